"""How learnopt compiles its large programs, and where compiled programs are kept.

**Meta-training programs** (one estimate of a meta-gradient: a scan over a truncation of
``2 x pairs x tasks`` vmapped inner runs, each with a learned optimizer's update) are compiled
by :func:`jit_program`. On the CPU it asks XLA for backend optimisation level 2 instead of its
default 3: measured on a 2-core machine (``benchmarks/meta_throughput.py``, both levels
compiled in one process, calls alternating), small_fc_lopt's PES estimate on 8 tasks of the 8x8
Fashion-MNIST MLP compiles about a third faster and runs faster too (the JSON records both).
Level 2 keeps IEEE semantics (no fast-math). On other backends nothing is changed.

**Persistent compilation cache.** A meta-training run compiles the same programs every time it
starts: on a resume after a kill, in every Ray worker of a machine, in each population member.
:func:`enable_persistent_cache` points jax's persistent compilation cache at a folder
(``$LEARNOPT_COMPILE_CACHE``, default ``~/.cache/learnopt/xla``; ``LEARNOPT_COMPILE_CACHE=0``
turns it off), so only the first start of a program pays for its compile. jax keys each entry
on the program, the compile options, the jax and XLA versions and the backend, so a stale entry
is never used; programs that compile in under a second are not stored. ``learnopt`` commands,
the Ray meta-gradient workers and the population hosts enable it when they start; library
users call it themselves (or set jax's ``jax_compilation_cache_dir``). This module imports jax
only when it is used, so a command that never compiles does not pay for importing it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: XLA options for the meta-training programs on the CPU (module docstring).
CPU_PROGRAM_OPTIONS = {"xla_backend_optimization_level": 2}
CACHE_ENV = "LEARNOPT_COMPILE_CACHE"


def program_options(backend: str | None = None) -> dict[str, Any]:
    """The compiler options of :func:`jit_program` on ``backend`` (default: jax's)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    return dict(CPU_PROGRAM_OPTIONS) if backend == "cpu" else {}


def jit_program(fn: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn)`` with :func:`program_options`: for meta-training estimates."""
    import jax

    return jax.jit(fn, compiler_options=program_options(), **jit_kwargs)


def cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """The persistent cache folder from ``$LEARNOPT_COMPILE_CACHE`` (``None``: turned off)."""
    env = os.environ if environ is None else environ
    value = env.get(CACHE_ENV, "").strip()
    if value in ("0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "learnopt" / "xla"


def enable_persistent_cache(path: str | Path | None = None) -> Path | None:
    """Keep compiled programs in ``path`` (default :func:`cache_dir`); returns the folder used.

    Does nothing (returns ``None``) when the cache is turned off, or when the folder cannot be
    created (a read-only home): compiling again is slower, never wrong.
    """
    folder = cache_dir() if path is None else Path(path)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(folder))
    else:  # read when jax is imported; inherited by child processes (Ray workers)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    return folder
