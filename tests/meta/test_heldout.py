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
