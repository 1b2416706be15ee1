"""The step-time model and time-budgeted sampling (VeLO, arXiv:2211.09760, §3.2, App. C.4-C.5).

Models are built by hand or fitted to synthetic timings, so these tests do not time anything
except one tiny task (``test_measure_step_time_of_a_tiny_task``).
"""

from __future__ import annotations

import collections
import json
import math

import jax
import numpy as np
import pytest

from learnopt.tasks import timing as T
from learnopt.tasks.base import config_to_dict
from learnopt.tasks.families import velo as F
from learnopt.tasks.families.registry import velo_families


def flops_model(families=("mlp", "conv"), rate=1e-9, overhead=1e-5) -> T.TimeModel:
    """t = overhead + rate * flops for the given families, no shared costs."""
    columns = T._columns(sorted(families))
    weights = [
        overhead if c.startswith("overhead:") else rate if c.startswith("flops:") else 0.0
        for c in columns
    ]
    return T.TimeModel(columns, weights, {"note": "hand-made"})


class FakeModel:
    """Predicts from a list of times, one per call, then repeats the last one."""

    def __init__(self, times):
        self.times = list(times)
        self.calls = 0

    def predict(self, config):
        t = self.times[min(self.calls, len(self.times) - 1)]
        self.calls += 1
        return t


def test_prediction_is_the_additive_formula():
    model = flops_model()
    config = F.MLPFamily().sample(jax.random.PRNGKey(0))
    flops = config.static.cost_features()["flops"]
    assert model.predict(config) == pytest.approx(1e-5 + 1e-9 * flops)
    with pytest.raises(KeyError, match="no family 'resnet'"):
        model.predict(F.ResNetFamily().sample(jax.random.PRNGKey(0)))


def test_every_accepted_sample_is_predicted_under_budget():
    family = F.MLPFamily()
    model = flops_model()
    budget = 1e-4
    accepted = []
    for i in range(30):
        key = jax.random.PRNGKey(i)
        try:
            accepted.append(T.sample_within_budget(family, key, budget, model, max_tries=50))
        except T.BudgetError:
            pass
    assert len(accepted) >= 25
    assert all(model.predict(c) <= budget for c in accepted)
    # The budget binds: unconstrained samples often exceed it.
    free = [family.sample(jax.random.PRNGKey(1000 + i)) for i in range(50)]
    assert sum(model.predict(c) > budget for c in free) >= 10


def test_rejection_with_a_fake_model_returns_the_first_fitting_draw():
    family = F.ConvFamily()
    key = jax.random.PRNGKey(3)
    fake = FakeModel([5.0, 2.0, 1.5, 0.5])
    config = T.sample_within_budget(family, key, 1.0, fake, max_tries=10)
    assert fake.calls == 4  # rejected three, accepted the fourth
    assert config == family.sample(jax.random.fold_in(key, 3))
    with pytest.raises(T.BudgetError, match=r"fastest: 2 s/step"):
        T.sample_within_budget(family, key, 1.0, FakeModel([3.0, 2.0]), max_tries=5)
    with pytest.raises(ValueError, match="max_tries"):
        T.sample_within_budget(family, key, 1.0, fake, max_tries=0)


def test_budget_probabilities_are_renormalised():
    ks = np.asarray(jax.random.split(jax.random.PRNGKey(0), 4000))  # host keys: no dispatch
    draws = collections.Counter(T.sample_budget(k) for k in ks)
    p = np.asarray(T.PHASE_ONE_PROBS) / sum(T.PHASE_ONE_PROBS)  # 0.591, 0.273, 0.091, 0.045
    for threshold, expected in zip(T.PHASE_ONE_THRESHOLDS, p, strict=True):
        assert draws[threshold] / 4000 == pytest.approx(expected, abs=0.025)


def test_velo_sampler_allows_lm_and_resnet_only_from_1e_4():
    families = velo_families(size="cpu", data="synthetic")
    everything_fits = FakeModel([0.0])
    small = collections.Counter()
    large = collections.Counter()
    for i in range(100):
        key = jax.random.PRNGKey(i)
        c = T.sample_velo_config(key, everything_fits, families, thresholds=(2e-5,), probs=(1,))
        small[c.family] += 1
        c = T.sample_velo_config(key, everything_fits, families, thresholds=(4e-4,), probs=(1,))
        large[c.family] += 1
    assert set(small) == set(F.SMALL_BUDGET_FAMILIES)
    assert set(large) == set(F.LARGE_BUDGET_FAMILIES)


def test_velo_sampler_respects_the_scaled_budget():
    families = velo_families(["mlp", "conv"])
    model = flops_model()
    for i in range(20):
        c = T.sample_velo_config(
            jax.random.PRNGKey(i), model, families, time_scale=10.0, max_tries=200
        )
        assert model.predict(c) <= 1e-3 * 10.0
    with pytest.raises(T.BudgetError):
        T.sample_velo_config(jax.random.PRNGKey(0), model, families, time_scale=0.01)


def test_fit_recovers_a_known_model_and_round_trips(tmp_path):
    truth = T.TimeModel(
        T._columns(["mlp", "rnn_lm"]),
        [2e-5, 5e-5, 1e-10, 3e-10, 1e-9, 1e-8, 0.0, 0.0],
    )
    ms = []
    for name in ("mlp", "rnn_lm"):
        family = velo_families([name])[name]
        for i in range(12):
            c = family.sample(jax.random.PRNGKey(i))
            ms.append(T.Measurement(name, config_to_dict(c), truth.predict(c)))
    fitted = T.fit_time_model(ms)
    assert fitted.info["fit_within_factor_2"] == 1.0
    assert fitted.info["fit_rms_log_error"] < 0.02
    for name in ("mlp", "rnn_lm"):
        family = velo_families([name])[name]
        for i in range(100, 110):
            c = family.sample(jax.random.PRNGKey(i))
            assert fitted.predict(c) == pytest.approx(truth.predict(c), rel=0.05)
    path = fitted.save(tmp_path / "model.json")
    loaded = T.TimeModel.load(path)
    assert loaded.columns == fitted.columns and loaded.weights == fitted.weights
    assert json.loads(path.read_text())["format_version"] == T.FORMAT_VERSION
    with pytest.raises(ValueError, match="format"):
        T.TimeModel.from_dict({**loaded.to_dict(), "format_version": 99})


def test_calibrate_with_an_injected_measurement(tmp_path):
    families = [F.MLPFamily(size="tiny"), F.AEFamily(size="tiny")]

    def fake_measure(task):
        return 1e-5 + 2e-10 * task.static.cost_features()["flops"]

    model = T.calibrate(families, 4, jax.random.PRNGKey(0), path=tmp_path / "tm.json",
                        measure=fake_measure)  # fmt: skip
    assert sorted(model.families) == ["mlp", "mlp_ae"]
    assert len(model.info["measurements"]) == 8
    assert model.info["fit_within_factor_2"] == 1.0
    assert T.TimeModel.load(tmp_path / "tm.json").weights == model.weights
    # Measurements are reproducible from the key.
    again = T.measure_families(families, 4, jax.random.PRNGKey(0), measure=fake_measure)
    assert [m.config for m in again] == [m["config"] for m in model.info["measurements"]]


def test_measure_step_time_of_a_tiny_task():
    family = F.MLPFamily(size="tiny", data="synthetic")
    task = family.task(family.sample(jax.random.PRNGKey(0)))
    seconds = T.measure_step_time(task, steps=2, min_time=0.0)
    assert math.isfinite(seconds) and 0 < seconds < 1.0


def test_cost_features_grow_with_size():
    small = F.MLPStatic(image_size=8, hidden_size=16, num_layers=1, batch_size=8)
    big = F.MLPStatic(image_size=8, hidden_size=64, num_layers=1, batch_size=8)
    fs, fb = small.cost_features(), big.cost_features()
    # 3 x (2 * (64*16 + 16*10)) * 8 FLOPs for the small one.
    assert fs["flops"] == 3 * 2 * (64 * 16 + 16 * 10) * 8
    assert fb["flops"] > fs["flops"] and fb["params"] > fs["params"]
