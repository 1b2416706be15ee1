"""nn_adam (arXiv:2203.11860, §2.2, App. C): meta-parameter count, hyperparameter decoding,
features by hand, equality with optax.adam when the output layer is zero, a float64 reference
of whole steps, rank 0/1/2/4 tensors, jit / vmap, optax usage and meta-gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import QPARAMS, quadratic_loss, scan_losses, train_like_optax

from learnopt.learned import nn_adam
from learnopt.learned.nn_adam import NNAdam, NNAdamState, encode_hparams, tensor_features

SHAPES = {"s": (), "b": (3,), "w": (2, 3), "k": (3, 2, 2, 4)}
STEPS = 4
LR = 1e-2
ADAM_X = (0.1 * math.log(LR), 0.1 * math.log(0.1), 0.1 * math.log(1e-3), 0.1 * math.log(1e-8))

LOPTS = {
    "absolute/adam": NNAdam(),
    "increment/adam": NNAdam(output_mode="increment"),
    "increment/released": NNAdam(output_mode="increment", step_rule="released"),
}


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS = _tree(0)
# gradient sequences [STEPS, ...] with different scales per step
GRADS = jax.tree.map(lambda *xs: jnp.stack(xs), *[_tree(10 + t, 10.0 ** (t - 2))
                                                 for t in range(STEPS)])


def _make_run(lopt: NNAdam):
    def run(theta, params, grads):
        opt = lopt.optimizer(theta, num_steps=100)

        def body(carry, g):
            params, state = carry
            u, state = opt.update(g, state, params, loss=jnp.asarray(1.0))
            return (optax.apply_updates(params, u), state), u

        (_, state), us = jax.lax.scan(body, (params, opt.init(params)), grads)
        return us, state

    return jax.jit(run)


RUN = {k: _make_run(v) for k, v in LOPTS.items()}


def _random_theta(lopt: NNAdam, seed: int, out_scale: float = 0.0):
    """A generic theta: perturbed LSTM and initial state; output layer scaled by out_scale."""
    theta = lopt.init(jax.random.PRNGKey(seed))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
    theta["lstm"] = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(keys[0], x.shape),
                                 theta["lstm"])
    theta["initial_state"] = {k: 0.5 * jax.random.normal(kk, v.shape) for (k, v), kk in
                              zip(theta["initial_state"].items(), keys[1:3], strict=True)}
    theta["out"] = {"w": out_scale * jax.random.normal(keys[3], (lopt.lstm_size, 4)),
                    "b": out_scale * jnp.asarray([1.0, -2.0, 3.0, 4.0])}
    return theta


# ---------------------------------------------------------------------------------------------


def test_meta_parameter_count_is_6856():
    lopt = NNAdam()
    lstm = (19 + 32) * 4 * 32 + 4 * 32  # 6,656: [x, h] -> 4 gates, plus biases
    out = 32 * 4 + 4  # 132
    assert lstm == 6656 and nn_adam.lstm_num_params(19, 32) == lstm
    assert lopt.num_meta_params() == lstm + out + 4 + 2 * 32 == 6856  # the released code's count
    shapes = jax.eval_shape(lopt.init, jax.random.PRNGKey(0))
    assert shapes["lstm"]["w"].shape == (51, 128) and shapes["out"]["w"].shape == (32, 4)
    assert NNAdam(lstm_size=8).num_meta_params() == (19 + 8) * 32 + 32 + 8 * 4 + 4 + 4 + 16
    assert NNAdam.name == "nn_adam"


def test_initial_theta_is_adam_and_decoding():
    theta = NNAdam().init(jax.random.PRNGKey(0))
    assert not np.any(np.asarray(theta["out"]["w"])) and not np.any(np.asarray(theta["out"]["b"]))
    hp = nn_adam.decode_hparams(theta["initial_hparams"])
    np.testing.assert_allclose([hp["learning_rate"], hp["beta1"], hp["beta2"], hp["epsilon"]],
                               [1e-4, 0.9, 0.999, 1e-8], rtol=1e-6)
    np.testing.assert_allclose(encode_hparams(LR, 0.9, 0.999, 1e-8), ADAM_X, rtol=1e-6)
    # clipping ranges: lr in [1e-8, 1e3], 1 - beta in [e^-10, 1], eps in [1e-11, 1e4]
    hp = nn_adam.decode_hparams(jnp.asarray([[-100.0, -100.0, 5.0, -100.0],
                                             [100.0, 100.0, -5.0, 100.0]]))
    np.testing.assert_allclose(hp["learning_rate"], [1e-8, 1e3], rtol=1e-5)
    np.testing.assert_allclose(hp["one_minus_beta1"], [math.exp(-10), 1.0], rtol=1e-5)
    np.testing.assert_allclose(hp["beta2"], [0.0, 1 - math.exp(-10)], rtol=1e-6)
    np.testing.assert_allclose(hp["epsilon"], [1e-11, 1e4], rtol=1e-5)
    with pytest.raises(ValueError, match="beta1 must lie"):
        encode_hparams(1e-3, 1.0, 0.999, 1e-8)


def _np_features(p, g, m, v, x):
    """The 19 features of the module docstring, by hand in float64."""
    p, g, m, v = (np.asarray(a, np.float64) for a in (p, g, m, v))

    def t(a):
        return 0.5 * np.clip(np.log(1e-8 + abs(a)), -5, 5)

    out = []
    for a in (m, v, p, g):
        out += [t(a.mean()), np.sign(a.mean()), t(((a - a.mean()) ** 2).mean())]
    out += [t(np.abs(g).mean()), 1.0 if p.ndim == 0 else -1.0, 1.0 if p.ndim == 1 else -1.0]
    return np.concatenate([out, 0.2 * np.clip(np.asarray(x, np.float64), -5, 5)])


def test_features_by_hand_vector_and_2x3():
    p = jnp.asarray([0.5, -1.0, 2.0])
    g = jnp.asarray([0.1, -0.2, 0.4])
    m = jnp.asarray([0.0, 0.0, 0.0])
    v = jnp.asarray([1e-6, 4e-6, 1.6e-5])
    x = jnp.asarray([-0.9, -0.23, -0.69, 30.0])
    got = np.asarray(tensor_features(p, g, m, v, x))
    # written out: mean p = 0.5 -> 0.5 * log(0.5 + 1e-8); var p = mean((0, -1.5, 1.5)^2) = 1.5
    # mean g = 0.1; var g = mean((0, -0.3, 0.3)^2) = 0.06; mean |g| = 0.7 / 3;
    # m = 0 -> 0.5 * clip(log(1e-8), -5, 5) = -2.5; mean v = 7e-6 -> 0.5 * log(7e-6) < -2.5
    np.testing.assert_allclose(got[[0, 1, 2]], [-2.5, 0.0, -2.5], atol=1e-6)
    np.testing.assert_allclose(got[[6, 7, 8]], [0.5 * math.log(0.5), 1.0, 0.5 * math.log(1.5)],
                               rtol=1e-5)
    np.testing.assert_allclose(got[[9, 10, 11, 12]], [0.5 * math.log(0.1), 1.0,
                                                      0.5 * math.log(0.06),
                                                      0.5 * math.log(0.7 / 3)], rtol=1e-5)
    np.testing.assert_allclose(got[[3, 4]], [-2.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(got[13:], [-1, 1, -0.18, -0.046, -0.138, 1.0], rtol=1e-6)
    np.testing.assert_allclose(got, _np_features(p, g, m, v, x), rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(3)
    p, g, m, v = (jnp.asarray(rng.normal(size=(2, 3)) * s, jnp.float32)
                  for s in (1.0, 0.1, 0.01, 0.001))
    v = jnp.abs(v)
    x = jnp.asarray([-0.5, -0.2, -0.7, -1.8])
    got = np.asarray(tensor_features(p, g, m, v, x))
    np.testing.assert_allclose(got, _np_features(p, g, m, v, x), rtol=1e-5, atol=1e-6)
    assert got[13] == -1.0 and got[14] == -1.0  # rank 2: neither scalar nor bias


def test_rank_features_and_state_shapes():
    z4 = jnp.zeros((3, 2, 2, 4))
    f4 = np.asarray(tensor_features(z4 + 1, z4, z4, z4, jnp.zeros(4)))
    f0 = np.asarray(tensor_features(jnp.asarray(2.0), jnp.asarray(-3.0), jnp.asarray(0.0),
                                    jnp.asarray(9.0), jnp.zeros(4)))
    assert (f4[13], f4[14], f0[13], f0[14]) == (-1.0, -1.0, 1.0, -1.0)
    np.testing.assert_allclose(f0[[6, 9, 10, 12, 3, 5]],
                               [0.5 * math.log(2), 0.5 * math.log(3), -1, 0.5 * math.log(3),
                                0.5 * math.log(9), -2.5], rtol=1e-5)
    lopt = NNAdam()
    state = jax.jit(lopt.optimizer(lopt.init(jax.random.PRNGKey(0)), 10).init)(PARAMS)
    assert isinstance(state, NNAdamState)
    assert state.mu["k"].shape == (3, 2, 2, 4) and state.nu["s"].shape == ()
    assert state.hparams.shape == (4, 4) and state.debias.shape == (4, 2)
    assert state.lstm.h.shape == (4, 32) and int(state.num_steps) == 10


def _np_adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with bias correction in float64; grads: list of arrays over steps."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        g = np.asarray(g, np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("case", ["initial_hparams", "output_bias", "increment"])
def test_zero_output_layer_is_optax_adam(case):
    """LSTM output layer zeroed, hyperparameters decoding to (1e-2, 0.9, 0.999, 1e-8): each
    update is optax.adam(1e-2)'s, on rank 0/1/2/4 tensors over gradients spanning 1e-2..10."""
    key = "increment/adam" if case == "increment" else "absolute/adam"
    theta = _random_theta(LOPTS[key], 0)
    x = jnp.asarray(ADAM_X, jnp.float32)
    if case == "output_bias":  # x = initial + 0.01 * (W h + b) with initial = 0, W = 0
        theta["initial_hparams"] = jnp.zeros(4)
        theta["out"]["b"] = x / 0.01
    else:
        theta["initial_hparams"] = x
    us, state = RUN[key](theta, PARAMS, GRADS)
    assert int(state.iteration) == STEPS

    adam = optax.adam(LR)
    params, astate = PARAMS, adam.init(PARAMS)
    for t in range(STEPS):
        g = jax.tree.map(lambda a, t=t: a[t], GRADS)
        ua, astate = adam.update(g, astate, params)
        params = optax.apply_updates(params, ua)
        for name in SHAPES:
            got, want = np.asarray(us[name][t]), np.asarray(ua[name])
            np.testing.assert_allclose(got, want, atol=1e-6)  # the brief's bound, absolute
            # float32: optax's own 1 - 0.999^t loses ~3e-5 relative to cancellation
            np.testing.assert_allclose(got, want, rtol=5e-5, err_msg=f"{name} step {t}")
    for name in SHAPES:  # against exact (float64) Adam we are within 1e-5 relative
        ref = _np_adam([GRADS[name][t] for t in range(STEPS)], LR)
        np.testing.assert_allclose(np.asarray(us[name]), np.stack(ref), rtol=1e-5)
    hp = NNAdam.hyperparameters(state)
    np.testing.assert_allclose(hp["learning_rate"], [LR] * 4, rtol=1e-5)
    np.testing.assert_allclose(state.debias[:, 1], 1 - 0.999**STEPS, rtol=1e-5)


# --- float64 reference of whole steps (features, LSTM, decoding, both update rules) -------


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_run(lopt: NNAdam, theta, params, grads):
    th = jax.tree.map(lambda a: np.asarray(a, np.float64), theta)
    names = sorted(SHAPES)  # jax.tree.leaves order of a dict
    p = {k: np.asarray(params[k], np.float64) for k in names}
    m = {k: np.zeros(SHAPES[k]) for k in names}
    v = {k: np.zeros(SHAPES[k]) for k in names}
    n = len(names)
    x_prev = np.tile(th["initial_hparams"], (n, 1))
    c = np.zeros((n, 2))
    h = np.tile(th["initial_state"]["h"], (n, 1))
    cell = np.tile(th["initial_state"]["c"], (n, 1))
    lo, hi = np.asarray(nn_adam.X_LOW), np.asarray(nn_adam.X_HIGH)
    all_updates = []
    for t in range(STEPS):
        g = {k: np.clip(np.asarray(grads[k][t], np.float64), -1000, 1000) for k in names}
        feats = np.stack([_np_features(p[k], g[k], m[k], v[k], x_prev[i])
                          for i, k in enumerate(names)])
        z = np.concatenate([feats, h], 1) @ th["lstm"]["w"] + th["lstm"]["b"]
        zi, zg, zf, zo = np.split(z, 4, axis=1)
        cell = _sigmoid(zf + 1) * cell + _sigmoid(zi) * np.tanh(zg)
        h = _sigmoid(zo) * np.tanh(cell)
        delta = 0.01 * (h @ th["out"]["w"] + th["out"]["b"])
        base = x_prev if lopt.output_mode == "increment" else th["initial_hparams"]
        x = np.clip(base + delta, lo, hi)
        lr, e1, e2, eps = np.exp(10 * x).T
        c = np.stack([(1 - e1) * c[:, 0] + e1, (1 - e2) * c[:, 1] + e2], 1)
        ups = {}
        for i, k in enumerate(names):
            m[k] = (1 - e1[i]) * m[k] + e1[i] * g[k]
            v[k] = (1 - e2[i]) * v[k] + e2[i] * g[k] ** 2
            if lopt.step_rule == "adam":
                ups[k] = -lr[i] * (m[k] / c[i, 0]) / (np.sqrt(v[k] / c[i, 1]) + eps[i])
            else:
                ups[k] = -lr[i] * (1 + eps[i]) * m[k] / (eps[i] + np.sqrt(v[k] + 1e-10))
            p[k] = p[k] + ups[k]
        all_updates.append(ups)
        x_prev = x
    return all_updates, x_prev, h


@pytest.mark.parametrize("key", list(LOPTS))
def test_whole_steps_against_float64_reference(key):
    """A generic theta (nonzero output layer, so every tensor gets its own, changing
    hyperparameters): updates, hyperparameters and LSTM state match a NumPy reference."""
    lopt = LOPTS[key]
    theta = _random_theta(lopt, 5, out_scale=3.0)
    theta["initial_hparams"] = jnp.asarray([-0.5, -0.2, -0.6, -1.6])
    us, state = RUN[key](theta, PARAMS, GRADS)
    ref, x, h = _np_run(lopt, theta, PARAMS, GRADS)
    np.testing.assert_allclose(np.asarray(state.hparams), x, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.lstm.h), h, rtol=2e-4, atol=2e-6)
    assert np.ptp(x[:, 0]) > 0.01  # the learning rates really differ between tensors
    for t in range(STEPS):
        for name in SHAPES:
            np.testing.assert_allclose(np.asarray(us[name][t]), ref[t][name], rtol=2e-4,
                                       atol=1e-9, err_msg=f"{key} {name} step {t}")


def test_vmap_over_thetas_and_params():
    lopt, run = LOPTS["absolute/adam"], RUN["absolute/adam"]
    thetas = [_random_theta(lopt, 20 + i, out_scale=10.0) for i in range(3)]
    params = [_tree(30 + i) for i in range(3)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    ub, sb = jax.vmap(run, in_axes=(0, 0, None))(stack(thetas), stack(params), GRADS)
    for i in range(3):
        ui, si = run(thetas[i], params[i], GRADS)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5,
                                                                  atol=1e-9), (ub, sb), (ui, si))


def _train(opt: optax.GradientTransformationExtraArgs, steps: int):
    """The user's loop, written once for optax.adam and the learned optimizer alike."""
    return train_like_optax(opt, quadratic_loss, QPARAMS, steps)


def test_user_trains_like_with_adam():
    lopt = NNAdam(initial_learning_rate=3e-2)
    theta = lopt.init(jax.random.PRNGKey(0))  # the initial theta: Adam(3e-2)
    ours = _train(lopt.optimizer(theta, 40), 40)
    adam = _train(optax.adam(3e-2), 40)
    assert np.all(np.isfinite(ours))
    assert ours[-1] < 0.2 * ours[0]
    np.testing.assert_allclose(ours, adam, rtol=1e-4)


def _unroll_loss(theta):
    opt = LOPTS["absolute/adam"].optimizer(theta, num_steps=3)
    return scan_losses(opt, quadratic_loss, QPARAMS, 3)[0]


def test_meta_gradient_of_3_step_unroll_is_finite():
    theta = NNAdam().init(jax.random.PRNGKey(0))
    theta["out"]["w"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    loss, grad = jax.jit(jax.value_and_grad(_unroll_loss))(theta)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grad))
    assert float(grad["initial_hparams"][0]) < 0  # a larger lr lowers this loss
    assert np.abs(np.asarray(grad["lstm"]["w"])).max() > 0
    assert np.abs(np.asarray(grad["initial_state"]["h"])).max() > 0


def test_bad_input_errors():
    with pytest.raises(ValueError, match="output_mode must be one of"):
        NNAdam(output_mode="delta")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_rule must be one of"):
        NNAdam(step_rule="adamw")  # type: ignore[arg-type]
    opt = NNAdam().optimizer(NNAdam().init(jax.random.PRNGKey(0)), 10)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(QPARAMS, opt.init(QPARAMS))
    with pytest.raises(ValueError, match="no array leaves"):
        opt.init({})


def test_progress_features_by_hand():
    """``progress_features=True``: the LSTM also reads tanh(10 (t / num_steps - s)) at the
    step count t before each update (VeLO's offsets s). Three steps of the optimizer against
    the same loop written out with the feature, LSTM and decoding functions; with the 9 new
    input rows zeroed it is the paper's nn_adam with the same other weights."""
    from learnopt.learned.velo import FRACTION_OFFSETS

    lopt = NNAdam(progress_features=True, initial_learning_rate=1e-3)
    assert lopt.num_features == 28 and lopt.num_meta_params() == 6856 + 9 * 128
    theta = lopt.init(jax.random.PRNGKey(3))
    theta["out"] = {"w": 0.5 * jax.random.normal(jax.random.PRNGKey(4), (32, 4)),
                    "b": jnp.zeros(4)}
    num_steps = 5
    opt = lopt.optimizer(theta, num_steps)
    state, params = opt.init(PARAMS), PARAMS
    names = sorted(PARAMS)  # the leaf order of a dict
    h = jnp.broadcast_to(theta["initial_state"]["h"], (len(names), 32))
    c = jnp.broadcast_to(theta["initial_state"]["c"], (len(names), 32))
    hp = jnp.broadcast_to(theta["initial_hparams"], (len(names), 4))
    mus = {n: jnp.zeros_like(PARAMS[n]) for n in names}
    nus = dict(mus)
    for t in range(3):
        g = jax.tree.map(lambda a, t=t: a[t], GRADS)
        updates, state = opt.update(g, state, params)
        frac = np.tanh(10.0 * (t / num_steps - np.asarray(FRACTION_OFFSETS)))
        feats = jnp.stack([jnp.concatenate([
            tensor_features(params[n], g[n], mus[n], nus[n], hp[i]), frac])
            for i, n in enumerate(names)])
        out, lstm = nn_adam.lstm_step(theta["lstm"], feats, nn_adam.LSTMState(h, c))
        h, c = lstm.h, lstm.c
        hp = nn_adam.clip_hparams(theta["initial_hparams"] + 0.01 * (out @ theta["out"]["w"]))
        np.testing.assert_allclose(np.asarray(state.hparams), np.asarray(hp), rtol=1e-5,
                                   atol=1e-6)
        mus, nus = state.mu, state.nu  # Adam's accumulators: tested above
        params = optax.apply_updates(params, updates)

    # progress rows zeroed: the paper's nn_adam with the remaining weights
    w = theta["lstm"]["w"]
    zeroed = dict(theta, lstm={"w": w.at[19:28].set(0.0), "b": theta["lstm"]["b"]})
    plain = NNAdam(initial_learning_rate=1e-3)
    plain_theta = dict(zeroed, lstm={"w": jnp.concatenate([w[:19], w[28:]]),
                                     "b": theta["lstm"]["b"]})
    g = jax.tree.map(lambda a: a[0], GRADS)
    a = lopt.optimizer(zeroed, num_steps)
    b = plain.optimizer(plain_theta, num_steps)
    ua, _ = a.update(g, a.init(PARAMS), PARAMS)
    ub, _ = b.update(g, b.init(PARAMS), PARAMS)
    for n in names:
        np.testing.assert_allclose(np.asarray(ua[n]), np.asarray(ub[n]), rtol=1e-6)
