"""Named hand-designed optimizers: ``get_optimizer(name, ...)`` and their listing.

The baselines of Metz et al. 2022 (arXiv:2203.11860), §2.1 and App. F: ``sgd``,
``momentum`` (SGDM, heavy ball, 0.9), ``adam`` and ``nadamw``. Every optimizer
returned is an ``optax.GradientTransformationExtraArgs`` whose ``update``
accepts and ignores extra keyword arguments such as ``loss=``, exactly like the
learned optimizers, so inner training and benchmarks never special-case them.

Default learning rates (used when ``learning_rate`` is None), all on
:data:`learnopt.optimizers.search.LR_GRID` except where noted:

* ``sgd``: 0.1.
* ``momentum``: 0.01; with momentum 0.9 the steady-state step is ten times the
  learning rate, so this matches SGD's 0.1.
* ``adam``: 1e-3, the default of Kingma & Ba.
* ``nadamw``: 1e-3 (``NAdamWConfig``'s default, Adam's usual value; the
  released library's NAdamW defaults to 1e-4).

These are starting points; the paper tunes SGD/SGDM/Adam over ``LR_GRID`` and
NAdamW by random search (:mod:`learnopt.optimizers.search`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import optax

from learnopt.optimizers import hand
from learnopt.optimizers._validate import check_learning_rate, check_num_steps
from learnopt.optimizers.nadamw import NAdamWConfig, nadamw


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer: its name, a one-line description and its builder.

    ``build(learning_rate, num_steps, **options)`` makes the transformation;
    ``options`` names the extra keyword arguments it accepts.
    """

    name: str
    description: str
    default_learning_rate: float
    needs_num_steps: bool
    options: tuple[str, ...]
    build: Callable[..., optax.GradientTransformationExtraArgs]


def _build_sgd(learning_rate: Any, num_steps: Any) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return hand.sgd(learning_rate)


def _build_momentum(
    learning_rate: Any, num_steps: Any, **options: Any
) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return hand.sgdm(learning_rate, **options)


def _build_adam(
    learning_rate: Any, num_steps: Any, **options: Any
) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return hand.adam(learning_rate, **options)


_NADAMW_FIELDS = tuple(f.name for f in dataclasses.fields(NAdamWConfig))


def _build_nadamw(
    learning_rate: Any, num_steps: Any, config: NAdamWConfig | None = None, **options: Any
) -> optax.GradientTransformationExtraArgs:
    check_num_steps(num_steps)
    if config is None:
        config = NAdamWConfig()
    if not isinstance(config, NAdamWConfig):
        raise ValueError(f"config must be an NAdamWConfig, got {type(config).__name__}")
    hparams = config.to_dict()
    hparams.update(options)
    hparams["learning_rate"] = learning_rate
    return nadamw(**hparams, num_steps=num_steps)


_REGISTRY: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo(
            name="sgd",
            description="SGD, phi -= lr * g (arXiv:2203.11860 §2.1); default lr 0.1",
            default_learning_rate=0.1,
            needs_num_steps=False,
            options=(),
            build=_build_sgd,
        ),
        OptimizerInfo(
            name="momentum",
            description="SGD with heavy-ball momentum 0.9 (SGDM, arXiv:2203.11860 §2.1); "
            "default lr 0.01",
            default_learning_rate=0.01,
            needs_num_steps=False,
            options=("momentum",),
            build=_build_momentum,
        ),
        OptimizerInfo(
            name="adam",
            description="Adam, b1=0.9 b2=0.999 eps=1e-8 (arXiv:2203.11860 §2.1); default lr 1e-3",
            default_learning_rate=1e-3,
            needs_num_steps=False,
            options=("b1", "b2", "eps"),
            build=_build_adam,
        ),
        OptimizerInfo(
            name="nadamw",
            description=(
                "Nesterov Adam + AdamW decay + cosine warm-up schedule, 10 hyperparameters "
                "(arXiv:2203.11860 App. F); needs num_steps; default lr 1e-3"
            ),
            default_learning_rate=NAdamWConfig().learning_rate,
            needs_num_steps=True,
            options=("config",) + tuple(n for n in _NADAMW_FIELDS if n != "learning_rate"),
            build=_build_nadamw,
        ),
    )
}

#: Read-only ``{name: OptimizerInfo}`` in registration order.
OPTIMIZERS: Mapping[str, OptimizerInfo] = MappingProxyType(_REGISTRY)


def list_optimizers() -> list[tuple[str, str]]:
    """``[(name, one-line description), ...]`` of the registered optimizers."""
    return [(info.name, info.description) for info in OPTIMIZERS.values()]


def get_optimizer(
    name: str,
    learning_rate: Any = None,
    num_steps: int | None = None,
    **kw: Any,
) -> optax.GradientTransformationExtraArgs:
    """The hand-designed optimizer ``name`` as an optax transformation.

    Args:
      name: one of ``sgd``, ``momentum``, ``adam``, ``nadamw``.
      learning_rate: finite and > 0; None picks the documented default. For
        ``sgd``/``momentum``/``adam`` it may also be an optax schedule.
      num_steps: the run length; required by ``nadamw`` (its schedule), ignored
        by the others so callers can pass it uniformly.
      **kw: per-optimizer options: ``momentum`` for ``momentum``; ``b1``, ``b2``,
        ``eps`` for ``adam``; for ``nadamw`` an ``NAdamWConfig`` as ``config=``
        and/or any of its fields (these override the config; ``learning_rate``
        overrides ``config.learning_rate`` when given).

    Raises:
      ValueError: unknown name (the message lists the valid names), unknown
        option, missing ``num_steps`` for ``nadamw``, or a learning rate that is
        not a finite positive number.
    """
    info = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if info is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    unknown = sorted(set(kw) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) if info.options else "none"
        raise ValueError(
            f"optimizer {name!r} got unexpected options {unknown}; accepted options: {accepted}"
        )
    if learning_rate is None:
        config = kw.get("config")
        if name == "nadamw" and isinstance(config, NAdamWConfig):
            learning_rate = config.learning_rate
        else:
            learning_rate = info.default_learning_rate
    check_learning_rate(learning_rate)
    if info.needs_num_steps:
        check_num_steps(num_steps)
    return info.build(learning_rate, num_steps, **kw)
