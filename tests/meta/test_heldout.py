"""Held-out meta-loss: the draws it scores on."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.learned.learnable import LearnableSGD
from learnopt.meta import heldout
from learnopt.meta.sources import MixtureEntry, TaskMixture, TaskSource, TimeBudget

TIME_MODEL = str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks/results/time_model.json")


def test_heldout_draws_at_the_given_time_scale(monkeypatch):
    # Under a time-budget curriculum, meta-eval scores on draws at a chosen scale (the run's
    # last outer step's): the names are those of TaskSource.draw(i, scale), not of the
    # budget's own time_scale.
    curriculum = {"start": 1.0, "end": 10.0, "num_steps": 100}
    mixture = TaskMixture(
        (MixtureEntry(family="velo_mlp", options={"size": "cpu"}),),
        time_budget=TimeBudget(TIME_MODEL, time_scale=1.0, curriculum=curriculum),
    )
    source = TaskSource(mixture, heldout.HELDOUT_SEED)
    seen = []

    def fake_curves(task, make_opt, thetas, seeds, num_steps):
        seen.append(task.name)
        return jnp.zeros((1, len(seeds), num_steps)), None

    monkeypatch.setattr(heldout, "loss_curves", fake_curves)
    lopt = LearnableSGD()
    theta = lopt.init(jax.random.PRNGKey(0))
    at = {}
    for scale in (None, 10.0):
        seen.clear()
        result = heldout.heldout_meta_loss(mixture, lopt, [theta], 6, 3, scale=scale)
        assert result.tasks == seen
        at[scale] = list(seen)
        assert result.per_task.shape == (6, 1) and np.isfinite(result.mean).all()
    assert at[10.0] == [source.draw(i, 10.0).task.name for i in range(6)]
    assert at[None] == [source.draw(i).task.name for i in range(6)]
    assert at[10.0] != at[None]  # a 10x budget lets other (larger) draws through


def test_tasks_improved_counts_each_task_once_whatever_its_scale():
    per_task = np.array([[6.0, 5.0, 6.5],
                         [60.0, 70.0, 50.0],   # a task of a larger scale moves the mean most
                         [3.0, 3.0, 2.0]])
    result = heldout.HeldoutResult(per_task.mean(axis=0), per_task, ["a", "b", "c"], 0.0)
    np.testing.assert_array_equal(result.tasks_improved, [0, 1, 2])
    assert result.mean[1] > result.mean[0]  # the mean says worse; 1 of 3 tasks improved
    assert result.to_dict()["tasks_improved_vs_first"] == [0, 1, 2]
