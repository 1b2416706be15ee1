"""Held-out accuracy of the step-time model of ``learnopt.tasks.timing`` (VeLO App. C.4).

VeLO (Metz et al. 2022, arXiv:2211.09760) rejection-samples tasks by a predicted time per step
(C.4, C.5). This script calibrates :class:`learnopt.tasks.timing.TimeModel` on this machine with
a modest number of sampled tasks per family (``--num-calibration``), then times a held-out set
of other sampled tasks (``--num-heldout`` per family, a different key) and reports how often the
prediction is within a factor of 2 of the measurement, overall and per family, with the RMS
error of ``log(predicted / measured)``.

Both sets are drawn from the families at ``--size`` (default ``cpu``) on synthetic data of
the tasks' shapes; timing is ``learnopt.tasks.timing.measure_step_time`` (value_and_grad +
SGD update in a jitted scan, fastest of several calls). Process CPU time and wall time of the
whole run are recorded, as are the measured range of step times per family and the fraction of
all measured tasks under each of C.5's budgets times ``--time-scale`` (what ``time_scale`` of
``sample_velo_config`` should be chosen against).

Usage: ``python benchmarks/time_model.py [--num-calibration 5] [--num-heldout 3]
[--out benchmarks/results/time_model.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from learnopt.tasks import timing as T
from learnopt.tasks.families import velo as F
from learnopt.tasks.families.registry import velo_families, velo_names

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-calibration", type=int, default=5)
    parser.add_argument("--num-heldout", type=int, default=3)
    parser.add_argument("--size", default="cpu", choices=F.SIZES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", default=velo_names())
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "time_model.json")
    args = parser.parse_args(argv)

    families = velo_families(args.families, size=args.size, data="synthetic")
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - wall0:7.1f}s] {msg}", flush=True)

    key_cal, key_held = jax.random.split(jax.random.PRNGKey(args.seed))
    model = T.calibrate(families, args.num_calibration, key_cal, log=log)
    cal_cpu = time.process_time() - cpu0
    log(f"calibrated on {model.info['num_measurements']} tasks; fit {model.info}")
    held = T.measure_families(families, args.num_heldout, key_held, log=log)

    def static_key(config_dict: dict) -> str:
        return json.dumps(config_dict["fields"]["static"], sort_keys=True)

    cal_statics = {static_key(m["config"]) for m in model.info["measurements"]}
    rows = []
    for m in held:
        config = m.as_config()
        predicted = model.predict(config)
        rows.append(
            {
                "family": m.family,
                "measured_s": m.seconds,
                "predicted_s": predicted,
                "log_ratio": math.log(predicted / m.seconds),
                "in_calibration_set": static_key(m.config) in cal_statics,
                "static": m.config["fields"]["static"],
            }
        )
    ratios = np.asarray([r["log_ratio"] for r in rows])
    within = np.abs(ratios) <= math.log(2.0)
    per_family = {}
    for name in families:
        sel = np.asarray([r["family"] == name for r in rows])
        cal_times = [mm["seconds"] for mm in model.info["measurements"] if mm["family"] == name] + [
            r["measured_s"] for r in rows if r["family"] == name
        ]
        per_family[name] = {
            "heldout_within_factor_2": float(np.mean(within[sel])),
            "heldout_rms_log_error": float(np.sqrt(np.mean(ratios[sel] ** 2))),
            "step_time_min_s": float(min(cal_times)),
            "step_time_median_s": float(np.median(cal_times)),
            "step_time_max_s": float(max(cal_times)),
        }
    all_times = [mm["seconds"] for mm in model.info["measurements"]] + [
        r["measured_s"] for r in rows
    ]
    under_scaled_budget = {
        f"{thr:g}": float(np.mean(np.asarray(all_times) <= thr * args.time_scale))
        for thr in T.PHASE_ONE_THRESHOLDS
    }
    result = {
        "description": (
            "Held-out accuracy of the step-time model (VeLO App. C.4): fraction of "
            "held-out sampled tasks whose predicted seconds per step is within a factor of 2 "
            "of the measured value."
        ),
        "heldout_within_factor_2": float(np.mean(within)),
        "heldout_rms_log_error": float(np.sqrt(np.mean(ratios**2))),
        "heldout_median_abs_log_ratio": float(np.median(np.abs(ratios))),
        "num_heldout": len(rows),
        "num_calibration": model.info["num_measurements"],
        "calibration_fit_within_factor_2": model.info["fit_within_factor_2"],
        "calibration_fit_rms_log_error": model.info["fit_rms_log_error"],
        "size": args.size,
        "seed": args.seed,
        "process_cpu_seconds": time.process_time() - cpu0,
        "calibration_cpu_seconds": cal_cpu,
        "wall_seconds": time.perf_counter() - wall0,
        "machine": T.machine_info(),
        "per_family": per_family,
        "time_scale": args.time_scale,
        "fraction_of_measured_tasks_under_scaled_budget": under_scaled_budget,
        "heldout": rows,
        "model": model.to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=_default))
    log(
        f"held-out within 2x: {result['heldout_within_factor_2']:.3f} of {len(rows)} "
        f"(rms log error {result['heldout_rms_log_error']:.3f}); "
        f"CPU {result['process_cpu_seconds']:.0f} s, wall {result['wall_seconds']:.0f} s; "
        f"wrote {args.out}"
    )
    return result


def _default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    main(sys.argv[1:])
