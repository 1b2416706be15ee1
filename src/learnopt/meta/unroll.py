"""Truncated, vectorised, resumable inner training: the unroll under every estimator.

Meta-training (Metz et al. 2022, "Practical tradeoffs", arXiv:2203.11860, App. D.1; PES of
Vicol et al. 2021, arXiv:2112.13835) trains a learned optimizer on inner runs of ``horizon``
steps (2,000 in that paper) cut into truncations of ``trunc_length`` steps (20). A gradient
estimator sees one truncation at a time and carries the inner state over to the next. This
module is that inner training, for ``num_tasks`` independent runs of one task, vectorised over
tasks: the layering of ``TruncatedStep`` in learned_optimization
(github.com/google/learned_optimization), over pure functions and optax optimizers.

Each step resets a finished run (lazily, at the start of the next step), draws a batch, takes
one inner step and records the normalised training loss at the parameters before the update;
the meta-loss is its mean over the truncation. Every random choice comes from the ``key`` given
to :meth:`TruncatedUnroll.unroll`, never from ``theta``, so antithetic pairs see identical
batches and resets. ``random_offset`` starts tasks at random steps so they reset out of
lockstep; ``checkpoint`` rematerialises the scan body. The step order, the key scheme and why
the meta-loss is the mean training loss over a run are in docs/derivations.md §1.1.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from learnopt.learned.base import LearnedOptimizer, MetaParams
from learnopt.step import TrainState, init_train_state, inner_step, sample_batches
from learnopt.tasks.base import Task

Params = Any


class UnrollState(NamedTuple):
    """The inner state of ``N`` tasks; every leaf has a leading task axis ``[N]``.

    ``train`` is each task's :class:`learnopt.step.TrainState` (parameters, optimizer state,
    gradient state). ``step`` is the inner step of each task's current run, in
    ``[0, horizon]`` (``horizon`` means the run has finished and resets on its next step).
    """

    train: TrainState
    step: jax.Array

    @property
    def params(self) -> Params:
        return self.train.params

    @property
    def opt_state(self) -> Any:
        return self.train.opt_state


class UnrollOutput(NamedTuple):
    """What one truncation records; every field is ``[T, N]`` (steps x tasks)."""

    losses: jax.Array  # normalised training loss before each update (float32)
    raw_losses: jax.Array  # the task's loss, unnormalised (may be non-finite)
    mask: jax.Array  # bool, the step counts in the meta-loss
    is_reset: jax.Array  # bool, the task was re-initialised at the start of this step
    step: jax.Array  # int32, the inner step of the recorded loss, in [0, horizon)


def meta_loss_per_task(output: UnrollOutput) -> jax.Array:
    """Mean normalised training loss over each task's valid steps: ``[N]``."""
    mask = output.mask.astype(output.losses.dtype)
    total = jnp.sum(jnp.where(output.mask, output.losses, 0.0), axis=0)
    return total / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def meta_loss(output: UnrollOutput) -> jax.Array:
    """The truncation's meta-loss: :func:`meta_loss_per_task` averaged over tasks."""
    return jnp.mean(meta_loss_per_task(output))


def _where_tree(cond: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


class TruncatedUnroll:
    """Truncated inner training of ``num_tasks`` copies of ``task`` (see the module docstring).

    Args:
      task: the task; every copy shares its structure and data source.
      lopt: the learned optimizer; the inner optimizer is
        ``lopt.optimizer(theta, horizon)``.
      num_tasks: ``N``, the number of independent inner runs.
      horizon: length of a whole inner run (2,000 in arXiv:2203.11860).
      trunc_length: ``T``, steps per call to :meth:`unroll` (20 there).
      random_offset: start each task at a random step in ``[0, horizon)``.
      checkpoint: wrap the scan body in ``jax.checkpoint``.
      task_map: ``"vmap"`` or ``"map"`` (``lax.map``) over tasks.
      meta_loss_split: the split whose loss is recorded for the meta-objective:
        ``"train"`` (the training-batch loss, arXiv:2203.11860) or e.g. ``"outer_valid"``
        (a fresh batch of that split at the same parameters, the validation
        meta-objective of arXiv:2009.11243, App. B and C.1).

    A learned optimizer with ``uses_valid_loss`` (``rnn_fc_lopt``) also gets
    ``valid_loss=``, the loss on an ``inner_valid`` batch at the same parameters
    (arXiv:2009.11243, App. C.3), at every step. Both extra batches use keys folded from
    the step's data key, so the keys of the training batch are unchanged.

    ``theta_batched=True`` (in :meth:`init_state` and :meth:`unroll`) means
    ``theta`` has a leading ``[N]`` axis: one (perturbed) theta per task.
    """

    def __init__(
        self,
        task: Task,
        lopt: LearnedOptimizer,
        num_tasks: int,
        horizon: int,
        trunc_length: int,
        random_offset: bool = True,
        checkpoint: bool = True,
        task_map: Literal["vmap", "map"] = "vmap",
        meta_loss_split: str = "train",
    ):
        for name, value in (
            ("num_tasks", num_tasks),
            ("horizon", horizon),
            ("trunc_length", trunc_length),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if task_map not in ("vmap", "map"):
            raise ValueError(f"task_map must be 'vmap' or 'map', got {task_map!r}")
        self.task = task
        self.lopt = lopt
        self.num_tasks = num_tasks
        self.horizon = horizon
        self.trunc_length = trunc_length
        self.random_offset = bool(random_offset)
        self.checkpoint = bool(checkpoint)
        self.task_map = task_map
        task.datasets.split(meta_loss_split)  # a clear error for an unknown split name
        self.meta_loss_split = meta_loss_split

    # -- single task -------------------------------------------------------------------

    def _init_one(self, theta: MetaParams, key: jax.Array) -> TrainState:
        params = self.task.init(key)
        return init_train_state(self.task, self.lopt.optimizer(theta, self.horizon), params)

    def _step_one(
        self,
        theta: MetaParams,
        train: TrainState,
        step: jax.Array,
        key: jax.Array,
        fresh: TrainState | None = None,
    ) -> tuple[tuple[TrainState, jax.Array], tuple[jax.Array, ...]]:
        """One step of one task; ``fresh`` is the state it resets to (built here if None)."""
        k_init, k_data, k_loss = jax.random.split(key, 3)
        opt = self.lopt.optimizer(theta, self.horizon)
        is_reset = step >= self.horizon
        if fresh is None:
            fresh = self._init_one(theta, k_init)
        train = _where_tree(is_reset, fresh, train)
        step = jnp.where(is_reset, jnp.zeros_like(step), step)

        batch, valid_batch = sample_batches(self.task, opt, k_data)
        meta = None
        if self.meta_loss_split != "train":
            split = self.task.datasets.split(self.meta_loss_split)
            meta = self.task.loss(train.params, k_loss, split.sample(jax.random.fold_in(k_data, 2)))
        train, loss = inner_step(self.task, opt, train, batch, k_loss, valid_batch)
        norm_loss = jnp.asarray(self.task.normalizer(loss if meta is None else meta), jnp.float32)
        record = (norm_loss, loss, jnp.ones((), bool), is_reset, step)
        return (train, step + 1), record

    # -- over tasks --------------------------------------------------------------------

    def _over_tasks(self, fn, theta: MetaParams, theta_batched: bool, *xs: Any) -> Any:
        """``fn(theta_i, *x_i)`` for every task ``i`` (``xs`` carry a leading ``[N]``)."""
        if self.task_map == "vmap":
            return jax.vmap(fn, in_axes=(0 if theta_batched else None,) + (0,) * len(xs))(
                theta, *xs
            )
        if theta_batched:
            return jax.lax.map(lambda args: fn(*args), (theta, *xs))
        return jax.lax.map(lambda args: fn(theta, *args), tuple(xs))

    def _fresh_states(
        self, theta: MetaParams, theta_batched: bool, step: jax.Array, step_keys: jax.Array
    ) -> TrainState | None:
        """The state each task resets to in this truncation, built once before the scan.

        With ``trunc_length <= horizon`` a task resets at most once per truncation, at the
        step ``t = horizon - step`` (if ``t < trunc_length``); its fresh state comes from
        that step's init key, exactly as a reset built inside the step would. Building it
        once instead of at every step (where all but one are discarded) saves a parameter
        initialisation per task-step: about a quarter of a small MLP's PES step. ``None``
        (build inside the step) when a task can reset more than once.
        """
        if self.trunc_length > self.horizon:
            return None
        t_reset = jnp.clip(self.horizon - step, 0, self.trunc_length - 1)  # [N]
        keys_at = step_keys[t_reset]  # [N] step keys
        init_keys = jax.vmap(
            lambda k, i: jax.random.split(jax.random.split(k, self.num_tasks)[i], 3)[0]
        )(keys_at, jnp.arange(self.num_tasks))
        return self._over_tasks(self._init_one, theta, theta_batched, init_keys)

    def _check_theta(self, theta: MetaParams, theta_batched: bool) -> None:
        if not theta_batched:
            return
        for leaf in jax.tree_util.tree_leaves(theta):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != self.num_tasks:
                raise ValueError(
                    "theta_batched=True needs every theta leaf to have a leading axis of "
                    f"num_tasks={self.num_tasks}, got shape {jnp.shape(leaf)}"
                )

    def init_state(
        self, theta: MetaParams, key: jax.Array, theta_batched: bool = False
    ) -> UnrollState:
        """Fresh parameters and optimizer states; steps at 0 or at random offsets."""
        self._check_theta(theta, theta_batched)
        k_init, k_offset = jax.random.split(key)
        keys = jax.random.split(k_init, self.num_tasks)
        train = self._over_tasks(self._init_one, theta, theta_batched, keys)
        if self.random_offset:
            step = jax.random.randint(k_offset, (self.num_tasks,), 0, self.horizon, jnp.int32)
        else:
            step = jnp.zeros((self.num_tasks,), jnp.int32)
        return UnrollState(train, step)

    def unroll(
        self,
        theta: MetaParams,
        state: UnrollState,
        key: jax.Array,
        theta_batched: bool = False,
    ) -> tuple[UnrollState, UnrollOutput]:
        """Train every task ``trunc_length`` steps from ``state``.

        Returns the new state and the per-step records, each ``[T, N]``. The
        same ``key`` and ``state`` give the same batches and resets whatever
        ``theta`` is.
        """
        self._check_theta(theta, theta_batched)
        step_keys = jax.random.split(key, self.trunc_length)
        fresh = self._fresh_states(theta, theta_batched, state.step, step_keys)

        def body(carry: UnrollState, step_key: jax.Array):
            task_keys = jax.random.split(step_key, self.num_tasks)
            xs = (*carry, task_keys) if fresh is None else (*carry, task_keys, fresh)
            new, record = self._over_tasks(self._step_one, theta, theta_batched, *xs)
            return UnrollState(*new), record

        if self.checkpoint:
            body = jax.checkpoint(body)
        state, records = jax.lax.scan(body, state, step_keys)
        return state, UnrollOutput(*records)
