"""The NAdamW learning-rate schedule: single-cycle cosine decay with warm-up.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, App. F.1, Eqs. 4-9, which repeat the schedule of Metz et al. 2020,
"Using a thousand optimization tasks to learn hyperparameter search strategies", arXiv:2002.11887.
The printed equations cannot be used literally, so this follows the released library
(``CosineLearningRateSchedule`` of learned_optimization, github.com/google/learned_optimization,
commit f4455dc), which produced the paper's NAdamW numbers: a warm-up ramp, an optional constant
phase, and a cosine decay to ``min_lr_mult * learning_rate`` at step ``T``; later steps hold the
final value. The library's warm-up quirk (the ramp spans ``T * max(c_warmup, c_constant)``) is
kept, since the paper's search space was tuned with it; ``c_constant = 1`` gives a constant rate
instead of the library's NaN. Every argument may be a traced array. The printed and the implemented
formulas: docs/derivations.md §4.3; the choices: docs/departures.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from learnopt.optimizers._validate import check_learning_rate, check_num_steps, check_range

Schedule = Callable[[Any], jax.Array]


def cosine_warmup_schedule(
    learning_rate: Any,
    num_steps: Any,
    *,
    warmup_fraction: Any = 0.0,
    constant_fraction: Any = 0.0,
    min_lr_mult: Any = 0.0,
) -> Schedule:
    """The NAdamW schedule of arXiv:2203.11860, App. F.1 (Eqs. 4-9, as the library runs them).

    Args:
      learning_rate: ``alpha_base``, the peak learning rate.
      num_steps: ``T``, the length of the run in updates.
      warmup_fraction: ``c_warmup`` in [0, 1]; 0 disables warm-up.
      constant_fraction: ``c_constant`` in [0, 1]; the decay starts at ``T * c_constant``.
      min_lr_mult: ``c_min_lr_mult`` in [0, 1]; the rate at step ``T`` is
        ``min_lr_mult * learning_rate``.

    Returns:
      ``schedule(step) -> learning rate`` (a float32 scalar), an optax schedule.
      See docs/derivations.md §4.3 for the exact formula and the library quirk it keeps.
    """
    if callable(learning_rate):
        raise ValueError(
            "learning_rate must be a number (alpha_base); the cosine schedule is built here"
        )
    check_learning_rate(learning_rate)
    check_num_steps(num_steps)
    check_range(warmup_fraction, "warmup_fraction", 0.0, 1.0)
    check_range(constant_fraction, "constant_fraction", 0.0, 1.0)
    check_range(min_lr_mult, "min_lr_mult", 0.0, 1.0)

    def schedule(step: Any) -> jax.Array:
        dtype = jnp.float32
        lr = jnp.asarray(learning_rate, dtype)
        total = jnp.asarray(num_steps, dtype)
        wf = jnp.asarray(warmup_fraction, dtype)
        cf = jnp.asarray(constant_fraction, dtype)
        t = jnp.minimum(jnp.asarray(step, dtype), total)

        constant_steps = total * cf
        x = jnp.maximum(t, constant_steps)
        decay_steps = total - constant_steps
        has_decay = decay_steps > 0
        frac = jnp.where(
            has_decay, (x - constant_steps) / jnp.where(has_decay, decay_steps, 1.0), 0.0
        )
        min_lr = jnp.asarray(min_lr_mult, dtype) * lr
        decayed = (lr - min_lr) * (0.5 * jnp.cos(math.pi * frac) + 0.5) + min_lr

        warmup_steps = total * jnp.maximum(wf, cf)  # the library's max() quirk, kept
        in_warmup = (wf > 0) & (warmup_steps > t)
        warm = lr * t / jnp.where(warmup_steps > 0, warmup_steps, 1.0)
        return jnp.where(in_warmup, warm, decayed)

    return schedule
