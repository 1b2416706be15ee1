"""One meta-gradient worker, without Ray: its estimator, its keys, one estimate per call.

The worker/learner split of Metz et al. 2020 (arXiv:2009.11243, App. B and H.1): a worker
takes the learner's current theta and its version (the learner step it was read at),
computes one meta-gradient with its own estimator and task draws, and returns
``(grad, version, metrics)``; the learner applies what arrives and drops stale estimates.

**Keys.** Every worker ever started in a run gets a serial number (0, 1, ... in start order;
a replacement for a dead worker gets the next one). Worker ``serial`` runs the config with
seed ``worker_seed(seed, serial)`` (worker 0: the config's own seed) through
``build_estimator_over_tasks``, so its task draws differ from the other workers', and uses
the key scheme of the single-process ``MetaTrainer``: ``key = PRNGKey(seed)``, the
estimator's state from ``split(fold_in(key, 2**31 - 1))[1]`` (theta from ``[0]``, drawn by
the learner with the run's seed), estimate ``k`` of this worker with ``fold_in(key, k)``. One
worker whose every gradient is applied therefore repeats the single-process run exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from learnopt.compilation import enable_persistent_cache
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.train import MetaTrainConfig, build_estimator_over_tasks, initial_keys
from learnopt.meta.train import initial_theta as run_initial_theta

SEED_STRIDE = 1_000_003


class WorkerResult(NamedTuple):
    """What a worker returns; unpacks as ``(grad, version, metrics)``."""

    grad: Any  # numpy arrays, theta's structure
    version: int  # the learner step of the theta the gradient was computed at
    metrics: dict[str, float]


def as_config(config: MetaTrainConfig | Mapping[str, Any]) -> MetaTrainConfig:
    if isinstance(config, MetaTrainConfig):
        return config
    return MetaTrainConfig.from_dict(config)


def worker_seed(seed: int, serial: int) -> int:
    """The seed of worker ``serial`` in a run of ``seed`` (``seed`` itself for worker 0)."""
    return (seed + SEED_STRIDE * serial) % 2**31


def initial_theta(config: MetaTrainConfig | Mapping[str, Any], lopt=None) -> Any:
    """The run's initial theta, as the learner (and ``MetaTrainer``) draws it."""
    config = as_config(config)
    if lopt is None:
        lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    return run_initial_theta(config, lopt)


class MetaGradientWorker:
    """``compute(theta, version) -> WorkerResult``; picklable arguments only, so Ray can
    build it in another process (``ray.remote(MetaGradientWorker)``)."""

    def __init__(self, config: MetaTrainConfig | Mapping[str, Any], serial: int = 0):
        enable_persistent_cache()  # workers of one machine compile the same programs
        base = as_config(config)
        self.serial = serial
        self.config = dataclasses.replace(base, seed=worker_seed(base.seed, serial))
        self.lopt = get_learned_optimizer(self.config.lopt, self.config.lopt_config)
        self.estimator = build_estimator_over_tasks(self.config, self.lopt)
        self.key = jax.random.PRNGKey(self.config.seed)
        self.state = None  # built from the first theta received
        self.count = 0  # estimates made

    def pid(self) -> int:
        """The worker's process id (to find or signal its process)."""
        return os.getpid()

    def compute(self, theta: Any, version: int) -> WorkerResult:
        start = time.perf_counter()
        if self.state is None:
            self.state = self.estimator.init_state(theta, initial_keys(self.config.seed)[1])
        meta_loss, grad, self.state, metrics = self.estimator.estimate(
            theta, self.state, jax.random.fold_in(self.key, self.count)
        )
        self.count += 1
        grad = jax.device_get(grad)
        record = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        record.update(
            meta_loss=float(meta_loss),
            worker=float(self.serial),
            estimate=float(self.count - 1),
            worker_seconds=time.perf_counter() - start,
        )
        return WorkerResult(grad, int(version), record)
