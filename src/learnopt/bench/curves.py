"""Many training runs in one compiled program: loss curves over hyperparameters and seeds.

Metz et al. 2022 (arXiv:2203.11860, §4) compare optimizers by the mean training loss over
a fixed horizon, with hand-designed baselines tuned over a learning-rate grid (and NAdamW
by random search). Every run of a grid here is the same program with different numbers, so
the whole grid runs as ``vmap`` (hyperparameters) of ``vmap`` (seeds) of a ``lax.scan``
over steps, with batches drawn in-jit from ``task.datasets.train.sample``.

Runs with the same seed share the initial parameters and the batch sequence (common random
numbers), so differences between optimizers are not noise of the data order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from learnopt.step import init_train_state, inner_step, sample_batches
from learnopt.tasks.base import Task

OptimizerFactory = Callable[[Any], optax.GradientTransformation]


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, data key) of evaluation seed ``seed``; shared by all optimizers."""
    k = jax.random.PRNGKey(1_000_003 + seed)
    return jax.random.split(k)


def loss_curves(
    task: Task,
    make_opt: OptimizerFactory,
    hparams: Any,
    seeds: list[int] | tuple[int, ...],
    num_steps: int,
) -> tuple[jax.Array, Any]:
    """Training-loss curves ``[H, S, num_steps]`` and final params ``[H, S, ...]``.

    ``hparams`` is a pytree whose leaves have a leading axis of size ``H``;
    ``make_opt(h)`` builds the optimizer for one slice (it is traced, so use
    the values as arrays, e.g. ``optax.adam(h)``).
    """
    keys = [seed_keys(s) for s in seeds]
    init_keys = jnp.stack([k[0] for k in keys])
    data_keys = jnp.stack([k[1] for k in keys])

    def one_run(h, init_key, data_key):
        opt = optax.with_extra_args_support(make_opt(h))

        def step(state, t):
            k = jax.random.fold_in(data_key, t)
            batch_key, loss_key = jax.random.split(k)
            batch, valid_batch = sample_batches(task, opt, batch_key)
            return inner_step(task, opt, state, batch, loss_key, valid_batch)

        state = init_train_state(task, opt, task.init(init_key))
        state, losses = jax.lax.scan(step, state, jnp.arange(num_steps))
        return losses, state.params

    over_seeds = jax.vmap(one_run, in_axes=(None, 0, 0))
    over_hparams = jax.vmap(over_seeds, in_axes=(0, None, None))
    return jax.jit(over_hparams)(hparams, init_keys, data_keys)
