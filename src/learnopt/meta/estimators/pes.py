r"""Persistent Evolution Strategies (PES) and truncated ES.

PES (Vicol, Metz and Sohl-Dickstein 2021, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", arXiv:2112.13835) is the estimator of
Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers" (arXiv:2203.11860, App. D.1): antithetic pairs with perturbation std 0.01,
truncations of 20 steps of inner runs of 2,000 steps, 8 tasks per worker. Truncated ES is the
same estimator without the accumulator (``accumulate=False``).

Each of the unroll's ``N`` inner runs is evaluated with ``num_pairs`` (``P``) antithetic pairs:
pair ``p`` of run ``i`` draws ``eps_{p,i} ~ N(0, std^2 I)`` and unrolls ``theta +- eps_{p,i}``
from its own persistent states, on run ``i``'s initialisation, offset, batches and keys (all
``2P`` members of a run share them). With ``c = (L^+ - L^-) / (2 std^2)`` over the truncation
and ``c_pre`` the same over the steps before the run's first reset in the truncation,

    g_{p,i} = c_{p,i} eps_{p,i} + c^pre_{p,i} A_{p,i},        g = mean_{p,i} g_{p,i},

where the accumulator ``A_{p,i}`` sums the perturbations of the run's earlier truncations and
restarts at ``eps_{p,i}`` after a reset. Without a reset this is the usual PES estimate
``c (A + eps)``; truncated ES is ``g = c eps``, biased toward short horizons. The derivation
(Stein's lemma per truncation, the ``2 std^2`` normalisation, the split at a reset) and the
``num_pairs`` semantics are in docs/derivations.md §1.2 and §1.3; the departure from the
released code on truncations with a reset is in docs/departures.md ("Meta-training").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from learnopt.compilation import jit_program
from learnopt.learned.base import MetaParams
from learnopt.meta.estimators.base import (
    Estimate,
    GradientEstimator,
    batched_theta,
    check_es_options,
    pair_perturbations,
    without_remat,
)
from learnopt.meta.unroll import (
    TruncatedUnroll,
    UnrollOutput,
    UnrollState,
    meta_loss_per_task,
)


class PESState(NamedTuple):
    """The inner states of the antithetic members and the accumulators.

    ``members`` holds the inner states of both signs stacked: every leaf has leading
    ``[2, num_pairs, num_tasks]`` axes (sign ``+`` first, then pair ``p`` of inner run ``i``),
    the layout the unroll is vmapped over, so an estimate neither stacks nor splits them.
    ``accumulator`` has ``theta``'s structure with leading ``[num_pairs, num_tasks]`` axes.
    """

    members: UnrollState
    accumulator: MetaParams

    @property
    def pos(self) -> UnrollState:
        """The ``+`` members' inner states (leading ``[num_pairs, num_tasks]`` axes)."""
        return jax.tree_util.tree_map(lambda x: x[0], self.members)

    @property
    def neg(self) -> UnrollState:
        """The ``-`` members' inner states."""
        return jax.tree_util.tree_map(lambda x: x[1], self.members)


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
      unroll: the truncated unroll (its ``num_tasks`` inner runs, its ``trunc_length``,
        its ``random_offset``; arXiv:2203.11860 uses 8 tasks and truncations of 20).
      std: perturbation standard deviation (arXiv:2203.11860: 0.01).
      num_pairs: antithetic pairs per inner run (1 in arXiv:2203.11860); each estimate
        unrolls ``2 * num_pairs * num_tasks`` members.
      accumulate: keep the PES accumulators; ``False`` is truncated ES.
      jit: compile :meth:`init_state` and :meth:`estimate`.
    """

    def __init__(
        self,
        unroll: TruncatedUnroll,
        std: float = 0.01,
        num_pairs: int = 1,
        accumulate: bool = True,
        jit: bool = True,
    ):
        check_es_options(std, num_pairs)
        self.unroll = without_remat(unroll)
        self.std = float(std)
        self.num_pairs = num_pairs
        self.accumulate = bool(accumulate)
        self.name = "pes" if self.accumulate else "truncated_es"
        self._init = jit_program(self._init_state) if jit else self._init_state
        # The perturbations are sampled by a program of their own: inside the estimate, XLA
        # copied the normal sampler into every fusion that reads them (docs/derivations.md
        # §1.4); as an input they compile once. The draws are the same (to float rounding).
        self._perturb = jit_program(self._perturbations) if jit else self._perturbations
        self._estimate_given = jit_program(self._estimate_impl) if jit else self._estimate_impl

    def config(self) -> dict[str, Any]:
        """The options of ``meta.estimators.registry.build_estimator(self.name, ...)``."""
        return {"std": self.std, "num_pairs": self.num_pairs}

    def init_state(self, theta: MetaParams, key: jax.Array) -> PESState:
        return self._init(theta, key)

    def estimate(self, theta: MetaParams, state: PESState, key: jax.Array) -> Estimate:
        return self._estimate(theta, state, key)[0]

    def _perturbations(self, theta: MetaParams, key: jax.Array) -> MetaParams:
        """The ``eps_{p,i}`` of ``estimate(theta, state, key)``: leading ``[P, N]`` axes."""
        k_eps = jax.random.split(key)[0]
        return pair_perturbations(theta, k_eps, self.std, self.num_pairs, self.unroll.num_tasks)

    def _estimate(
        self, theta: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        return self._estimate_given(theta, state, key, self._perturb(theta, key))

    def estimate_with_samples(
        self, theta: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        """:meth:`estimate` and the per-pair estimates ``g_{p,i}`` (leading ``[P, N]`` axes).

        ``grad`` is their mean. Inner runs are independent, the pairs of one run are not
        (they share its initialisation and batches): a standard error comes from the spread
        over runs of ``samples.mean(axis=0)``.
        """
        return self._estimate(theta, state, key)

    def _init_state(self, theta: MetaParams, key: jax.Array) -> PESState:
        inner = self.unroll.init_state(theta, key)
        p, n = self.num_pairs, self.unroll.num_tasks
        # Every pair of a run starts from the run's state (initialisation and offset).
        inner = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (p, *x.shape)), inner)
        accumulator = jax.tree_util.tree_map(
            lambda x: jnp.zeros((p, n, *jnp.shape(x)), jnp.result_type(x, jnp.float32)), theta
        )
        return PESState(_stack(inner, inner), accumulator)

    def _estimate_impl(
        self, theta: MetaParams, state: PESState, key: jax.Array, eps: MetaParams
    ) -> tuple[Estimate, MetaParams]:
        k_unroll = jax.random.split(key)[1]
        p, n = self.num_pairs, self.unroll.num_tasks
        thetas = _stack(batched_theta(theta, eps, 1.0), batched_theta(theta, eps, -1.0))

        def run(theta_batch, inner):
            # Every member gets the same key: identical batches, losses keys and resets.
            return self.unroll.unroll(theta_batch, inner, k_unroll, theta_batched=True)

        # One vmap over the 2P members (sign-major), the unroll maps over the runs (N): one
        # batching pass of the unroll instead of two, which is cheaper to trace.
        def merge(x):
            return x.reshape((2 * p, *x.shape[2:]))

        def split(x):
            return x.reshape((2, p, *x.shape[1:]))

        members = jax.tree_util.tree_map(merge, (thetas, state.members))
        new_members, outs = jax.tree_util.tree_map(split, jax.vmap(run)(*members))
        pos_out, neg_out = _unstack(outs)  # fields [P, T, N]

        c, c_pre, did_reset = jax.vmap(pes_coefficients, in_axes=(0, 0, None))(
            pos_out, neg_out, self.std
        )  # each [P, N]

        def per_task(coef, tree):
            return jax.tree_util.tree_map(
                lambda x: jnp.reshape(coef, (p, n) + (1,) * (x.ndim - 2)).astype(x.dtype) * x,
                tree,
            )

        samples = per_task(c, eps)
        accumulator = state.accumulator
        if self.accumulate:
            samples = jax.tree_util.tree_map(jnp.add, samples, per_task(c_pre, accumulator))

            def next_acc(a, e):
                keep = jnp.reshape(~did_reset, (p, n) + (1,) * (e.ndim - 2))
                return jnp.where(keep, a + e, e)

            accumulator = jax.tree_util.tree_map(next_acc, accumulator, eps)
        grad = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=(0, 1)), samples)

        loss_pos = jax.vmap(meta_loss_per_task)(pos_out)  # [P, N]
        loss_neg = jax.vmap(meta_loss_per_task)(neg_out)
        meta_loss = jnp.mean(0.5 * (loss_pos + loss_neg))
        metrics = {
            f"{self.name}/meta_loss": meta_loss,
            f"{self.name}/delta_loss_abs_mean": jnp.mean(jnp.abs(loss_pos - loss_neg)),
            # resets depend on the step counts only: the same for every pair of a run
            f"{self.name}/num_resets": jnp.sum(pos_out.is_reset[0]),
            f"{self.name}/nonfinite_inner_losses": jnp.sum(~jnp.isfinite(pos_out.raw_losses))
            + jnp.sum(~jnp.isfinite(neg_out.raw_losses)),
            f"{self.name}/mean_inner_step": jnp.mean(new_members.step[0].astype(jnp.float32)),
        }
        new_state = PESState(new_members, accumulator)
        return Estimate(meta_loss, grad, new_state, metrics), samples
