"""The one inner training step, and the contract of the extra arguments optimizers receive.

Every loop that trains a task in learnopt calls :func:`inner_step`: plain training
(:mod:`learnopt.training`), the vectorised benchmark curves (:mod:`learnopt.bench.curves`),
the meta-training unroll (:mod:`learnopt.meta.unroll`) and the task of training a learned
optimizer (:mod:`learnopt.tasks.families.lopt`). One step is:

1. the loss and the gradient through the task's gradient protocol,
   ``task.value_and_grad(params, key, batch, grad_state)`` (so augmentations that change the
   gradient, including delayed gradients with their own state, apply in every loop);
2. the extra arguments of the optimizer (below);
3. ``opt.update(grads, opt_state, params, **extra_args)`` and ``optax.apply_updates``.

Extra arguments
---------------
Every optimizer in learnopt, hand-designed or learned, is an
``optax.GradientTransformationExtraArgs``; its ``update`` accepts any keyword and ignores the
ones it does not read (optax's convention). :func:`inner_step` passes:

``loss``
    always: the training loss at ``params`` on the step's batch, the value whose gradient
    ``grads`` is (a float32 scalar). Learned optimizers with loss features read it (VeLO, the
    per-tensor LSTM of Metz et al. 2020); an optimizer that needs it and is called without it
    raises an error naming it.
``valid_loss``
    only to optimizers that read it (:func:`reads_extra_args`): the loss at ``params`` on a
    batch of the task's ``inner_valid`` split (Metz et al. 2020, "Tasks, stability,
    architecture, and compute", arXiv:2009.11243, §3.1: validation-loss features). Computing
    it costs one more forward pass, so it is skipped for every other optimizer. The caller
    passes that batch as ``valid_batch``; :func:`inner_step` raises if the optimizer reads
    ``valid_loss`` and no batch is given.

An optimizer declares what it reads with :func:`declare_extra_args`; a plain optax
transformation reads nothing beyond optax's own arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.tasks.base import Task

Params = Any
Batch = Any

#: The extra keyword arguments of ``update`` that learnopt defines (module docstring).
EXTRA_ARGS = ("loss", "valid_loss")


class ExtraArgsTransformation(optax.GradientTransformationExtraArgs):
    """An optax transformation that also records which extra arguments its ``update`` reads.

    It is a ``GradientTransformationExtraArgs`` (so optax passes extra arguments through it
    unchanged); ``reads`` is a tuple of names from :data:`EXTRA_ARGS`.
    """

    reads: tuple[str, ...] = ()


def declare_extra_args(
    opt: optax.GradientTransformationExtraArgs, reads: tuple[str, ...]
) -> ExtraArgsTransformation:
    """``opt`` marked as reading the extra arguments ``reads`` (each in :data:`EXTRA_ARGS`)."""
    unknown = [name for name in reads if name not in EXTRA_ARGS]
    if unknown:
        raise ValueError(f"unknown extra arguments {unknown}; learnopt defines {EXTRA_ARGS}")
    marked = ExtraArgsTransformation(opt.init, opt.update)
    marked.reads = tuple(reads)
    return marked


def reads_extra_args(opt: optax.GradientTransformation) -> tuple[str, ...]:
    """The extra arguments ``opt.update`` reads (``()`` for a plain optax transformation)."""
    return tuple(getattr(opt, "reads", ()))


def needs_valid_batch(opt: optax.GradientTransformation) -> bool:
    """Whether :func:`inner_step` must be given a ``valid_batch`` for ``opt``."""
    return "valid_loss" in reads_extra_args(opt)


def sample_batches(
    task: Task, opt: optax.GradientTransformation, key: jax.Array
) -> tuple[Batch, Batch | None]:
    """``(batch, valid_batch)`` drawn in-jit for one step: a ``train`` batch from ``key`` and,
    when ``opt`` reads ``valid_loss``, an ``inner_valid`` batch from ``fold_in(key, 1)``."""
    batch = task.datasets.train.sample(key)
    if not needs_valid_batch(opt):
        return batch, None
    return batch, task.datasets.inner_valid.sample(jax.random.fold_in(key, 1))


class TrainState(NamedTuple):
    """What changes from one inner step to the next."""

    params: Params
    opt_state: Any
    grad_state: Any  # the task's gradient-protocol state (``()`` for most tasks)


def init_train_state(
    task: Task, opt: optax.GradientTransformation, params: Params
) -> TrainState:
    """The state of a run starting at ``params``: ``opt.init`` and the task's gradient state."""
    return TrainState(params, opt.init(params), task.grad_state_init(params))


def inner_step(
    task: Task,
    opt: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    valid_batch: Batch | None = None,
) -> tuple[TrainState, jax.Array]:
    """One step of training ``task`` with ``opt``: ``(new state, loss)`` (module docstring).

    ``loss`` is the task's loss at ``state.params`` on ``batch`` (before the update), as the
    gradient protocol returns it: the loss of the gradient the optimizer received. ``key`` is
    the step's loss key (dropout, stochastic gradient estimates). ``valid_batch`` is a batch
    of ``task``'s ``inner_valid`` split, required when the optimizer reads ``valid_loss``.
    Pure and traceable: use it under ``jit``, ``vmap``, ``lax.scan`` and ``grad``.
    """
    opt = optax.with_extra_args_support(opt)
    (loss, grads), grad_state = task.value_and_grad(state.params, key, batch, state.grad_state)
    extra = {"loss": jnp.asarray(loss, jnp.float32)}
    if needs_valid_batch(opt):
        if valid_batch is None:
            raise ValueError(
                "this optimizer reads valid_loss: pass valid_batch (a batch of the task's "
                "inner_valid split) to inner_step"
            )
        extra["valid_loss"] = jnp.asarray(task.loss(state.params, key, valid_batch), jnp.float32)
    updates, opt_state = opt.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, grad_state), loss
