"""Offline self-training: a shipped learned optimizer trains a fresh one, against Adam.

Metz et al. 2020, "Tasks, stability, architecture, and compute: training more effective
learned optimizers, and using them to train themselves" (arXiv:2009.11243, §4.6, App. F.4,
Fig. 7/8): an already meta-trained learned optimizer, used as the outer optimizer (the
meta-gradient clipped to [-0.1, 0.1], the outer loss as its loss features), trains a randomly
initialised learned optimizer about as efficiently as Adam for 10k outer steps, then diverges.

Here the shipped ``small_fc_lopt_general`` (``learnopt.pretrained``) trains a fresh
``small_fc_lopt`` from random init on the task mixture of ``configs/pbt_self_training.toml``,
and Adam after the same clip at ``--adam-lrs`` trains the same initial theta. Every arm gets
the same number of meta-gradient evaluations and the same estimator keys and task draws (its
own estimator, with the same seed; the compiled programs are shared). Measured: the training
meta-loss per outer step, and every ``--eval-every`` steps each arm's theta on the fixed
evaluation pool of the population runs (:class:`learnopt.meta.pbt_eval.EvalPool`: mean
normalised training loss over ``eval_steps`` inner steps of ``eval_tasks`` draws of the
mixture), evaluated together at the end.

Usage: ``python benchmarks/offline_self_training.py [--steps 600] [--eval-every 100]
[--trunc 40] [--adam-lrs 1e-3,3e-4] [--max-seconds S]``; writes
``benchmarks/results/offline_self_training.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from learnopt import pretrained
from learnopt.io import atomic_write_json, machine_info
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.learned_outer import learned_outer_optimizer
from learnopt.meta.learner import Learner
from learnopt.meta.pbt_config import PBTConfig
from learnopt.meta.pbt_eval import EvalPool
from learnopt.meta.train import build_estimator_over_tasks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "pbt_self_training.toml"),
                    help="population config whose tasks, estimator and evaluation pool are used")
    ap.add_argument("--outer", default="small_fc_lopt_general",
                    help="the shipped learned optimizer used as the outer optimizer")
    ap.add_argument("--steps", type=int, default=600, help="outer steps of every arm")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluate every N outer steps")
    ap.add_argument("--trunc", type=int, default=40, help="truncation length (inner steps)")
    ap.add_argument("--clip", type=float, default=0.1, help="elementwise outer-gradient clip")
    ap.add_argument("--adam-lrs", default="1e-3,3e-4", help="Adam arms' learning rates")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fresh theta and draws")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop every arm at the step where the slowest reached this budget")
    ap.add_argument("--out", default=str(OUT / "offline_self_training"),
                    help="output path without suffix (.json and .png are written)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the PNG from the JSON at --out")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return

    config = PBTConfig.from_file(args.config)
    outer_lopt, outer_theta, _ = pretrained.load(args.outer)
    lopt = get_learned_optimizer(config.lopt, config.lopt_config)
    if outer_lopt.config() != lopt.config():
        print(f"note: the outer optimizer is a {outer_lopt.name} {outer_lopt.config()}")
    if outer_lopt.config().get("compute") == "elementwise":  # same function, faster compile
        outer_lopt = get_learned_optimizer(outer_lopt.name,
                                           {**outer_lopt.config(), "compute": "concat"})
    fresh = lopt.init(jax.random.PRNGKey(args.seed))
    meta = config.member_meta_config(args.seed, args.trunc)
    shared = collections.OrderedDict()

    arms: dict[str, Learner] = {
        f"learned outer ({args.outer})": Learner(
            optimizer=learned_outer_optimizer(outer_lopt, outer_theta, clip=args.clip),
            max_staleness=None),
    }
    for lr in (float(x) for x in args.adam_lrs.split(",") if x):
        arms[f"Adam lr={lr:g}"] = Learner(lr, clip=args.clip, max_staleness=None)

    state_key = jax.random.PRNGKey(args.seed + 17)
    runs = {}
    for name, learner in arms.items():
        est = build_estimator_over_tasks(meta, lopt, cache_size=64, shared_cache=shared)
        runs[name] = {"learner": learner, "state": learner.init(fresh), "est": est,
                      "est_state": est.init_state(fresh, state_key), "losses": [],
                      "applied": 0, "kept": [(0, fresh)], "seconds": 0.0}
    start = time.perf_counter()
    steps_done = 0
    for step in range(args.steps):
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            break
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), step)
        for r in runs.values():
            t = time.perf_counter()
            loss, grad, r["est_state"], _ = r["est"].estimate(r["state"].theta, r["est_state"],
                                                               key)
            extra = {"loss": loss} if r["learner"].custom else {}
            r["state"], ok = r["learner"].apply(r["state"], grad, **extra)
            r["applied"] += ok
            r["losses"].append(float(loss))
            r["seconds"] += time.perf_counter() - t
            if (step + 1) % args.eval_every == 0:
                r["kept"].append((step + 1, r["state"].theta))
        steps_done = step + 1
        if steps_done % 50 == 0:
            line = ", ".join(f"{n.split(' (')[0]}: {np.mean(r['losses'][-50:]):.4f}"
                             for n, r in runs.items())
            print(f"step {steps_done}/{args.steps} ({time.perf_counter() - start:.0f} s) "
                  f"mean meta-loss of the last 50: {line}", flush=True)
    for r in runs.values():
        if r["kept"][-1][0] != steps_done:
            r["kept"].append((steps_done, r["state"].theta))

    pool = EvalPool(meta.mixture(), lopt, config.eval_tasks, config.eval_steps, config.seed)
    seeds = [1_000_000 + k for k in range(config.eval_seeds)]
    flat = [theta for r in runs.values() for _, theta in r["kept"]]
    print(f"evaluating {len(flat)} thetas on {len(pool.draws)} tasks x {config.eval_steps} "
          f"steps x {len(seeds)} seeds", flush=True)
    per_task = pool.curves(flat, seeds).mean(axis=(2, 3))  # [tasks, thetas]
    scores = np.nanmean(np.where(np.isfinite(per_task), per_task, np.nan), axis=0)
    result = {"description": __doc__.split("\n\n")[0], "outer": args.outer,
              "config": _relative(args.config), "steps": steps_done, "trunc": args.trunc,
              "clip": args.clip, "seed": args.seed, "eval_tasks": pool.names,
              "eval_steps": config.eval_steps, "eval_seeds": seeds, "arms": {},
              "seconds": round(time.perf_counter() - start, 1), "machine": machine_info()}
    i = 0
    for name, r in runs.items():
        n = len(r["kept"])
        result["arms"][name] = {
            "meta_loss": [x if math.isfinite(x) else None for x in r["losses"]],
            "applied": int(r["applied"]),
            "eval_steps": [s for s, _ in r["kept"]],
            "eval": [float(x) if math.isfinite(x) else None for x in scores[i:i + n]],
            "seconds": round(r["seconds"], 1),
        }
        i += n
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    for name, arm in result["arms"].items():
        print(f"{name}: eval {arm['eval']} at steps {arm['eval_steps']}")
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}")


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def plot(result: dict, path: Path) -> None:
    from learnopt.plotting import pyplot

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = list(result["arms"].items())
    ref_name = next((n for n, _ in arms if n.startswith("Adam")), arms[0][0])
    ref = np.asarray([np.nan if v is None else v for v in result["arms"][ref_name]["meta_loss"]],
                     float)
    for i, (name, arm) in enumerate(arms):
        # Every arm meets the same task at the same step: the difference removes the tasks'
        # own loss levels, which otherwise dominate the curve.
        y = np.asarray([np.nan if v is None else v for v in arm["meta_loss"]], float) - ref
        window = max(1, min(25, len(y) // 10))
        smooth = np.convolve(np.nan_to_num(y), np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(y) + 1), smooth, color=f"C{i}", label=name)
        ev = [np.nan if v is None else v for v in arm["eval"]]
        ax2.plot(arm["eval_steps"], ev, marker="o", color=f"C{i}", label=name)
    ax.set(xlabel="outer step (meta-gradient evaluations)",
           ylabel=f"meta-loss minus {ref_name}'s (moving average)",
           title="training meta-loss of the fresh small_fc_lopt")
    ax2.set(xlabel="outer step", ylabel="mean normalised training loss",
            title=f"evaluation: {len(result['eval_tasks'])} tasks x {result['eval_steps']} steps")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("Offline self-training (Metz et al. 2020, §4.6): learned outer vs Adam")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
