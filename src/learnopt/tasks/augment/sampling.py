"""Sampling the seven task augmentations with VeLO's probabilities, and applying them.

Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv:2211.09760, App. C.5. :func:`sample_augmentation` draws an
:class:`AugmentationConfig`; :func:`apply` wraps a task with it (the wrappers are in
:mod:`learnopt.tasks.augment.wrappers`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from learnopt.tasks.augment.wrappers import (
    REPARAM_LEVELS,
    delayed_gradients,
    directional_gradient,
    es_gradient,
    normalize_gradient,
    reduce_batch_size,
    reparameterize_random,
    to_bfloat16,
)
from learnopt.tasks.base import Task

REPARAM_LEVEL_CHOICES = ("none", "none", "global", "global", "tensor", "tensor", "parameter")
REPARAM_RANGES = ((0.001, 1000.0), (0.01, 100.0), (0.1, 10.0))
ES_PAIRS = (1, 2, 4, 8, 16)
PROBABILITIES = {
    "es": 0.08,
    "batch": 0.2,
    "bf16": 0.2,
    "normalize": 0.05,
    "directional": 0.08,
    "delay": 0.05,
}


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Which of the seven augmentations to apply, and their settings (C.5).

    Off values: ``reparam_level="none"``, ``es_std=0``, ``batch_fraction=1``,
    ``bf16=False``, ``normalize_gradient=False``, ``num_directions=0``,
    ``delay=0``.
    """

    reparam_level: str = "none"
    reparam_range: tuple[float, float] = (1.0, 1.0)
    reparam_seed: int = 0
    es_std: float = 0.0
    es_pairs: int = 0
    batch_fraction: float = 1.0
    bf16: bool = False
    normalize_gradient: bool = False
    num_directions: int = 0
    direction_sign: bool = False
    delay: int = 0

    def __post_init__(self):
        object.__setattr__(self, "reparam_range", tuple(float(v) for v in self.reparam_range))
        if self.reparam_level not in REPARAM_LEVELS:
            raise ValueError(
                f"reparam_level must be one of {REPARAM_LEVELS}, got {self.reparam_level!r}"
            )
        lo, hi = self.reparam_range
        if not 0 < lo <= hi:
            raise ValueError(f"reparam_range must satisfy 0 < lo <= hi, got {self.reparam_range}")
        if self.es_std < 0 or (self.es_std > 0) != (self.es_pairs > 0):
            raise ValueError(
                "ES needs es_std > 0 and es_pairs > 0 together (or both 0), got "
                f"es_std={self.es_std}, es_pairs={self.es_pairs}"
            )
        if not 0 < self.batch_fraction <= 1:
            raise ValueError(f"batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if self.num_directions < 0:
            raise ValueError(f"num_directions must be >= 0, got {self.num_directions}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")

    @property
    def is_identity(self) -> bool:
        """True when :func:`apply` returns the task unchanged."""
        return (
            self.reparam_level == "none"
            and self.es_pairs == 0
            and self.batch_fraction == 1.0
            and not self.bf16
            and not self.normalize_gradient
            and self.num_directions == 0
            and self.delay == 0
        )


def parse_augmentation(text: str) -> AugmentationConfig:
    """An :class:`AugmentationConfig` from ``"field=value,field=value"`` (the CLI's
    ``--augment``), e.g. ``"delay=1"`` or ``"bf16=true,batch_fraction=0.5"``; a range is
    written ``reparam_range=0.1:10``. Unknown fields and bad values raise ``ValueError``."""
    fields = {f.name: f for f in dataclasses.fields(AugmentationConfig)}
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in fields:
            raise ValueError(
                f"bad augmentation {item!r}: expected FIELD=VALUE with FIELD one of "
                f"{', '.join(fields)}"
            )
        default = getattr(AugmentationConfig(), name)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[name] = raw.lower() in ("true", "1")
            elif isinstance(default, tuple):
                values[name] = tuple(float(v) for v in raw.split(":"))
            else:
                values[name] = type(default)(raw)
        except ValueError:
            kind = "true/false" if isinstance(default, bool) else type(default).__name__
            raise ValueError(f"bad augmentation value {item!r}: {name} takes {kind}") from None
    return AugmentationConfig(**values)


def rng_from_key(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by the key's bits (raw or typed keys; needs a concrete key)."""
    words = np.asarray(jax.random.key_data(key)).ravel()
    return np.random.default_rng([int(w) for w in words])


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """``exp(U[log lo, log hi])``."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def log_uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A log-uniform draw in ``[lo, hi]`` rounded to the nearest integer."""
    return int(min(hi, max(lo, round(log_uniform(rng, lo, hi)))))


def sample_augmentation(key: jax.Array) -> AugmentationConfig:
    """Draw augmentations with the probabilities of C.5 (listed in :mod:`.wrappers`)."""
    rng = rng_from_key(key)
    level = str(rng.choice(REPARAM_LEVEL_CHOICES))
    scale_range = REPARAM_RANGES[int(rng.integers(len(REPARAM_RANGES)))]
    reparam_seed = int(rng.integers(0, 2**31 - 1))
    es = rng.uniform() < PROBABILITIES["es"]
    es_std = log_uniform(rng, 1e-3, 1e-1)
    es_pairs = int(rng.choice(ES_PAIRS))
    batch = rng.uniform() < PROBABILITIES["batch"]
    fraction = float(rng.uniform(0.01, 1.0))
    bf16 = bool(rng.uniform() < PROBABILITIES["bf16"])
    normalize = bool(rng.uniform() < PROBABILITIES["normalize"])
    directional = rng.uniform() < PROBABILITIES["directional"]
    directions = log_uniform_int(rng, 1, 1024)
    sign = bool(rng.uniform() < 0.5)
    delayed = rng.uniform() < PROBABILITIES["delay"]
    delay = log_uniform_int(rng, 1, 8)
    return AugmentationConfig(
        reparam_level=level,
        reparam_range=scale_range if level != "none" else (1.0, 1.0),
        reparam_seed=reparam_seed if level != "none" else 0,
        es_std=es_std if es else 0.0,
        es_pairs=es_pairs if es else 0,
        batch_fraction=fraction if batch else 1.0,
        bf16=bf16,
        normalize_gradient=normalize,
        num_directions=directions if directional else 0,
        direction_sign=sign if directional else False,
        delay=delay if delayed else 0,
    )


def apply(task: Task, config: AugmentationConfig) -> Task:
    """Wrap ``task`` with the augmentations of ``config`` (order: docs/derivations.md §5.1)."""
    if config.batch_fraction < 1.0 and task.batch_reducible:
        task = reduce_batch_size(task, config.batch_fraction)
    if config.bf16:
        task = to_bfloat16(task)
    task = reparameterize_random(
        task, config.reparam_level, config.reparam_range, config.reparam_seed
    )
    if config.es_pairs > 0:
        task = es_gradient(task, config.es_std, config.es_pairs)
    if config.num_directions > 0:
        task = directional_gradient(task, config.num_directions, config.direction_sign)
    if config.normalize_gradient:
        task = normalize_gradient(task)
    if config.delay > 0:
        task = delayed_gradients(task, config.delay)
    return task


CONFIG_TYPES = {"AugmentationConfig": AugmentationConfig}
