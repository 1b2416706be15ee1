"""The XLA:CPU batched-LAPACK deadlock: reproducer, and the throughput cost of the workaround.

docs/hangs.md explains the hang. jaxlib 0.10.0-0.11.0 split a batched LAPACK call over XLA's
intra-op pool and block a pool thread until the chunks finish; enough concurrent calls
deadlock. :mod:`learnopt` sets ``PJRT_NPROC=1`` (one intra-op thread) on those versions.

``--repro``: runs :data:`REPRO` (a few independent batched QRs of one random draw, ``vmap``
over 2 keys, ``REPRO_REPS`` times; no learnopt code) in fresh processes with the workaround
off and on, ``--tries`` each, with a timeout; reports finished/hung and seconds.

Throughput (always): the training step of the 8x8 Fashion-MNIST MLP (``fmnist_mlp_8x8``, batch
128, batches drawn in-jit) run as one jitted ``lax.scan`` of ``--steps`` steps, with Adam, with
``small_fc_lopt``, and with Adam vmapped over 8 seeds (the shape of multi-task meta-training);
plus the 784-128-10 MLP with Adam (bigger matmuls, where intra-op threads could matter). Each
setting runs in its own process (the variable is read when jax's CPU client is created);
workaround-off and workaround-on processes alternate for ``--rounds`` rounds, and the
reported ratio (on / off, steps per second) is of the medians over rounds, measured in the
same run so machine load hits both alike.

Usage: ``python benchmarks/xla_hang.py [--quick] [--repro] [--out PATH]``.
Writes ``benchmarks/results/xla_hang.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPRO_REPS = 2000
REPRO = f"""
import time, jax, jax.numpy as jnp
n, num_qr, batch = 84, 8, 2
def orthogonal_mats(key):  # independent QRs of slices of one normal draw
    z = jax.random.normal(key, (num_qr * n * n,))
    return [jnp.linalg.qr(z[i * n * n:(i + 1) * n * n].reshape(n, n))[0] for i in range(num_qr)]
f = jax.jit(jax.vmap(orthogonal_mats))
for i in range({REPRO_REPS}):
    jax.block_until_ready(f(jax.random.split(jax.random.PRNGKey(i), batch)))
print("done")
"""


def _env(workaround: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PJRT_NPROC", None)
    env.pop("NPROC", None)
    env["LEARNOPT_XLA_WORKAROUND"] = "1" if workaround else "0"
    return env


def run_repro(tries: int, timeout_s: float) -> list[dict]:
    code = "import learnopt\n" + REPRO  # importing learnopt applies (or not) the workaround
    rows = []
    for t in range(tries):
        for workaround in (False, True):
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-c", code], env=_env(workaround),
                                      capture_output=True, text=True, timeout=timeout_s)
                outcome = "finished" if "done" in proc.stdout else f"error rc={proc.returncode}"
            except subprocess.TimeoutExpired:
                outcome = f"HUNG (killed after {timeout_s:g} s)"
            row = {"try": t, "workaround": workaround, "outcome": outcome,
                   "seconds": round(time.perf_counter() - t0, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def child(steps: int, repeats: int) -> dict:
    """Steps per second of each workload in this process (runs in a fresh interpreter)."""
    import jax
    import jax.numpy as jnp
    import optax

    import learnopt  # applies the workaround unless LEARNOPT_XLA_WORKAROUND=0
    from learnopt.learned.registry import get_learned_optimizer
    from learnopt.step import init_train_state, inner_step, sample_batches
    from learnopt.tasks.fixed.registry import get_task

    task = get_task("fmnist_mlp_8x8")
    lopt = get_learned_optimizer("small_fc_lopt")
    opts = {
        "adam": optax.adam(1e-3),
        "small_fc_lopt": lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), steps),
    }

    def train(opt, key):
        opt = optax.with_extra_args_support(opt)

        def step(state, t):
            batch_key, loss_key = jax.random.split(jax.random.fold_in(key, t))
            batch, valid = sample_batches(task, opt, batch_key)
            return inner_step(task, opt, state, batch, loss_key, valid)

        state = init_train_state(task, opt, task.init(key))
        return jax.lax.scan(step, state, jnp.arange(steps))[1][-1]

    def mlp784(key):
        sizes, batch = (784, 128, 10), 128
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (batch, sizes[0]))
        y = jax.random.randint(ky, (batch,), 0, sizes[-1])
        params = [(jax.random.normal(jax.random.fold_in(key, i), (a, b)) / a**0.5, jnp.zeros(b))
                  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]

        def loss_fn(p):
            h = x
            for i, (w, b) in enumerate(p):
                h = h @ w + b
                h = jax.nn.relu(h) if i < len(p) - 1 else h
            return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

        opt = optax.adam(1e-3)

        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        return jax.lax.scan(step, (params, opt.init(params)), None, length=steps)[1][-1]

    workloads = {
        "fmnist_mlp_8x8/adam": (jax.jit(lambda k: train(opts["adam"], k)), 1),
        "fmnist_mlp_8x8/small_fc_lopt": (jax.jit(lambda k: train(opts["small_fc_lopt"], k)), 1),
        "fmnist_mlp_8x8/adam x8 seeds (vmap)": (
            jax.jit(jax.vmap(lambda k: train(opts["adam"], k))), 8),
        "mlp_784_128_10/adam": (jax.jit(mlp784), 1),
    }
    out = {"workaround": learnopt.XLA_WORKAROUND, "steps_per_s": {}}
    for name, (fn, runs) in workloads.items():
        keys = jax.random.split(jax.random.PRNGKey(1), 8) if runs > 1 else jax.random.PRNGKey(1)
        jax.block_until_ready(fn(keys))  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(keys))
            times.append(time.perf_counter() - t0)
        out["steps_per_s"][name] = steps * runs / statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, repeats and steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repro", action="store_true", help="also run the reproducer")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "xla_hang.json")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 200)
    repeats = args.repeats or (3 if args.quick else 7)
    if args.child:
        print("RESULT " + json.dumps(child(steps, repeats)), flush=True)
        return {}
    rounds = args.rounds or (2 if args.quick else 3)

    import jax
    import jaxlib

    result: dict = {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()), "steps": steps, "repeats": repeats,
        "rounds": rounds,
    }
    if args.repro:
        result["repro"] = run_repro(args.tries, args.timeout)

    per: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(rounds):
        for workaround in (False, True):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(steps),
                 "--repeats", str(repeats)],
                env=_env(workaround), capture_output=True, text=True, timeout=1800,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"child failed:\n{proc.stdout}\n{proc.stderr}")
            res = json.loads(lines[-1][len("RESULT "):])
            print(f"round {r} workaround={workaround}: {res}", flush=True)
            per[workaround].append(res)
    names = per[False][0]["steps_per_s"]
    table = {}
    for name in names:
        off = statistics.median(x["steps_per_s"][name] for x in per[False])
        on = statistics.median(x["steps_per_s"][name] for x in per[True])
        table[name] = {"default_steps_per_s": round(off, 1), "workaround_steps_per_s": round(on, 1),
                       "ratio_workaround_over_default": round(on / off, 3)}
        print(f"{name:40s} default {off:9.1f}  PJRT_NPROC=1 {on:9.1f} steps/s  "
              f"ratio {on / off:.3f}", flush=True)
    result["throughput"] = table
    result["workaround"] = per[True][0]["workaround"]
    result["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
