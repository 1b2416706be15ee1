"""The memory/compute tradeoff study of Metz et al. 2022, "Practical tradeoffs between memory,
compute, and performance in learned optimizers" (arXiv:2203.11860, §4.1-4.3, Fig. 1 and 4),
on this machine.

For every hand-designed and learned optimizer: the time of one training step
(value_and_grad + optimizer update + apply_updates) as a ratio to SGD and to
Adam measured in the same run, and optimizer-state bytes per parameter, on the
Fashion-MNIST MLP (28x28 input, two hidden layers of width ``w``) and the
ConvNet of Metz et al. 2022 (Practical tradeoffs, arXiv:2203.11860; channels
``(w, 2w, 2w)``, 28x28x1 input), across batch sizes and widths (Fig. 4). Data are random
arrays of the task's shapes: the step cost does not depend on the values.

Timing: each optimizer's step runs ``--steps`` times inside one jitted
``lax.scan``; after compiling and warming up, the optimizers of one
configuration are timed round-robin (so drift on the shared machine hits
all alike) and the median of ``--repeats`` is kept.

Usage: ``python benchmarks/tradeoffs.py [--quick] [--out DIR]``; writes
``tradeoffs.json`` and ``tradeoffs.png`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import optax

from learnopt.learned.registry import get_learned_optimizer
from learnopt.optimizers.registry import get_optimizer
from learnopt.tasks.models import standard as models

HAND = ("sgd", "adam", "nadamw")
LEARNED = (
    "small_fc_lopt",
    "fc_lopt",
    "nn_adam",
    "rnn_fc_lopt",
    "hierarchical_rnn",
    "velo_small",
    "velo",
)


def build_optimizer(name: str, num_steps: int):
    if name in HAND:
        return get_optimizer(name, num_steps=num_steps)
    lopt = get_learned_optimizer(name)
    return optax.with_extra_args_support(
        lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), num_steps)
    )


def make_problem(kind: str, width: int, batch: int):
    key = jax.random.PRNGKey(0)
    # mlp1: one hidden layer (784-w-10), the timing MLP of arXiv:2203.11860 §4.1
    if kind in ("mlp", "mlp1"):
        model = models.MLP((width, width) if kind == "mlp" else (width,), 10)
        x = jax.random.uniform(key, (batch, 28, 28))
    else:
        model = models.ConvNet(channels=(width, 2 * width, 2 * width), num_outputs=10)
        x = jax.random.uniform(key, (batch, 28, 28, 1))
    y = jax.random.randint(key, (batch,), 0, 10)
    params = model.init(key, x[:1])["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn


def make_runner(opt, loss_fn, steps: int):
    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), loss

    return jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=steps))


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def measure(kind, width, batch, names, steps, repeats):
    params, loss_fn = make_problem(kind, width, batch)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    runners, states, out = {}, {}, {}
    for name in names:
        try:
            opt = build_optimizer(name, 10_000)
            states[name] = opt.init(params)
            runners[name] = make_runner(opt, loss_fn, steps)
            t0 = time.perf_counter()
            jax.block_until_ready(runners[name](params, states[name]))
            print(f"    compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as e:  # an optimizer that fails is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, states[name]))
            times[name].append((time.perf_counter() - t0) / steps)
    for name in runners:
        out[name] = {
            "step_seconds": statistics.median(times[name]),
            "state_bytes_per_param": tree_bytes(states[name]) / num_params,
        }
    for row in out.values():
        if "step_seconds" in row:
            for ref in ("sgd", "adam"):
                if "step_seconds" in out.get(ref, {}):
                    row[f"ratio_to_{ref}"] = row["step_seconds"] / out[ref]["step_seconds"]
    return {"kind": kind, "width": width, "batch": batch, "num_params": num_params, "results": out}


def plot(rows, path: Path, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("mlp", "mlp1", "conv") if any(r["kind"] == k for r in rows)]
    if not kinds:
        return
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        kind_rows = [r for r in rows if r["kind"] == kind]
        widths = sorted({r["width"] for r in kind_rows})
        batches = sorted({r["batch"] for r in kind_rows})
        for j, (axis_name, values, fixed) in enumerate(
            (
                ("batch", batches, ("width", widths[len(widths) // 2])),
                ("width", widths, ("batch", batches[len(batches) // 2])),
            )
        ):
            ax = axes[i, j]
            for k, name in enumerate(names):
                ys = []
                for v in values:
                    match = [r for r in kind_rows if r[axis_name] == v and r[fixed[0]] == fixed[1]]
                    row = match[0]["results"].get(name, {}) if match else {}
                    ys.append(row.get("ratio_to_sgd", math.nan))
                ax.plot(values, ys, marker="o", color=f"C{k}", label=name)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel=axis_name,
                ylabel="step time / SGD",
                title=f"{kind}, {fixed[0]}={fixed[1]}",
            )
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, rows, steps: int, repeats: int) -> None:
    meta = {
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "steps_per_timing": steps,
        "repeats": repeats,
        "load_average": os.getloadavg(),
    }
    path.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--optimizers", nargs="*", default=None)
    p.add_argument(
        "--configs", nargs="*", default=None, help="KIND:WIDTH:BATCH, e.g. conv:8:32 mlp:128:128"
    )
    p.add_argument("--name", default="tradeoffs", help="stem of the JSON and PNG files")
    args = p.parse_args(argv)
    names = args.optimizers or [*HAND, *LEARNED]
    steps, repeats = (10, 3) if args.quick else (30, 5)
    configs = [("mlp", 128, 128)]
    if not args.quick:
        configs += [("mlp", 128, b) for b in (32, 512)] + [("mlp", w, 128) for w in (32, 512)]
        configs += [("conv", 32, 128), ("conv", 8, 128), ("conv", 32, 32)]
    if args.configs:
        configs = [(k, int(w), int(b)) for k, w, b in (c.split(":") for c in args.configs)]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, width, batch in configs:
        t0 = time.perf_counter()
        rows.append(measure(kind, width, batch, names, steps, repeats))
        print(f"{kind} width={width} batch={batch}: {time.perf_counter() - t0:.0f}s", flush=True)
        for name, r in rows[-1]["results"].items():
            print(
                f"  {name:18s} "
                + (
                    f"x{r['ratio_to_adam']:.2f} Adam, {r['state_bytes_per_param']:.1f} B/param"
                    if "ratio_to_adam" in r
                    else r.get("error", "")
                )
            )
        write_json(args.out / f"{args.name}.json", rows, steps, repeats)  # partial results survive
    plot(rows, args.out / f"{args.name}.png", names)
    return rows


if __name__ == "__main__":
    main()
