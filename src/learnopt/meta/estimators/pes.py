r"""Persistent Evolution Strategies (PES) and truncated ES.

PES (Vicol, Metz and Sohl-Dickstein 2021, "Unbiased Gradient Estimation in
Unrolled Computation Graphs with Persistent Evolution Strategies", arXiv:2112.13835)
is the estimator of Metz et al. 2022, "Practical tradeoffs between memory, compute,
and performance in learned optimizers" (arXiv:2203.11860, App. D.1): antithetic
pairs with perturbation std 0.01, truncations of 20 steps of inner runs of 2,000
steps, 8 tasks per worker. Truncated ES is the same estimator without the
accumulator (``accumulate=False``).

**Estimate.** Each task ``i`` draws ``eps_i ~ N(0, std^2 I)`` over all of
``theta`` and unrolls ``theta + eps_i`` and ``theta - eps_i`` for one
truncation on the same batches and keys (same unroll key, same state
structure; see ``meta.unroll``). With ``l^\pm_{i,t}`` the normalised training
losses and ``w_{i,t} = mask_{i,t} / sum_t mask_{i,t}``,

    L^\pm_i     = sum_t w_{i,t} l^\pm_{i,t}                 (the truncation meta-loss)
    c_i         = (L^+_i - L^-_i) / (2 std^2)
    c^{pre}_i   = sum_{t < r_i} w_{i,t} (l^+_{i,t} - l^-_{i,t}) / (2 std^2)
    g_i         = c_i eps_i + c^{pre}_i A_i
    g           = mean_i g_i
    A_i        <- A_i + eps_i   if task i did not reset in this truncation, else eps_i

where ``r_i`` is the first step of the truncation at which task ``i`` reset
(``r_i = T`` when it did not) and ``A_i`` is the sum of the perturbations used
by task ``i``'s current run in earlier truncations. Without a reset,
``g_i = c_i (A_i + eps_i)``: the formula of learned_optimization's
``outer_trainers/truncated_pes.py``, the code released with arXiv:2203.11860.

**Derivation.** A run's loss at step ``t`` depends on every theta the run has
used: ``l^+_t = f_t(theta + e_1, ..., theta + e_k)`` for the perturbations
``e_1..e_k`` of the truncations since the run started (``e_k = eps_i`` the
current one). The Gaussian-smoothed objective ``F_t(theta) = E f_t(theta + e_1,
..., theta + e_k)`` has, by Stein's lemma applied to each ``e_j``,

    grad F_t = sum_j E[d f_t / d theta_j] = E[f_t(theta + e) * sum_{j<=k} e_j] / std^2.

Flipping every sign (``e -> -e`` preserves the distribution) gives the same
expectation from the minus member with a minus sign, so
``E[(l^+_t - l^-_t) / (2 std^2) * sum_{j<=k} e_j] = grad F_t``: the antithetic
normalisation is ``2 std^2`` (each member's perturbation has std ``std``, not
``2 std``). For a step before the reset, ``sum_{j<=k} e_j = A_i + eps_i``; for a
step at or after a reset, the run started in this truncation (the reset is
lazy, so even its fresh optimizer state is built with ``theta +- eps_i``) and the
sum is ``eps_i`` alone. Weighting by ``w_{i,t}`` and summing gives ``g_i`` above,
an unbiased estimate of the gradient of the smoothed truncation meta-loss
(the smoothing bias is ``O(std^2)``). Post-reset losses multiplied by ``A_i``
would still have zero mean (``A_i`` is independent of them) but only add
variance, so they are left out. Averaged over tasks whose inner steps are
uniform over ``[0, horizon)`` (random offsets, after every task's first reset),
``E g`` is the gradient of the mean training loss over a whole inner run, the
meta-objective of arXiv:2203.11860.

Departure from learned_optimization (``truncated_pes.compute_pes_grad``, the code of
arXiv:2203.11860): on a truncation with a reset the reference multiplies the whole
truncation's ``c_i`` by a mixture of ``A_i + eps_i`` (the fraction of steps
before the reset) and ``eps_i`` (the fraction after); its pre-reset losses then
lose part of their ``A_i`` term, a bias on those truncations that the per-step
split above removes. Like the reference, the first inner state is initialised
with the unperturbed ``theta`` (exact whenever the optimizer's initial state does
not depend on ``theta``, as for optax optimizers) and the accumulator starts at
zero.

**Truncated ES** (``accumulate=False``): ``g_i = c_i eps_i``; it ignores how the
truncation's losses depend on the theta of earlier truncations and is biased
toward short horizons.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from learnopt.learned.base import MetaParams
from learnopt.meta.estimators.base import (
    Estimate,
    GradientEstimator,
    batched_theta,
    sample_perturbations,
)
from learnopt.meta.unroll import (
    TruncatedUnroll,
    UnrollOutput,
    UnrollState,
    meta_loss_per_task,
)


class PESState(NamedTuple):
    """The inner states of the plus and minus members and the per-task accumulators.

    ``accumulator`` has ``theta``'s structure with a leading ``[num_tasks]`` axis.
    """

    pos: UnrollState
    neg: UnrollState
    accumulator: MetaParams


def _stack(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a, b)


def _unstack(tree: Any) -> tuple[Any, Any]:
    return (
        jax.tree_util.tree_map(lambda x: x[0], tree),
        jax.tree_util.tree_map(lambda x: x[1], tree),
    )


def pes_coefficients(
    pos: UnrollOutput, neg: UnrollOutput, std: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(c, c_pre, did_reset)``, each ``[N]``, from the two members' records.

    ``c`` weights the current perturbation, ``c_pre`` the accumulator (only the
    steps before the truncation's first reset), ``did_reset`` whether the task
    reset in this truncation. See the module docstring.
    """
    mask = pos.mask & neg.mask
    weights = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask, axis=0), 1)
    delta = jnp.where(mask, pos.losses - neg.losses, 0.0) * weights
    before_reset = jnp.cumsum(pos.is_reset.astype(jnp.int32), axis=0) == 0
    scale = 1.0 / (2.0 * std**2)
    c = jnp.sum(delta, axis=0) * scale
    c_pre = jnp.sum(jnp.where(before_reset, delta, 0.0), axis=0) * scale
    did_reset = jnp.any(pos.is_reset, axis=0)
    return c, c_pre, did_reset


class PES(GradientEstimator):
    """PES (``accumulate=True``, default) or truncated ES (``accumulate=False``).

    Args:
      unroll: the truncated unroll (its ``num_tasks`` antithetic pairs, its
        ``trunc_length``; arXiv:2203.11860 uses 8 tasks and truncations of 20).
      std: perturbation standard deviation (arXiv:2203.11860: 0.01).
      accumulate: keep the PES accumulators; ``False`` is truncated ES.
      jit: compile :meth:`init_state` and :meth:`estimate`.
    """

    def __init__(
        self, unroll: TruncatedUnroll, std: float = 0.01, accumulate: bool = True, jit: bool = True
    ):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.unroll = unroll
        self.std = float(std)
        self.accumulate = bool(accumulate)
        self.name = "pes" if self.accumulate else "truncated_es"
        self._init = jax.jit(self._init_state) if jit else self._init_state
        self._estimate = jax.jit(self._estimate_impl) if jit else self._estimate_impl

    def config(self) -> dict[str, Any]:
        """The options of ``meta.estimators.registry.build_estimator(self.name, ...)``."""
        return {"std": self.std}

    def init_state(self, theta: MetaParams, key: jax.Array) -> PESState:
        return self._init(theta, key)

    def estimate(self, theta: MetaParams, state: PESState, key: jax.Array) -> Estimate:
        return self._estimate(theta, state, key)[0]

    def estimate_with_samples(
        self, theta: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        """:meth:`estimate` and the per-task estimates ``g_i`` (leading ``[N]`` axis).

        ``grad`` is their mean; their spread gives the estimate's standard error.
        """
        return self._estimate(theta, state, key)

    def _init_state(self, theta: MetaParams, key: jax.Array) -> PESState:
        inner = self.unroll.init_state(theta, key)
        n = self.unroll.num_tasks
        accumulator = jax.tree_util.tree_map(
            lambda x: jnp.zeros((n, *jnp.shape(x)), jnp.result_type(x, jnp.float32)), theta
        )
        return PESState(inner, inner, accumulator)

    def _estimate_impl(
        self, theta: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        k_eps, k_unroll = jax.random.split(key)
        n = self.unroll.num_tasks
        eps = sample_perturbations(theta, k_eps, self.std, n)
        thetas = _stack(batched_theta(theta, eps, 1.0), batched_theta(theta, eps, -1.0))

        def run(theta_batch, inner):
            # Both members get the same key: identical batches, losses keys and resets.
            return self.unroll.unroll(theta_batch, inner, k_unroll, theta_batched=True)

        new_inner, outs = jax.vmap(run)(thetas, _stack(state.pos, state.neg))
        pos_state, neg_state = _unstack(new_inner)
        pos_out, neg_out = _unstack(outs)

        c, c_pre, did_reset = pes_coefficients(pos_out, neg_out, self.std)

        def per_task(coef, tree):
            return jax.tree_util.tree_map(
                lambda x: jnp.reshape(coef, (n,) + (1,) * (x.ndim - 1)).astype(x.dtype) * x, tree
            )

        samples = per_task(c, eps)
        accumulator = state.accumulator
        if self.accumulate:
            samples = jax.tree_util.tree_map(jnp.add, samples, per_task(c_pre, accumulator))

            def next_acc(a, e):
                keep = jnp.reshape(~did_reset, (n,) + (1,) * (e.ndim - 1))
                return jnp.where(keep, a + e, e)

            accumulator = jax.tree_util.tree_map(next_acc, accumulator, eps)
        grad = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), samples)

        loss_pos = meta_loss_per_task(pos_out)
        loss_neg = meta_loss_per_task(neg_out)
        meta_loss = jnp.mean(0.5 * (loss_pos + loss_neg))
        metrics = {
            f"{self.name}/meta_loss": meta_loss,
            f"{self.name}/delta_loss_abs_mean": jnp.mean(jnp.abs(loss_pos - loss_neg)),
            f"{self.name}/num_resets": jnp.sum(pos_out.is_reset),
            f"{self.name}/nonfinite_inner_losses": jnp.sum(~jnp.isfinite(pos_out.raw_losses))
            + jnp.sum(~jnp.isfinite(neg_out.raw_losses)),
            f"{self.name}/mean_inner_step": jnp.mean(pos_state.step.astype(jnp.float32)),
        }
        new_state = PESState(pos_state, neg_state, accumulator)
        return Estimate(meta_loss, grad, new_state, metrics), samples
