"""Outer steps per second: the single-process meta-training loop against 1 and 2 Ray workers.

The asynchronous worker/learner setup of Metz et al. 2020 (arXiv:2009.11243, App. B, H.1) as
``learnopt.distributed`` runs it: a learner in the driver, workers as Ray actors
(``RayMetaGradients``, embedded local Ray started per configuration), gradients applied in
arrival order with ``max_staleness`` 5. The single-process path is the ``MetaTrainer`` loop
(``estimator.estimate`` then ``learner.apply`` in one process). Task: the default small
setting, ``fmnist_mlp_8x8`` with ``small_fc_lopt``, PES over 8 inner runs, truncation 20.

Each configuration is warmed up first (compiles, Ray and actor start-up; for Ray until every
worker has delivered a gradient), then ``--steps`` applied outer updates are timed. The order
is single, 1 worker, 2 workers, single again; the ratios divide by the mean of the two single
runs. The machine is shared: the load average and the CPU busy fraction of the whole machine
(``/proc/stat``) over each timed phase are recorded with the result.

Usage: ``python benchmarks/ray_workers.py [--steps N] [--out PATH]``.
Writes ``benchmarks/results/ray_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax

import learnopt
from learnopt.distributed import RayMetaGradients, initial_theta, run_learner
from learnopt.io import atomic_write_json, machine_info
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.learner import Learner
from learnopt.meta.train import MetaTrainConfig, build_estimator_over_tasks

CONFIG = MetaTrainConfig(task="fmnist_mlp_8x8", lopt="small_fc_lopt", estimator="pes",
                         num_tasks=8, trunc_length=20)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Phase:
    """Times a block; records wall seconds, machine CPU busy fraction and load average."""

    def __enter__(self):
        self.load0 = os.getloadavg()[0]
        self.cpu0 = cpu_times()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        busy, total = (b - a for a, b in zip(self.cpu0, cpu_times(), strict=True))
        self.busy = busy / max(total, 1)
        self.load = [round(self.load0, 2), round(os.getloadavg()[0], 2)]


def single_process(steps: int, warmup: int) -> dict:
    lopt = get_learned_optimizer(CONFIG.lopt, CONFIG.lopt_config)
    estimator = build_estimator_over_tasks(CONFIG, lopt)
    learner = Learner(CONFIG.outer_lr, CONFIG.clip)
    key = jax.random.PRNGKey(CONFIG.seed)
    theta_key, est_key = jax.random.split(jax.random.fold_in(key, -1 % 2**31))
    state = learner.init(lopt.init(theta_key))
    est_state = estimator.init_state(state.theta, est_key)

    def step(k):
        nonlocal state, est_state
        _, grad, est_state, _ = estimator.estimate(state.theta, est_state,
                                                   jax.random.fold_in(key, k))
        state, _ = learner.apply(state, grad)

    for k in range(warmup):
        step(k)
    with Phase() as p:
        for k in range(warmup, warmup + steps):
            step(k)
    return {"steps": steps, "seconds": round(p.seconds, 3),
            "steps_per_s": steps / p.seconds, "cpu_busy": round(p.busy, 3), "load": p.load}


def ray_workers(num_workers: int, steps: int, warmup: int) -> dict:
    learner = Learner(CONFIG.outer_lr, CONFIG.clip, max_staleness=5)
    t0 = time.perf_counter()
    with RayMetaGradients(CONFIG, num_workers) as grads:
        state = learner.init(initial_theta(CONFIG))
        seen: set[int] = set()
        target = warmup
        while True:  # warm up until every worker delivered (compiled) and `warmup` updates
            state, records = run_learner(grads, learner, state, target)
            seen |= {int(r["worker"]) for r in records}
            if seen >= set(range(num_workers)):
                break
            target = int(state.step) + 1
        startup = time.perf_counter() - t0
        stale0 = int(state.num_stale)
        start = int(state.step)
        with Phase() as p:
            state, records = run_learner(grads, learner, state, start + steps)
        failures = grads.num_failures
    return {
        "workers": num_workers, "steps": steps, "seconds": round(p.seconds, 3),
        "steps_per_s": steps / p.seconds, "startup_and_warmup_seconds": round(startup, 2),
        "gradients_received": len(records), "stale_dropped": int(state.num_stale) - stale0,
        "mean_staleness": sum(r["staleness"] for r in records) / len(records),
        "worker_failures": failures, "cpu_busy": round(p.busy, 3), "load": p.load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/ray_workers.json")
    args = parser.parse_args()
    with Phase() as idle:  # how busy the machine is before we start
        time.sleep(3.0)
    runs = {}
    runs["single_a"] = single_process(args.steps, args.warmup)
    print("single", runs["single_a"], flush=True)
    for n in (1, 2):
        runs[f"ray_{n}"] = ray_workers(n, args.steps, args.warmup)
        print(f"ray {n}", runs[f"ray_{n}"], flush=True)
    runs["single_b"] = single_process(args.steps, args.warmup)
    print("single", runs["single_b"], flush=True)
    base = (runs["single_a"]["steps_per_s"] + runs["single_b"]["steps_per_s"]) / 2
    result = {
        "benchmark": "ray_workers",
        "config": {k: CONFIG.to_dict()[k] for k in
                   ("task", "lopt", "estimator", "num_tasks", "trunc_length", "horizon")},
        "protocol": {"timed_steps": args.steps, "warmup_steps": args.warmup,
                     "order": "single, ray 1, ray 2, single", "max_staleness": 5,
                     "ratio": "steps/s over the mean of the two single-process runs"},
        "machine": machine_info(),
        # learnopt sets PJRT_NPROC=1 on affected jaxlibs (docs/hangs.md): one XLA thread per
        # process, so one process uses one core; Ray workers inherit the driver's environment.
        "xla_workaround": learnopt.XLA_WORKAROUND,
        "PJRT_NPROC": os.environ.get("PJRT_NPROC"),
        "machine_busy_before": {"cpu_busy": round(idle.busy, 3), "load": idle.load},
        "runs": runs,
        "single_steps_per_s": base,
        "ratio_vs_single": {f"ray_{n}": runs[f"ray_{n}"]["steps_per_s"] / base for n in (1, 2)},
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result["ratio_vs_single"], indent=2))


if __name__ == "__main__":
    main()
