"""learnopt.bench.speedup: VeLO's speedup over LR-tuned Adam, checked on hand-computed numbers."""

import numpy as np
import pytest

from learnopt.bench.speedup import (
    EMA_DECAY,
    Speedup,
    adam_envelope,
    aggregate,
    beats,
    ema,
    final_loss,
    speedup,
)

# env[i] = 10 - (i + 1)/100: the loss after i + 1 steps, from 9.99 down to 7.0 at step 300.
LINEAR = 10.0 - np.arange(1, 301) / 100.0


def test_ema_by_hand():
    # y0 = 1; y1 = .5*1 + .5*2 = 1.5; y2 = .5*1.5 + .5*4 = 2.75
    np.testing.assert_allclose(ema(np.array([1.0, 2.0, 4.0]), 0.5), [1.0, 1.5, 2.75])
    assert EMA_DECAY == 0.95
    # default decay: y1 = .95*10 + .05*0 = 9.5; along the last axis of each row
    np.testing.assert_allclose(ema(np.array([[10.0, 0.0], [2.0, 4.0]])), [[10, 9.5], [2, 2.1]])


def test_ema_propagates_divergence_as_inf():
    out = ema(np.array([1.0, np.nan, 1.0, 1.0]), 0.5)
    assert out[0] == 1.0
    assert np.all(out[1:] == np.inf)
    assert np.all(ema(np.array([-np.inf, 1.0])) == np.inf)


def test_envelope_of_two_lrs_ignores_the_diverged_lr_and_is_monotone():
    curves = np.array(
        [
            # lr 0: seed mean [4, 3, 10]; EMA: 4, .95*4+.05*3 = 3.95, .95*3.95+.05*10 = 4.2525
            [[4.0, 2.0, 12.0], [4.0, 4.0, 8.0]],
            # lr 1: seed mean [3, 1, inf] (one seed diverged); EMA: 3, .95*3+.05*1 = 2.9, inf
            [[3.0, 1.0, np.nan], [3.0, 1.0, 1.0]],
        ]
    )
    # pointwise min [3, 2.9, 4.2525], cumulative min [3, 2.9, 2.9]
    np.testing.assert_allclose(adam_envelope(curves), [3.0, 2.9, 2.9])


def test_envelope_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="H, S"):
        adam_envelope(np.ones((2, 3)))


def test_final_loss_uses_the_envelope_smoothing():
    # seed mean [2, 4]; EMA: 2, .95*2 + .05*4 = 2.1
    assert final_loss(np.array([[1.0, 3.0], [3.0, 5.0]])) == pytest.approx(2.1)
    assert final_loss(np.array([[1.0, 3.0], [3.0, np.nan]])) == np.inf
    assert final_loss(np.array([2.0, 4.0])) == pytest.approx(2.1)  # one seed as a 1-D curve


def test_speedup_on_a_linear_envelope():
    assert speedup(8.5, LINEAR, 100) == Speedup(pytest.approx(1.5), pytest.approx(150.0), None)
    assert speedup(8.0, LINEAR, 100).value == pytest.approx(2.0)
    # halfway between steps 150 (8.5) and 151 (8.49)
    s = speedup(8.495, LINEAR, 100)
    assert s.step == pytest.approx(150.5) and s.value == pytest.approx(1.505)
    # exactly the last point: reached at step 300, the largest measurable speedup, not clipped
    assert speedup(7.0, LINEAR, 100) == Speedup(3.0, 300.0, None)


def test_speedup_matches_velo_inverse_interpolation():
    rng = np.random.default_rng(0)
    env = np.cumsum(-rng.uniform(0.01, 1.0, size=50)) + 100.0  # strictly decreasing
    xp = np.arange(1, 51, dtype=np.float64)
    for loss in rng.uniform(env[-1], env[0], size=20):
        expected = np.interp(loss, env[::-1], xp[::-1])
        assert speedup(loss, env, 10).step == pytest.approx(expected, rel=1e-12)


def test_speedup_clipped_high_and_low():
    # below the whole envelope: value = 300/100
    assert speedup(6.9, LINEAR, 100) == Speedup(3.0, 300.0, "high")
    # reached at step 5 of 1000: 0.005 < 0.01
    low = speedup(9.95, LINEAR, 1000)
    assert low.value == 0.01 and low.clipped == "low" and low.step == pytest.approx(5.0)
    # reached at step 10 of 1000: exactly 0.01, not clipped
    s = speedup(9.9, LINEAR, 1000)
    assert s.value == pytest.approx(0.01) and s.clipped is None
    # above the start of the envelope: step 1; 1/100 is not below min_speedup, 1/1000 is
    assert speedup(12.0, LINEAR, 100) == Speedup(0.01, 1.0, None)
    assert speedup(12.0, LINEAR, 1000) == Speedup(0.01, 1.0, "low")
    assert speedup(12.0, LINEAR, 4, min_speedup=0.5) == Speedup(0.5, 1.0, "low")


def test_speedup_of_a_diverged_run():
    for loss in (np.nan, np.inf):
        assert speedup(loss, LINEAR, 100) == Speedup(0.01, np.inf, "low")


def test_speedup_on_flat_stretches_takes_the_first_step():
    env = np.array([5.0, 4.0, 4.0, 4.0, 3.0])
    assert speedup(4.0, env, 1).step == 2.0
    assert speedup(4.5, env, 1).step == pytest.approx(1.5)
    assert speedup(3.5, env, 1).step == pytest.approx(4.5)
    # a diverged prefix: the first finite point at or below the loss is step 3
    assert speedup(3.0, np.array([np.inf, np.inf, 2.0, 1.0]), 1).step == 3.0


def test_speedup_rejects_a_non_monotone_envelope():
    with pytest.raises(ValueError, match="non-increasing"):
        speedup(1.0, np.array([3.0, 1.0, 2.0]), 1)


def test_adam_itself_has_speedup_one():
    t = np.arange(1, 41, dtype=np.float64)
    curves = np.stack([1.0 / t, 2.0 / t])[None]  # [1 lr, 2 seeds, 40 steps], decreasing
    env = adam_envelope(curves)
    s = speedup(final_loss(curves[0, :, :10]), env, 10)
    assert s.value == pytest.approx(1.0) and s.clipped is None


def test_aggregate_by_hand():
    out = aggregate([0.5, 1.0, 2.0, 4.0, 100.0])
    assert out["mean"] == pytest.approx((0.5 + 1 + 2 + 4 + 30) / 5)  # 100 clipped at 30: 7.5
    assert out["mean_inverse"] == pytest.approx((2 + 1 + 0.5 + 0.25 + 0.01) / 5)  # 0.752
    assert out["p50"] == 2.0
    assert out["p25"] == 1.0 and out["p75"] == 4.0
    assert out["p10"] == pytest.approx(0.7)  # rank 0.4: 0.5 + 0.4*(1 - 0.5)
    assert out["p5"] == pytest.approx(0.6)  # rank 0.2
    assert out["n"] == 5


def test_aggregate_clips_cost_and_rejects_bad_input():
    out = aggregate([0.05, 0.0, 2.0, np.inf])
    assert out["mean_inverse"] == pytest.approx((10 + 10 + 0.5 + 0) / 4)  # 1/0.05 = 20 -> 10
    assert out["mean"] == pytest.approx((0.05 + 0 + 2 + 30) / 4)
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        aggregate([1.0, np.nan])


def test_beats():
    assert beats([0.5, 1.0, 2.0, 4.0, 100.0]) == pytest.approx(0.6)  # 1.0 is not > 1
    assert beats([0.5, 1.0, 2.0, 4.0, 100.0], threshold=4.0) == pytest.approx(0.2)
