"""Seconds per Adam step of every canonical task, and the implied time of 10K steps.

VeLOdrome's tasks train for 10K steps (VeLO, arXiv:2211.09760, §4.1); ours are sized so that
10K steps take minutes on 2 CPU cores. This measures it: each task's training
step (batch sampled in-jit, value_and_grad, Adam, apply) runs ``--steps``
times in one jitted ``lax.scan``; the median of ``--repeats`` calls after a
warm-up is reported, with optax SGD on the same task as the reference ratio.
Writes ``benchmarks/results/canonical_step_time.json``; with ``--tasks`` only the named
tasks are measured and their rows replaced in the existing file (other rows kept; the
replaced values are listed under ``updates`` with the time of the update).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import jax
import optax

from learnopt.tasks.fixed.registry import canonical_names, get_task


def step_seconds(task, opt, steps: int, repeats: int) -> float:
    def body(carry, t):
        params, state = carry
        k = jax.random.fold_in(jax.random.PRNGKey(0), t)
        batch = task.datasets.train.sample(k)
        loss, g = jax.value_and_grad(task.loss)(params, k, batch)
        u, state = opt.update(g, state, params)
        return (optax.apply_updates(params, u), state), loss

    params = task.init(jax.random.PRNGKey(0))
    run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), jax.numpy.arange(steps)))
    state = opt.init(params)
    jax.block_until_ready(run(params, state))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, state))
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="measure only these canonical tasks and update their rows in the existing file",
    )
    p.add_argument("--note", default="", help="why the rows were re-measured (with --tasks)")
    args = p.parse_args(argv)
    names = canonical_names()
    if args.tasks is not None:
        unknown = sorted(set(args.tasks) - set(names))
        if unknown:
            p.error(f"unknown tasks {unknown}; valid: {', '.join(names)}")
        names = [n for n in names if n in args.tasks]
    rows = []
    for name in names:
        task = get_task(name)
        adam = step_seconds(task, optax.adam(1e-3), args.steps, args.repeats)
        sgd = step_seconds(task, optax.sgd(1e-2), args.steps, args.repeats)
        rows.append(
            {
                "task": name,
                "num_params": task.num_params(),
                "adam_step_seconds": adam,
                "adam_over_sgd": adam / sgd,
                "adam_10k_steps_minutes": adam * 10_000 / 60,
            }
        )
        print(
            f"{name:50s} {rows[-1]['num_params']:>9,} params  {adam * 1e3:7.2f} ms/step  "
            f"10K steps: {rows[-1]['adam_10k_steps_minutes']:5.1f} min",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "jax": jax.__version__, "load_average": os.getloadavg()}
    path = args.out / "canonical_step_time.json"
    result = {"machine": meta, "rows": rows}
    if args.tasks is not None and path.exists():
        result = merge(json.loads(path.read_text()), rows, meta, args.note)
    path.write_text(json.dumps(result, indent=2) + "\n")


def merge(old: dict, rows: list[dict], meta: dict, note: str = "") -> dict:
    """``old`` with the rows of the tasks in ``rows`` replaced (in canonical order) and an
    ``updates`` entry recording what was replaced, when, and on what machine state."""
    new = {r["task"]: r for r in rows}
    previous = {r["task"]: r for r in old.get("rows", []) if r["task"] in new}
    order = canonical_names()
    kept = [r for r in old.get("rows", []) if r["task"] not in new]
    merged = sorted(
        kept + rows, key=lambda r: order.index(r["task"]) if r["task"] in order else len(order)
    )
    update = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": meta,
        "tasks": sorted(new),
        "previous_adam_step_seconds": {t: r["adam_step_seconds"] for t, r in previous.items()},
    }
    if note:
        update["note"] = note
    return {**old, "rows": merged, "updates": [*old.get("updates", []), update]}


if __name__ == "__main__":
    main()
