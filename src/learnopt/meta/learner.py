"""The outer learner: applies meta-gradients to theta.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in
learned optimizers" (arXiv:2203.11860, App. D.1) meta-train with Adam and "gradient
clipping at 3.0 applied to each gradient value independently" (an elementwise clip,
not a global-norm clip), with no learning-rate schedule. The learner also guards
meta-training against bad estimates: a meta-gradient with any non-finite entry is
dropped (theta and the outer optimizer state are left unchanged) and counted, so a NaN
in one inner run never kills meta-training. Several gradients (from several estimators
or workers) are averaged first; a gradient older than ``max_staleness`` outer steps is
dropped as stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.trees import tree_all_finite


class LearnerState(NamedTuple):
    theta: Any
    opt_state: Any
    step: jax.Array  # outer steps applied
    num_dropped: jax.Array  # gradients dropped for non-finite values


def outer_optimizer(learning_rate: float, clip: float = 3.0) -> optax.GradientTransformation:
    """Adam after an elementwise clip of each meta-gradient value to [-clip, clip]."""
    if learning_rate <= 0:
        raise ValueError(f"outer learning rate must be > 0, got {learning_rate}")
    parts = [optax.clip(clip)] if clip and clip > 0 else []
    return optax.chain(*parts, optax.adam(learning_rate))


class Learner:
    """``init(theta) -> LearnerState``; ``apply(state, grad) -> (state, applied)``."""

    def __init__(self, learning_rate: float, clip: float = 3.0, max_staleness: int = 0):
        self.opt = outer_optimizer(learning_rate, clip)
        self.max_staleness = max_staleness
        self._apply = jax.jit(self._apply_impl)

    def init(self, theta) -> LearnerState:
        return LearnerState(theta, self.opt.init(theta), jnp.asarray(0), jnp.asarray(0))

    def _apply_impl(self, state: LearnerState, grad) -> tuple[LearnerState, jax.Array]:
        ok = tree_all_finite(grad)
        safe_grad = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grad)
        updates, new_opt = self.opt.update(safe_grad, state.opt_state, state.theta)
        new_theta = optax.apply_updates(state.theta, updates)
        pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = LearnerState(
            theta=pick(new_theta, state.theta),
            opt_state=pick(new_opt, state.opt_state),
            step=state.step + ok.astype(state.step.dtype),
            num_dropped=state.num_dropped + (~ok).astype(state.num_dropped.dtype),
        )
        return new_state, ok

    def apply(self, state: LearnerState, grad) -> tuple[LearnerState, bool]:
        """Apply one meta-gradient; returns whether it was applied (finite)."""
        state, ok = self._apply(state, grad)
        return state, bool(ok)

    def aggregate(self, grads: Sequence[tuple[Any, int]], current_step: int):
        """Average ``(grad, theta_step)`` pairs, dropping stale and non-finite ones.

        ``theta_step`` is the outer step of the theta a worker computed its
        gradient at. Returns ``(mean_grad or None, num_used)``.
        """
        fresh = [
            g
            for g, s in grads
            if current_step - s <= self.max_staleness and bool(tree_all_finite(g))
        ]
        if not fresh:
            return None, 0
        mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *fresh)
        return mean, len(fresh)
