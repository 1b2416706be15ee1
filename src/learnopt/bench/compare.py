"""A learned optimizer against tuned hand-designed baselines on one task.

The protocol of Metz et al. 2022, "Practical tradeoffs between memory, compute, and
performance in learned optimizers", arXiv:2203.11860, §4.1 and App. F, at CPU scale:

* The score of a run is its mean normalised training loss over the horizon:
  ``mean_t normalizer(loss_t)``, the same quantity the learned optimizer is
  meta-trained on (App. D.1). The normalizer clips divergent runs, so a
  diverged learning rate scores badly instead of poisoning the mean.
* Adam (0.9, 0.999, 1e-8) is tuned over the 15-value learning-rate grid
  1e-7..1; the learning rate with the lowest score averaged over seeds wins.
* NAdamW is tuned by ``K`` random draws from the App. F.2 search space.
* Every optimizer sees the same initial parameters and batches for the same
  seed (:mod:`learnopt.bench.curves`). The winner of each tuning is reported
  with its per-seed scores (mean and standard deviation over seeds) and its
  test loss and accuracy at the end of training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.bench.curves import loss_curves
from learnopt.optimizers.hand import adam
from learnopt.optimizers.nadamw import nadamw
from learnopt.optimizers.search import LR_GRID, sample_nadamw_configs
from learnopt.tasks.base import Task
from learnopt.training import evaluate


@dataclasses.dataclass
class OptimizerScore:
    """The tuned result of one optimizer on one task."""

    name: str
    setting: str  # the chosen hyperparameters, human-readable
    curves: np.ndarray  # [seeds, steps] normalised training loss
    test: list[dict[str, float]]  # per seed, at the end of training
    tuning: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def seed_scores(self) -> np.ndarray:
        return self.curves.mean(axis=1)

    def summary(self) -> dict[str, Any]:
        out = {
            "optimizer": self.name,
            "setting": self.setting,
            "mean_train_loss": float(self.seed_scores.mean()),
            "std_over_seeds": float(self.seed_scores.std()),
            "per_seed": [float(x) for x in self.seed_scores],
            "final_train_loss": float(self.curves[:, -50:].mean()),
        }
        for key in self.test[0] if self.test else []:
            out[f"test_{key}"] = float(np.mean([t[key] for t in self.test]))
        return out


def _normalised(task: Task, losses: jax.Array) -> np.ndarray:
    return np.asarray(jax.vmap(task.normalizer)(losses.reshape(-1)).reshape(losses.shape))


def _test_metrics(task: Task, params, best: int, num_seeds: int) -> list[dict[str, float]]:
    return [
        evaluate(task, jax.tree_util.tree_map(lambda x, s=s: x[best, s], params), "test")
        for s in range(num_seeds)
    ]


def _pick(task, name, settings, losses, params, seeds) -> OptimizerScore:
    norm = _normalised(task, losses)  # [H, S, T]
    scores = norm.mean(axis=(1, 2))
    best = int(np.nanargmin(scores))
    pairs = zip(settings, scores, strict=True)
    tuning = [{"setting": s, "mean_train_loss": float(v)} for s, v in pairs]
    return OptimizerScore(
        name, settings[best], norm[best], _test_metrics(task, params, best, len(seeds)), tuning
    )


def tune_adam(task: Task, seeds, num_steps: int, grid=LR_GRID) -> OptimizerScore:
    lrs = jnp.asarray(grid, jnp.float32)
    losses, params = loss_curves(task, adam, lrs, seeds, num_steps)
    return _pick(task, "adam", [f"lr={lr:.3g}" for lr in grid], losses, params, seeds)


def tune_nadamw(task: Task, seeds, num_steps: int, trials: int, seed: int = 0) -> OptimizerScore:
    configs = sample_nadamw_configs(np.random.default_rng(seed), trials)
    fields = configs[0].to_dict().keys()
    hp = {k: jnp.asarray([float(c.to_dict()[k]) for c in configs], jnp.float32) for k in fields}
    losses, params = loss_curves(
        task, lambda h: nadamw(**h, num_steps=num_steps), hp, seeds, num_steps
    )
    settings = [json.dumps(c.to_dict()) for c in configs]
    return _pick(task, f"nadamw ({trials} trials)", settings, losses, params, seeds)


def score_learned(task: Task, name: str, lopt, theta, seeds, num_steps: int) -> OptimizerScore:
    thetas = jax.tree_util.tree_map(lambda x: x[None], theta)
    losses, params = loss_curves(
        task, lambda th: lopt.optimizer(th, num_steps), thetas, seeds, num_steps
    )
    return _pick(task, name, ["meta-trained theta"], losses, params, seeds)


def write_report(
    out_dir: str | os.PathLike, task_name: str, scores: list[OptimizerScore], num_steps: int
) -> Path:
    """``results.json``, ``table.md`` and ``curves.png`` for one task; returns the table."""
    from learnopt.plotting import plot_curves
    from learnopt.training import smooth

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [s.summary() for s in scores]
    (out / "results.json").write_text(
        json.dumps(
            {
                "task": task_name,
                "steps": num_steps,
                "seeds": int(scores[0].curves.shape[0]),
                "results": summaries,
                "tuning": {s.name: s.tuning for s in scores},
            },
            indent=2,
        )
        + "\n"
    )
    test_keys = [k for k in summaries[0] if k.startswith("test_")]
    head = ["optimizer", "setting", "mean train loss (± std over seeds)", *test_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        setting = s["setting"] if len(s["setting"]) < 40 else "see results.json"
        row = [s["optimizer"], setting, f"{s['mean_train_loss']:.4f} ± {s['std_over_seeds']:.4f}"]
        row += [f"{s[k]:.4f}" for k in test_keys]
        lines.append("| " + " | ".join(row) + " |")
    table = out / "table.md"
    table.write_text(
        f"# {task_name}: mean normalised training loss over {num_steps} steps\n\n"
        + "\n".join(lines)
        + "\n"
    )
    curves = {s.name: smooth(s.curves.mean(axis=0), 20) for s in scores}
    bands = {s.name: smooth(s.curves.std(axis=0), 20) for s in scores}
    plot_curves(
        out / "curves.png",
        curves,
        f"{task_name}: training loss, mean over {scores[0].curves.shape[0]} seeds",
        bands=bands,
        log_y=True,
    )
    return table
