"""Throughput of the meta-training engine, as ratios measured in one run.

* **PES task-steps per second**: small_fc_lopt meta-trained with PES on ``--tasks`` inner runs
  of the 8x8 Fashion-MNIST MLP (64-32-10, batch 128), truncations of 20 steps; both members
  of each antithetic pair count, so one outer step is ``tasks x 2 x 20`` task-steps (the
  definition behind learned_optimization's published PES figure).
* **First outer step**: seconds of the first estimate (compile and run), after building the
  estimator (set-up seconds, reported apart), with an empty persistent compilation cache
  (``cold``), and again in the same process after ``jax.clear_caches()`` with a new estimator
  that finds its programs in that cache (``warm``: a resume, a second Ray worker, a
  population member; :mod:`learnopt.compilation`).
* **Cold process**: a fresh Python process on an empty compilation cache, as a user's first
  ``learnopt meta-train`` meets it: the seconds of its imports, of its set-up (the task, the
  learned optimizer and its initial meta-parameters, the estimator and its state) and of its
  first estimate, and their sum. The optimizer loads its native kernel on a background thread
  from its construction on (:func:`learnopt.learned.native.prefetch`), so that load overlaps
  the set-up; the sum is what it saves.
* **Compile options**: the same estimate compiled at XLA's default CPU optimisation level (3)
  and at learnopt's (2, :func:`learnopt.compilation.jit_program`), called alternately in one
  process: compile seconds and the median per-step ratio.
* **Floor ratio**: the seconds of one outer step over the seconds of the same number of plain
  inner steps (``tasks x 2`` vmapped runs of optax.adam, 20 steps, forward + backward +
  update, one jitted scan): what the learned optimizer, the perturbations and the PES
  bookkeeping cost on top of training itself.
* **Mixtures**: the multi-task engine with 4 task slots and the same inner runs and truncation
  per slot, (a) over 4 named tasks of the benchmark task's size (4 compiled configs; their
  task-steps per second against the single config's) and (b) over 4 VeLO families at CPU size
  (sizes differ, so the largest task sets the pace). For each: the seconds of the first outer
  step (4 compiles) and, once compiled, an outer step's seconds over the sum of the 4 slots'
  estimates called alone (the engine's own overhead).

Usage: ``python benchmarks/meta_throughput.py [--tasks 8] [--steps 20] [--out PATH]``;
writes ``benchmarks/results/meta_throughput.json``.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the imports: a cold process counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from learnopt.compilation import enable_persistent_cache, jit_program, program_options  # noqa: E402
from learnopt.io import atomic_write_json, machine_info  # noqa: E402
from learnopt.learned.registry import get_learned_optimizer  # noqa: E402
from learnopt.meta.estimators.registry import build_estimator  # noqa: E402
from learnopt.meta.multitask import MultiTaskEstimator  # noqa: E402
from learnopt.meta.sources import MixtureEntry, TaskMixture, TaskSource  # noqa: E402
from learnopt.meta.unroll import TruncatedUnroll  # noqa: E402
from learnopt.step import init_train_state, inner_step  # noqa: E402
from learnopt.tasks.fixed.registry import get_task  # noqa: E402

TRUNC = 20
HORIZON = 2000


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def pes_single(task, lopt, theta, num_tasks: int, repeats: int, warm: bool = False) -> dict:
    if warm:
        jax.clear_caches()  # the in-memory caches; the persistent one stays
    start = time.perf_counter()
    unroll = TruncatedUnroll(task, lopt, num_tasks=num_tasks, horizon=HORIZON, trunc_length=TRUNC)
    est = build_estimator("pes", unroll)
    state = est.init_state(theta, jax.random.PRNGKey(1))
    jax.block_until_ready(state)
    setup = time.perf_counter() - start
    holder = {"state": state, "i": 0}

    def one():
        holder["i"] += 1
        out = est.estimate(theta, holder["state"], jax.random.PRNGKey(holder["i"]))
        holder["state"] = out.state
        float(out.meta_loss)

    first = timed(one, 1)[0]
    if warm:
        return {"setup_seconds": round(setup, 3), "first_step_seconds": round(first, 3)}
    steps = timed(one, repeats)
    per_step = statistics.median(steps)
    return {
        "setup_seconds": round(setup, 3),
        "first_step_seconds": round(first, 3),
        "seconds_per_outer_step": per_step,
        "task_steps_per_second": num_tasks * 2 * TRUNC / per_step,
    }


def cold_child(num_tasks: int) -> dict:
    """In this fresh process (``--cold-child``): imports, set-up and first estimate seconds."""
    imported = time.perf_counter()
    enable_persistent_cache(tempfile.mkdtemp(prefix="learnopt-xla-"))  # empty
    task = get_task("fmnist_mlp_8x8")
    lopt = get_learned_optimizer("small_fc_lopt")
    theta = lopt.init(jax.random.PRNGKey(0))
    unroll = TruncatedUnroll(task, lopt, num_tasks=num_tasks, horizon=HORIZON, trunc_length=TRUNC)
    est = build_estimator("pes", unroll)
    state = jax.block_until_ready(est.init_state(theta, jax.random.PRNGKey(1)))
    set_up = time.perf_counter()
    float(est.estimate(theta, state, jax.random.PRNGKey(2)).meta_loss)
    done = time.perf_counter()
    return {"import_seconds": round(imported - _STARTED, 3),
            "setup_seconds": round(set_up - imported, 3),
            "first_step_seconds": round(done - set_up, 3),
            "total_seconds": round(done - _STARTED, 3)}


def cold_process(num_tasks: int, repeats: int = 3) -> dict:
    """:func:`cold_child` in ``repeats`` fresh processes: each run, and the median of each."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--cold-child", str(num_tasks)],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"num_tasks": num_tasks, "runs": runs,
            **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0]}}


def adam_floor(task, num_runs: int, repeats: int) -> float:
    """Seconds of ``num_runs`` vmapped Adam runs of TRUNC steps (one jitted scan)."""
    opt = optax.adam(1e-3)

    def run(key):
        state = init_train_state(task, opt, task.init(key))

        def body(state, k):
            batch = task.datasets.train.sample(k)
            return inner_step(task, opt, state, batch, k)

        return jax.lax.scan(body, state, jax.random.split(key, TRUNC))[1]

    fn = jit_program(jax.vmap(run))  # the estimators' compile options
    keys = jax.random.split(jax.random.PRNGKey(0), num_runs)
    jax.block_until_ready(fn(keys))
    return statistics.median(timed(lambda: jax.block_until_ready(fn(keys)), repeats))


def compile_levels(task, lopt, theta, num_tasks: int, repeats: int) -> dict:
    """The PES estimate compiled at XLA's default level and at learnopt's, alternating."""
    unroll = TruncatedUnroll(task, lopt, num_tasks=num_tasks, horizon=HORIZON, trunc_length=TRUNC)
    est = build_estimator("pes", unroll, jit=False)
    state = jax.jit(est.init_state)(theta, jax.random.PRNGKey(1))
    fns, compile_s = {}, {}
    for name, jit in (("default", jax.jit), ("learnopt", jit_program)):
        fn = jit(est.estimate)
        start = time.perf_counter()
        fns[name] = fn.lower(theta, state, jax.random.PRNGKey(2)).compile()
        compile_s[name] = round(time.perf_counter() - start, 3)
    states = {name: state for name in fns}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn(theta, states[name], jax.random.PRNGKey(3 + i))
            float(out.meta_loss)
            seconds[name].append(time.perf_counter() - start)
            states[name] = out.state
    ratios = [a / b for a, b in zip(seconds["learnopt"], seconds["default"], strict=True)]
    return {
        "learnopt_options": program_options(),
        "compile_seconds": compile_s,
        "seconds_per_outer_step": {k: statistics.median(v) for k, v in seconds.items()},
        "median_step_ratio_learnopt_over_default": statistics.median(ratios),
    }


#: Four VeLO families at CPU size: task sizes differ, so the slowest slot sets the pace.
VELO_FAMILIES = tuple(MixtureEntry(family=f, options={"size": "cpu"})
                      for f in ("velo_mlp", "velo_conv", "velo_mlp_ae", "velo_transformer_lm"))
#: Four named tasks of the benchmark task's size (~2-9k parameters, 64 inputs): four compiled
#: configs whose throughput is comparable with the single config's.
SMALL_CONFIGS = tuple(MixtureEntry(task=t) for t in (
    "fmnist_mlp_8x8", "digits_mlp_8x8", "ImageMLP_Digits8_Tanh64x64_bs32",
    "ImageMLPAE_Digits8_32x8x32_bs32"))


def mixture(lopt, theta, num_tasks: int, repeats: int, entries) -> dict:
    """The multi-task engine over 4 slots (one per entry, drawn in order), against the same 4
    estimators called one after the other outside the engine (the engine's own overhead)."""
    mixture_ = TaskMixture(tuple(entries))
    # The first source seed whose first 4 draws use 4 different entries (draws pick entries at
    # random), so the 4 slots are 4 compiled configs; the seed is recorded.
    seed = next(s for s in range(1000)
                if len({TaskSource(mixture_, seed=s).choose(i)[0] for i in range(4)}) == 4)
    source = TaskSource(mixture_, seed=seed)
    engine = MultiTaskEstimator(source, lopt, num_slots=4, num_tasks=num_tasks, horizon=HORIZON,
                                trunc_length=TRUNC, lifetime=10**9)
    start = time.perf_counter()
    state = engine.init_state(theta, jax.random.PRNGKey(1))
    out = engine.estimate(theta, state, jax.random.PRNGKey(2))
    first = time.perf_counter() - start
    holder = {"state": out.state, "i": 2}

    def one():
        holder["i"] += 1
        holder["state"] = engine.estimate(theta, holder["state"],
                                          jax.random.PRNGKey(holder["i"])).state

    per_step = statistics.median(timed(one, repeats))
    alone = []
    for slot in holder["state"]["slots"]:
        est = engine.estimator_for(int(slot["draw"]), HORIZON, TRUNC)
        run = {"state": slot["state"]}

        def call(est=est, run=run):
            out = est.estimate(theta, run["state"], jax.random.PRNGKey(7))
            run["state"] = out.state
            float(out.meta_loss)

        alone.append(statistics.median(timed(call, repeats)))
    return {
        "source_seed": seed,
        "tasks": [engine.draw(i).task.name for i in range(4)],
        "first_step_seconds": round(first, 3),
        "seconds_per_outer_step": per_step,
        "seconds_per_slot_alone": alone,
        "engine_overhead_ratio": per_step / sum(alone),
        "task_steps_per_second": 4 * num_tasks * 2 * TRUNC / per_step,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="*", default=[8, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/meta_throughput.json")
    p.add_argument("--skip-velo-mixture", action="store_true",
                   help="leave out the 4-family VeLO mixture (several minutes of compiles)")
    p.add_argument("--cold-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cold_child is not None:
        print(json.dumps(cold_child(args.cold_child)), flush=True)
        return
    task = get_task("fmnist_mlp_8x8")
    lopt = get_learned_optimizer("small_fc_lopt")
    theta = lopt.init(jax.random.PRNGKey(0))
    load = os.getloadavg()
    results: dict = {
        "description": __doc__.split("\n\n")[0],
        "task": task.name,
        "learned_optimizer": "small_fc_lopt",
        "truncation": TRUNC,
        "machine": machine_info(),
        "env": {k: os.environ.get(k) for k in ("PJRT_NPROC", "XLA_FLAGS")},
        "load_average_before": [round(x, 2) for x in load],
        "single": {},
    }
    results["cold_process"] = cold_process(args.tasks[0])
    print("cold process", json.dumps(results["cold_process"]), flush=True)
    enable_persistent_cache(tempfile.mkdtemp(prefix="learnopt-xla-"))  # empty: cold starts
    for n in args.tasks:
        single = pes_single(task, lopt, theta, n, args.repeats)
        single["warm_start"] = pes_single(task, lopt, theta, n, args.repeats, warm=True)
        floor = adam_floor(task, 2 * n, args.repeats)
        single["adam_floor_seconds"] = floor
        single["ratio_to_adam_floor"] = single["seconds_per_outer_step"] / floor
        results["single"][str(n)] = single
        print(n, json.dumps(single), flush=True)
        atomic_write_json(Path(args.out), results)
    results["compile_levels"] = compile_levels(task, lopt, theta, args.tasks[0], args.repeats)
    print("compile levels", json.dumps(results["compile_levels"]), flush=True)
    n = args.tasks[0]
    small = mixture(lopt, theta, n, args.repeats, SMALL_CONFIGS)
    small["throughput_ratio_single_over_mixture"] = (
        results["single"][str(n)]["task_steps_per_second"] / small["task_steps_per_second"])
    results["mixture_small_configs"] = small
    print("mixture of small configs", json.dumps(small), flush=True)
    atomic_write_json(Path(args.out), results)
    if not args.skip_velo_mixture:
        mix = mixture(lopt, theta, n, max(3, args.repeats // 4), VELO_FAMILIES)
        results["mixture"] = mix
        print("mixture", json.dumps(mix), flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(Path(args.out), results)


if __name__ == "__main__":
    jnp.zeros(())  # start the backend after learnopt's import-time settings
    main()
