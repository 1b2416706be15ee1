"""Step cost of the learned optimizers relative to optax.adam: time and optimizer-state memory.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers" (arXiv:2203.11860, §4.1-4.3, Fig. 3b) and Metz et al. 2022, "VeLO: Training
Versatile Learned Optimizers by Scaling Up" (arXiv:2211.09760, App. B.7) measure the overhead
of a learned optimizer against Adam; this is that measurement on this project's machine.

Optimizers: ``optax.adam`` (the reference), ``small_fc_lopt``, ``fc_lopt``, ``nn_adam``,
``velo`` (the paper's size: LSTM 512, bank 256) at their initial theta, and the shipped
``small_fc_lopt_general`` from ``learnopt.pretrained.optimizer`` (behind its divergence guard).
Tasks (random data of the task's shapes, fixed batch: the step cost does not depend on the
values): the 784-128-10 ReLU MLP at batch 128 (101,770 parameters), a small ConvNet
(``models.standard.ConvNet`` with channels 16-32-32 on 16x16x1 images, batch 64) and a small
decoder-only Transformer LM (``models.sampled.TransformerLM``: 2 layers, 2 heads x 32,
vocabulary 64, sequence 32, batch 16).

Two timings per optimizer, each a jitted ``lax.scan`` of ``--steps`` steps:

* ``train_step``: ``value_and_grad`` of the loss + optimizer ``update`` + ``apply_updates``;
* ``update``: optimizer ``update`` + ``apply_updates``, scanning over a precomputed stack of
  gradients (the loss gradient times ``1 + 1e-3 t`` at step ``t``), no loss or gradient.

Each is compiled and run once first; then the timed calls go round-robin across optimizers
(drift on a shared machine hits all alike), and each optimizer's ratio to Adam is the median
over repeats of the per-round ratio (the Adam call of the same round). Optimizer-state bytes
are the summed sizes of the state pytree's arrays; they are compared with each architecture's
stated floats per parameter (``STATED_FLOATS_PER_PARAM``: the accumulators the paper lists;
per-tensor extras such as factored row/column statistics, LSTM states or counters come on top
and must stay within 10%). The machine (``learnopt.io.machine_info``) and its load average at
start and end are recorded: absolute times on a shared machine move a lot, same-round ratios
much less.

Usage: ``python benchmarks/step_cost.py [--quick] [--tasks mlp,conv,transformer] [--out PATH]``;
``--quick`` (the MLP only, few repeats) takes under a minute. Writes
``benchmarks/results/step_cost.json``. ``benchmarks/small_fc_lopt_step.py`` compares
small_fc_lopt's two compute paths on the MLP alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from learnopt.io import machine_info
from learnopt.learned import common, native
from learnopt.learned.registry import get_learned_optimizer
from learnopt.tasks.models import sampled, standard

#: Accumulator floats per parameter as the architectures state them: Adam's m and v; the
#: 3 momenta + 1 rms of small_fc_lopt and VeLO (their AdaFactor statistics are per row and
#: column, O(rows + cols) per tensor, not per parameter); fc_lopt's 6 momenta; nn_adam's Adam
#: m and v (its LSTM state is per tensor). The guarded small_fc_lopt_general adds the guard's
#: rollback snapshot (docs/stability.md): the last good parameters (1) and the wrapped
#: optimizer's state there (4), so 4 + 1 + 4.
STATED_FLOATS_PER_PARAM = {"adam": 2, "small_fc_lopt": 4, "small_fc_lopt_1_kernel_thread": 4,
                           "small_fc_lopt_general": 9,
                           "fc_lopt": 6, "nn_adam": 2, "velo": 4}
LEARNED = ("small_fc_lopt", "fc_lopt", "nn_adam", "velo")
TASKS = ("mlp", "conv", "transformer")


def make_task(kind: str) -> tuple[Any, Any, str]:
    """``(params, loss_fn, description)`` of a benchmark task."""
    key = jax.random.PRNGKey(0)
    kx, ky, kp = jax.random.split(key, 3)
    if kind == "mlp":
        model = standard.MLP((128,), 10)
        x = jax.random.uniform(kx, (128, 784))
        y = jax.random.randint(ky, (128,), 0, 10)
        desc = "MLP 784-128-10, ReLU, batch 128"
    elif kind == "conv":
        model = standard.ConvNet(channels=(16, 32, 32), strides=(2, 1, 1), num_outputs=10)
        x = jax.random.uniform(kx, (64, 16, 16, 1))
        y = jax.random.randint(ky, (64,), 0, 10)
        desc = "ConvNet 3x3 convs 16(s2)-32-32, mean pool, linear head; 16x16x1, batch 64"
    elif kind == "transformer":
        model = sampled.TransformerLM(vocab_size=64, num_heads=2, head_dim=32, num_layers=2,
                                      max_len=32)
        x = jax.random.randint(kx, (16, 32), 0, 64)
        y = jax.random.randint(ky, (16, 32), 0, 64)
        desc = "Transformer LM, 2 layers, 2 heads x 32, vocab 64, seq 32, batch 16"
    else:
        raise ValueError(f"unknown task {kind!r}; choose from {TASKS}")
    params = model.init(kp, x[:1])["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn, desc


def build_optimizers(num_steps: int) -> dict[str, optax.GradientTransformationExtraArgs]:
    from learnopt import pretrained

    opts: dict[str, Any] = {"adam": optax.with_extra_args_support(optax.adam(1e-3))}
    for name in LEARNED:
        lopt = get_learned_optimizer(name)
        opts[name] = lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), num_steps)
    opts["small_fc_lopt_general"] = pretrained.optimizer("small_fc_lopt_general", num_steps)
    # the native kernel on the caller's thread alone (the others use its helper threads;
    # XLA itself runs on one, docs/hangs.md)
    opts[ONE_THREAD] = opts["small_fc_lopt"]
    return opts


ONE_THREAD = "small_fc_lopt_1_kernel_thread"


def train_runner(opt, loss_fn, steps: int):
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


def update_runner(opt):
    """``update`` + ``apply_updates`` over a stack of gradients (one per step, scanned over)."""

    def step(carry, grads):
        params, state, loss = carry
        updates, state = opt.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state, loss), None

    @jax.jit
    def run(params, state, grad_stack, loss):
        (params, state, _), _ = jax.lax.scan(step, (params, state, loss), grad_stack)
        return params, state

    return run


def measure_task(kind: str, opts: dict[str, Any], steps: int, repeats: int) -> dict[str, Any]:
    params, loss_fn, desc = make_task(kind)
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    # A different gradient each step, precomputed: the scan cannot hoist gradient-only work, and
    # the step does no extra elementwise op (scaling one gradient inside the loop made XLA:CPU
    # fuse the scale into every consumer and slowed small_fc_lopt's update ~3x).
    grad_stack = jax.tree.map(lambda g: jnp.stack([g * (1.0 + 1e-3 * t) for t in range(steps)]),
                              grads)
    calls, states, compile_s, out = {}, {}, {}, {}
    for name, opt in opts.items():
        state = opt.init(params)
        states[name] = state
        tr, up = train_runner(opt, loss_fn, steps), update_runner(opt)
        old_threads = native.set_threads(1 if name == ONE_THREAD else None)  # at trace time
        t0 = time.perf_counter()
        jax.block_until_ready(tr(params, state))
        jax.block_until_ready(up(params, state, grad_stack, loss))
        compile_s[name] = time.perf_counter() - t0
        native.set_threads(old_threads)
        calls[("train_step", name)] = (tr, (params, state))
        calls[("update", name)] = (up, (params, state, grad_stack, loss))
        print(f"  [{kind}] compiled {name} in {compile_s[name]:.1f}s", flush=True)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for key, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append((time.perf_counter() - t0) / steps)
    adam_bytes = common.tree_bytes(states["adam"])
    for name in opts:
        nbytes = common.tree_bytes(states[name])
        floats = nbytes / 4 / num_params
        stated = STATED_FLOATS_PER_PARAM[name]
        row: dict[str, Any] = {
            "state_bytes": nbytes,
            "state_bytes_ratio_to_adam": nbytes / adam_bytes,
            "state_floats_per_param": floats,
            "stated_floats_per_param": stated,
            "state_within_10pct_of_stated": abs(floats / stated - 1.0) <= 0.10,
            "compile_and_first_run_s": compile_s[name],
        }
        for what in ("train_step", "update"):
            ts, ref = times[(what, name)], times[(what, "adam")]
            row[what] = {
                "ms_median": 1e3 * statistics.median(ts),
                "ratio_to_adam": statistics.median(a / b for a, b in zip(ts, ref, strict=True)),
                "ms_repeats": [1e3 * t for t in ts],
            }
        out[name] = row
    return {"task": kind, "description": desc, "num_params": num_params, "results": out}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the MLP task only, fewer steps and repeats (< 1 minute)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {TASKS}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "step_cost.json")
    args = parser.parse_args(argv)
    tasks = tuple(args.tasks.split(",")) if args.tasks else (("mlp",) if args.quick else TASKS)
    repeats = args.repeats or (7 if args.quick else 21)
    steps = args.steps or (20 if args.quick else 50)

    load_start = list(os.getloadavg())
    opts = build_optimizers(num_steps=10_000)
    rows = [measure_task(kind, opts, steps, repeats) for kind in tasks]
    report = {
        "benchmark": "step_cost",
        "protocol": {
            "steps_per_call": steps, "repeats": repeats, "quick": args.quick,
            "train_step": "jit(lax.scan(value_and_grad + update + apply_updates))",
            "update": "jit(lax.scan(update + apply_updates)) over precomputed gradients "
                      "g x (1 + 1e-3 t)",
            "ratio": "median over rounds of (optimizer time / adam time in the same round)",
            "order": "round-robin across optimizers and timings",
            "theta": "initial theta (registry defaults, PRNGKey(0)); small_fc_lopt_general is "
                     "the shipped, guarded pretrained optimizer",
        },
        "machine": machine_info(),
        "load_average_1_5_15min_start": load_start,
        "load_average_1_5_15min_end": list(os.getloadavg()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['description']} ({row['num_params']:,} parameters)")
        print(f"  {'optimizer':24s} {'step x adam':>11s} {'update x adam':>13s} "
              f"{'floats/param':>12s} {'stated':>6s}")
        for name, r in row["results"].items():
            print(f"  {name:24s} {r['train_step']['ratio_to_adam']:11.2f} "
                  f"{r['update']['ratio_to_adam']:13.2f} {r['state_floats_per_param']:12.3f} "
                  f"{r['stated_floats_per_param']:6d}")
    print(f"load average start {load_start}, end {report['load_average_1_5_15min_end']}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
