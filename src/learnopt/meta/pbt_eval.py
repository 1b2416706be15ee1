"""Scoring a population: exploit comparisons, and the evaluation of Metz et al. 2021's Fig. 2.

Metz et al. 2021, "Training Learned Optimizers with Randomly Initialized Learned Optimizers"
(arXiv:2101.07367, §2-3): two members are compared "on 100 tasks" of the training
distribution; Fig. 2 evaluates every member on 100 tasks for 10,000 inner steps and plots the
"mean over tasks and normalized learning curves" over outer-training, against Adam at one
learning rate for all tasks ("sampled logarithmically between 1e-6 and 1e1 every half order
of magnitude", 15 values) and Adam with its learning rate tuned per task.

At CPU scale, :class:`EvalPool` is a fixed sample of ``num_tasks`` draws of the training
mixture (another seed than any member's draws). A theta's score on the pool is its normalised
training loss (``task.normalizer``) averaged over inner steps, initialisations and tasks: the
meta-objective of Metz et al. 2022 (arXiv:2203.11860, App. D.1), lower is better. All thetas
of a call train from the same initialisations on the same batches (common random numbers,
:func:`learnopt.bench.curves.loss_curves`); one compiled program per task and stack size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.bench.curves import loss_curves
from learnopt.learned.base import LearnedOptimizer
from learnopt.meta.sources import TaskMixture, TaskSource

EVAL_SEED = 2_000_003  # the pool's draws: far from every member's seed
# Fig. 2's fixed-LR Adam sweep: 1e-6 .. 1e1 every half order of magnitude (15 values).
ADAM_LRS = tuple(float(10.0 ** (e / 2)) for e in range(-12, 3))


def _stack(thetas: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *thetas)


class EvalPool:
    """A fixed sample of ``num_tasks`` draws of ``mixture``, trained ``num_steps`` steps."""

    def __init__(self, mixture: TaskMixture, lopt: LearnedOptimizer, num_tasks: int,
                 num_steps: int, seed: int = 0):
        source = TaskSource(mixture, EVAL_SEED + seed)
        self.draws = [source.draw(i) for i in range(num_tasks)]
        self.lopt = lopt
        self.num_steps = num_steps
        self._programs: dict[tuple[int, str], Any] = {}

    @property
    def names(self) -> list[str]:
        return [d.task.name for d in self.draws]

    def _program(self, index: int, kind: str):
        """A jitted ``(stacked hparams, seeds [S]) -> normalised losses [H, S, T]``."""
        if (index, kind) not in self._programs:
            task, steps = self.draws[index].task, self.num_steps
            if kind == "lopt":
                def make(theta):
                    return self.lopt.optimizer(theta, steps)
            else:
                make = optax.adam

            def run(hparams, seeds):
                losses, _ = loss_curves(task, make, hparams, list(seeds), steps)
                flat = jax.vmap(task.normalizer)(losses.reshape(-1))
                return flat.reshape(losses.shape).astype(jnp.float32)

            self._programs[(index, kind)] = jax.jit(run)
        return self._programs[(index, kind)]

    def curves(self, thetas: Sequence[Any], seeds: Sequence[int]) -> np.ndarray:
        """Normalised training-loss curves ``[tasks, thetas, seeds, steps]``."""
        stacked = _stack(thetas)
        seeds = jnp.asarray(list(seeds), jnp.int32)
        return np.stack([np.asarray(self._program(i, "lopt")(stacked, seeds), np.float64)
                         for i in range(len(self.draws))])

    def adam_curves(self, lrs: Sequence[float], seeds: Sequence[int]) -> np.ndarray:
        """Adam's normalised curves ``[tasks, lrs, seeds, steps]`` on the pool."""
        lrs = jnp.asarray(list(lrs), jnp.float32)
        seeds = jnp.asarray(list(seeds), jnp.int32)
        return np.stack([np.asarray(self._program(i, "adam")(lrs, seeds), np.float64)
                         for i in range(len(self.draws))])

    def scores(self, thetas: Sequence[Any], seeds: Sequence[int]) -> np.ndarray:
        """Each theta's mean normalised loss over steps, seeds and tasks (``[thetas]``); a
        non-finite curve scores +inf (it loses every comparison)."""
        per = self.curves(thetas, seeds).mean(axis=(2, 3)).mean(axis=0)
        return np.where(np.isfinite(per), per, np.inf)


@dataclasses.dataclass
class PopulationEval:
    """Fig. 2 of arXiv:2101.07367 at CPU scale (module docstring)."""

    steps: list[int]  # outer steps of the kept thetas
    members: np.ndarray  # [steps, P] mean normalised loss per member
    adam_fixed: dict[float, float]  # lr -> mean over tasks (one LR for every task)
    adam_per_task: float  # mean over tasks of the best LR of each task
    adam_per_task_lrs: list[float]
    tasks: list[str]
    member_curves: np.ndarray  # [P, T] last kept step's normalised curve, mean over tasks
    adam_curve: np.ndarray  # [T] per-task tuned Adam's curve, mean over tasks
    num_steps: int
    seeds: list[int]

    def to_dict(self) -> dict[str, Any]:
        best = int(np.argmin([v for v in self.adam_fixed.values()]))
        return {
            "steps": self.steps,
            "members": [[_num(x) for x in row] for row in self.members],
            "population_best": [_num(np.nanmin(row)) for row in self.members],
            "adam_fixed_lr": {f"{lr:.3g}": _num(v) for lr, v in self.adam_fixed.items()},
            "adam_best_fixed_lr": _num(list(self.adam_fixed.values())[best]),
            "adam_best_fixed_lr_value": list(self.adam_fixed)[best],
            "adam_per_task_tuned": _num(self.adam_per_task),
            "adam_per_task_lrs": self.adam_per_task_lrs,
            "tasks": self.tasks,
            "num_steps": self.num_steps,
            "seeds": self.seeds,
        }


def _num(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def evaluate_population(
    pool: EvalPool, kept: Sequence[tuple[int, Sequence[Any]]], seeds: Sequence[int],
    adam_lrs: Sequence[float] = ADAM_LRS,
) -> PopulationEval:
    """Every member's kept thetas (``[(outer step, [theta per member])]``) on the pool, and
    Adam at each of ``adam_lrs`` (fixed over tasks, and the best per task)."""
    steps = [int(s) for s, _ in kept]
    num_members = len(kept[0][1])
    flat = [theta for _, thetas in kept for theta in thetas]
    curves = pool.curves(flat, seeds)  # [tasks, steps*P, seeds, T]
    per_task = curves.mean(axis=(2, 3))  # [tasks, steps*P]
    per_task = np.where(np.isfinite(per_task), per_task, np.nan)
    members = np.nanmean(per_task, axis=0).reshape(len(steps), num_members)
    last = curves[:, -num_members:].mean(axis=2).mean(axis=0)  # [P, T]
    adam = pool.adam_curves(adam_lrs, seeds)  # [tasks, lrs, seeds, T]
    adam_scores = adam.mean(axis=(2, 3))
    adam_scores = np.where(np.isfinite(adam_scores), adam_scores, np.inf)
    fixed = {float(lr): float(v) for lr, v in zip(adam_lrs, adam_scores.mean(axis=0),
                                                   strict=True)}
    best = np.argmin(adam_scores, axis=1)
    tuned_curve = np.stack([adam[t, b].mean(axis=0) for t, b in enumerate(best)]).mean(axis=0)
    return PopulationEval(
        steps, members, fixed, float(adam_scores[np.arange(len(best)), best].mean()),
        [float(adam_lrs[b]) for b in best], pool.names, last, tuned_curve, pool.num_steps,
        [int(s) for s in seeds],
    )


def plot_population_eval(result: PopulationEval, path: str | Path, title: str) -> Path:
    """Left: every member's mean normalised loss over outer steps, with fixed-LR Adam (dashed
    blue, the five best LRs) and per-task tuned Adam (black). Right: the last kept thetas'
    normalised learning curves (mean over tasks) against per-task tuned Adam."""
    from learnopt.plotting import pyplot

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.asarray(result.steps)
    for m in range(result.members.shape[1]):
        ax.plot(x, result.members[:, m], color="C1", alpha=0.35, lw=0.8,
                label="members" if m == 0 else None)
    ax.plot(x, np.nanmin(result.members, axis=1), color="C3", lw=2, label="population best")
    ranked = sorted(result.adam_fixed.items(), key=lambda kv: kv[1])[:5]
    for i, (lr, value) in enumerate(ranked):
        ax.axhline(value, color="C0", ls="--", lw=0.9, alpha=1.0 - 0.15 * i,
                   label="Adam, one LR for all tasks (5 best)" if i == 0 else None)
        ax.annotate(f"{lr:.0e}", (x[-1] if len(x) else 0, value), fontsize=7, color="C0")
    ax.axhline(result.adam_per_task, color="k", lw=1.5, label="Adam, LR tuned per task")
    ax.set(xlabel="outer step", ylabel="mean normalised training loss",
           title=f"{title}: {len(result.tasks)} tasks x {result.num_steps} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    t = np.arange(1, result.adam_curve.shape[0] + 1)
    for m in range(result.member_curves.shape[0]):
        ax2.plot(t, result.member_curves[m], color="C1", alpha=0.5, lw=0.8,
                 label="members (last kept theta)" if m == 0 else None)
    ax2.plot(t, result.adam_curve, color="k", lw=1.5, label="Adam, LR tuned per task")
    ax2.set(xlabel="inner step", ylabel="normalised training loss (mean over tasks)",
            title="learning curves")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
