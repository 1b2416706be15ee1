"""Task sources: a declared, seeded mixture of families and named tasks."""

import json
import pathlib
import tomllib

import numpy as np
import pytest

from learnopt.meta.sources import MixtureEntry, TaskMixture, TaskSource, TimeBudget
from learnopt.meta.train import MetaTrainConfig
from learnopt.tasks import timing

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIME_MODEL = str(ROOT / "benchmarks/results/time_model.json")


def test_entries_are_drawn_in_proportion_to_their_weights():
    mixture = TaskMixture((
        MixtureEntry(task="quadratic_d10", weight=1.0),
        MixtureEntry(family="velo_mlp", weight=2.0, options={"size": "tiny"}),
        MixtureEntry(family="synthetic", weight=1.0),
    ))
    source = TaskSource(mixture, seed=3)
    counts = np.bincount([source.choose(i)[0] for i in range(2000)], minlength=3)
    np.testing.assert_allclose(counts / 2000, [0.25, 0.5, 0.25], atol=0.035)  # > 3 SE
    assert TaskSource(mixture, seed=3).choose(17) == source.choose(17)  # seeded
    assert [TaskSource(mixture, seed=4).choose(i) for i in range(20)] != [
        source.choose(i) for i in range(20)
    ]


def test_draws_are_reproducible_and_describe_what_was_drawn():
    mixture = TaskMixture(
        (MixtureEntry(family="velo_mlp", options={"size": "tiny"}),), augment=True
    )
    a, b = TaskSource(mixture, 0).draw(5), TaskSource(mixture, 0).draw(5)
    assert a.task.name == b.task.name and a.cache_key == b.cache_key
    assert a.spec["entry"] == "velo_mlp" and a.spec["config"]["type"] == "MLPConfig"
    names = {TaskSource(mixture, 0).draw(i).task.name for i in range(12)}
    assert len(names) == 12  # different configs
    augmented = [TaskSource(mixture, 0).draw(i).spec.get("augmentation") for i in range(40)]
    assert 0 < sum(x is not None for x in augmented) < 40  # VeLO's probabilities: some, not all
    json.dumps(a.spec)  # JSON-ready


def test_time_budget_keeps_large_families_out_of_small_budgets():
    mixture = TaskMixture(
        (
            MixtureEntry(family="velo_mlp", options={"size": "cpu"}),
            MixtureEntry(family="velo_rnn_lm", options={"size": "cpu"}),
        ),
        time_budget=TimeBudget(TIME_MODEL, phase=1, time_scale=10.0),
    )
    source = TaskSource(mixture, 0)
    chosen = [source.choose(i) for i in range(300)]
    small = [entry for entry, t in chosen if t < timing.SMALL_BUDGET_LIMIT]
    large = [entry for entry, t in chosen if t >= timing.SMALL_BUDGET_LIMIT]
    assert small and set(small) == {0}  # rnn_lm is not allowed below 1e-4 s (VeLO App. C.5)
    assert set(large) == {0, 1}
    # phase one: P(threshold < 1e-4) = 0.65 / 1.1
    assert len(small) / 300 == pytest.approx(0.65 / 1.1, abs=0.09)
    draw = source.draw(next(i for i, (_, t) in enumerate(chosen) if t < 1e-4))
    model = timing.TimeModel.load(TIME_MODEL)
    assert model.predict(draw.task.config) <= draw.spec["max_seconds_per_step"]


def test_bad_mixtures_are_named():
    with pytest.raises(ValueError, match="unknown family 'velo_mlpp'"):
        MixtureEntry(family="velo_mlpp")
    with pytest.raises(ValueError, match="exactly one of family or task"):
        MixtureEntry(family="velo_mlp", task="quadratic_d10")
    with pytest.raises(ValueError, match="weight must be > 0"):
        MixtureEntry(task="quadratic_d10", weight=0)
    with pytest.raises(ValueError, match="unknown mixture-entry keys \\['famliy'\\]"):
        TaskMixture.from_dict({"entries": [{"famliy": "velo_mlp"}]})
    with pytest.raises(ValueError, match="at least one entry"):
        TaskMixture.from_dict({"entries": []})
    with pytest.raises(ValueError, match="phase must be 1 or 2"):
        TimeBudget(TIME_MODEL, phase=3)


@pytest.mark.parametrize("name", ["single_task", "cpu_mixture", "velo_phase1"])
def test_shipped_run_configs_load_and_round_trip(name):
    path = ROOT / "configs" / f"{name}.toml"
    config = MetaTrainConfig.from_file(path)
    assert MetaTrainConfig.from_json(config.to_json()) == config
    raw = tomllib.loads(open(path).read())
    mixture = config.mixture()
    assert len(mixture.entries) == len(raw.get("tasks", {}).get("entries", [None]))
    assert TaskMixture.from_dict(mixture.to_dict()) == mixture
    TaskSource(mixture, config.seed).choose(0)


def test_the_single_task_config_is_the_default_run():
    assert MetaTrainConfig.from_file(ROOT / "configs/single_task.toml") == MetaTrainConfig()
