"""NAdamW: Nesterov Adam with AdamW-style weight decay and a cosine schedule.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.1 and App. F.1, Eqs. 10-21; the schedule (Eqs. 4-9) is in
:mod:`learnopt.optimizers.schedules`. The ten hyperparameters of App. F.1 are the fields of
:class:`NAdamWConfig`.

The update follows the printed equations with two typos fixed (the sign of Eq. 20, the scale
of the L2 term of Eq. 13); ``use_nesterov`` mixes the heavy-ball and Nesterov updates
arithmetically, so every hyperparameter may be a traced array and a sweep can vmap over
configurations. ``num_steps`` is required (the schedule needs it). The transformation returns
updates to add and ignores extra keyword arguments such as ``loss=``. Equations:
docs/derivations.md §4.2; how this differs from the paper and the released library, and why:
docs/departures.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.optimizers._validate import check_learning_rate, check_num_steps, check_range
from learnopt.optimizers.schedules import Schedule, cosine_warmup_schedule


class NAdamWState(NamedTuple):
    """``count``: updates applied so far (int32); ``mu``, ``nu``: Eqs. 14-15."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _check_hparams(
    *,
    learning_rate: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    l2_wd: Any,
    adamw_wd: Any,
    warmup_fraction: Any,
    constant_fraction: Any,
    min_lr_mult: Any,
) -> None:
    check_learning_rate(learning_rate)
    check_range(beta1, "beta1", 0.0, 1.0, high_open=True)
    check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
    check_range(eps, "eps", 0.0, math.inf)
    check_range(l2_wd, "l2_wd", 0.0, math.inf)
    check_range(adamw_wd, "adamw_wd", 0.0, math.inf)
    check_range(warmup_fraction, "warmup_fraction", 0.0, 1.0)
    check_range(constant_fraction, "constant_fraction", 0.0, 1.0)
    check_range(min_lr_mult, "min_lr_mult", 0.0, 1.0)


def _is_literal_zero(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == 0


def nadamw(
    learning_rate: Any = 1e-3,
    beta1: Any = 0.9,
    beta2: Any = 0.999,
    eps: Any = 1e-8,
    l2_wd: Any = 0.0,
    adamw_wd: Any = 0.0,
    use_nesterov: Any = True,
    warmup_fraction: Any = 0.0,
    constant_fraction: Any = 0.0,
    min_lr_mult: Any = 0.0,
    *,
    num_steps: Any,
) -> optax.GradientTransformationExtraArgs:
    """NAdamW of arXiv:2203.11860, App. F.1 (Eqs. 4-21) as an optax transformation.

    Args:
      learning_rate: ``alpha_base``, the peak of the schedule.
      beta1, beta2: moment decay rates, in [0, 1).
      eps: added to ``sqrt(vhat)`` (Eqs. 18-19), >= 0.
      l2_wd: coupled L2 strength: ``l2_wd * phi`` is added to the gradient (Eq. 13).
      adamw_wd: decoupled (AdamW) decay: ``-alpha * adamw_wd * phi`` (Eq. 21).
      use_nesterov: ``b_use_nesterov``; True uses ``u_nes`` (Eq. 19), False ``u_hb``.
      warmup_fraction, constant_fraction, min_lr_mult: the schedule (Eqs. 4-9),
        see :func:`learnopt.optimizers.schedules.cosine_warmup_schedule`.
      num_steps: ``T``, the run length the schedule spans (required).

    Concrete values are range-checked (ValueError); traced ones pass unchecked.
    ``update`` needs ``params`` unless both weight decays are literally 0.
    All choices are listed in docs/departures.md.
    """
    check_num_steps(num_steps)
    _check_hparams(
        learning_rate=learning_rate,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        l2_wd=l2_wd,
        adamw_wd=adamw_wd,
        warmup_fraction=warmup_fraction,
        constant_fraction=constant_fraction,
        min_lr_mult=min_lr_mult,
    )
    schedule = cosine_warmup_schedule(
        learning_rate,
        num_steps,
        warmup_fraction=warmup_fraction,
        constant_fraction=constant_fraction,
        min_lr_mult=min_lr_mult,
    )
    needs_params = not (_is_literal_zero(l2_wd) and _is_literal_zero(adamw_wd))
    nesterov = float(use_nesterov) if isinstance(use_nesterov, bool | np.bool_) else None

    def init_fn(params: optax.Params) -> NAdamWState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return NAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update_fn(
        updates: optax.Updates, state: NAdamWState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, NAdamWState]:
        if params is None:
            if needs_params:
                raise ValueError(
                    "nadamw with nonzero l2_wd or adamw_wd needs params: "
                    "call update(grads, state, params)"
                )
            params = jax.tree.map(jnp.zeros_like, updates)
        b = jnp.asarray(use_nesterov, jnp.float32) if nesterov is None else nesterov
        alpha = schedule(state.count)
        t1 = (state.count + 1).astype(jnp.float32)
        # 1 - beta^(t+1) as -expm1((t+1) log1p(-(1 - beta))): accurate in float32 for
        # beta near 1 (F.2 samples 1 - beta2 down to 1e-5), where 1 - beta**t is not.
        bc1 = -jnp.expm1(t1 * jnp.log1p(-jnp.asarray(1.0 - beta1, jnp.float32)))
        bc2 = -jnp.expm1(t1 * jnp.log1p(-jnp.asarray(1.0 - beta2, jnp.float32)))

        grads = jax.tree.map(lambda g, p: g + l2_wd * p, updates, params)  # Eq. 13
        mu = jax.tree.map(lambda m, g: beta1 * m + (1.0 - beta1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1.0 - beta2) * g * g, state.nu, grads)

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array, p: jax.Array) -> jax.Array:
            mhat = m / bc1  # Eq. 16
            denom = jnp.sqrt(v / bc2) + eps  # Eqs. 17-19
            u_hb = mhat / denom
            u_nes = (beta1 * mhat + (1.0 - beta1) * g) / denom
            step = (1.0 - b) * u_hb + b * u_nes + adamw_wd * p  # Eqs. 20-21
            return (-alpha * step).astype(g.dtype)

        new_updates = jax.tree.map(leaf, grads, mu, nu, params)
        return new_updates, NAdamWState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

    return optax.with_extra_args_support(optax.GradientTransformation(init_fn, update_fn))


@dataclasses.dataclass(frozen=True)
class NAdamWConfig:
    """The ten NAdamW hyperparameters of arXiv:2203.11860, App. F.1.

    Defaults: Adam's usual ``learning_rate=1e-3, beta1=0.9, beta2=0.999,
    eps=1e-8``, Nesterov on, no weight decay, no warm-up, no constant phase and
    ``min_lr_mult=0``: a plain cosine decay from ``learning_rate`` to 0 over
    the run. Values are checked on construction (ValueError naming the field
    and its accepted range) and stored as Python floats / bool, so
    :meth:`to_dict` is JSON-serialisable.
    """

    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    l2_wd: float = 0.0
    adamw_wd: float = 0.0
    use_nesterov: bool = True
    warmup_fraction: float = 0.0
    constant_fraction: float = 0.0
    min_lr_mult: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.use_nesterov, bool | np.bool_):
            raise ValueError(f"use_nesterov must be a bool, got {self.use_nesterov!r}")
        object.__setattr__(self, "use_nesterov", bool(self.use_nesterov))
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.pop("use_nesterov")
        for name, value in values.items():
            if isinstance(value, jax.core.Tracer) or isinstance(value, bool | np.bool_):
                raise ValueError(f"{name} must be a concrete real number, got {value!r}")
        _check_hparams(**values)
        for name, value in values.items():
            object.__setattr__(self, name, float(np.asarray(value)))

    def to_dict(self) -> dict[str, Any]:
        """The ten fields as a plain ``{name: float | bool}`` dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NAdamWConfig:
        """Inverse of :meth:`to_dict`; every field must be present, no others."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(
                f"NAdamWConfig.from_dict: unknown keys {unknown}, missing keys {missing}; "
                f"expected exactly {names}"
            )
        return cls(**{n: data[n] for n in names})

    def schedule(self, num_steps: int) -> Schedule:
        """The learning-rate schedule (Eqs. 4-9) for a run of ``num_steps`` updates."""
        return cosine_warmup_schedule(
            self.learning_rate,
            num_steps,
            warmup_fraction=self.warmup_fraction,
            constant_fraction=self.constant_fraction,
            min_lr_mult=self.min_lr_mult,
        )

    def optimizer(self, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """:func:`nadamw` with these hyperparameters for a run of ``num_steps`` updates."""
        return nadamw(**self.to_dict(), num_steps=num_steps)


def nadamw_from_config(
    config: NAdamWConfig, num_steps: int
) -> optax.GradientTransformationExtraArgs:
    """Same as ``config.optimizer(num_steps)``."""
    return config.optimizer(num_steps)
