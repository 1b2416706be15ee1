"""Held-out meta-loss: how well meta-parameters train fresh draws of the run's task distribution.

A meta-training run's own meta-loss is measured on the tasks it trains on, with perturbed
meta-parameters, one truncation at a time. :func:`heldout_meta_loss` instead draws ``num_draws``
tasks from the same mixture with another seed (tasks the run never saw), trains each from
scratch for ``num_steps`` steps with the learned optimizer at every given ``theta`` (all thetas
of one task in one vmapped program, :func:`learnopt.bench.curves.loss_curves`, sharing the
initialisations and batches) and reports the mean normalised training loss over the run: the
meta-objective of Metz et al. 2022, Practical tradeoffs (arXiv:2203.11860, §3.2), on unseen
tasks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.bench.curves import loss_curves
from learnopt.learned.base import LearnedOptimizer
from learnopt.meta.sources import TaskMixture, TaskSource

HELDOUT_SEED = 1_000_003  # the draws' seed: far from any training seed


@dataclasses.dataclass
class HeldoutResult:
    """Mean normalised loss per theta (``[len(thetas)]``) and per task (``[tasks, thetas]``)."""

    mean: np.ndarray
    per_task: np.ndarray
    tasks: list[str]
    seconds: float

    @property
    def tasks_improved(self) -> np.ndarray:
        """Per theta, on how many tasks its loss is below the first theta's (``[thetas]``).

        The mean can follow one task whose normalised loss is much larger than the others' (a
        quadratic at 60 beside classifiers at 6); the count weighs every task alike.
        """
        return np.sum(self.per_task < self.per_task[:, :1], axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": [float(x) for x in self.mean],
            "tasks_improved_vs_first": [int(x) for x in self.tasks_improved],
            "per_task": [[float(x) for x in row] for row in self.per_task],
            "tasks": self.tasks,
            "seconds": round(self.seconds, 2),
        }


def heldout_meta_loss(
    mixture: TaskMixture,
    lopt: LearnedOptimizer,
    thetas: Sequence[Any],
    num_draws: int = 8,
    num_steps: int = 500,
    seeds: Sequence[int] = (0, 1),
    seed: int = HELDOUT_SEED,
    progress=None,
    scale: float | None = None,
) -> HeldoutResult:
    """The held-out meta-loss of each of ``thetas`` (module docstring).

    ``scale``: the time scale of the draws when the mixture samples within a time budget
    (:meth:`TaskSource.scale_at` of an outer step, for a run with a time-budget curriculum);
    None draws at the budget's own ``time_scale``. Every theta sees the same draws.

    A task whose normalised losses are not finite counts at its normaliser's value for a
    non-finite loss (the task decides, as in meta-training). ``progress(i, name)`` is called
    before each task.
    """
    if not thetas:
        raise ValueError("give at least one theta")
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *thetas)
    source = TaskSource(mixture, seed)
    start = time.perf_counter()
    rows, names = [], []
    for i in range(num_draws):
        draw = source.draw(i, scale)
        names.append(draw.task.name)
        if progress is not None:
            progress(i, draw.task.name)
        losses, _ = loss_curves(
            draw.task, lambda th: lopt.optimizer(th, num_steps), stacked, list(seeds), num_steps
        )
        normalised = np.asarray(draw.task.normalizer(losses), np.float64)  # [thetas, seeds, T]
        rows.append(normalised.mean(axis=(1, 2)))
    per_task = np.stack(rows)
    return HeldoutResult(per_task.mean(axis=0), per_task, names, time.perf_counter() - start)
