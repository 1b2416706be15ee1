"""Inner-run length samplers and outer-step curricula: exact values and sampled distributions."""

import json
import math

import jax
import numpy as np
import pytest

from learnopt.meta.schedules import (
    SCHEDULES,
    FixedLength,
    LinearCurriculum,
    LogUniformLength,
    PiecewiseCurriculum,
    TimeBudgetCurriculum,
    UniformLength,
    schedule_from_dict,
)

KEYS = jax.random.split(jax.random.PRNGKey(0), 40_000)


def draws(schedule, outer_step=0):
    return np.asarray(jax.jit(jax.vmap(lambda k: schedule(outer_step, k)))(KEYS))


def assert_frequencies(values, probs):
    """Empirical frequency of each value within 4 binomial standard errors of ``probs``."""
    n = len(values)
    assert set(np.unique(values)) <= set(probs)
    for value, p in probs.items():
        freq = np.mean(values == value)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (value, freq, p)


def test_fixed_length():
    sched = FixedLength(200)
    assert int(sched(0, KEYS[0])) == int(sched(10**6, None)) == 200
    assert set(draws(sched).tolist()) == {200}


def test_uniform_length_is_uniform_on_the_closed_interval():
    values = draws(UniformLength(3, 7))
    assert values.dtype == np.int32 and values.min() == 3 and values.max() == 7
    assert_frequencies(values, {n: 0.2 for n in range(3, 8)})
    assert set(draws(UniformLength(5, 5)).tolist()) == {5}


def test_log_uniform_length_has_the_integer_log_uniform_distribution():
    # P(n) = log((n + 1) / n) / log((hi + 1) / lo): P(1) = 0.2447, P(16) = 0.0214.
    values = draws(LogUniformLength(1, 16))
    probs = {n: math.log((n + 1) / n) / math.log(17) for n in range(1, 17)}
    assert abs(sum(probs.values()) - 1) < 1e-12 and abs(probs[1] - 0.2447) < 1e-4
    assert_frequencies(values, probs)
    # VeLO's range (App. D.1): each decade equally likely, so half the runs are under 2,000.
    values = draws(LogUniformLength(200, 20_000))
    assert values.min() >= 200 and values.max() <= 20_000
    half = math.log(2000 / 200) / math.log(20_001 / 200)  # 0.49998
    assert abs(np.mean(values < 2000) - half) < 4 * math.sqrt(0.25 / len(values))
    assert abs(np.median(values) - 2000) < 60


def test_linear_curriculum_exact_values():
    sched = LinearCurriculum(start=100, end=2000, num_steps=1000)
    got = [int(sched(k)) for k in (0, 1, 250, 500, 999, 1000, 5000)]
    assert got == [100, 102, 575, 1050, 1998, 2000, 2000]  # 100 + 1.9 k, rounded
    assert [int(LinearCurriculum(10, 4, 3)(k)) for k in range(5)] == [10, 8, 6, 4, 4]


def test_piecewise_curriculum_exact_breakpoints():
    points = ((0, 200), (1000, 2000), (3000, 20_000))
    const = PiecewiseCurriculum(points)
    steps = (0, 999, 1000, 2999, 3000, 10**6)
    assert [int(const(k)) for k in steps] == [200, 200, 2000, 2000, 20_000, 20_000]
    linear = PiecewiseCurriculum(points, interpolation="linear")
    got = [int(linear(k)) for k in (0, 500, 1000, 2000, 3000, 10**6)]
    assert got == [200, 1100, 2000, 11_000, 20_000, 20_000]
    assert int(PiecewiseCurriculum(((0, 7),))(123)) == 7


def test_time_budget_curriculum_grows_geometrically():
    sched = TimeBudgetCurriculum(start=2e-5, end=1e-3, num_steps=100)
    got = [float(sched(k)) for k in (0, 50, 100, 1000)]
    np.testing.assert_allclose(got, [2e-5, math.sqrt(2e-5 * 1e-3), 1e-3, 1e-3], rtol=1e-5)
    assert float(TimeBudgetCurriculum(1e-4, 1e-4, 5)(3)) == pytest.approx(1e-4, rel=1e-6)


def test_schedules_trace_under_jit_with_a_traced_outer_step():
    cases = [
        LinearCurriculum(100, 2000, 1000),
        PiecewiseCurriculum(((0, 200), (1000, 2000))),
        PiecewiseCurriculum(((0, 200), (1000, 2000)), interpolation="linear"),
        TimeBudgetCurriculum(2e-5, 1e-3, 100),
        UniformLength(3, 7),
    ]
    for sched in cases:
        traced = jax.jit(lambda k, key, s=sched: s(k, key))
        for k in (0, 40, 999, 1000, 4000):
            got, want = traced(k, KEYS[k]), sched(k, KEYS[k])
            assert got.dtype == want.dtype
            np.testing.assert_allclose(float(got), float(want), rtol=1e-6)  # ints: exact


def test_every_schedule_round_trips_through_json():
    cases = [
        FixedLength(20),
        UniformLength(3, 7),
        LogUniformLength(200, 20_000),
        LinearCurriculum(300, 10_000, 10_000),
        PiecewiseCurriculum(((0, 200), (1000, 2000)), interpolation="linear"),
        TimeBudgetCurriculum(2e-5, 1e-3, 100),
    ]
    assert sorted(type(s).kind for s in cases) == sorted(SCHEDULES)
    for sched in cases:
        data = json.loads(json.dumps(sched.to_dict()))
        assert data["kind"] == type(sched).kind
        again = schedule_from_dict(data)
        assert again == sched and type(again).from_dict(data) == sched
        assert float(again(7, KEYS[7])) == float(sched(7, KEYS[7]))
    assert PiecewiseCurriculum(((0, 200),)).to_dict() == {
        "kind": "piecewise", "breakpoints": [[0, 200]], "interpolation": "constant"
    }


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: FixedLength(0), r"length must be an int >= 1, got 0"),
        (lambda: FixedLength(2.5), r"length must be an int >= 1, got 2.5"),
        (lambda: FixedLength(True), r"length must be an int >= 1, got True"),
        (lambda: UniformLength(5, 3), r"need lo <= hi, got lo=5, hi=3"),
        (lambda: LogUniformLength(0, 10), r"lo must be an int >= 1, got 0"),
        (lambda: LinearCurriculum(100, 200, 0), r"num_steps must be an int >= 1, got 0"),
        (lambda: PiecewiseCurriculum(()), r"at least one \(outer_step, horizon\) pair"),
        (lambda: PiecewiseCurriculum(((5, 200),)), r"first breakpoint must be at outer step 0"),
        (
            lambda: PiecewiseCurriculum(((0, 2), (10, 3), (10, 4))),
            r"must increase strictly, got \[0, 10, 10\]",
        ),
        (lambda: PiecewiseCurriculum(((0, -2),)), r"breakpoint horizon must be an int >= 1"),
        (lambda: PiecewiseCurriculum(((0, 2, 3),)), r"each breakpoint is \(outer_step, horizon\)"),
        (
            lambda: PiecewiseCurriculum(((0, 2),), interpolation="cubic"),
            r"interpolation must be 'constant' or 'linear', got 'cubic'",
        ),
        (lambda: TimeBudgetCurriculum(0.0, 1e-3, 10), r"start must be a finite number > 0"),
        (lambda: TimeBudgetCurriculum(1e-4, math.inf, 10), r"end must be a finite number > 0"),
        (lambda: TimeBudgetCurriculum(1e-3, 1e-4, 10), r"time budget must not shrink"),
        (lambda: FixedLength(3)(-1, None), r"outer step must be >= 0, got -1"),
        (lambda: schedule_from_dict({"kind": "cosine"}), r"unknown schedule kind 'cosine'"),
        (
            lambda: schedule_from_dict({"kind": "fixed", "length": 3, "lo": 1}),
            r"unknown keys \['lo'\] for schedule 'fixed'; accepted: \['length'\]",
        ),
        (
            lambda: schedule_from_dict({"kind": "time_budget", "start": 1.0}),
            r"schedule 'time_budget' needs keys \['end', 'num_steps'\]; got \['start'\]",
        ),
        (
            lambda: FixedLength.from_dict({"kind": "uniform", "length": 3}),
            r"FixedLength.from_dict needs kind 'fixed', got 'uniform'",
        ),
    ],
)
def test_bad_values_get_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
