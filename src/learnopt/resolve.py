"""An optimizer named on the command line: a shipped pretrained name, a meta-training run
directory, or a hand-designed optimizer with its hyperparameters.

Forms of ``spec``:

* ``small_fc_lopt_general``: a shipped pretrained optimizer (``learnopt optimizers``);
* ``runs/general``: a meta-training run directory (its latest ``theta.msgpack``);
* ``adam``, ``adam:lr=3e-3``, ``momentum:lr=0.1,momentum=0.95``, ``nadamw:lr=1e-3,adamw_wd=1e-4``:
  a hand-designed optimizer of :mod:`learnopt.optimizers.registry` and its options
  (``lr`` is the learning rate; the optimizer's defaults fill the rest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optax


@dataclasses.dataclass(frozen=True)
class NamedOptimizer:
    """An optimizer ready to build for any run length: ``make(num_steps)``."""

    label: str
    make: Callable[[int], optax.GradientTransformationExtraArgs]
    setting: str
    kind: str  # "pretrained", "run" or "hand"


def learned_from_spec(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(lopt, theta, metadata)`` of a shipped pretrained name or a run directory."""
    from learnopt import pretrained

    if spec in pretrained.available():
        return pretrained.load(spec)
    run = Path(spec)
    if (run / "config.json").is_file():
        from learnopt.learned.registry import learned_optimizer_from_config
        from learnopt.meta.train import MetaTrainConfig, load_theta

        if not (run / "theta.msgpack").is_file():
            raise FileNotFoundError(f"{run} is a meta-training run without a theta.msgpack yet")
        config = MetaTrainConfig.from_json((run / "config.json").read_text())
        lopt = learned_optimizer_from_config(config.lopt, config.lopt_config)
        return lopt, load_theta(run, lopt), {"architecture": config.lopt, "run": str(run)}
    raise ValueError(f"{spec!r} is neither a shipped pretrained optimizer "
                     f"({', '.join(pretrained.available())}) nor a meta-training run directory")


def _hand_options(text: str, spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{spec!r}: options are key=value pairs separated by commas, "
                             f"e.g. adam:lr=3e-3")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{spec!r}: option {key!r} needs a number, got {value!r}") from None
    return options


def resolve_optimizer(spec: str, learning_rate: float | None = None) -> NamedOptimizer:
    """The optimizer ``spec`` names (see the module docstring); ``ValueError`` if none.

    ``learning_rate`` (``learnopt train --lr``) is the learning rate of a hand-designed
    ``spec`` (as ``:lr=`` would be); a learned optimizer takes none."""
    from learnopt import pretrained
    from learnopt.optimizers.registry import OPTIMIZERS, get_optimizer

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"an optimizer spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    if name in OPTIMIZERS:
        options = _hand_options(rest, spec)
        lr = options.pop("lr", None)
        if learning_rate is not None:
            if lr is not None and lr != learning_rate:
                raise ValueError(f"two learning rates: {spec!r} and --lr {learning_rate:g}; "
                                 "give one")
            lr = learning_rate
        get_optimizer(name, lr, num_steps=1, **options)  # validate now, not mid-benchmark
        setting = ", ".join(f"{k}={v:g}" for k, v in
                            {"lr": lr or OPTIMIZERS[name].default_learning_rate,
                             **options}.items())
        return NamedOptimizer(spec, lambda n: get_optimizer(name, lr, num_steps=n, **options),
                              setting, "hand")
    if learning_rate is not None:
        raise ValueError(f"--lr {learning_rate:g} sets the learning rate of a hand-designed "
                         f"optimizer ({', '.join(OPTIMIZERS)}); {spec!r} is not one (a "
                         "learned optimizer takes no learning rate)")
    if spec in pretrained.available():
        return NamedOptimizer(spec, lambda n: pretrained.optimizer(spec, n),
                              pretrained.describe(spec), "pretrained")
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"unknown optimizer {spec!r}: not a shipped pretrained optimizer "
                         f"({', '.join(pretrained.available())}), a meta-training run "
                         f"directory, or a hand-designed optimizer ({', '.join(OPTIMIZERS)}, "
                         f"e.g. adam:lr=3e-3)")
    lopt, theta, _ = learned_from_spec(spec.rstrip("/"))
    label = Path(spec.rstrip("/")).name
    return NamedOptimizer(label, lambda n: lopt.optimizer(theta, n),
                          f"{lopt.name} from {spec}", "run")
