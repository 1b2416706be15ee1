"""Step time and optimizer-state memory of small_fc_lopt relative to optax.adam.

Metz et al. 2022 (Practical tradeoffs, arXiv:2203.11860) §4.1-4.3 and Fig. 3b measure the compute
and memory overhead of learned optimizers; this is the same measurement on this project's
machine for ``small_fc_lopt`` (both compute paths, ``learnopt.learned.adafac_mlp``; the
elementwise one with and without the native CPU kernel, ``learnopt.learned.native``), with
``fc_lopt`` and SGD alongside, all as ratios to Adam measured in the same run.

Task: the 784-128-10 ReLU MLP (101,770 parameters), batch 128, random data (fixed batch),
softmax cross-entropy. A training step is ``value_and_grad`` + optimizer ``update`` +
``optax.apply_updates``; ``--steps`` steps run inside one jitted ``lax.scan``. Each optimizer is
compiled and warmed up first, then the timed calls are interleaved round-robin across optimizers
(so drift on the shared machine hits all of them alike) and the median is reported.
Optimizer-state bytes are the summed sizes of the state pytree's arrays. The machine's load
average is recorded at the start and the end: on a shared machine the absolute times move a lot,
the same-run ratios much less.

Usage: ``python benchmarks/small_fc_lopt_step.py [--quick] [--out PATH]``.
Writes ``benchmarks/results/small_fc_lopt_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from learnopt.learned import common, native
from learnopt.learned.adafac_mlp import SmallFcLOpt
from learnopt.learned.mlp import FcLOpt

BATCH = 128
SIZES = (784, 128, 10)


def make_task(key: jax.Array):
    kp, kx, ky = jax.random.split(key, 3)
    params = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(jax.random.fold_in(kp, i), (a, b)) / jnp.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,))
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])

    def loss_fn(p):
        h = x
        n = len(SIZES) - 1
        for i in range(n):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i != n - 1:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    return params, loss_fn


def make_runner(opt: optax.GradientTransformationExtraArgs, loss_fn, steps: int):
    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def run(params, state):
        (params, state), losses = jax.lax.scan(step, (params, state), None, length=steps)
        return params, state, losses[-1]

    return run


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "system": platform.platform(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "small_fc_lopt_step.json")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    steps = args.steps or (50 if args.quick else 100)

    machine_at_start = machine_info()
    params, loss_fn = make_task(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    small_concat = SmallFcLOpt(compute="concat")
    small_elem = SmallFcLOpt(compute="elementwise")
    fc = FcLOpt()
    opts = {
        "adam": optax.adam(1e-3),
        "sgd": optax.sgd(1e-2),
        "small_fc_lopt_concat": small_concat.optimizer(small_concat.init(key), 1000),
        "small_fc_lopt_elementwise": small_elem.optimizer(small_elem.init(key), 1000),
        # the same optimizer traced with the native kernel off: XLA's elementwise loops
        "small_fc_lopt_elementwise_xla": small_elem.optimizer(small_elem.init(key), 1000),
        "fc_lopt": fc.optimizer(fc.init(key), 1000),
    }

    runners, states, compile_s, results = {}, {}, {}, {}
    for name, opt in opts.items():
        state = opt.init(params)
        run = make_runner(opt, loss_fn, steps)
        kernel_was = native.set_enabled(name != "small_fc_lopt_elementwise_xla")
        t0 = time.perf_counter()
        out = run(params, state)  # traces and compiles
        jax.block_until_ready(out)
        compile_s[name] = time.perf_counter() - t0
        native.set_enabled(kernel_was)
        runners[name], states[name] = run, state
        print(f"compiled {name} in {compile_s[name]:.2f} s (final loss {float(out[2]):.4f})",
              flush=True)

    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name in opts:
            t0 = time.perf_counter()
            jax.block_until_ready(runners[name](params, states[name]))
            times[name].append((time.perf_counter() - t0) / steps * 1e3)

    adam_ms = statistics.median(times["adam"])
    sgd_ms = statistics.median(times["sgd"])
    adam_bytes = common.tree_bytes(states["adam"])
    num_params = sum(x.size for x in jax.tree.leaves(params))
    for name in opts:
        ms = statistics.median(times[name])
        nbytes = common.tree_bytes(states[name])
        results[name] = {
            "step_ms_median": ms,
            "step_ms_repeats": times[name],
            "step_time_ratio_to_adam": ms / adam_ms,
            "step_time_ratio_to_sgd": ms / sgd_ms,
            "state_bytes": nbytes,
            "state_bytes_ratio_to_adam": nbytes / adam_bytes,
            "state_floats_per_param": nbytes / 4 / num_params,
            "compile_and_first_run_s": compile_s[name],
        }
    faster = min(("concat", "elementwise"),
                 key=lambda p: results[f"small_fc_lopt_{p}"]["step_ms_median"])
    report = {
        "benchmark": "small_fc_lopt_step",
        "task": {"mlp": list(SIZES), "activation": "relu", "batch": BATCH,
                 "num_params": num_params, "data": "random, fixed batch"},
        "protocol": {"steps_per_scan": steps, "repeats": repeats, "statistic": "median",
                     "step": "value_and_grad + update + apply_updates, jit(lax.scan)",
                     "order": "round-robin across optimizers", "quick": args.quick},
        "machine": machine_at_start,
        "load_average_at_end": machine_info()["load_average_1_5_15min"],
        "results": results,
        "faster_small_fc_lopt_path": faster,
        "default_small_fc_lopt_path": SmallFcLOpt().compute,
        "native_kernel_available": native.available(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'optimizer':28s} {'ms/step':>9s} {'x adam':>7s} {'x sgd':>7s} "
          f"{'state B':>9s} {'B x adam':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['step_ms_median']:9.3f} {r['step_time_ratio_to_adam']:7.2f} "
              f"{r['step_time_ratio_to_sgd']:7.2f} {r['state_bytes']:9d} "
              f"{r['state_bytes_ratio_to_adam']:8.3f}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
