"""Bench optimizers on the tasks of a committed ``learnopt bench`` report, against that report's
baselines, without training the baselines again.

A full-suite report (``benchmarks/results/bench_full/results.json``) holds, per task, the
LR-tuned Adam envelope (downsampled to at most 200 points of its 3x-longer run) and every
baseline's final loss. Training the Adam grid again takes hours on 2 cores; training one more
optimizer on the 31 tasks takes minutes. This script trains the optimizers given with
``--optimizer`` (the specs of ``learnopt bench``) on each task of the report with the report's
seeds and step budgets, and scores them as ``learnopt bench`` does (VeLO's speedup, Metz et
al. 2022, arXiv:2211.09760, §4.3), with one difference: the envelope is the stored one,
linearly interpolated between its points. To show what that costs, the report's own
optimizers are scored again on the interpolated envelope from their stored final losses, and
the largest relative difference to their stored speedups is recorded.

Usage: ``python benchmarks/bench_against_report.py --optimizer runs/general_nn_adam
[--optimizer ...] [--report PATH] [--task NAME ...] [--out PATH]``; writes JSON (default:
``benchmarks/results/bench_against_report.json``) and prints the aggregate table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from learnopt.bench.run import ADAM_DEFAULT, ADAM_TUNED, MIN_SPEEDUP, contender_curves
from learnopt.bench.speedup import final_loss, speedup
from learnopt.bench.suite import bench_task
from learnopt.io import atomic_write_json, machine_info
from learnopt.resolve import resolve_optimizer


def interpolated_envelope(stored: dict[str, list[float]], length: int) -> np.ndarray:
    """The stored (downsampled) envelope at every step ``1 .. length``, linearly
    interpolated; non-increasing as the stored points are."""
    env = np.interp(np.arange(1, length + 1), stored["steps"], stored["loss"])
    return np.minimum.accumulate(env)


def score(final: float, curves: np.ndarray | None, env: np.ndarray, steps: int,
          initial: float, adam_default_final: float) -> dict[str, Any]:
    sp = speedup(final, env, steps, min_speedup=MIN_SPEEDUP)
    diverged = (not np.isfinite(final) or final >= initial
                or (curves is not None and not np.all(np.isfinite(curves))))
    return {"final_loss": final, "speedup": sp.value, "clipped": sp.clipped,
            "beats_adam_1e-3": bool(final < adam_default_final), "diverged": bool(diverged)}


def aggregate(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    scores = [r["scores"][label] for r in rows]
    s = np.asarray([x["speedup"] for x in scores])
    return {"tasks": len(scores), "beats_tuned_adam": float(np.mean(s > 1.0)),
            "beats_adam_1e-3": float(np.mean([x["beats_adam_1e-3"] for x in scores])),
            "median_speedup": float(np.median(s)), "mean_speedup": float(np.mean(s)),
            "divergences": int(sum(x["diverged"] for x in scores))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", action="append", required=True)
    p.add_argument("--report", default="benchmarks/results/bench_full/results.json")
    p.add_argument("--task", action="append", default=None)
    p.add_argument("--out", default="benchmarks/results/bench_against_report.json")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    contenders = [resolve_optimizer(spec) for spec in args.optimizer]
    stored_labels = [label for label in report["tasks"][0]["results"]]
    clash = {c.label for c in contenders} & set(stored_labels)
    if clash:
        raise SystemExit(f"optimizer labels {sorted(clash)} are already in the report")
    tasks = [t for t in report["tasks"] if not args.task or t["task"] in args.task]
    if not tasks:
        raise SystemExit(f"no task of {args.report} matches {args.task}")
    seeds = list(range(int(report["seeds"])))
    factor = float(report["baseline_factor"])
    start = time.perf_counter()
    rows = []
    for t in tqdm(tasks, desc="tasks", unit="task"):
        bt = bench_task(t["task"])
        if bt.steps != t["steps"]:
            raise SystemExit(f"{bt.name}: the suite has {bt.steps} steps, the report "
                             f"{t['steps']}")
        env = interpolated_envelope(t["envelope"], int(round(factor * bt.steps)))
        adam_final = t["results"][ADAM_DEFAULT]["final_loss"]
        scores = {label: score(r["final_loss"], None, env, bt.steps, t["initial_loss"],
                               adam_final) for label, r in t["results"].items()}
        interp_error = max(abs(scores[label]["speedup"] - r["speedup"]) / r["speedup"]
                           for label, r in t["results"].items())
        task = bt.build()
        for c in contenders:
            curves = contender_curves(task, c, seeds, bt.steps)
            scores[c.label] = score(final_loss(curves), curves, env, bt.steps,
                                    t["initial_loss"], adam_final)
        rows.append({"task": bt.name, "kind": bt.kind, "steps": bt.steps, "scores": scores,
                     "stored_speedup_max_rel_error": interp_error})
    labels = [c.label for c in contenders] + stored_labels
    out = {"benchmark": "bench_against_report", "report": args.report,
           "command": "python benchmarks/bench_against_report.py " + " ".join(
               f"--optimizer {s}" for s in args.optimizer),
           "optimizers": {c.label: c.setting for c in contenders}, "seeds": seeds,
           "baseline_factor": factor, "seconds": time.perf_counter() - start,
           "machine": machine_info(),
           "max_rel_error_of_interpolated_envelope": max(
               r["stored_speedup_max_rel_error"] for r in rows),
           "aggregate": {label: aggregate(rows, label) for label in labels}, "tasks": rows}
    atomic_write_json(args.out, out)
    print(f"{'optimizer':32s} {'beats tuned':>11s} {'beats 1e-3':>10s} {'median':>7s} "
          f"{'mean':>6s} {'div':>4s}")
    for label, a in out["aggregate"].items():
        print(f"{label[:32]:32s} {a['beats_tuned_adam']:11.2f} {a['beats_adam_1e-3']:10.2f} "
              f"{a['median_speedup']:7.3f} {a['mean_speedup']:6.2f} {a['divergences']:4d}")
    print(f"wrote {args.out}; stored speedups re-scored on the interpolated envelope differ by "
          f"at most {100 * out['max_rel_error_of_interpolated_envelope']:.1f}%")
    return out


if __name__ == "__main__":
    main()
