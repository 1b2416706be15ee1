"""The outer learner: applies meta-gradients to theta.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in
learned optimizers" (arXiv:2203.11860, App. D.1) meta-train with Adam and "gradient
clipping at 3.0 applied to each gradient value independently" (an elementwise clip,
not a global-norm clip), with no learning-rate schedule; Metz et al. 2020 (arXiv:2009.11243,
App. B) clip each value at 0.1 ("without this clipping no training occurs"), warm up Adam's
statistics by "setting the outer-learning rate to zero for the first 300 outer-iterations"
(``warmup="zero"``) and throw away gradients "from more than five outer-iterations away from
the current weights" (``max_staleness=5``, the default here).

The outer optimizer is an optax chain (elementwise clip, Adam) inside
``optax.inject_hyperparams``: the base learning rate lives in the optimizer state, so it can
be changed on a running learner (:meth:`Learner.set_learning_rate`, for a population) and is
checkpointed with it; the step's rate is that base rate times a warm-up and schedule
multiplier (:func:`lr_multiplier`) of the number of applied updates.

The learner guards meta-training against bad estimates: a meta-gradient with any non-finite
entry is dropped (theta and the outer optimizer state are left unchanged) and counted
(``num_dropped``), so a NaN in one inner run never kills meta-training. A gradient computed
at a theta read at learner step ``version`` is dropped as stale, and counted (``num_stale``),
when ``step - version > max_staleness``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.trees import tree_all_finite

WARMUPS = ("linear", "zero")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The outer learner's hyperparameters (JSON-ready through :meth:`to_dict`).

    ``learning_rate`` is Adam's base rate; the rate of update ``t`` (0-based, counting
    applied updates) is ``learning_rate * lr_multiplier(t)``:

    - warm-up, ``t < warmup_steps``: ``t / warmup_steps`` (``warmup="linear"``, as
      ``optax.linear_schedule(0, 1, warmup_steps)``) or 0 (``warmup="zero"``: Adam's moments
      are filled while theta stays put, Metz et al. 2020, arXiv:2009.11243, App. B);
    - then ``schedule`` over ``s = t - warmup_steps`` of ``D = total_steps - warmup_steps``
      steps: ``"constant"`` 1; ``"linear"`` ``1 - (1 - final_fraction) s / D``; ``"cosine"``
      ``final_fraction + (1 - final_fraction) (1 + cos(pi s / D)) / 2``; past ``total_steps``
      the multiplier stays at ``final_fraction``.

    ``clip``: each meta-gradient value is clipped to ``[-clip, clip]`` before Adam; 0 or None
    turns the clip off. ``max_staleness``: see the module docstring; None accepts any age.
    """

    learning_rate: float = 3e-4
    clip: float | None = 3.0
    warmup_steps: int = 0
    warmup: str = "linear"
    schedule: str = "constant"
    total_steps: int | None = None
    final_fraction: float = 0.0
    max_staleness: int | None = 5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)

        def count(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name} must be an integer >= 0{' or None' if optional else ''}, "
                    f"got {value!r}"
                )

        if number("learning_rate") <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.clip is not None and number("clip") < 0:
            raise ValueError(f"clip must be >= 0 (0 or None: no clip), got {self.clip!r}")
        count("warmup_steps")
        count("max_staleness", optional=True)
        count("total_steps", optional=True)
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warmup {self.warmup!r}; valid: {', '.join(WARMUPS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        if self.schedule != "constant" and (
            self.total_steps is None or self.total_steps <= self.warmup_steps
        ):
            raise ValueError(
                f"schedule {self.schedule!r} needs total_steps > warmup_steps "
                f"({self.warmup_steps}), got total_steps={self.total_steps!r}"
            )
        if not 0.0 <= number("final_fraction") <= 1.0:
            raise ValueError(f"final_fraction must be in [0, 1], got {self.final_fraction!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= number(name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if number("eps") <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LearnerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown learner config fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)


def lr_multiplier(config: LearnerConfig) -> Callable[[Any], jax.Array]:
    """``multiplier(t)``: warm-up then schedule factor of update ``t`` (LearnerConfig)."""
    w, kind, f = config.warmup_steps, config.schedule, config.final_fraction
    decay = float(config.total_steps - w) if kind != "constant" else 1.0

    def multiplier(t: Any) -> jax.Array:
        t = jnp.asarray(t, jnp.float32)
        s = jnp.clip(t - w, 0.0, decay) / decay
        if kind == "cosine":
            after = f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * s))
        elif kind == "linear":
            after = 1.0 - (1.0 - f) * s
        else:
            after = jnp.ones_like(t)
        if w == 0:
            return after
        warm = t / w if config.warmup == "linear" else jnp.zeros_like(t)
        return jnp.where(t < w, warm, after)

    return multiplier


def _clipped_adam(
    learning_rate: Any, lr_multiplier: Any, b1: Any, b2: Any, eps: Any, clip: float | None
) -> optax.GradientTransformation:
    parts = [optax.clip(clip)] if clip else []
    return optax.chain(*parts, optax.adam(learning_rate * lr_multiplier, b1=b1, b2=b2, eps=eps))


def outer_optimizer(
    learning_rate: float | LearnerConfig, clip: float | None = 3.0
) -> optax.GradientTransformation:
    """Adam after an elementwise clip to ``[-clip, clip]``, with the rate in its state.

    ``learning_rate`` is a number (then ``clip`` applies, no warm-up or schedule) or a
    :class:`LearnerConfig`. The state is ``optax.inject_hyperparams``'s: its ``hyperparams``
    hold ``learning_rate`` (the base rate; change it there) and ``lr_multiplier``.
    """
    if not isinstance(learning_rate, LearnerConfig):
        learning_rate = LearnerConfig(learning_rate=learning_rate, clip=clip)
    c = learning_rate
    return optax.inject_hyperparams(_clipped_adam, static_args=("clip",),
                                    hyperparam_dtype=jnp.float32)(
        learning_rate=c.learning_rate, lr_multiplier=lr_multiplier(c), b1=c.b1, b2=c.b2,
        eps=c.eps, clip=c.clip or None,
    )


class LearnerState(NamedTuple):
    theta: Any
    opt_state: Any  # optax.InjectStatefulHyperparamsState
    step: jax.Array  # outer updates applied (the version of theta)
    num_dropped: jax.Array  # gradients dropped for non-finite values
    num_stale: jax.Array  # gradients dropped as older than max_staleness


class Learner:
    """``init(theta) -> LearnerState``; ``apply(state, grad, version=None) -> (state, applied)``.

    ``Learner(learning_rate, clip, max_staleness, **other LearnerConfig fields)`` or
    ``Learner.from_config(LearnerConfig(...))``; ``learner.config`` is the LearnerConfig.

    ``optimizer``: another outer optimizer (an optax transformation) in place of the clipped
    Adam, e.g. a learned one (:func:`learnopt.meta.learned_outer.learned_outer_optimizer`);
    ``learning_rate`` and ``clip`` then do not apply (the learning-rate methods need the
    default optimizer), and an update with a non-finite value is dropped like a non-finite
    meta-gradient. Keyword arguments of :meth:`apply` go to its ``update``.
    """

    def __init__(
        self,
        learning_rate: float = 3e-4,
        clip: float | None = 3.0,
        max_staleness: int | None = 5,
        optimizer: optax.GradientTransformation | None = None,
        **config: Any,
    ):
        self.config = LearnerConfig(
            learning_rate=learning_rate, clip=clip, max_staleness=max_staleness, **config
        )
        self.max_staleness = self.config.max_staleness
        self.multiplier = lr_multiplier(self.config)
        self.custom = optimizer is not None
        self.opt = outer_optimizer(self.config) if optimizer is None else optimizer
        self._apply = jax.jit(self._apply_impl)

    @classmethod
    def from_config(cls, config: LearnerConfig | Mapping[str, Any]) -> Learner:
        if not isinstance(config, LearnerConfig):
            config = LearnerConfig.from_dict(config)
        return cls(**config.to_dict())

    def init(self, theta) -> LearnerState:
        zero = jnp.asarray(0, jnp.int32)
        return LearnerState(theta, self.opt.init(theta), zero, zero, zero)

    # -- the learning rate ---------------------------------------------------------------
    def learning_rate(self, state: LearnerState) -> float:
        """The base learning rate held in ``state`` (before warm-up and schedule)."""
        return float(state.opt_state.hyperparams["learning_rate"])

    def learning_rate_at(self, state: LearnerState, step: int | None = None) -> float:
        """The rate update ``step`` (default: the next one, ``state.step``) will use."""
        step = int(state.step) if step is None else step
        return self.learning_rate(state) * float(self.multiplier(step))

    def set_learning_rate(self, state: LearnerState, learning_rate: float) -> LearnerState:
        """``state`` with a new base learning rate, used from the next :meth:`apply` on."""
        LearnerConfig(learning_rate=learning_rate)  # validates
        hp = dict(state.opt_state.hyperparams)
        hp["learning_rate"] = jnp.asarray(learning_rate, hp["learning_rate"].dtype)
        return state._replace(opt_state=state.opt_state._replace(hyperparams=hp))

    # -- updates -------------------------------------------------------------------------
    def _apply_impl(self, state: LearnerState, grad, fresh: jax.Array, extra=None):
        finite = tree_all_finite(grad)
        ok = fresh & finite
        safe_grad = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grad)
        updates, new_opt = self.opt.update(safe_grad, state.opt_state, state.theta,
                                           **(extra or {}))
        if self.custom:  # a learned outer optimizer may itself produce non-finite steps
            finite = finite & tree_all_finite(updates)
            ok = fresh & finite
        new_theta = optax.apply_updates(state.theta, updates)
        pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = LearnerState(
            theta=pick(new_theta, state.theta),
            opt_state=pick(new_opt, state.opt_state),
            step=state.step + ok.astype(state.step.dtype),
            num_dropped=state.num_dropped + (fresh & ~finite).astype(state.num_dropped.dtype),
            num_stale=state.num_stale + (~fresh).astype(state.num_stale.dtype),
        )
        return new_state, ok

    def staleness(self, state: LearnerState, version: int | None) -> int:
        """``state.step - version`` (0 for None); a version ahead of the learner raises."""
        if version is None:
            return 0
        age = int(state.step) - int(version)
        if age < 0:
            raise ValueError(
                f"gradient version {version} is ahead of the learner (step {int(state.step)})"
            )
        return age

    def apply(
        self, state: LearnerState, grad, version: int | None = None, **extra_args: Any
    ) -> tuple[LearnerState, bool]:
        """Apply one meta-gradient computed at the theta of learner step ``version``
        (None: the current theta); returns whether it was applied (fresh and finite).
        ``extra_args`` (e.g. ``loss=``, ``outer_theta=`` of a learned outer optimizer) are
        passed to the outer optimizer's ``update``."""
        fresh = self.max_staleness is None or self.staleness(state, version) <= self.max_staleness
        extra = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in extra_args.items()}
        state, ok = self._apply(state, grad, jnp.asarray(fresh), extra or None)
        return state, bool(ok)

    def aggregate(self, grads: Sequence[tuple[Any, int]], current_step: int):
        """Average ``(grad, theta_step)`` pairs, dropping stale and non-finite ones.

        ``theta_step`` is the outer step of the theta a worker computed its
        gradient at. Returns ``(mean_grad or None, num_used)``.
        """
        fresh = [
            g
            for g, s in grads
            if (self.max_staleness is None or current_step - s <= self.max_staleness)
            and bool(tree_all_finite(g))
        ]
        if not fresh:
            return None, 0
        mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *fresh)
        return mean, len(fresh)
