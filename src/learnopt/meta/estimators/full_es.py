r"""Full-horizon antithetic ES: a whole inner run per meta-gradient.

The estimator of Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up"
(arXiv:2211.09760, §3.3, App. D.2): antithetic ES (Salimans et al. 2017, arXiv:1703.03864)
in which every inner run is trained to completion for each meta-gradient, with the
initialisation, the training batches and the evaluation batches shared within a pair.
Nothing is carried between estimates: each :meth:`FullES.estimate` starts ``N`` fresh runs at
step 0 from its ``key``.

Each of the unroll's ``N`` runs is evaluated with ``num_pairs`` (``P``) antithetic pairs
``theta +- eps_{p,i}``, ``eps_{p,i} ~ N(0, std^2 I)``; all ``2P`` members of run ``i`` share its
initialisation, batches and keys (the inner optimizer state is built with the member's theta).
With ``L`` the run's task-normalised meta-loss,

    g_{p,i} = (L(theta + eps_{p,i}) - L(theta - eps_{p,i})) / (2 std^2) * eps_{p,i},
    g       = mean_{p,i} g_{p,i},

an unbiased estimate of the gradient of the Gaussian-smoothed ``E L``; a non-finite difference
is set to 0 and counted, as in VeLO's released code. ``objective="mean"`` is the mean normalised
training loss over the run (Metz et al. 2022, arXiv:2203.11860, App. D.1); ``objective="final"``
is VeLO's final loss (App. D.1): the normalised loss at the parameters after the last update,
on a fresh batch of the unroll's ``meta_loss_split``. The unroll's ``trunc_length`` and
``random_offset`` do not apply: runs always last ``horizon`` steps from step 0. Derivation and
``num_pairs`` semantics: docs/derivations.md §1.3; departures from VeLO: docs/departures.md.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, NamedTuple

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
from learnopt.meta.unroll import TruncatedUnroll, meta_loss_per_task

OBJECTIVES = ("mean", "final")


class FullESState(NamedTuple):
    """No inner state survives an estimate; ``num_estimates`` counts them (int32 scalar)."""

    num_estimates: jax.Array


class FullES(GradientEstimator):
    """Antithetic ES over whole inner runs of ``unroll.horizon`` steps (module docstring).

    Args:
      unroll: gives the task, the learned optimizer, ``num_tasks`` (``N`` inner runs),
        ``horizon``, ``task_map`` and ``meta_loss_split``. Its ``trunc_length`` and
        ``random_offset`` are ignored: a run has no truncations and starts at step 0.
      std: perturbation standard deviation (0.01 in VeLO's released code).
      num_pairs: antithetic pairs per inner run; an estimate trains
        ``2 * num_pairs * num_tasks`` runs.
      objective: ``"mean"`` (mean normalised loss over the run) or ``"final"`` (normalised
        loss at the run's final parameters, VeLO).
      jit: compile :meth:`estimate`.
    """

    name = "full_es"

    def __init__(
        self,
        unroll: TruncatedUnroll,
        std: float = 0.01,
        num_pairs: int = 1,
        objective: Literal["mean", "final"] = "mean",
        jit: bool = True,
    ):
        check_es_options(std, num_pairs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.unroll = unroll
        self.std = float(std)
        self.num_pairs = num_pairs
        self.objective = objective
        # One truncation of the whole horizon from step 0; a copy keeps every other setting.
        run = copy.copy(without_remat(unroll))
        run.trunc_length = unroll.horizon
        run.random_offset = False
        self._run = run
        # The perturbations come from a program of their own, as in PES (derivations §1.4).
        self._perturb = jit_program(self.perturbations) if jit else self.perturbations
        self._estimate_given = jit_program(self._estimate_impl) if jit else self._estimate_impl

    def config(self) -> dict[str, Any]:
        """The options of ``meta.estimators.registry.build_estimator("full_es", ...)``."""
        return {"std": self.std, "num_pairs": self.num_pairs, "objective": self.objective}

    def init_state(self, theta: MetaParams, key: jax.Array) -> FullESState:
        del theta, key
        return FullESState(jnp.zeros((), jnp.int32))

    def estimate(self, theta: MetaParams, state: FullESState, key: jax.Array) -> Estimate:
        return self._estimate(theta, state, key)[0]

    def _estimate(
        self, theta: MetaParams, state: FullESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        return self._estimate_given(theta, state, key, self._perturb(theta, key))

    def estimate_with_samples(
        self, theta: MetaParams, state: FullESState, key: jax.Array
    ) -> tuple[Estimate, MetaParams]:
        """:meth:`estimate` and the per-pair estimates ``g_{p,i}`` (leading ``[P, N]`` axes).

        Runs are independent, the pairs of one run are not: a standard error comes from the
        spread over runs of ``samples.mean(axis=0)``.
        """
        return self._estimate(theta, state, key)

    # -- what an estimate with ``key`` uses ------------------------------------------------

    @staticmethod
    def _keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        k_eps, k_init, k_run, k_final = jax.random.split(key, 4)
        return k_eps, k_init, k_run, k_final

    def perturbations(self, theta: MetaParams, key: jax.Array) -> MetaParams:
        """The ``eps_{p,i}`` of ``estimate(theta, state, key)``: leading ``[P, N]`` axes."""
        return pair_perturbations(
            theta, self._keys(key)[0], self.std, self.num_pairs, self.unroll.num_tasks
        )

    def initial_params(self, theta: MetaParams, key: jax.Array) -> Any:
        """The parameters the runs of ``estimate(theta, state, key)`` start from (``[N]``)."""
        return self._run.init_state(theta, self._keys(key)[1]).params

    # -- the estimate ----------------------------------------------------------------------

    def _final_losses(self, params: Any, key: jax.Array) -> jax.Array:
        """Normalised loss of each run's final parameters on a fresh batch: ``[N]``."""
        task = self.unroll.task
        split = task.datasets.split(self.unroll.meta_loss_split)

        def one(p, k):
            k_batch, k_loss = jax.random.split(k)
            loss = task.loss(p, k_loss, split.sample(k_batch))
            return jnp.asarray(task.normalizer(loss), jnp.float32), loss

        return jax.vmap(one)(params, jax.random.split(key, self.unroll.num_tasks))

    def _estimate_impl(
        self, theta: MetaParams, state: FullESState, key: jax.Array, eps: MetaParams
    ) -> tuple[Estimate, MetaParams]:
        _, k_init, k_run, k_final = self._keys(key)
        p, n = self.num_pairs, self.unroll.num_tasks
        thetas = jax.tree_util.tree_map(
            lambda a, b: jnp.stack([a, b]),
            batched_theta(theta, eps, 1.0),
            batched_theta(theta, eps, -1.0),
        )  # leaves [2, P, N, ...]

        def member(theta_batch):
            # Every member gets the same keys: the same initial parameters, batches and
            # loss keys; only the optimizer (and its initial state) sees the member's theta.
            start = self._run.init_state(theta_batch, k_init, theta_batched=True)
            end, out = self._run.unroll(theta_batch, start, k_run, theta_batched=True)
            nonfinite = jnp.sum(~jnp.isfinite(out.raw_losses))
            if self.objective == "mean":
                return meta_loss_per_task(out), nonfinite
            final, raw = self._final_losses(end.params, k_final)
            return final, nonfinite + jnp.sum(~jnp.isfinite(raw))

        losses, nonfinite = jax.vmap(jax.vmap(member))(thetas)  # [2, P, N], [2, P]
        diff = losses[0] - losses[1]
        finite = jnp.isfinite(diff)
        coef = jnp.where(finite, diff, 0.0) / (2.0 * self.std**2)  # [P, N]
        samples = jax.tree_util.tree_map(
            lambda e: jnp.reshape(coef, (p, n) + (1,) * (e.ndim - 2)).astype(e.dtype) * e, eps
        )
        grad = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=(0, 1)), samples)
        meta_loss = jnp.mean(0.5 * (losses[0] + losses[1]))
        metrics = {
            "full_es/meta_loss": meta_loss,
            "full_es/delta_loss_abs_mean": jnp.mean(jnp.where(finite, jnp.abs(diff), 0.0)),
            "full_es/nonfinite_pairs": jnp.sum(~finite),
            "full_es/nonfinite_inner_losses": jnp.sum(nonfinite),
            "full_es/inner_steps": jnp.asarray(self.unroll.horizon, jnp.int32),
        }
        new_state = FullESState(state.num_estimates + 1)
        return Estimate(meta_loss, grad, new_state, metrics), samples
