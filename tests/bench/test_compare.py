"""Baseline tuning and the comparison report on the quadratic (no data, fast)."""

import json

import jax
import numpy as np
import optax
import pytest

from learnopt.bench.compare import score_learned, tune_adam, write_report
from learnopt.bench.curves import loss_curves, seed_keys
from learnopt.learned.learnable import LearnableSGD
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask

TASK = QuadraticTask(QuadraticConfig(dim=6, min_singular=0.3, max_singular=1.0, seed=1))


def test_loss_curves_match_a_plain_training_loop():
    losses, _ = loss_curves(TASK, optax.sgd, np.asarray([0.1, 0.5]), [0, 1], 30)
    assert losses.shape == (2, 2, 30)
    for h, lr in enumerate([0.1, 0.5]):
        for s in (0, 1):
            params = TASK.init(seed_keys(s)[0])
            expected = []
            for _ in range(30):
                loss, g = jax.value_and_grad(TASK.loss)(params, None, {})
                expected.append(float(loss))
                params = {"x": params["x"] - lr * g["x"]}
            np.testing.assert_allclose(losses[h, s], expected, rtol=1e-5)


def test_adam_grid_picks_the_lowest_mean_loss_and_survives_divergence(tmp_path):
    grid = (1e-4, 1e-1, 1e3)
    score = tune_adam(TASK, [0, 1], 40, grid=grid)
    means = [t["mean_train_loss"] for t in score.tuning]
    assert np.all(np.isfinite(means))  # lr=1e3 blows up but is clipped by the normalizer
    assert score.setting == "lr=0.1" and int(np.argmin(means)) == 1
    np.testing.assert_allclose(score.seed_scores.mean(), min(means), rtol=1e-6)
    learned = score_learned(
        TASK, "learnable_sgd", LearnableSGD(0.3), LearnableSGD(0.3).init(None), [0, 1], 40
    )
    table = write_report(tmp_path, "quad", [learned, score], 40)
    assert "| learnable_sgd |" in table.read_text() and (tmp_path / "curves.png").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"][1]["mean_train_loss"] == pytest.approx(min(means))
