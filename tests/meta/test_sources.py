"""Task sources: a declared, seeded mixture of families and named tasks."""

import hashlib
import json
import math
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


def velo_mlp_with(curriculum, time_scale=1.0):
    return TaskMixture(
        (MixtureEntry(family="velo_mlp", options={"size": "cpu"}),),
        time_budget=TimeBudget(TIME_MODEL, time_scale=time_scale, curriculum=curriculum),
    )


def test_a_budget_curriculum_scales_each_draws_budget_by_its_outer_step():
    curriculum = {"kind": "time_budget", "start": 1.0, "end": 10.0, "num_steps": 100}
    source = TaskSource(velo_mlp_with(curriculum, time_scale=2.0), 0)
    scales = [source.scale_at(k) for k in (0, 50, 100, 1000)]
    # time_scale * (end / start) ** min(k / num_steps, 1): 2, 2 sqrt(10), 20, 20
    np.testing.assert_allclose(scales, [2.0, 2.0 * math.sqrt(10.0), 20.0, 20.0], rtol=1e-6)
    model = timing.TimeModel.load(TIME_MODEL)
    for step in (0, 100):
        scale = source.scale_at(step)
        for i in range(5):
            draw, (_, threshold) = source.draw(i, scale=scale), source.choose(i)
            assert draw.spec["time_scale"] == scale
            assert draw.spec["max_seconds_per_step"] == pytest.approx(threshold * scale)
            assert model.predict(draw.task.config) <= threshold * scale
    assert source.draw(0, scale=2.0).cache_key != source.draw(0, scale=20.0).cache_key


def test_a_growing_budget_lets_bigger_tasks_through():
    curriculum = {"start": 1.0, "end": 10.0, "num_steps": 100}  # kind defaults to time_budget
    source = TaskSource(velo_mlp_with(curriculum, time_scale=1.0), 0)
    model = timing.TimeModel.load(TIME_MODEL)
    mean = {}
    for step in (0, 100):
        scale = source.scale_at(step)
        mean[step] = np.mean(
            [model.predict(source.draw(i, scale=scale).task.config) for i in range(20)]
        )
    # at scale 1 many first samples are over budget and rejected; at 10 most fit (measured:
    # 1.6e-5 vs 4.3e-5 s/step)
    assert mean[100] > 2.0 * mean[0]


# Draws of this mixture before curricula existed: (entry, max_seconds_per_step, the sha256 of
# the cache key, first 16 hex digits). A run without a curriculum must draw exactly these.
BEFORE_CURRICULA = [
    ("velo_rnn_lm", 0.001, "845de7c102ed47d1"),
    ("velo_mlp", 0.0002, "bf4f9a567fb05e37"),
    ("quadratic_d10", None, "77fcaadb136e623b"),
    ("quadratic_d10", None, "0c6893dab7a46b26"),
    ("quadratic_d10", None, "2b61392eb03635ef"),
    ("quadratic_d10", None, "c79697115bae5894"),
    ("velo_mlp", 0.0002, "374a6824f7a355a6"),
    ("velo_mlp", 0.001, "64b4b06c2bc1ce0c"),
]


def test_without_a_curriculum_draws_are_those_of_before():
    mixture = TaskMixture(
        (
            MixtureEntry(family="velo_mlp", options={"size": "cpu"}),
            MixtureEntry(family="velo_rnn_lm", options={"size": "cpu"}),
            MixtureEntry(task="quadratic_d10"),
        ),
        augment=True,
        time_budget=TimeBudget(TIME_MODEL, phase=1, time_scale=10.0),
    )
    source = TaskSource(mixture, 7)
    assert source.scale_at(0) is None and source.scale_at(10_000) is None
    got = []
    for i in range(len(BEFORE_CURRICULA)):
        draw = source.draw(i)
        assert "time_scale" not in draw.spec
        digest = hashlib.sha256(draw.cache_key.encode()).hexdigest()[:16]
        got.append((draw.spec["entry"], draw.spec.get("max_seconds_per_step"), digest))
    assert got == BEFORE_CURRICULA
    assert "curriculum" not in mixture.to_dict()["time_budget"]  # config.json unchanged too


def test_budget_curricula_round_trip_and_bad_ones_are_named():
    mixture = velo_mlp_with({"start": 1, "end": 4.0, "num_steps": 20})
    assert mixture.time_budget.curriculum == {
        "kind": "time_budget", "start": 1, "end": 4.0, "num_steps": 20
    }
    data = json.loads(json.dumps(mixture.to_dict()))
    assert data["time_budget"]["curriculum"]["end"] == 4.0
    again = TaskMixture.from_dict(data)
    assert again == mixture
    assert TaskSource(again).scale_at(10) == pytest.approx(2.0, rel=1e-6)  # sqrt(4)
    bad = [
        ({"kind": "linear", "start": 1, "end": 4, "num_steps": 20},
         r"curriculum must be of kind 'time_budget'.*got kind 'linear'"),
        ({"start": 1.0, "end": 4.0, "num_steps": 20, "steps": 3}, r"unknown keys \['steps'\]"),
        ({"start": 1.0, "end": 4.0}, r"needs keys \['num_steps'\]"),
        ({"start": 4.0, "end": 1.0, "num_steps": 20}, r"time budget must not shrink"),
        ([1.0, 4.0], r"curriculum must be a table/dict"),
    ]
    for curriculum, message in bad:
        with pytest.raises(ValueError, match=message):
            velo_mlp_with(curriculum)
    with pytest.raises(ValueError, match=r"unknown time_budget keys \['curriculm'\]"):
        TaskMixture.from_dict({**data, "time_budget": {"model": TIME_MODEL, "curriculm": {}}})
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        TaskSource(mixture).draw(0, scale=0.0)
    with pytest.raises(ValueError, match="with a time_budget only"):
        TaskSource(TaskMixture.single("quadratic_d10")).draw(0, scale=1.0)


def test_the_velo_phase1_config_grows_its_time_scale():
    config = MetaTrainConfig.from_file(ROOT / "configs/velo_phase1.toml")
    budget = config.mixture().time_budget
    assert budget.curriculum["kind"] == "time_budget"
    start, end = budget.curriculum["start"], budget.curriculum["end"]
    n = budget.curriculum["num_steps"]
    assert budget.scale_at(0) == pytest.approx(budget.time_scale * start, rel=1e-6)
    assert budget.scale_at(n) == pytest.approx(budget.time_scale * end, rel=1e-6)
    assert budget.scale_at(n) > budget.scale_at(0)


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
