"""Seconds per Adam step of every canonical task, and the implied time of 10K steps.

VeLOdrome's tasks train for 10K steps (seed 001 §4.1); ours are sized so that
10K steps take minutes on 2 CPU cores. This measures it: each task's training
step (batch sampled in-jit, value_and_grad, Adam, apply) runs ``--steps``
times in one jitted ``lax.scan``; the median of ``--repeats`` calls after a
warm-up is reported, with optax SGD on the same task as the reference ratio.
Writes ``benchmarks/results/canonical_step_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import optax

from learnopt.tasks.canonical import build_canonical, canonical_names


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
    args = p.parse_args(argv)
    rows = []
    for name in canonical_names():
        task = build_canonical(name)
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
    (args.out / "canonical_step_time.json").write_text(
        json.dumps({"machine": meta, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
