"""The outer learner: warm-up and schedule values, injected learning rates against a hand
Adam, elementwise clipping, stale and non-finite gradients, checkpoint round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.io import load_checkpoint, save_checkpoint
from learnopt.meta.learner import Learner, LearnerConfig, lr_multiplier

# Rank 0, 1, 2 and 4 leaves: the learner is elementwise and must be on every shape.
SHAPES = {"a": (), "b": (3,), "c": (2, 3), "d": (2, 1, 2, 3)}


def tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def hand_adam(theta, grads, lrs, clip=None, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written out (Kingma & Ba 2015, Alg. 1) in float64, one learning rate per step."""
    theta = {k: np.asarray(v, np.float64) for k, v in theta.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for k in theta:
            gk = np.asarray(g[k], np.float64)
            if clip:
                gk = np.clip(gk, -clip, clip)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            theta[k] = theta[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return theta


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(a[k]), b[k], rtol=rtol, atol=atol, err_msg=k)


def test_warmup_and_schedule_values_at_chosen_steps():
    cos = lr_multiplier(LearnerConfig(warmup_steps=4, schedule="cosine", total_steps=8))
    got = [float(cos(t)) for t in (0, 1, 2, 3, 4, 5, 6, 7, 8, 100)]
    # t / 4 during warm-up, then (1 + cos(pi s / 4)) / 2 for s = t - 4, then 0.
    want = [0, 0.25, 0.5, 0.75, 1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    lin = lr_multiplier(LearnerConfig(schedule="linear", total_steps=10, final_fraction=0.1))
    np.testing.assert_allclose([float(lin(t)) for t in (0, 5, 10, 50)], [1, 0.55, 0.1, 0.1],
                               atol=1e-6)
    zero = lr_multiplier(LearnerConfig(warmup_steps=3, warmup="zero"))
    assert [float(zero(t)) for t in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]
    # learning_rate_at: base rate times multiplier, for the next update by default.
    learner = Learner(0.2, warmup_steps=4, schedule="cosine", total_steps=8)
    s = learner.init(tree(0))
    assert learner.learning_rate_at(s) == 0.0
    assert learner.learning_rate_at(s, 6) == pytest.approx(0.1)


def test_linear_warmup_scales_adam_steps_through_apply():
    # A constant gradient makes each Adam step lr * sign(g) (up to eps), so after six
    # updates with a 4-step warm-up theta moved by lr * (0 + .25 + .5 + .75 + 1 + 1).
    learner = Learner(0.1, clip=None, warmup_steps=4)
    theta = {"w": jnp.zeros(3)}
    s = learner.init(theta)
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    for _ in range(6):
        s, ok = learner.apply(s, g)
        assert ok
    np.testing.assert_allclose(s.theta["w"], [-0.35, 0.35, -0.35], rtol=1e-5)
    assert int(s.step) == 6


def test_zero_warmup_fills_adam_moments_but_leaves_theta():
    learner = Learner(0.05, clip=None, warmup_steps=2, warmup="zero")
    theta = tree(1)
    grads = [tree(10 + i) for i in range(4)]
    s = learner.init(theta)
    for i, g in enumerate(grads):
        s, _ = learner.apply(s, g)
        if i == 1:
            assert_tree_close(s.theta, {k: np.asarray(v) for k, v in theta.items()}, rtol=0,
                              atol=0)
    assert_tree_close(s.theta, hand_adam(theta, grads, [0.0, 0.0, 0.05, 0.05]))


def test_an_injected_learning_rate_takes_effect_on_the_next_apply():
    learner = Learner(0.1, clip=None)
    theta = tree(2)
    g1, g2, g3 = tree(20), tree(21), tree(22)
    s = learner.init(theta)
    s, _ = learner.apply(s, g1)
    compiles = learner._apply._cache_size()
    s = learner.set_learning_rate(s, 0.01)
    assert learner.learning_rate(s) == pytest.approx(0.01)
    s, _ = learner.apply(s, g2)
    s, _ = learner.apply(s, g3)
    assert_tree_close(s.theta, hand_adam(theta, [g1, g2, g3], [0.1, 0.01, 0.01]))
    # The unchanged rate gives a different theta: the change did something.
    unchanged = hand_adam(theta, [g1, g2, g3], [0.1, 0.1, 0.1])
    assert np.abs(np.asarray(s.theta["c"]) - unchanged["c"]).max() > 1e-2
    assert learner._apply._cache_size() == compiles  # the rate is data: no recompile
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        learner.set_learning_rate(s, -1.0)


def test_elementwise_clip_at_metz_2020_value():
    # Metz et al. 2020 (arXiv:2009.11243, App. B) clip each value at 0.1.
    learner = Learner(0.1, clip=0.1)
    theta = tree(3)
    grads = [tree(30, scale=0.3), tree(31, scale=0.3)]
    s = learner.init(theta)
    for g in grads:
        s, _ = learner.apply(s, g)
    assert_tree_close(s.theta, hand_adam(theta, grads, [0.1, 0.1], clip=0.1))
    off = hand_adam(theta, grads, [0.1, 0.1])
    assert np.abs(np.asarray(s.theta["d"]) - off["d"]).max() > 1e-3


def test_stale_and_non_finite_gradients_are_dropped_and_counted_apart():
    learner = Learner(0.1, clip=None, max_staleness=2)
    s = learner.init({"w": jnp.zeros(2)})
    one = {"w": jnp.ones(2)}
    for _ in range(3):
        s, _ = learner.apply(s, one)
    before = np.asarray(s.theta["w"])
    s, ok = learner.apply(s, one, version=0)  # 3 steps old > 2
    assert not ok and int(s.num_stale) == 1 and int(s.num_dropped) == 0 and int(s.step) == 3
    np.testing.assert_array_equal(s.theta["w"], before)
    s, ok = learner.apply(s, {"w": jnp.asarray([jnp.nan, 1.0])}, version=3)
    assert not ok and int(s.num_stale) == 1 and int(s.num_dropped) == 1
    s, ok = learner.apply(s, {"w": jnp.asarray([jnp.nan, 1.0])}, version=0)  # stale first
    assert not ok and int(s.num_stale) == 2 and int(s.num_dropped) == 1
    s, ok = learner.apply(s, one, version=1)  # exactly 2 old: used
    assert ok and int(s.step) == 4
    np.testing.assert_allclose(s.theta["w"], [-0.4, -0.4], rtol=1e-5)
    s, ok = learner.apply(s, one)  # no version: the current theta
    assert ok and int(s.step) == 5
    with pytest.raises(ValueError, match="version 9 is ahead of the learner \\(step 5\\)"):
        learner.apply(s, one, version=9)
    anyage = Learner(0.1, max_staleness=None)
    t = anyage.init({"w": jnp.zeros(2)})
    for _ in range(7):
        t, _ = anyage.apply(t, one)
    t, ok = anyage.apply(t, one, version=0)
    assert ok and int(t.num_stale) == 0


def test_state_round_trips_through_checkpoints(tmp_path):
    learner = Learner(0.1, clip=0.5, warmup_steps=2, schedule="cosine", total_steps=10,
                      max_staleness=1)
    theta = tree(4)
    s = learner.init(theta)
    for i in range(3):
        s, _ = learner.apply(s, tree(40 + i))
    s, _ = learner.apply(s, tree(43), version=0)  # stale
    s = learner.set_learning_rate(s, 0.03)
    save_checkpoint(tmp_path / "learner.msgpack", s, learner.config.to_dict())
    ckpt = load_checkpoint(tmp_path / "learner.msgpack", learner.init(theta))
    back = Learner.from_config(ckpt.config)
    assert back.config == learner.config
    r = ckpt.state
    assert type(r) is type(s) and int(r.step) == 3 and int(r.num_stale) == 1
    assert back.learning_rate(r) == pytest.approx(0.03)
    for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(r), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s, _ = learner.apply(s, tree(44))
    r, _ = back.apply(r, tree(44))
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(s.theta[k]), np.asarray(r.theta[k]))


def test_config_round_trip_and_clear_errors():
    cfg = LearnerConfig(learning_rate=1e-3, clip=0.1, warmup_steps=300, warmup="zero",
                        schedule="linear", total_steps=1000, max_staleness=5)
    assert LearnerConfig.from_dict(cfg.to_dict()) == cfg
    assert Learner.from_config(cfg.to_dict()).config == cfg
    bad = [
        (dict(schedule="step"), "unknown schedule 'step'; valid: constant, cosine, linear"),
        (dict(warmup="exp"), "unknown warmup 'exp'; valid: linear, zero"),
        (dict(schedule="cosine"), "needs total_steps > warmup_steps \\(0\\)"),
        (dict(schedule="cosine", warmup_steps=5, total_steps=5), "total_steps=5"),
        (dict(clip=-1.0), "clip must be >= 0 \\(0 or None: no clip\\)"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(learning_rate=float("nan")), "learning_rate must be finite"),
        (dict(max_staleness=-1), "max_staleness must be an integer >= 0 or None"),
        (dict(warmup_steps=True), "warmup_steps must be an integer >= 0, got True"),
        (dict(final_fraction=2.0), "final_fraction must be in \\[0, 1\\]"),
        (dict(b2=1.0), "b2 must be in \\[0, 1\\)"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            LearnerConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown learner config fields \\['lr'\\]"):
        LearnerConfig.from_dict({"lr": 0.1})
