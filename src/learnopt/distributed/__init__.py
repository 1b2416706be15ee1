"""Meta-training on Ray: a learner in the driver, meta-gradient workers as actors.

``RayMetaGradients(config, num_workers, address=None).next(theta, version)`` returns
``(grad, version, metrics)`` results; ``run_learner`` applies them with a ``meta.learner``
Learner. See docs/distributed.md. Importing this package imports Ray.
"""

from learnopt.distributed.loop import run_learner
from learnopt.distributed.ray_backend import RayMetaGradients, WorkerFailures
from learnopt.distributed.worker import (
    MetaGradientWorker,
    WorkerResult,
    initial_theta,
    worker_seed,
)

__all__ = [
    "MetaGradientWorker",
    "RayMetaGradients",
    "WorkerFailures",
    "WorkerResult",
    "initial_theta",
    "run_learner",
    "worker_seed",
]
