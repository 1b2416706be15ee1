"""Compile and run seconds of one Adam run of every task of the ``learnopt bench`` suite.

The suite (:mod:`learnopt.bench.suite`) gives each task a step budget chosen so that one Adam run
of that many steps takes at most about 5 s on one CPU core after compilation, about 90 s for
the ``full`` suite and 15 s for ``quick``. This measures it with the program the benchmark runs:
:func:`learnopt.bench.curves.loss_curves` with one learning rate (Adam 1e-3) and one seed, a
jit-compiled ``vmap`` over hyperparameters of ``vmap`` over seeds of a ``lax.scan`` over steps.

``loss_curves`` compiles on every call, so one call is timed and split with JAX's monitoring
spans: ``compile_seconds`` is the union of the time spent tracing, lowering and compiling
(``/jax/core/compile/*`` events) during the call, and ``run_seconds`` the rest of its wall time
(the scan, with batches drawn in-jit). ``build_seconds`` (building the task, reading its data)
is reported apart. By default the process pins itself to one core before JAX starts
(``--cores``), so XLA runs one thread. Writes ``benchmarks/results/bench_suite_time.json``
with :func:`learnopt.io.machine_info` and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (nested spans count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def time_task(bench, steps: int, lr: float = 1e-3) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from learnopt.bench.curves import loss_curves

    t0 = time.perf_counter()
    task = bench.build()
    num_params = task.num_params()
    build = time.perf_counter() - t0

    spans: list[tuple[float, float]] = []

    def listener(event, start, end, **kwargs):
        if event in COMPILE_EVENTS:
            spans.append((start, end))

    jax.monitoring.register_event_time_span_listener(listener)
    try:
        start = time.time()
        curves, _ = loss_curves(task, lambda h: optax.adam(h), jnp.array([lr]), [0], steps)
        curves = np.asarray(jax.block_until_ready(curves))[0, 0]
        total = time.time() - start
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
    compile_s = union_seconds(spans)
    return {
        "task": bench.name,
        "kind": bench.kind,
        "num_params": int(num_params),
        "steps": steps,
        "build_seconds": round(build, 3),
        "compile_seconds": round(compile_s, 3),
        "run_seconds": round(total - compile_s, 3),
        "ms_per_step": round(1e3 * (total - compile_s) / steps, 4),
        "first_loss": float(curves[0]),
        "last_loss": float(np.mean(curves[-max(1, steps // 20):])),
        "finite": bool(np.all(np.isfinite(curves))),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="full", help="suite to time (quick or full)")
    p.add_argument("--tasks", nargs="+", default=None, help="time only these suite tasks")
    p.add_argument("--steps", type=int, default=None, help="override every task's steps")
    p.add_argument("--cores", type=int, default=1, help="pin to this many cores (0: no pinning)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.cores > 0 and hasattr(os, "sched_setaffinity"):  # before XLA sizes its thread pool
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[-args.cores:])

    from learnopt.bench.suite import SUITES, suite
    from learnopt.io import machine_info

    tasks = suite(args.suite)
    if args.tasks is not None:
        unknown = sorted(set(args.tasks) - {t.name for t in tasks})
        if unknown:
            p.error(f"unknown tasks {unknown}; valid: {', '.join(t.name for t in tasks)}")
        tasks = [t for t in tasks if t.name in args.tasks]
    load_before = os.getloadavg()
    rows = []
    for bench in tasks:
        row = time_task(bench, args.steps or bench.steps)
        rows.append(row)
        print(
            f"{row['task']:54s} {row['kind']:14s} {row['num_params']:>8,} {row['steps']:>5} "
            f"compile {row['compile_seconds']:6.2f} s  run {row['run_seconds']:6.2f} s  "
            f"({row['ms_per_step']:.3f} ms/step)  loss {row['first_loss']:.3g} -> "
            f"{row['last_loss']:.3g}",
            flush=True,
        )
    names = {r["task"] for r in rows}
    totals = {
        s: round(sum(r["run_seconds"] for r in rows if r["task"] in SUITES[s]), 2)
        for s in SUITES
        if set(SUITES[s]) <= names
    }
    compile_totals = {
        s: round(sum(r["compile_seconds"] for r in rows if r["task"] in SUITES[s]), 2)
        for s in SUITES
        if set(SUITES[s]) <= names
    }
    print("run seconds per suite:", totals, " compile seconds:", compile_totals)
    if args.no_write:
        return
    machine = machine_info()
    machine.update(
        pinned_cores=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    result = {
        "what": "one Adam(1e-3) run of each suite task's steps via learnopt.bench.curves."
        "loss_curves (1 learning rate, 1 seed)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine,
        "suite_run_seconds": totals,
        "suite_compile_seconds": compile_totals,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_suite_time.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
