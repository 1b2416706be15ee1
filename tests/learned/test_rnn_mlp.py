"""rnn_fc_lopt / LSTM_FF (arXiv:2009.11243, §3.3, App. C): meta-parameter count, LossAccum and the
dynamic gradient clip by hand, features by hand, a float64 reference of whole steps (message
passing included), rank 0/1/2/4 tensors, jit / vmap, optax usage and meta-gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import QPARAMS, quadratic_loss, scan_losses, train_run

from learnopt.learned import rnn_mlp
from learnopt.learned.rnn_mlp import (
    RnnFcLOpt,
    RnnFcLOptState,
    loss_accum_corrected_mean,
    loss_accum_init,
    loss_accum_update,
    loss_accum_weight,
    parameter_features,
    rolling_clip_init,
    rolling_clip_update,
    tensor_features,
)

LOPT = RnnFcLOpt()
INIT = jax.jit(LOPT.init)
DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9999)
SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)
SHAPES = {"s": (), "b": (3,), "w": (2, 3), "k": (3, 2, 2, 4)}
STEPS = 3
LOSSES = np.array([2.0, 1.5, 1.2], np.float32)
VALID = np.array([2.5, np.nan, 1.9], np.float32)  # no validation loss on the 2nd step


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS = _tree(0)
# step 0 has gradients of ~40 so the first clip (at clip_mult) bites
GRADS = jax.tree.map(lambda *xs: jnp.stack(xs), *[_tree(10 + t, (40.0, 0.3, 0.05)[t])
                                                 for t in range(STEPS)])


def _run(lopt: RnnFcLOpt):
    def run(theta, params, grads, losses, valid):
        opt = lopt.optimizer(theta, num_steps=100)

        def body(carry, xs):
            params, state = carry
            g, loss, vloss = xs
            u, state = opt.update(g, state, params, loss=loss, valid_loss=vloss)
            return (optax.apply_updates(params, u), state), (u, state)

        _, (us, states) = jax.lax.scan(body, (params, opt.init(params)), (grads, losses, valid))
        return us, states

    return jax.jit(run)


RUN = _run(LOPT)


def _generic_theta(seed: int):
    """Initial theta with the zero-initialised parts (LSTM state, clip offsets) perturbed."""
    theta = INIT(jax.random.PRNGKey(seed))
    k = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
    theta["initial_state"] = {"h": 0.3 * jax.random.normal(k[0], (64,)),
                              "c": 0.3 * jax.random.normal(k[1], (64,))}
    theta["lstm"]["b"] = 0.1 * jax.random.normal(k[2], (256,))
    theta["clip"] = {"log_one_minus_alpha": jnp.asarray(0.7), "log_mult": jnp.asarray(0.3)}
    return theta


# ---------------------------------------------------------------------------------------------


def test_meta_parameter_count():
    mlp = (54 * 32 + 32) + (32 * 32 + 32) + (32 * 18 + 18)  # 3,410
    lstm = (52 + 64) * 4 * 64 + 4 * 64  # 29,952
    proj = (64 * 17 + 17) + (64 * 18 + 18)  # 2,275: rnn_to_ff, rnn_to_in
    init = 2 * 64 + 18 + 16  # 162: LSTM (h, c), from_lstm, from_mlp
    assert (mlp, lstm, proj, init) == (3410, 29952, 2275, 162)  # the released code's count
    assert RnnFcLOpt(learn_clip=False).num_meta_params() == mlp + lstm + proj + init == 35799
    assert LOPT.num_meta_params() == 35799 + 2  # + learned clip alpha and multiplier
    assert (LOPT.num_lstm_inputs, LOPT.num_mlp_inputs, LOPT.num_normalized_features) == (52, 54,
                                                                                          23)
    assert LOPT.mlp_sizes == (54, 32, 32, 18) and RnnFcLOpt.name == "rnn_fc_lopt"
    small = RnnFcLOpt(lstm_hidden_size=8, from_mlp_size=2, from_lstm_size=3, lstm_to_ff=4,
                      mlp_hidden=(5,), decays=(0.9, 0.99), learn_clip=False)
    n_in = 3 + 4 * 2 + 11 + 3 + 4  # 29 MLP inputs
    assert small.num_meta_params() == ((n_in * 5 + 5) + (5 * 4 + 4) + (16 + 2 + 3 + 2 + 8) * 32
                                       + 32 + (8 * 4 + 4) + (8 * 3 + 3) + 16 + 3 + 2)


def test_loss_accum_by_hand():
    d = 0.9
    s = loss_accum_update(loss_accum_init(), 2.0, d)
    # mean = 0.1 * 2 = 0.2; var = 0.1 * (0.2 - 2)^2 = 0.324; corrected by 1 / (1 - 0.9)
    np.testing.assert_allclose([s.mean, s.var], [0.2, 0.324], rtol=1e-6)
    np.testing.assert_allclose(loss_accum_corrected_mean(s, d), 2.0, rtol=1e-6)
    np.testing.assert_allclose(loss_accum_weight(s, 2.0, d), 0.0, atol=1e-6)
    s = loss_accum_update(s, 1.0, d)
    # mean = 0.18 + 0.1 = 0.28; var = 0.9 * 0.324 + 0.1 * 0.72^2 = 0.34344; c = 1 / 0.19
    np.testing.assert_allclose([s.mean, s.var, s.updates], [0.28, 0.34344, 2], rtol=1e-6)
    np.testing.assert_allclose(loss_accum_corrected_mean(s, d), 0.28 / 0.19, rtol=1e-6)
    want = (1.0 - 0.28 / 0.19) / math.sqrt(0.34344 / 0.19 + 1e-8)  # -0.35232
    np.testing.assert_allclose(loss_accum_weight(s, 1.0, d), want, rtol=1e-5)
    np.testing.assert_allclose(loss_accum_weight(s, 100.0, d), 5.0)  # clipped to +-5
    # non-finite losses leave the state alone
    for bad in (np.nan, np.inf):
        jax.tree.map(np.testing.assert_array_equal, loss_accum_update(s, bad, d), s)
    # before any update: corrected mean 0 (mean 0 * 1e8), and the same under jit (XLA used to
    # fold 1 - d^0 + 1e-8 into 0 there, giving NaN)
    s0 = loss_accum_init()
    for f in (loss_accum_corrected_mean, jax.jit(loss_accum_corrected_mean, static_argnums=1)):
        assert float(f(s0, d)) == 0.0
    assert float(jax.jit(loss_accum_weight, static_argnums=2)(s0, 0.5, 0.95)) == 5.0


def test_dynamic_clip_by_hand():
    alpha, mult = jnp.float32(0.99), jnp.float32(10.0)
    s = rolling_clip_init(alpha)
    assert int(s.t) == 1 and np.isclose(float(s.snd), 0.01)
    g = [jnp.asarray([20.0, -3.0]), jnp.asarray([[1.0, 2.0, 3.0], [-30.0, 0.0, 4.0]])]
    s, c = rolling_clip_update(s, g, alpha, mult)
    # first clip: 10 * 0.01 / (1 - 0.99) = 10
    np.testing.assert_allclose(c[0], [10.0, -3.0])
    np.testing.assert_allclose(c[1], [[1, 2, 3], [-10, 0, 4]])
    # mean over tensors of mean(g^2): (109 / 2 + 130 / 6) / 2 = 38.0833...
    new = math.sqrt(1e-8 + (109 / 2 + 130 / 6) / 2)
    snd = 0.99 * 0.01 + 0.01 * new
    np.testing.assert_allclose(float(s.snd), snd, rtol=1e-6)
    assert int(s.t) == 2
    # second clip: 10 * snd / (1 - 0.99^2) = 35.986
    amount = 10 * snd / (1 - 0.99**2)
    np.testing.assert_allclose(float(rnn_mlp.rolling_clip_amount(s, alpha, mult)), amount,
                               rtol=1e-5)
    assert 35.9 < amount < 36.1
    _, c = rolling_clip_update(s, [jnp.asarray([40.0, -3.0])], alpha, mult)
    np.testing.assert_allclose(c[0], [amount, -3.0], rtol=1e-5)
    # the meta-learned offsets: alpha = 1 - 0.01 e^a, clip_mult = 10 e^b
    theta = {"clip": {"log_one_minus_alpha": jnp.asarray(math.log(5.0)),
                      "log_mult": jnp.asarray(math.log(2.0))}}
    a, m = LOPT.clip_params(theta)
    np.testing.assert_allclose([a, m], [0.95, 20.0], rtol=1e-6)


def _np_clip_log_abs(x):
    return np.clip(np.log(1e-8 + np.abs(x)), -5, 5)


def _lead(x):
    """A reference accumulator, written ``shape + (K,)``, in the optimizer's ``(K,) + shape``."""
    return jnp.moveaxis(jnp.asarray(x), -1, 0)


def _np_tensor_features(p, g, m, r):
    p, g, m, r = (np.asarray(a, np.float64) for a in (p, g, m, r))
    out = []
    for a in (m, r, p):
        out += [_np_clip_log_abs(a.mean()), np.sign(a.mean()),
                _np_clip_log_abs(((a - a.mean()) ** 2).mean())]
    shape = list(p.shape) + [1] * (4 - p.ndim)
    out += [_np_clip_log_abs(np.sqrt((p**2).sum())), _np_clip_log_abs(np.sqrt((g**2).sum())),
            1.0 if p.ndim == 0 else -1.0] + [math.log(s) - 1 for s in shape]
    return np.asarray(out)


def _np_parameter_features(p, g, m, r, t, n, ff):
    p, g, m, r = (np.asarray(a, np.float64) for a in (p, g, m, r))
    rs = 1 / np.sqrt(r + 1e-6)
    raw = np.concatenate([g[..., None], p[..., None], np.log(np.abs(p) + 1e-8)[..., None], m, r,
                          rs, m * rs], -1)
    axes = tuple(range(p.ndim))
    x = raw / np.sqrt(1e-5 + np.mean(raw**2, axis=axes, keepdims=True))
    tiled = np.concatenate([[math.sin(t / (s * math.pi)) for s in SCALES],
                            [math.log(n) - 1, math.log(np.sqrt((p**2).sum()) + 1e-8),
                             math.log(max(p.size, 1))], np.asarray(ff, np.float64)])
    return np.concatenate([x, np.broadcast_to(tiled, p.shape + tiled.shape)], -1)


def test_features_by_hand_vector_and_2x3():
    p = jnp.asarray([3.0, -1.0, 1.0])
    g = jnp.asarray([0.0, 3.0, -4.0])
    m = jnp.asarray([[0.1, 0.2, 0.0, 0.0, 0.0]] * 3)
    r = jnp.full((3, 5), 0.04)
    got = np.asarray(tensor_features(p, g, _lead(m), _lead(r)))
    # written out: mean p = 1, var p = (4 + 4 + 0) / 3; ||p|| = sqrt(11); ||g|| = 5;
    # mean m = 0.3 * 3 / 15 = 0.06; rms constant 0.04 -> var 0 -> clip(log(1e-8)) = -5
    np.testing.assert_allclose(got[6:11], [0.0, 1.0, math.log(8 / 3), math.log(math.sqrt(11)),
                                           math.log(5.0)], atol=1e-6)
    np.testing.assert_allclose(got[[0, 1, 3, 4, 5]], [math.log(0.06), 1, math.log(0.04), 1, -5],
                               rtol=1e-5)
    np.testing.assert_allclose(got[11:], [-1.0, math.log(3) - 1, -1, -1, -1], rtol=1e-6)
    np.testing.assert_allclose(got, _np_tensor_features(p, g, m, r), rtol=1e-5, atol=1e-6)

    ff = jnp.arange(17.0) / 17
    feats = np.asarray(parameter_features(p, g, _lead(m), _lead(r), jnp.asarray(7), 4, ff))
    assert feats.shape == (3, 54)
    # the normalised g: (0, 3, -4) / sqrt(1e-5 + 25 / 3)
    np.testing.assert_allclose(feats[:, 0], np.array([0, 3, -4]) / math.sqrt(1e-5 + 25 / 3),
                               rtol=1e-5)
    np.testing.assert_allclose(feats[0, 23:34], [math.sin(7 / (s * math.pi)) for s in SCALES],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(feats[1, 34:37], [math.log(4) - 1, math.log(math.sqrt(11)),
                                                 math.log(3)], rtol=1e-5)
    np.testing.assert_allclose(feats[2, 37:], ff, rtol=1e-6)
    np.testing.assert_allclose(feats, _np_parameter_features(p, g, m, r, 7, 4, ff), rtol=1e-5,
                               atol=1e-6)

    rng = np.random.default_rng(4)
    p, g = (jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) for _ in range(2))
    m = jnp.asarray(rng.normal(size=(2, 3, 5)) * 0.1, jnp.float32)
    r = jnp.asarray(rng.uniform(size=(2, 3, 5)) * 0.01, jnp.float32)
    np.testing.assert_allclose(tensor_features(p, g, _lead(m), _lead(r)),
                               _np_tensor_features(p, g, m, r), rtol=1e-5, atol=1e-6)
    feats = np.asarray(parameter_features(p, g, _lead(m), _lead(r), jnp.asarray(123), 4, ff))
    np.testing.assert_allclose(feats, _np_parameter_features(p, g, m, r, 123, 4, ff), rtol=1e-4,
                               atol=1e-5)
    assert feats.shape == (2, 3, 54)
    feats = np.asarray(parameter_features(p, g, _lead(m), _lead(r), jnp.asarray(0), 4, ff,
                                          feature_clip=0.5))
    assert np.abs(feats[..., :23]).max() == 0.5


def test_rank_0_and_4_features_and_shapes():
    f0 = np.asarray(tensor_features(jnp.asarray(-2.0), jnp.asarray(0.5), jnp.full((5,), 0.1),
                                    jnp.full((5,), 0.25)))
    np.testing.assert_allclose(f0, _np_tensor_features(-2.0, 0.5, np.full(5, 0.1),
                                                       np.full(5, 0.25)), rtol=1e-5, atol=1e-6)
    assert f0[11] == 1.0 and np.all(f0[12:] == -1.0)  # scalar; shape (1, 1, 1, 1)
    k = jnp.ones((3, 2, 2, 4))
    f4 = np.asarray(tensor_features(k, k, k[None], k[None]))
    np.testing.assert_allclose(f4[11:], [-1, math.log(3) - 1, math.log(2) - 1, math.log(2) - 1,
                                         math.log(4) - 1], rtol=1e-6)
    np.testing.assert_allclose(rnn_mlp.shape_features((2, 3, 5, 7, 11)),
                               np.log([6, 5, 7, 11]) - 1, rtol=1e-6)
    assert parameter_features(jnp.asarray(1.0), jnp.asarray(1.0), jnp.ones(5), jnp.ones(5),
                              jnp.asarray(0), 4, jnp.zeros(17)).shape == (54,)
    opt = LOPT.optimizer(INIT(jax.random.PRNGKey(0)), 9)
    state = jax.jit(opt.init)(PARAMS)
    assert isinstance(state, RnnFcLOptState)
    assert state.momentum.m["k"].shape == (5, 3, 2, 2, 4) and state.rms.rms["s"].shape == (5,)
    assert state.lstm.h.shape == (4, 64) and state.from_mlp.shape == (4, 16)
    assert state.from_lstm.shape == (18,) and int(state.num_steps) == 9


# --- float64 reference of whole steps ---------------------------------------------------------


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_mlp(params, x):
    n = sum(1 for k in params if k.startswith("w"))
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = np.maximum(x, 0)
    return x


def _np_run(theta, params, grads, losses, valid):
    """The update of arXiv:2009.11243, App. C.3 in float64, for STEPS steps."""
    th = jax.tree.map(lambda a: np.asarray(a, np.float64), theta)
    names = sorted(SHAPES)  # jax.tree.leaves order of a dict
    n = len(names)
    d = np.asarray(DECAYS)
    p = {k: np.asarray(params[k], np.float64) for k in names}
    m = {k: np.zeros(SHAPES[k] + (5,)) for k in names}
    r = {k: np.zeros(SHAPES[k] + (5,)) for k in names}
    h = np.tile(th["initial_state"]["h"], (n, 1))
    c = np.tile(th["initial_state"]["c"], (n, 1))
    from_lstm = th["initial_from_lstm"]
    from_mlp = np.tile(th["initial_from_mlp"], (n, 1))
    alpha = 1 - 0.01 * math.exp(th["clip"]["log_one_minus_alpha"])
    mult = 10 * math.exp(th["clip"]["log_mult"])
    clip_t, snd = 1, 1 - alpha
    tr = [0.0, 0.0, 0]  # mean, var, updates (decay 0.95)
    va = [0.0, 0.0, 0]  # (decay 0.9)
    out = []

    def upd(acc, x, dec):
        mean = dec * acc[0] + (1 - dec) * x
        return [mean, dec * acc[1] + (1 - dec) * (mean - x) ** 2, acc[2] + 1]

    def corr(acc, dec):
        return 1 / (1 - dec ** acc[2] + 1e-8)

    for t in range(STEPS):
        tr = upd(tr, float(losses[t]), 0.95)
        if np.isfinite(valid[t]):
            va = upd(va, float(valid[t]), 0.9)
        ct = corr(tr, 0.95)
        tfeat = np.clip((losses[t] - tr[0] * ct) / np.sqrt(tr[1] * ct + 1e-8), -5, 5)
        vfeat = np.clip((va[0] * corr(va, 0.9) - tr[0] * ct) / np.sqrt(tr[1] * ct + 1e-8), -5, 5)
        amount = mult * snd / (1 - alpha**clip_t)
        g = {k: np.clip(np.asarray(grads[k][t], np.float64), -amount, amount) for k in names}
        snd = alpha * snd + (1 - alpha) * math.sqrt(1e-8 + np.mean([np.mean(g[k] ** 2)
                                                                     for k in names]))
        clip_t += 1
        for k in names:
            m[k] = d * m[k] + (1 - d) * g[k][..., None]
            r[k] = d * r[k] + (1 - d) * g[k][..., None] ** 2
        stats = np.stack([_np_tensor_features(p[k], g[k], m[k], r[k]) for k in names])
        glob = np.concatenate([[tfeat, vfeat], from_lstm])
        x = np.concatenate([stats, np.tile(glob, (n, 1)), from_mlp], 1)
        z = np.concatenate([x, h], 1) @ th["lstm"]["w"] + th["lstm"]["b"]
        zi, zg, zf, zo = np.split(z, 4, axis=1)
        c = _sigmoid(zf + 1) * c + _sigmoid(zi) * np.tanh(zg)
        h = _sigmoid(zo) * np.tanh(c)
        from_lstm = _np_mlp(th["rnn_to_in"], h).mean(0)
        ff = _np_mlp(th["rnn_to_ff"], h)
        ups = {}
        for i, k in enumerate(names):
            o = _np_mlp(th["mlp"], _np_parameter_features(p[k], g[k], m[k], r[k], t, n, ff[i]))
            ups[k] = -0.001 * o[..., 0] * np.exp(0.001 * o[..., 1])
            from_mlp[i] = o[..., 2:].reshape(-1, 16).mean(0)
            p[k] = p[k] + ups[k]
        out.append({"updates": ups, "from_lstm": from_lstm.copy(), "from_mlp": from_mlp.copy(),
                    "h": h.copy(), "tfeat": tfeat, "vfeat": vfeat, "snd": snd,
                    "valid_updates": va[2]})
    return out


def test_whole_steps_against_float64_reference_under_jit_and_vmap():
    """Three steps of two optimizers at once (vmap over theta and params, inside jit), each
    checked against a float64 reference: clipping (step 0 gradients ~40), loss features, the
    LSTM, both messages (from_lstm across tensors, from_mlp back up) and the updates."""
    thetas = [_generic_theta(1), _generic_theta(2)]
    params = [PARAMS, _tree(5)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    us, states = jax.vmap(RUN, in_axes=(0, 0, None, None, None))(
        stack(thetas), stack(params), GRADS, LOSSES, VALID)
    for j in range(2):
        ref = _np_run(thetas[j], params[j], GRADS, LOSSES, VALID)
        for t in range(STEPS):
            np.testing.assert_allclose(states.clip.snd[j, t], ref[t]["snd"], rtol=1e-5)
            np.testing.assert_allclose(states.lstm.h[j, t], ref[t]["h"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(states.from_lstm[j, t], ref[t]["from_lstm"], rtol=1e-4,
                                       atol=1e-5)
            np.testing.assert_allclose(states.from_mlp[j, t], ref[t]["from_mlp"], rtol=1e-4,
                                       atol=1e-5)
            assert int(states.valid_loss.updates[j, t]) == ref[t]["valid_updates"]
            for name in SHAPES:
                np.testing.assert_allclose(us[name][j, t], ref[t]["updates"][name], rtol=2e-4,
                                           atol=1e-8, err_msg=f"{name} step {t} theta {j}")
        assert ref[1]["vfeat"] != ref[0]["vfeat"]  # held valid mean, re-normalised
    # the validation statistics are held on the step without a validation loss
    jax.tree.map(lambda a: np.testing.assert_array_equal(a[:, 1], a[:, 0]), states.valid_loss)
    assert not np.allclose(us["w"][0], us["w"][1])  # the two optimizers really differ
    # the paper's step size: |update| ~ 0.001 |d|
    assert 1e-5 < np.abs(np.asarray(us["w"])).mean() < 1e-2


def _train(opt: optax.GradientTransformationExtraArgs, steps: int):
    """The user's loop, exactly as written for optax.adam: (losses, final state)."""
    losses, _, state = train_run(opt, quadratic_loss, QPARAMS, steps)
    return losses, state


def test_user_trains_like_with_adam():
    ours, state = _train(LOPT.optimizer(INIT(jax.random.PRNGKey(0)), 20), 20)
    assert np.all(np.isfinite(ours))
    assert np.all(np.abs(np.diff(ours)) < 0.1 * ours[0])  # small, finite steps
    assert int(state.iteration) == 20 and int(state.train_loss.updates) == 20
    assert int(state.valid_loss.updates) == 0  # valid_loss=None: never updated


def _unroll_loss(theta):
    opt = LOPT.optimizer(theta, num_steps=3)
    return scan_losses(opt, quadratic_loss, QPARAMS, 3, lambda loss: {"valid_loss": 1.1 * loss})[0]


def test_meta_gradient_of_3_step_unroll_is_finite():
    theta = INIT(jax.random.PRNGKey(0))  # zero-initialised biases b: ||p|| = 0 at start
    loss, grad = jax.jit(jax.value_and_grad(_unroll_loss))(theta)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grad))
    for name in ("mlp", "lstm", "rnn_to_ff", "initial_from_mlp", "initial_state"):
        assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(grad[name])) > 0, name


def test_bad_input_errors():
    opt = LOPT.optimizer(INIT(jax.random.PRNGKey(0)), 10)
    state = opt.init(QPARAMS)
    with pytest.raises(ValueError, match="needs the training loss"):
        opt.update(QPARAMS, state, QPARAMS)
    with pytest.raises(ValueError, match="different tree structures"):
        opt.update({"w": QPARAMS["w"]}, state, QPARAMS, loss=1.0)
    with pytest.raises(ValueError, match="valid_loss_decay must lie"):
        RnnFcLOpt(valid_loss_decay=1.0)
    with pytest.raises(ValueError, match="no array leaves"):
        opt.init({})
