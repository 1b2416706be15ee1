"""Never hang silently: a watchdog for steps, and the XLA:CPU deadlock workaround.

**The deadlock** (docs/hangs.md). jaxlib 0.10.0 to 0.11.0 split the batch of a batched LAPACK
call on CPU (``jnp.linalg.qr``, ``cholesky``, ``eigh``, ``svd``, ``lu``, ``solve``, triangular
solves, ... under ``vmap`` or with leading batch axes) over XLA's intra-op thread pool
(``jax::ParallelBatchMap`` in ``jaxlib/cpu/lapack_kernels.cc``) and block a pool thread in
``absl::BlockingCounter::Wait`` until the chunks are done. When as many such calls run at the
same time as the pool has threads (two on a 2-core machine: independent QRs of the layers of a
network with orthogonal initialisation, vmapped over seeds or tasks), no thread is left to run
the chunks and the program never returns: 0% CPU, the main thread in ``BlockUntilReady``.
Whether two calls overlap depends on thread timing, so the same program sometimes finishes.
The path is taken when ``batch * flops_per_matrix >= 2e5`` and the pool has more than one
thread; jax removed it from open-source builds after 0.11.0 (jax commit 859992407d).

:func:`apply_xla_workaround` (called when :mod:`learnopt` is imported) sets ``PJRT_NPROC=1``
on an affected jaxlib, which sizes XLA:CPU's intra-op pool to one thread; LAPACK kernels then
never split their batch, so the deadlock cannot happen. It does nothing if jax's backend is
already initialised (the variable is read when the CPU client is created; then it warns), if
``PJRT_NPROC`` or ``NPROC`` is already set (the user's choice wins), or if
``LEARNOPT_XLA_WORKAROUND=0``.

**The watchdog.** A blocked XLA call cannot be interrupted from Python. :class:`StepWatchdog`
therefore runs each step (and the wait for its results) in a daemon thread and waits for it
with a time limit: ``factor`` times the median of the previous steps, at least ``floor_s``
(``first_s`` for the first, compiling, calls; or from the caller's ``expected_s``). A step that
runs past its limit is reported (logged, ``on_hang``) and abandoned, and :class:`StepHangError`
is raised naming the task, so the caller can drop the task and draw another, or a Ray worker
can exit and be replaced. The abandoned thread keeps running (or stays blocked) with whatever
memory and threads it holds; after an XLA deadlock the process's thread pool is partly blocked
for good (the same program will hang again), so restarting the process is the safe recovery.
"""

from __future__ import annotations

import logging
import os
import queue
import statistics
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# jaxlib versions with the unguarded jax::ParallelBatchMap in jaxlib/cpu/lapack_kernels.cc
# (added in 0.10.0, "LAPACK operations are now parallelized along the batch dimension on
# CPU"; guarded by PLATFORM_GOOGLE in jax commit 859992407d, after the 0.11.0 release).
AFFECTED_JAXLIB = ((0, 10, 0), (0, 11, 0))  # inclusive
WORKAROUND_ENV = "LEARNOPT_XLA_WORKAROUND"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def jaxlib_affected(version: str | None = None) -> bool:
    """Whether jaxlib ``version`` (default: the installed one) has the batched-LAPACK deadlock."""
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return False
    low, high = AFFECTED_JAXLIB
    return low <= _version_tuple(version) <= high


def _backend_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API moved: assume the worst, do not touch the environment
        return True


def apply_xla_workaround(environ: dict[str, str] | None = None) -> str | None:
    """Set ``PJRT_NPROC=1`` if the installed jaxlib can deadlock in batched LAPACK calls.

    Returns a description of what was done, or None when nothing was (not affected, disabled
    with ``LEARNOPT_XLA_WORKAROUND=0``, ``PJRT_NPROC``/``NPROC`` set by the user, or the
    backend already initialised, in which case a warning says how to apply it by hand).
    ``environ`` defaults to ``os.environ`` (tests pass a dict).
    """
    env = os.environ if environ is None else environ
    if env.get(WORKAROUND_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "PJRT_NPROC" in env or "NPROC" in env:
        return None
    if not jaxlib_affected():
        return None
    if environ is None and _backend_initialised():
        warnings.warn(
            "learnopt: this jaxlib can deadlock XLA:CPU in batched LAPACK calls (e.g. vmapped "
            "orthogonal initialisation; see docs/hangs.md), and jax's backend was initialised "
            "before learnopt was imported, so the workaround PJRT_NPROC=1 could not be applied. "
            "Set PJRT_NPROC=1 in the environment, or import learnopt before using jax.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    env["PJRT_NPROC"] = "1"
    return "PJRT_NPROC=1 (jaxlib batched-LAPACK deadlock workaround, docs/hangs.md)"


class StepHangError(TimeoutError):
    """A step ran past its watchdog limit; it was abandoned (still running or blocked)."""

    def __init__(self, task: str, elapsed_s: float, limit_s: float, how: str):
        self.task = task
        self.elapsed_s = elapsed_s
        self.limit_s = limit_s
        super().__init__(
            f"learnopt watchdog: the step of task {task!r} has run {elapsed_s:.1f} s, past its "
            f"limit of {limit_s:.1f} s ({how}); it is probably hung. It was abandoned in a "
            "daemon thread, which keeps its memory and threads. If this is an XLA deadlock "
            "(0% CPU; see docs/hangs.md) the process's CPU thread pool stays partly blocked: "
            "drop this task, and restart the process (or Ray worker) to be safe."
        )


class StepWatchdog:
    """Runs steps with a time limit learned from their own durations.

    ``run(fn, *args, task=..., **kwargs)`` calls ``fn(*args, **kwargs)`` in a daemon thread,
    waits for its outputs (``jax.block_until_ready``, so the device work is inside the timed
    region; ``block=False`` skips that), and returns them. The limit is ``expected_s * factor``
    when the caller passes ``expected_s``; else ``first_s`` for the first ``warmup`` calls (they
    compile) and ``factor`` times the median of the last ``history`` recorded durations after
    that; never below ``floor_s``. Calls past ``warmup`` that finish are recorded. A call past
    its limit raises :class:`StepHangError` after logging it and calling ``on_hang(error)``;
    exceptions of ``fn`` propagate unchanged.
    """

    def __init__(
        self,
        *,
        factor: float = 10.0,
        floor_s: float = 30.0,
        first_s: float = 900.0,
        warmup: int = 1,
        history: int = 100,
        block: bool = True,
        on_hang: Callable[[StepHangError], Any] | None = None,
    ):
        if factor <= 0 or floor_s < 0 or first_s <= 0 or warmup < 0 or history < 1:
            raise ValueError(
                "need factor > 0, floor_s >= 0, first_s > 0, warmup >= 0 and history >= 1"
            )
        self.factor = factor
        self.floor_s = floor_s
        self.first_s = first_s
        self.warmup = warmup
        self.block = block
        self.on_hang = on_hang
        self.calls = 0
        self.durations: deque[float] = deque(maxlen=history)
        self.hangs: list[StepHangError] = []
        self._abandoned: list[threading.Thread] = []
        self._runner: _StepThread | None = None  # reused while no call hangs

    @property
    def median_s(self) -> float | None:
        """Median recorded step duration, or None before any."""
        return statistics.median(self.durations) if self.durations else None

    @property
    def abandoned_alive(self) -> int:
        """How many abandoned (hung) step threads are still running or blocked."""
        return sum(t.is_alive() for t in self._abandoned)

    def close(self) -> None:
        """End the idle thread that runs the calls (a later call starts a new one)."""
        if self._runner is not None:
            self._runner.stop()
            self._runner = None

    def record(self, seconds: float) -> None:
        """Add a step duration measured elsewhere to the history."""
        self.durations.append(float(seconds))

    def limit_s(self, expected_s: float | None = None) -> tuple[float, str]:
        """``(limit in seconds, how it was computed)`` for the next call."""
        if expected_s is not None:
            limit, how = self.factor * expected_s, f"{self.factor:g} x expected {expected_s:.3g} s"
        elif self.calls < self.warmup or not self.durations:
            limit, how = self.first_s, "first-call limit, compilation included"
        else:
            med = self.median_s
            limit, how = self.factor * med, f"{self.factor:g} x median step {med:.3g} s"
        if limit < self.floor_s:
            limit, how = self.floor_s, f"floor; {how}"
        return limit, how

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        task: str = "step",
        expected_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` under the watchdog (class docstring)."""
        limit, how = self.limit_s(expected_s)
        warm = self.calls >= self.warmup
        self.calls += 1
        box: dict[str, Any] = {}
        done = threading.Event()
        block = self.block

        def target() -> None:
            try:
                out = fn(*args, **kwargs)
                if block:
                    import jax

                    out = jax.block_until_ready(out)
                box["out"] = out
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e
            finally:
                done.set()

        if self._runner is None:
            self._runner = _StepThread()
        runner = self._runner
        start = time.perf_counter()
        runner.submit(target, f"learnopt-step[{task}]")
        if not done.wait(limit):
            err = StepHangError(task, time.perf_counter() - start, limit, how)
            self.close()  # the thread exits once the hung call returns, if ever
            self._abandoned.append(runner.thread)
            self.hangs.append(err)
            logger.error("%s", err)
            if self.on_hang is not None:
                self.on_hang(err)
            raise err
        elapsed = time.perf_counter() - start
        if "err" in box:
            raise box["err"]
        if warm:
            self.record(elapsed)
        return box["out"]


class _StepThread:
    """A daemon thread that runs submitted calls one at a time (starting a thread per step
    cost about 2 ms on a busy 2-core machine, a tenth of a small task's PES step)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="learnopt-step", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, name = job
            self.thread.name = name
            fn()

    def submit(self, fn: Callable[[], None], name: str) -> None:
        self._jobs.put((fn, name))

    def stop(self) -> None:
        self._jobs.put(None)


def run_with_timeout(
    fn: Callable[..., Any], *args: Any, timeout_s: float, task: str = "step",
    block: bool = True, **kwargs: Any,
) -> Any:
    """One call of ``fn(*args, **kwargs)`` with a fixed limit; :class:`StepHangError` past it."""
    wd = StepWatchdog(factor=1.0, floor_s=0.0, first_s=timeout_s, warmup=1, block=block)
    try:
        return wd.run(fn, *args, task=task, **kwargs)
    finally:
        wd.close()  # a one-off watchdog leaves no idle thread behind
