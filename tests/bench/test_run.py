"""The bench engine: baselines from one grid, the cache, speedups, divergence, aggregates."""

import numpy as np
import pytest

from learnopt.bench.cache import BaselineCache
from learnopt.bench.run import (
    ADAM_DEFAULT,
    ADAM_TUNED,
    bench_task_result,
    grid_curves,
    summarise,
)
from learnopt.bench.suite import BenchTask
from learnopt.optimizers.hand import adam
from learnopt.resolve import resolve_optimizer

TASK = BenchTask("quadratic_d10", steps=30, kind="quadratic", why="test")


@pytest.fixture(scope="module")
def first_and_second(tmp_path_factory):
    cache = BaselineCache(tmp_path_factory.mktemp("cache"))
    contenders = [resolve_optimizer("sgd:lr=0.5"), resolve_optimizer("sgd:lr=50")]
    first = bench_task_result(TASK, contenders, [0, 1], cache, baselines=("sgdm",))
    counts = [(cache.hits, cache.misses)]
    second = bench_task_result(TASK, contenders, [0, 1], cache, baselines=("sgdm",))
    counts.append((cache.hits, cache.misses))
    return first, second, cache, counts


def test_untuned_and_tuned_adam_are_prefixes_of_the_long_grid(first_and_second, tmp_path):
    first, _, cache, _ = first_and_second
    task = TASK.build()
    grid = grid_curves(cache, TASK, task, "adam", [{"learning_rate": 1e-3}],
                       lambda h, n: adam(h["learning_rate"]), [0, 1], 90)
    # The stored report curves are the first 30 steps of the 90-step lr=1e-3 runs.
    assert first["results"][ADAM_DEFAULT]["curve_steps"] == list(range(1, 31))
    np.testing.assert_allclose(first["results"][ADAM_DEFAULT]["curves"], grid[0, :, :30],
                               rtol=1e-6)
    assert first["results"][ADAM_DEFAULT]["setting"] == "lr=0.001"
    # The reference never beats its own envelope; the envelope covers 3x the budget.
    assert first["results"][ADAM_TUNED]["speedup"] <= 1.0
    assert first["envelope"]["steps"][-1] == 90
    env = np.asarray(first["envelope"]["loss"])
    assert np.all(np.diff(env) <= 0)


def test_second_run_reads_every_baseline_from_the_cache(first_and_second):
    first, second, _, counts = first_and_second
    # adam: 15 lrs x 2 seeds; sgdm: 15 lrs x 2 seeds; all hits the second time.
    assert counts == [(0, 60), (60, 60)]
    for label in (ADAM_TUNED, ADAM_DEFAULT, "sgdm (tuned)"):
        assert first["results"][label] == second["results"][label]


def test_divergence_and_speedups_of_contenders(first_and_second):
    first, _, _, _ = first_and_second
    good, bad = first["results"]["sgd:lr=0.5"], first["results"]["sgd:lr=50"]
    assert not good["diverged"] and bad["diverged"]
    assert bad["speedup"] == 0.01 and bad["clipped"] == "low"
    assert good["final_loss"] < first["initial_loss"]


def test_summarise_counts_by_hand():
    def row(speedup, final, diverged=False):
        return {"speedup": speedup, "final_loss": final, "diverged": diverged}

    tasks = [
        {"results": {"x": row(2.0, 0.1), ADAM_DEFAULT: row(0.5, 0.3)}},
        {"results": {"x": row(0.5, 0.4), ADAM_DEFAULT: row(0.8, 0.2)}},
        {"results": {"x": row(0.01, np.inf, True), ADAM_DEFAULT: row(0.3, 0.9)}},
        {"results": {"x": row(3.0, 0.05), ADAM_DEFAULT: row(1.0, 0.1)}},
    ]
    agg = summarise(tasks, ["x"])["x"]
    assert agg["beats_tuned_adam"] == 0.5  # 2.0 and 3.0
    assert agg["beats_adam_1e-3"] == 0.5  # tasks 1 and 4
    assert agg["divergences"] == 1
    assert agg["p50"] == pytest.approx(1.25)
    assert agg["mean"] == pytest.approx((2.0 + 0.5 + 0.01 + 3.0) / 4)


def test_merge_results_of_disjoint_task_subsets(first_and_second):
    """Two runs on different tasks merge into one result whose aggregates are recomputed over
    both; a null final loss (from results.json) reads as diverged; overlaps are refused."""
    import copy

    from learnopt.bench.run import merge_results

    first, _, _, _ = first_and_second
    labels = list(first["results"])
    part = {"suite": "quick", "seeds": 2, "baseline_factor": 3.0, "optimizers": labels,
            "reference": ADAM_TUNED, "seconds": 10.0, "command": "a",
            "cache": {"hits": 1, "misses": 2}}
    task_b = copy.deepcopy(first)
    task_b["task"] = "Synthetic_Rosenbrock_d10"
    task_b["results"]["sgd:lr=0.5"]["final_loss"] = None
    task_b["results"]["sgd:lr=0.5"]["speedup"] = 3.0
    merged = merge_results([{**part, "tasks": [task_b]},
                            {**part, "tasks": [first], "command": "b"}])
    assert [t["task"] for t in merged["tasks"]] == ["Synthetic_Rosenbrock_d10", "quadratic_d10"]
    assert merged["seconds"] == 20.0 and merged["cache"] == {"hits": 2, "misses": 4}
    agg = merged["aggregate"]["sgd:lr=0.5"]
    assert agg["n"] == 2 and agg["beats_tuned_adam"] == 0.5
    assert agg["beats_adam_1e-3"] == (first["results"]["sgd:lr=0.5"]["final_loss"]
                                      < first["results"][ADAM_DEFAULT]["final_loss"]) / 2
    with pytest.raises(ValueError, match="overlap"):
        merge_results([{**part, "tasks": [first]}, {**part, "tasks": [first]}])
