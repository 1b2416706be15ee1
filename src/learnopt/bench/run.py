"""``learnopt bench``: optimizers against tuned hand-designed baselines over a task suite.

The measurement of Metz et al. 2022, VeLO (arXiv:2211.09760, §4.1, App. F.1) at CPU scale.
On every task of a suite (:mod:`learnopt.bench.suite`), with the same initial parameters and
batches for a given seed (:mod:`learnopt.bench.curves`):

* **LR-tuned Adam** runs every learning rate of the half-decade grid 1e-7 .. 1 for
  ``baseline_factor`` (3 by default) times the task's step budget. Its lower envelope (mean
  over seeds, EMA, minimum over learning rates, cumulative minimum) is the reference of the
  speedup metric (:mod:`learnopt.bench.speedup`). Runs at a constant learning rate are
  deterministic per seed, so the first ``steps`` losses of these runs are also the runs of
  **Adam at 1e-3** (untuned) and of **Adam tuned** at the budget (the grid point with the
  lowest final loss), with no extra training.
* **SGD with momentum** and **AdamW** (weight decay 1e-4) are tuned on the same grid, and
  **NAdamW** by ``nadamw_trials`` random draws from its 10-hyperparameter space (Metz et al.
  2022, arXiv:2203.11860, App. F.2), each at the task's step budget.
* Every baseline curve is cached on disk by (task, optimizer, hyperparameters, steps, seed)
  (:mod:`learnopt.bench.cache`), so a second run reuses it.
* The optimizers under test (:class:`learnopt.resolve.NamedOptimizer`) run the step budget
  once per seed; their final loss is located on the envelope: the speedup is the step at
  which tuned Adam first reaches it, over the budget.

A run is *diverged* when any seed's training loss is non-finite, or when its smoothed final
loss is not below the loss at the first step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from learnopt.bench.cache import BaselineCache
from learnopt.bench.curves import loss_curves
from learnopt.bench.speedup import adam_envelope, aggregate, final_loss, speedup
from learnopt.bench.suite import BenchTask, suite
from learnopt.io import machine_info
from learnopt.optimizers.hand import adam, sgdm
from learnopt.optimizers.nadamw import nadamw
from learnopt.optimizers.search import LR_GRID, sample_nadamw_configs
from learnopt.resolve import NamedOptimizer

#: The labels of the hand-designed baselines, in report order.
ADAM_TUNED = "adam (tuned)"
ADAM_DEFAULT = "adam lr=1e-3"
SGDM_TUNED = "sgdm (tuned)"
ADAMW_TUNED = "adamw (tuned)"
BASELINES = ("adam", "sgdm", "adamw", "nadamw")
#: AdamW's decoupled weight decay (optax's default) when its learning rate is tuned.
ADAMW_WEIGHT_DECAY = 1e-4
#: Baseline curves committed with the repository (read, never written, by ``learnopt bench``).
REPOSITORY_CACHE = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_cache"
#: Speedups are clipped below at this value (a loss Adam's envelope beats from its first steps).
MIN_SPEEDUP = 0.01
#: Curves in the report are downsampled to at most this many points.
REPORT_POINTS = 200

@dataclasses.dataclass(frozen=True)
class _Baseline:
    """One tuned hand-designed baseline: a name, its candidate settings and its optimizer."""

    name: str
    label: str
    settings: list[dict[str, float]]
    make: Callable[[dict[str, jax.Array], int], optax.GradientTransformation]


def _lr_settings() -> list[dict[str, float]]:
    return [{"learning_rate": lr} for lr in LR_GRID]


def _baselines(names: Sequence[str], nadamw_trials: int, seed: int = 0) -> list[_Baseline]:
    out = []
    if "sgdm" in names:
        out.append(_Baseline("sgdm", SGDM_TUNED, _lr_settings(),
                             lambda h, n: sgdm(h["learning_rate"], 0.9)))
    if "adamw" in names:
        out.append(_Baseline(
            "adamw", ADAMW_TUNED, _lr_settings(),
            lambda h, n: optax.adamw(h["learning_rate"], weight_decay=ADAMW_WEIGHT_DECAY)))
    if "nadamw" in names and nadamw_trials > 0:
        configs = sample_nadamw_configs(np.random.default_rng(seed), nadamw_trials)
        settings = [{k: float(v) for k, v in c.to_dict().items()} for c in configs]
        out.append(_Baseline("nadamw", f"nadamw ({nadamw_trials} trials)", settings,
                             lambda h, n: nadamw(**h, num_steps=n)))
    return out


def _setting_text(setting: Mapping[str, float]) -> str:
    if set(setting) == {"learning_rate"}:
        return f"lr={setting['learning_rate']:.3g}"
    return json.dumps(setting, sort_keys=True)


def _fingerprint(bench_task: BenchTask, task) -> str:
    n = sum(int(np.prod(x.shape)) for x in
            jax.tree_util.tree_leaves(jax.eval_shape(task.init, jax.random.PRNGKey(0))))
    return f"{bench_task.name}:{n}"


def grid_curves(
    cache: BaselineCache,
    bench_task: BenchTask,
    task,
    name: str,
    settings: list[dict[str, float]],
    make: Callable[[dict[str, jax.Array], int], optax.GradientTransformation],
    seeds: Sequence[int],
    steps: int,
    fp: str | None = None,
) -> np.ndarray:
    """Training-loss curves ``[len(settings), len(seeds), steps]``, from the cache where there.

    The settings and seeds that miss are trained together in one compiled program and
    stored, one cache entry per (setting, seed). ``fp``: the task's cache fingerprint
    (computed when not given)."""
    fp = fp if fp is not None else _fingerprint(bench_task, task)
    out = np.full((len(settings), len(seeds), steps), np.nan, np.float32)
    missing_h, missing_s = set(), set()
    for i, h in enumerate(settings):
        for j, s in enumerate(seeds):
            hit = cache.get(bench_task.name, name, h, steps, s, fingerprint=fp)
            if hit is None:
                missing_h.add(i)
                missing_s.add(j)
            else:
                out[i, j] = hit.curve
    if missing_h:
        hs, ss = sorted(missing_h), sorted(missing_s)
        stacked = {k: jnp.asarray([settings[i][k] for i in hs], jnp.float32)
                   for k in settings[0]}
        losses, _ = loss_curves(task, lambda h: make(h, steps), stacked,
                                [seeds[j] for j in ss], steps)
        losses = np.asarray(losses, np.float32)
        for a, i in enumerate(hs):
            for b, j in enumerate(ss):
                out[i, j] = losses[a, b]
                cache.put(bench_task.name, name, settings[i], steps, seeds[j], losses[a, b],
                          fingerprint=fp)
    return out


def contender_curves(
    task, contender: NamedOptimizer, seeds: Sequence[int], steps: int
) -> np.ndarray:
    """Training-loss curves ``[len(seeds), steps]`` of an optimizer under test."""
    losses, _ = loss_curves(task, lambda _: contender.make(steps), jnp.zeros((1,)), list(seeds),
                            steps)
    return np.asarray(losses, np.float32)[0]


def _downsample(curves: np.ndarray) -> tuple[list[int], list[list[float]]]:
    steps = curves.shape[-1]
    idx = np.unique(np.linspace(0, steps - 1, min(steps, REPORT_POINTS)).round().astype(int))
    return [int(i) + 1 for i in idx], [[float(v) for v in c[idx]] for c in curves]


def _diverged(curves: np.ndarray, final: float, initial: float) -> bool:
    return bool(not np.all(np.isfinite(curves)) or not np.isfinite(final) or final >= initial)


def bench_task_result(
    bench_task: BenchTask,
    contenders: Sequence[NamedOptimizer],
    seeds: Sequence[int],
    cache: BaselineCache,
    baseline_factor: float = 3.0,
    baselines: Sequence[str] = BASELINES,
    nadamw_trials: int = 8,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """One task of the report (the ``tasks`` entries of :func:`run_bench`'s result).

    ``on_stage(name)`` is called after each training stage (the Adam grid, each contender,
    each further baseline)."""
    task = bench_task.build()
    steps = bench_task.steps
    long_steps = int(round(baseline_factor * steps))
    fp = _fingerprint(bench_task, task)
    grid = grid_curves(cache, bench_task, task, "adam", _lr_settings(),
                       lambda h, n: adam(h["learning_rate"]), seeds, long_steps, fp)
    on_stage("adam grid")
    envelope = adam_envelope(grid)
    initial = float(np.mean(grid[:, :, 0]))
    curves: dict[str, tuple[str, np.ndarray]] = {}
    for c in contenders:
        curves[c.label] = (c.setting, contender_curves(task, c, seeds, steps))
        on_stage(c.label)
    short = grid[:, :, :steps]
    best = int(np.argmin([final_loss(c) for c in short]))
    curves[ADAM_DEFAULT] = ("lr=0.001", short[LR_GRID.index(10.0 ** -3)])
    curves[ADAM_TUNED] = (f"lr={LR_GRID[best]:.3g}", short[best])
    for b in _baselines(baselines, nadamw_trials):
        runs = grid_curves(cache, bench_task, task, b.name, b.settings, b.make, seeds, steps, fp)
        pick = int(np.argmin([final_loss(c) for c in runs]))
        curves[b.label] = (_setting_text(b.settings[pick]), runs[pick])
        on_stage(b.label)
    results = {}
    for label, (setting, c) in curves.items():
        final = final_loss(c)
        sp = speedup(final, envelope, steps, min_speedup=MIN_SPEEDUP)
        curve_steps, down = _downsample(c)
        results[label] = {"setting": setting, "curve_steps": curve_steps, "curves": down,
                          "final_loss": final, "speedup": sp.value, "clipped": sp.clipped,
                          "diverged": _diverged(c, final, initial)}
    env_steps, (env,) = _downsample(envelope[None])
    return {"task": bench_task.name, "kind": bench_task.kind, "steps": steps,
            "initial_loss": initial, "envelope": {"steps": env_steps, "loss": env},
            "results": results}


def summarise(tasks: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per optimizer: VeLO's aggregates of its speedups, the fraction of tasks on which it
    beats LR-tuned Adam (speedup > 1) and Adam at 1e-3 (a lower final loss), divergences."""
    out = {}
    for label in labels:
        rows = [t["results"][label] for t in tasks]
        spd = [r["speedup"] for r in rows]
        default = [t["results"][ADAM_DEFAULT]["final_loss"] for t in tasks]
        agg = aggregate(spd)
        agg["beats_tuned_adam"] = float(np.mean([s > 1.0 for s in spd]))
        agg["beats_adam_1e-3"] = float(np.mean([r["final_loss"] < d
                                                for r, d in zip(rows, default, strict=True)]))
        agg["divergences"] = int(sum(r["diverged"] for r in rows))
        out[label] = agg
    return out


def run_bench(
    contenders: Sequence[NamedOptimizer],
    suite_name: str = "quick",
    seeds: int = 2,
    cache: BaselineCache | None = None,
    baseline_factor: float = 3.0,
    baselines: Sequence[str] = BASELINES,
    nadamw_trials: int = 8,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """The result of the benchmark (the schema :func:`learnopt.bench.report.write_report`
    reads): per task the curves, final losses and speedups of every optimizer, and the
    aggregates.

    Args:
      contenders: the optimizers under test (labels must be unique and differ from the
        baselines').
      suite_name: ``"quick"`` or ``"full"``; ``tasks`` (names in the suite) restricts it.
      seeds: seeds per configuration (the same initial parameters and batches for all).
      cache: where baseline curves are read and stored; None keeps nothing.
      baseline_factor: how many times longer than the budget LR-tuned Adam runs (the largest
        speedup that can be measured).
      baselines: which tuned baselines to run besides Adam (``sgdm``, ``adamw``, ``nadamw``).
      nadamw_trials: random-search trials of NAdamW.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if baseline_factor < 1:
        raise ValueError(f"baseline_factor must be >= 1, got {baseline_factor}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; valid: {', '.join(BASELINES)}")
    labels = [c.label for c in contenders]
    fixed = [ADAM_DEFAULT, ADAM_TUNED] + [b.label for b in _baselines(baselines, nadamw_trials)]
    if len(set(labels)) != len(labels) or set(labels) & set(fixed):
        raise ValueError(f"optimizer labels must be unique and differ from {fixed}; got "
                         f"{labels}")
    chosen = suite(suite_name)
    if tasks:
        names = {t.name for t in chosen}
        bad = [t for t in tasks if t not in names]
        if bad:
            raise ValueError(f"tasks {bad} are not in the {suite_name!r} suite")
        chosen = [t for t in chosen if t.name in tasks]
    if cache is None:
        import tempfile

        cache = BaselineCache(tempfile.mkdtemp(prefix="learnopt-bench-"))
    seed_list = list(range(seeds))
    start = time.perf_counter()
    stages = 1 + len(contenders) + len(fixed) - 2
    bar = tqdm(total=len(chosen) * stages, desc=f"bench {suite_name}", unit="run",
               disable=not progress)
    results = []
    for bt in chosen:
        def stage(what: str, name: str = bt.name) -> None:
            bar.set_postfix_str(f"{name}: {what}")
            bar.update(1)

        results.append(bench_task_result(bt, contenders, seed_list, cache, baseline_factor,
                                         baselines, nadamw_trials, on_stage=stage))
    bar.close()
    return {
        "suite": suite_name,
        "seeds": seeds,
        "baseline_factor": baseline_factor,
        "min_speedup": MIN_SPEEDUP,
        "seconds": time.perf_counter() - start,
        "machine": machine_info(),
        "command": command,
        "optimizers": labels + fixed,
        "reference": ADAM_TUNED,
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "tasks": results,
        "aggregate": summarise(results, labels + fixed),
    }


def merge_results(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same optimizers on disjoint tasks of a suite (e.g. run in
    parallel with ``--task``): tasks in suite order, aggregates recomputed over all of them.

    Parts may come from ``results.json`` files, where non-finite numbers are ``null``: a
    ``null`` final loss reads as diverged (+inf)."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for key in ("suite", "seeds", "baseline_factor", "optimizers", "reference"):
        if any(p[key] != first[key] for p in parts):
            raise ValueError(f"parts differ in {key!r}; only runs of one benchmark merge")
    tasks = [t for p in parts for t in p["tasks"]]
    names = [t["task"] for t in tasks]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parts overlap in tasks: {twice}")
    order = {t.name: i for i, t in enumerate(suite(first["suite"]))}
    tasks.sort(key=lambda t: order.get(t["task"], len(order)))
    for t in tasks:
        for r in t["results"].values():
            if r["final_loss"] is None:
                r["final_loss"] = float("inf")
    return {
        **{k: v for k, v in first.items() if k not in ("tasks", "aggregate", "nonfinite")},
        "seconds": sum(p["seconds"] for p in parts),
        "command": " ; ".join(p["command"] for p in parts),
        "cache": {k: sum(p["cache"][k] for p in parts) for k in ("hits", "misses")},
        "tasks": tasks,
        "aggregate": summarise(tasks, first["optimizers"]),
    }
