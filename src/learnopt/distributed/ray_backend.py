"""Meta-gradients from Ray actors: N workers, each with its own estimator, kept busy.

The asynchronous, batched training of Metz et al. 2020 (arXiv:2009.11243, App. B and H.1):
workers compute meta-gradients at the theta they were given and the learner applies them as
they arrive, dropping stale ones (``meta.learner``). Here the learner runs in the driver and
each worker is a Ray actor holding a :class:`~learnopt.distributed.worker.MetaGradientWorker`.

:meth:`RayMetaGradients.next` gives every idle worker the driver's latest ``(theta, version)``,
waits until at least one worker is done, and returns the finished ``(grad, version, metrics)``
in arrival order; the others keep computing. A worker that dies (its process killed, or an
exception in its estimator) is replaced by a fresh one with the next serial number (a new
seed, fresh inner runs) and the run goes on; ``max_failures`` replacements in all end it.

Ray is started here (``ray.init(num_cpus=..., include_dashboard=False,
log_to_driver=False)``, shut down by :meth:`RayMetaGradients.close`) unless it is already
running in this process, or joins the cluster at ``address`` (``ray start --head``; see
docs/distributed.md). Usage statistics are off: nothing here reaches the network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ray

from learnopt.distributed.worker import MetaGradientWorker, WorkerResult, as_config
from learnopt.meta.train import MetaTrainConfig


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Join the cluster at ``address``, or start an embedded local Ray with ``num_cpus``,
    unless Ray is already up; returns whether this call started it (and so should shut it
    down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True

class WorkerFailures(RuntimeError):
    """More workers died than ``max_failures`` allows."""


class RayMetaGradients:
    """``next(theta, version) -> list[WorkerResult]`` from ``num_workers`` Ray actors.

    ``config`` is a MetaTrainConfig or its ``to_dict()``. ``num_cpus`` (embedded Ray only)
    defaults to ``num_workers * cpus_per_worker``; ``cpus_per_worker`` is each actor's Ray
    CPU request. ``worker_env`` sets environment variables in the workers (e.g.
    ``XLA_FLAGS``). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        config: MetaTrainConfig | Mapping[str, Any],
        num_workers: int,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_worker: float = 1.0,
        max_failures: int = 10,
        worker_env: Mapping[str, str] | None = None,
    ):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {max_failures}")
        self.config = as_config(config).to_dict()
        self.num_workers = num_workers
        self.max_failures = max_failures
        self.owns_ray = start_ray(
            address, num_cpus or max(1, int(num_workers * cpus_per_worker + 0.999))
        )
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": 0}
        if worker_env:
            options["runtime_env"] = {"env_vars": dict(worker_env)}
        self._actor_class = ray.remote(MetaGradientWorker).options(**options)
        self.workers: dict[int, Any] = {}  # serial -> actor handle
        self.pending: dict[Any, int] = {}  # object ref -> serial
        self.next_serial = 0
        self.num_failures = 0
        self.failures: list[str] = []
        for _ in range(num_workers):
            self._start_worker()

    def _start_worker(self) -> None:
        serial = self.next_serial
        self.next_serial += 1
        self.workers[serial] = self._actor_class.remote(self.config, serial)

    def _replace(self, serial: int, error: BaseException) -> None:
        self.num_failures += 1
        self.failures.append(f"worker {serial}: {type(error).__name__}: {error}"[:2000])
        actor = self.workers.pop(serial)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        if self.num_failures > self.max_failures:
            raise WorkerFailures(
                f"{self.num_failures} worker failures (max_failures={self.max_failures}); "
                f"last: {self.failures[-1]}"
            ) from error
        self._start_worker()

    @property
    def idle(self) -> list[int]:
        busy = set(self.pending.values())
        return [s for s in self.workers if s not in busy]

    def next(self, theta: Any, version: int, timeout: float | None = None) -> list[WorkerResult]:
        """Hand ``(theta, version)`` to every idle worker; return the results that are done:
        at least one, the first to finish first, then any others finished by then. A dead
        worker's result is replaced by a fresh worker, given ``(theta, version)`` in turn.
        ``timeout`` (seconds) bounds the wait: ``TimeoutError`` if no worker finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[WorkerResult] = []
        while not results:
            idle = self.idle
            if idle:
                theta_ref = ray.put(jax.device_get(theta))
                for serial in idle:
                    ref = self.workers[serial].compute.remote(theta_ref, int(version))
                    self.pending[ref] = serial
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"no worker finished within {timeout} s")
            rest = [r for r in self.pending if r not in ready]
            more = ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
            for ref in [*ready, *more]:
                serial = self.pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayError as error:
                    self._replace(serial, error)
        return results

    def close(self) -> None:
        """Stop the workers (and Ray, if this object started it)."""
        for actor in self.workers.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.workers.clear()
        self.pending.clear()
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> RayMetaGradients:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
