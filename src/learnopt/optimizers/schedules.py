"""The NAdamW learning-rate schedule: single-cycle cosine decay with warm-up.

Seed 004 (Metz et al. 2022, "Practical tradeoffs between memory, compute, and
performance in learned optimizers"), App. F.1, Eqs. 4-9, which repeat the
schedule of Metz et al. 2020b. The printed equations are

    u            = [c_warmup * T > t]                                      (4)
    alpha_dc     = (alpha_base - c_min) * (0.5 cos(t pi / (T - c_constant)) + 0.5)
                   + c_min                                                 (5-7)
    alpha_warmup = t / (T * c_warmup)                                      (8)
    alpha        = (1 - u) alpha_dc + u alpha_warmup                       (9)

and cannot be used literally: ``c_min`` (the min learning-rate *multiplier*) is
used as an absolute learning rate, ``T - c_constant`` subtracts a fraction from
a step count, the cosine has no constant phase, and Eq. 8 lacks the factor
``alpha_base``. As the spec asks (``spec/tradeoffs.md`` §1.2), we follow the
released library (learned_optimization ``CosineLearningRateSchedule`` at
f4455dc), which is what produced the paper's NAdamW numbers:

    t            <- min(t, T)                  (steps past the end hold the final value)
    C            = c_constant * T              (constant steps)
    alpha_min    = c_min_lr_mult * alpha_base
    x            = max(t, C)
    alpha_dc     = (alpha_base - alpha_min) * (0.5 cos(pi (x - C) / (T - C)) + 0.5) + alpha_min
    if c_warmup > 0:
        W            = T * max(c_warmup, c_constant)
        u            = [W > t]
        alpha_warmup = alpha_base * t / W
    else:
        u            = 0
    alpha        = (1 - u) alpha_dc + u alpha_warmup

Choices, all deliberate:

* **The max() quirk is kept.** With any nonzero warm-up the ramp runs over
  ``T * max(c_warmup, c_constant)`` steps, not ``T * c_warmup``: when
  ``c_constant >= c_warmup`` the "constant" phase becomes a linear ramp from 0
  to ``alpha_base`` and the cosine starts right after it; when
  ``c_warmup > c_constant`` the ramp runs into the decay window and the rate
  drops at ``t = W`` from about ``alpha_base`` to ``alpha_dc(W)``. We keep it
  because the F.2 search space (and the paper's 1000-configuration NAdamW
  baseline) was tuned and reported with exactly this behaviour; "fixing" it
  would change what a sampled configuration means.
* ``t`` is the 0-based count of updates already applied, as in Eq. 8 and the
  library, so with warm-up the very first update has learning rate 0.
* ``c_constant = 1`` makes ``T - C = 0``; the library then computes 0/0 = NaN.
  Here the decay fraction is defined as 0, so the rate stays at ``alpha_base``.
  Denominators are guarded so that gradients with respect to the
  hyperparameters stay finite too.
* Every argument may be a traced array (the function uses ``jnp.where``, not
  Python branches), so a sweep can vmap over sampled configurations.
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
    """The NAdamW schedule of seed 004 App. F.1 (Eqs. 4-9, as the library runs them).

    Args:
      learning_rate: ``alpha_base``, the peak learning rate.
      num_steps: ``T``, the length of the run in updates.
      warmup_fraction: ``c_warmup`` in [0, 1]; 0 disables warm-up.
      constant_fraction: ``c_constant`` in [0, 1]; the decay starts at ``T * c_constant``.
      min_lr_mult: ``c_min_lr_mult`` in [0, 1]; the rate at step ``T`` is
        ``min_lr_mult * learning_rate``.

    Returns:
      ``schedule(step) -> learning rate`` (a float32 scalar), an optax schedule.
      See the module docstring for the exact formula and the library quirk it keeps.
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
