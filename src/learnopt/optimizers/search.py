"""Hyperparameter search spaces of the hand-designed baselines.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860: SGD, SGDM and Adam are tuned over learning rates "every half order
of magnitude between 1e-7 and 1" (§2.1: the 15 values of :data:`LR_GRID`); NAdamW by random search,
1000 configurations per task, over the space of Metz et al. 2020, arXiv:2002.11887 (App. F.2:
:func:`sample_nadamw_config`). Ranges spanning decades are drawn log-uniformly. The sampler is
deterministic in its seed, always consumes 13 uniform draws in a fixed order, runs on the host
(numpy) and returns Python values; a jax key becomes a numpy generator through 128 bits drawn from
it. The full table of the space: docs/derivations.md §4.4.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.optimizers.nadamw import NAdamWConfig

#: arXiv:2203.11860, §2.1: 10^-7, 10^-6.5, ..., 10^0 (15 learning rates, ratio sqrt(10)).
LR_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-14, 1))

#: arXiv:2203.11860, App. F.2 ranges (low, high) of the log-uniform draws.
NADAMW_LOG_RANGES: dict[str, tuple[float, float]] = {
    "learning_rate": (1e-5, 1.0),
    "one_minus_beta1": (1e-3, 1.0),
    "one_minus_beta2": (1e-5, 1.0),
    "eps": (1e-8, 1e4),
    "l2_wd": (1e-5, 1e-1),
    "adamw_wd": (1e-5, 1e-1),
    "min_lr_mult": (1e-5, 1.0),
    "warmup_fraction": (1e-5, 1e-1),
}

KeyOrRng = Any  # jax PRNG key (typed or raw uint32[2]) | int seed | np.random.Generator


def _as_generator(key_or_rng: KeyOrRng) -> np.random.Generator:
    if isinstance(key_or_rng, np.random.Generator):
        return key_or_rng
    if isinstance(key_or_rng, int | np.integer) and not isinstance(key_or_rng, bool | np.bool_):
        if key_or_rng < 0:
            raise ValueError(f"an integer seed must be >= 0, got {key_or_rng}")
        return np.random.default_rng(int(key_or_rng))
    if isinstance(key_or_rng, jax.Array | np.ndarray):
        try:
            bits = np.asarray(jax.random.bits(key_or_rng, (4,), jnp.uint32))
        except Exception as err:
            raise ValueError(
                "expected a concrete jax PRNG key, an int seed or a numpy Generator, "
                f"got an array of shape {np.shape(key_or_rng)} and dtype "
                f"{getattr(key_or_rng, 'dtype', None)}"
            ) from err
        return np.random.default_rng(bits)
    raise ValueError(
        "expected a jax PRNG key, an int seed or a numpy Generator, "
        f"got {type(key_or_rng).__name__}"
    )


def _log_uniform(u: float, name: str) -> float:
    low, high = NADAMW_LOG_RANGES[name]
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return min(max(value, low), high)


def _draw(rng: np.random.Generator) -> NAdamWConfig:
    u = rng.random(13).tolist()
    wd_case = min(int(u[5] * 3), 2)  # 0: keep both, 1: zero l2_wd, 2: zero adamw_wd
    l2_wd = _log_uniform(u[6], "l2_wd")
    adamw_wd = _log_uniform(u[7], "adamw_wd")
    return NAdamWConfig(
        learning_rate=_log_uniform(u[0], "learning_rate"),
        beta1=1.0 - _log_uniform(u[1], "one_minus_beta1"),
        beta2=1.0 - _log_uniform(u[2], "one_minus_beta2"),
        eps=_log_uniform(u[3], "eps"),
        use_nesterov=u[4] < 0.5,
        l2_wd=0.0 if wd_case == 1 else l2_wd,
        adamw_wd=0.0 if wd_case == 2 else adamw_wd,
        min_lr_mult=_log_uniform(u[9], "min_lr_mult") if u[8] < 0.5 else 0.0,
        warmup_fraction=_log_uniform(u[11], "warmup_fraction") if u[10] < 0.5 else 0.0,
        constant_fraction=u[12],
    )


def sample_nadamw_config(key_or_rng: KeyOrRng) -> NAdamWConfig:
    """One NAdamW configuration from the App. F.2 search space of arXiv:2203.11860.

    ``key_or_rng`` is a jax PRNG key or an int seed (the same one gives the same
    config) or a ``numpy.random.Generator`` (advanced in place, so repeated calls
    give a stream of configs).
    """
    return _draw(_as_generator(key_or_rng))


def sample_nadamw_configs(key_or_rng: KeyOrRng, num: int) -> list[NAdamWConfig]:
    """``num`` configurations drawn in sequence from one generator (arXiv:2203.11860, App. F.2).

    Deterministic in the seed; the first config equals ``sample_nadamw_config`` of
    the same seed. The paper uses ``num = 1000`` per task.
    """
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 0:
        raise ValueError(f"num must be an integer >= 0, got {num!r}")
    rng = _as_generator(key_or_rng)
    return [_draw(rng) for _ in range(int(num))]
