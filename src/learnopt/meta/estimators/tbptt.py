"""Truncated backpropagation through time (TBPTT) over the unroll.

The gradient of the truncation's meta-loss (the mean normalised training loss
over its steps, as in Metz et al. 2022, "Practical tradeoffs", arXiv:2203.11860,
App. D.1; ``meta.unroll.meta_loss``) with respect to ``theta``, by
``jax.value_and_grad`` through the ``lax.scan`` of the truncation (whose body is
wrapped in ``jax.checkpoint`` by ``TruncatedUnroll``: activations are recomputed in
the backward pass instead of stored). The inner state carried from one truncation to
the next is ``stop_gradient``-ed: the estimate ignores how earlier truncations'
theta shaped the state it starts from, which biases it toward short horizons
(Vicol et al. 2021, arXiv:2112.13835, §2; the reason arXiv:2203.11860 trains with
PES). With ``trunc_length == horizon`` and no random offset, one call is the exact
gradient of the full-run meta-loss: learned_optimization's ``FullGrad`` /
``TruncatedGrad`` with ``loss_type='avg'`` (``outer_trainers/full_grad.py``,
``truncated_grad.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from learnopt.compilation import jit_program
from learnopt.learned.base import MetaParams
from learnopt.meta.estimators.base import Estimate, GradientEstimator
from learnopt.meta.unroll import TruncatedUnroll, UnrollState, meta_loss
from learnopt.trees import tree_all_finite


class TBPTTState(NamedTuple):
    """The inner state of the unroll's tasks."""

    unroll_state: UnrollState


class TruncatedBPTT(GradientEstimator):
    """Backprop through one truncation of ``unroll``; the state between truncations is constant.

    Args:
      unroll: the truncated unroll (one shared ``theta`` for all its tasks).
      jit: compile :meth:`init_state` and :meth:`estimate`.
    """

    name = "tbptt"

    def __init__(self, unroll: TruncatedUnroll, jit: bool = True):
        self.unroll = unroll
        self._init = jit_program(self._init_state) if jit else self._init_state
        self._estimate = jit_program(self._estimate_impl) if jit else self._estimate_impl

    def init_state(self, theta: MetaParams, key: jax.Array) -> TBPTTState:
        return self._init(theta, key)

    def estimate(self, theta: MetaParams, state: TBPTTState, key: jax.Array) -> Estimate:
        return self._estimate(theta, state, key)

    def _init_state(self, theta: MetaParams, key: jax.Array) -> TBPTTState:
        return TBPTTState(self.unroll.init_state(theta, key))

    def _estimate_impl(self, theta: MetaParams, state: TBPTTState, key: jax.Array) -> Estimate:
        start = jax.lax.stop_gradient(state.unroll_state)

        def loss_fn(th):
            new_state, out = self.unroll.unroll(th, start, key)
            return meta_loss(out), (new_state, out)

        (loss, (new_state, out)), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        new_state = jax.lax.stop_gradient(new_state)
        metrics = {
            "tbptt/meta_loss": loss,
            "tbptt/num_resets": jnp.sum(out.is_reset),
            "tbptt/nonfinite_inner_losses": jnp.sum(~jnp.isfinite(out.raw_losses)),
            "tbptt/grad_finite": tree_all_finite(grad),
            "tbptt/mean_inner_step": jnp.mean(new_state.step.astype(jnp.float32)),
        }
        return Estimate(loss, grad, TBPTTState(new_state), metrics)
