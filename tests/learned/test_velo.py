"""VeLO (arXiv:2211.09760, App. B): parameter counts, the 28 LSTM features and the 30 per-parameter
features by hand (NumPy, float64), the LSTM path by hand, jit / vmap, optax usage and
meta-gradients. Everything but the count test uses ``Velo.small()`` and tiny tensors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import train_run

from learnopt.learned import velo
from learnopt.learned.velo import Velo, VeloState

SMALL = Velo.small()
K = SMALL.param_inits
H = SMALL.lstm_hidden_size

# Tensors of rank 0, 1, 2 and 4 (leaf order b, k, s, w); factored dims (d1, d0) by hand.
SHAPES = {"b": (3,), "k": (5, 2, 3, 4), "s": (), "w": (2, 3)}
FACTORED = {"k": (3, 0), "w": (0, 1)}
RANKS = {"b": 1, "k": 4, "s": 0, "w": 2}
T = 1000
LOSSES = np.array([3.0, 2.0, 10.0])  # the third is clipped to 2 |max corrected EMA|


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale + 0.1, jnp.float32)
            for k, s in SHAPES.items()}


PARAMS = _tree(0)
GRADS = [_tree(1), _tree(2, scale=3.0), _tree(3, scale=0.5)]
GRADS[0]["k"] = GRADS[0]["k"].at[1, 0, 2, 3].set(2500.0)  # clipped to 1000


# The jitted functions below run on tiny arrays: ask XLA for its fastest compile, not the
# fastest code (about a third less compile time on CPU; the numbers are unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _stack(xs):
    return jax.tree.map(lambda *a: jnp.stack(a), *xs)


def _run3(theta, params, grads, losses, num_steps):
    """Three updates at fixed params (num_steps traced): per step the LSTM inputs, the
    update and the state after it."""
    opt = SMALL.optimizer(theta, num_steps)

    def body(state, inp):
        g, loss = inp
        feats, _ = SMALL.lstm_features(state, params, loss)
        updates, state = opt.update(g, state, params, loss=loss)
        return state, (feats, updates, state)

    return jax.lax.scan(body, opt.init(params), (grads, losses))[1]


run3 = jax.jit(_run3, compiler_options=FAST_COMPILE)


def _run(theta, params=PARAMS, grads=GRADS, losses=LOSSES):
    return run3(theta, params, _stack(grads), jnp.asarray(losses, jnp.float32),
                jnp.asarray(T, jnp.int32))


def _controlled_theta(theta, feature: int = 0, c_lr: float | None = 1.0):
    """Heads fixed so that c_hyper = 1 and (unless c_lr is None) c_lr = the given constant;
    the bank mixes to the MLP whose direction is normalised feature ``feature``."""
    sel = velo.feature_selector_mlp(SMALL.mlp_layer_sizes, feature)
    theta = dict(theta, controls={"w": jnp.zeros((H, K)), "b": jnp.ones((K,))},
                 bank={n: jnp.broadcast_to(w / 100.0, (K,) + w.shape) for n, w in sel.items()})
    if c_lr is not None:
        theta["step_size"] = {"w": jnp.zeros((H, 1)), "b": jnp.full((1,), c_lr, jnp.float32)}
    return theta


THETA = SMALL.init(jax.random.PRNGKey(0))

# ---------------------------------------------------------------------------------------------
# NumPy reference (float64; decays as the float32 values the code uses).

f64 = lambda x: np.asarray(np.float32(x), np.float64)  # noqa: E731
MOM, RMS, FAC = f64(velo.MOMENTUM_DECAYS), f64(velo.RMS_DECAYS), f64(velo.ADAFACTOR_DECAYS)


def _clipped(name, step):
    g = np.asarray(GRADS[step][name], np.float64)
    return np.clip(g, -1000, 1000).reshape(np.shape(g) or (1,))


def _ema(xs, decays, shape):
    v = np.zeros(shape + np.shape(decays))
    for x in xs:
        v = decays * v + (1 - decays) * x[..., None]
    return v


def _clip_log_abs(x):
    return 0.5 * np.clip(np.log(1e-8 + np.abs(10 * x)), -5, 5)


def _loss_features(n):
    """The 9 loss features after the first n losses (code's buffer recipe)."""
    hl = 10 ** np.linspace(1, np.log10(T), 10)
    d = np.exp(-1 / hl)
    means, rmin = np.zeros(10), np.full(10, 1e12)
    for i, loss in enumerate(LOSSES[:n]):
        approx_max = loss if i == 0 else np.max(means / (1 - d ** (i + 1)))
        loss = min(2 * abs(approx_max), loss)
        means = means * d + loss * (1 - d)
        rmin = np.minimum(rmin, means / (1 - d ** (i + 1)))
    cor = means / (1 - d**n)
    f = np.clip((cor[:-1] - rmin[:-1]) / np.maximum(1e-8, cor[1:] - rmin[:-1]) - 1, -1, 1)
    return f * 0 if n <= 2 else f


def _lstm_features(step):
    """(4, 28) LSTM inputs of update ``step`` (0-based): accumulators after ``step`` grads."""
    frac = np.tanh(10 * (step / T - np.array(velo.FRACTION_OFFSETS)))
    rows = []
    for name in SHAPES:
        p = np.asarray(PARAMS[name], np.float64).reshape(SHAPES[name] or (1,))
        gs = [_clipped(name, i) for i in range(step)]
        s = 1 / np.sqrt(max(1e-9, np.mean(p**2)))
        m, rms = _ema(gs, MOM, p.shape) * s, _ema([g**2 for g in gs], RMS, p.shape) * s
        axes = tuple(range(p.ndim))
        var_m = np.mean((m - np.mean(m, axis=axes, keepdims=True)) ** 2, axis=axes)
        mean_rms = np.mean(rms, axis=axes).reshape(1)
        var_rms = np.mean((rms - np.mean(rms, axis=axes, keepdims=True)) ** 2,
                          axis=axes).reshape(1)
        rank = np.eye(5)[RANKS[name]]
        rows.append(np.concatenate([frac, _loss_features(step + 1), _clip_log_abs(mean_rms),
                                    rank, _clip_log_abs(var_m), _clip_log_abs(var_rms)]))
    return np.stack(rows)


def _mlp_features(name, step, normalize=True):
    """The 30 per-parameter features of update ``step`` (0-based), shape p.shape + (30,)."""
    p = np.asarray(PARAMS[name], np.float64).reshape(SHAPES[name] or (1,))
    gs = [_clipped(name, i) for i in range(step + 1)]
    g = gs[-1]
    m, rms = _ema(gs, MOM, p.shape), _ema([x**2 for x in gs], RMS, p.shape)
    r = 1 / np.sqrt(rms + 1e-6)
    g2s = [x**2 + 1e-30 for x in gs]
    if name in FACTORED:
        d1, d0 = FACTORED[name]
        vr = _ema([x.mean(axis=d0) for x in g2s], FAC, g2s[0].mean(axis=d0).shape)
        vc = _ema([x.mean(axis=d1) for x in g2s], FAC, g2s[0].mean(axis=d1).shape)
        d1r = d1 - 1 if d1 > d0 else d1
        rowf = 1 / np.sqrt(np.maximum(vr / (vr.mean(axis=d1r, keepdims=True) + 1e-9), 1e-9))
        colf = 1 / np.sqrt(np.maximum(vc, 1e-9))
        pre = np.expand_dims(rowf, d0) * np.expand_dims(colf, d1)
        full = p.shape + (3,)
        row = np.broadcast_to(np.expand_dims(vr, d0), full)
        col = np.broadcast_to(np.expand_dims(vc, d1), full)
        fac_g, fac_mom = g[..., None] * pre, m * pre
    else:
        v = _ema(g2s, FAC, p.shape)
        row = col = v
        fac_g = g[..., None] / np.sqrt(v + 1e-9)
        fac_mom = m / np.sqrt(np.maximum(v, 1e-9))
    x = np.concatenate([g[..., None], np.clip(g, -0.1, 0.1)[..., None], p[..., None], m, rms,
                        m * r, r, fac_g, (g[..., None] * r), row, col, 1 / np.sqrt(row + 1e-8),
                        1 / np.sqrt(col + 1e-8), fac_mom], axis=-1)
    if normalize:
        x = x / np.sqrt(1e-5 + np.mean(x**2, axis=tuple(range(p.ndim)), keepdims=True))
    return x


def _param_scale(name):
    return math.sqrt(np.mean(np.asarray(PARAMS[name], np.float64) ** 2) + 1e-9)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_per_tensor(theta, feats, h, c):
    t = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
    dense = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    pooled = np.maximum(dense(t["mix"]["f1"], feats), 0)
    x = dense(t["mix"]["f0"], feats) + pooled.max(axis=0, keepdims=True)
    i, g, f, o = np.split(dense(t["lstm"], np.concatenate([x, h], -1)), 4, axis=-1)
    c = _sigmoid(f + 1) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    return dense(t["controls"], h), dense(t["step_size"], h)[:, 0], h, c


# ---------------------------------------------------------------------------------------------


def test_paper_size_parameter_count():
    counts = Velo().parameter_counts()  # jax.eval_shape: nothing is allocated
    assert counts == {"mix": 44_544, "lstm": 2_099_200, "controls": 131_328, "step_size": 513,
                      "bank": 40_704, "lstm_init_state": 1_024}
    assert sum(counts.values()) - counts["lstm_init_state"] == 2_316_289
    assert Velo().num_meta_params() == 2_316_289 + 1_024
    assert Velo().num_lstm_features == 28 and len(velo.MLP_FEATURE_NAMES) == 30
    assert Velo().mlp_layer_sizes == (30, 4, 4, 3)
    # the released code's var_rms broadcast: 30 LSTM inputs, 3 x 2 x 512 more mixing weights
    assert Velo(var_rms="code").num_meta_params() == 2_319_361 + 1_024
    assert Velo(var_rms="code").num_lstm_features == 30
    assert Velo.name == "velo"


def test_small_size_parameter_count_and_init():
    counts = SMALL.parameter_counts()
    assert counts == {"mix": 1_392, "lstm": 2_112, "controls": 136, "step_size": 17,
                      "bank": 1_272, "lstm_init_state": 32}
    assert SMALL.num_meta_params() == 4_961
    assert THETA["bank"]["w0"].shape == (K, 30, 4) and THETA["bank"]["b2"].shape == (K, 3)
    # "descent": heads at bias 1; the bank's mean is the selector of feature 7 (/100) + noise
    np.testing.assert_array_equal(THETA["step_size"]["b"], [1.0])
    np.testing.assert_array_equal(THETA["controls"]["b"], np.ones(K))
    assert np.abs(np.asarray(THETA["controls"]["w"])).max() <= 0.2 / math.sqrt(H) + 1e-7
    mean_w0 = 100 * np.asarray(THETA["bank"]["w0"]).mean(0)
    assert mean_w0[velo.DESCENT_FEATURE, 0] > 0.5 and mean_w0[velo.DESCENT_FEATURE, 1] < -0.5
    released = Velo.small(init_scheme="released").init(jax.random.PRNGKey(0))
    for name, fan_in in (("w0", 30), ("w1", 4), ("w2", 4)):
        w = np.asarray(released["bank"][name])
        assert np.abs(w).max() <= 2 / math.sqrt(fan_in) + 1e-6
        # members are independent draws
        assert not np.allclose(w[0], w[1])
    assert not np.any(np.asarray(released["step_size"]["b"]))
    assert not np.any(np.asarray(released["lstm_init_state"]["hidden"]))


def test_lstm_features_by_hand():
    """All 28 per-tensor LSTM inputs of three updates on rank 0, 1, 2 and 4 tensors."""
    feats, _, states = _run(THETA)
    assert feats.shape == (3, 4, 28)
    for step in range(3):
        np.testing.assert_allclose(np.asarray(feats[step], np.float64), _lstm_features(step),
                                   rtol=1e-4, atol=2e-5, err_msg=f"update {step}")
    # the loss features switch on at the third loss, and the 10.0 loss was clipped
    assert np.all(np.asarray(feats[:2, :, 9:18]) == 0) and np.any(np.asarray(feats[2, :, 9:18]))
    assert np.all(np.abs(np.asarray(feats[2, :, 9:18])) <= 1)
    # rank one-hots: b -> 1, k -> 4, s -> 0, w -> 2
    np.testing.assert_array_equal(np.argmax(np.asarray(feats[0, :, 19:24]), -1), [1, 4, 0, 2])
    np.testing.assert_array_equal(states.iteration, [1, 2, 3])


def test_var_rms_code_quirk_and_rank_feature():
    rng = np.random.default_rng(5)
    p, m, rms = rng.normal(size=(2, 3)), rng.normal(size=(2, 3, 3)), rng.random((2, 3, 1))
    got = np.asarray(velo.tensor_statistics(jnp.asarray(p), jnp.moveaxis(m, -1, 0),
                                            jnp.moveaxis(rms, -1, 0), var_rms="code"))
    s = 1 / np.sqrt(np.mean(p**2))
    want = _clip_log_abs(np.mean((rms * s - np.mean(m * s, axis=(0, 1))) ** 2, axis=(0, 1)))
    assert got.shape == (1 + 5 + 3 + 3,)
    np.testing.assert_allclose(got[-3:], want, rtol=1e-5)
    np.testing.assert_array_equal(velo.rank_feature((1, 7, 1)), np.eye(5)[1])  # size-1 dims
    np.testing.assert_array_equal(velo.rank_feature((2,) * 5), np.zeros(5))  # rank >= 5
    assert velo.lstm_feature_names("code")[-3:] == ("var_rms_0.9", "var_rms_0.99",
                                                    "var_rms_0.999")


@functools.lru_cache(maxsize=1)
def _selected_features():
    """Normalised features as the optimizer sees them: select each of the 30 in turn
    (c_lr = 1, c_hyper = 1), so the update is -0.001 * sqrt(mean(p^2) + 1e-9) * feature.
    Returns {name: (3 updates, *shape, 30)}."""
    outs = [_run(_controlled_theta(THETA, k))[1] for k in range(30)]
    return {name: np.stack([np.asarray(u[name], np.float64).reshape((3,) + (shape or (1,)))
                            for u in outs], axis=-1) / (-1e-3 * _param_scale(name))
            for name, shape in SHAPES.items()}


def test_every_per_parameter_feature_by_hand():
    """All 30 normalised per-parameter features, rank 0, 1, 2 and 4 tensors, three updates."""
    for name, got in _selected_features().items():
        for step in range(3):
            np.testing.assert_allclose(got[step], _mlp_features(name, step), rtol=1e-4,
                                       atol=2e-6, err_msg=f"{name} update {step}")


def test_feature_normalisation():
    """Each channel is scaled to mean(x^2) = ms / (1e-5 + ms) over the tensor (ms the raw
    mean square): 1 for ordinary channels, less for tiny ones."""
    for name, got in _selected_features().items():
        for step in range(3):
            raw = _mlp_features(name, step, normalize=False)
            axes = tuple(range(raw.ndim - 1))
            ms = np.mean(raw**2, axis=axes)
            np.testing.assert_allclose(np.mean(got[step] ** 2, axis=axes), ms / (1e-5 + ms),
                                       rtol=2e-4, atol=1e-7, err_msg=f"{name} update {step}")
            # g and p (raw mean squares >> 1e-5) come out with a unit second moment
            np.testing.assert_allclose(np.mean(got[step][..., [0, 2]] ** 2, axis=axes), 1.0,
                                       rtol=1e-3)


def test_lstm_path_by_hand():
    """c_lr from mixing (code form), the LSTM (gates i, g, f, o, forget bias 1, learned initial
    state, state carried over steps) and the step-size head, recomputed in NumPy."""
    key = jax.random.PRNGKey(1)
    theta = _controlled_theta(THETA, 0, c_lr=None)
    theta["step_size"] = {"w": 3.0 * jax.random.normal(key, (H, 1)) / math.sqrt(H),
                          "b": jnp.array([0.3], jnp.float32)}
    theta["lstm_init_state"] = {
        "hidden": 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (H,)),
        "cell": 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (H,))}
    _, updates, states = _run(theta)
    h = np.tile(np.asarray(theta["lstm_init_state"]["hidden"], np.float64), (4, 1))
    c = np.tile(np.asarray(theta["lstm_init_state"]["cell"], np.float64), (4, 1))
    for step in range(3):
        _, c_lr, h, c = _np_per_tensor(theta, _lstm_features(step), h, c)
        for i, (name, shape) in enumerate(SHAPES.items()):
            want = -c_lr[i] * 1e-3 * _param_scale(name) * _mlp_features(name, step)[..., 0]
            got = np.asarray(updates[name][step], np.float64).reshape(shape or (1,))
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9, err_msg=f"{name} {step}")
        np.testing.assert_allclose(states.lstm_hidden[step], h, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(states.lstm_cell[step], c, rtol=2e-4, atol=1e-6)
    assert np.ptp(np.asarray(states.lstm_hidden[-1])) > 0.1


def test_paper_mixing_formula():
    lopt = Velo.small(mixing="paper")
    theta = lopt.init(jax.random.PRNGKey(2))
    assert theta["mix"]["f1"]["w"].shape == (H, H)
    rng = np.random.default_rng(3)
    feats, h, c = rng.normal(size=(3, 28)), rng.normal(size=(3, H)), rng.normal(size=(3, H))
    got = jax.jit(lopt.per_tensor)(theta, *(jnp.asarray(x, jnp.float32) for x in (feats, h, c)))
    t = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
    dense = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    pooled = relu(dense(t["mix"]["f1"], relu(dense(t["mix"]["f2"], feats))))
    x = dense(t["mix"]["f0"], feats) + pooled.max(axis=0, keepdims=True)
    i, g, f, o = np.split(dense(t["lstm"], np.concatenate([x, h], -1)), 4, axis=-1)
    c = _sigmoid(f + 1) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    for a, b in zip(got, (dense(t["controls"], h), dense(t["step_size"], h)[:, 0], h, c),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)


def test_state_jit_and_vmap_over_param_sets():
    opt = SMALL.optimizer(THETA, num_steps=T)
    state = jax.jit(opt.init)(PARAMS)
    assert isinstance(state, VeloState)
    assert state.lstm_hidden.shape == (4, H) and state.lstm_cell.shape == (4, H)
    assert state.momentum.m["k"].shape == (3, 5, 2, 3, 4)  # decays first
    assert state.factored.v_row["k"].shape == (3, 2, 3, 4)  # largest dim (axis 0) removed
    assert state.factored.v_col["k"].shape == (3, 5, 2, 3)  # 2nd largest (axis 3) removed
    assert state.factored.v_full["s"].shape == (3,)
    assert state.loss_buffer.means.shape == (10,) and int(state.num_steps) == T
    # vmap over two parameter sets (and their grads and losses) with one shared theta
    sets = [(PARAMS, GRADS, LOSSES), (_tree(10), [_tree(11), _tree(12), _tree(13)],
                                      LOSSES[::-1])]
    batched = jax.jit(jax.vmap(_run3, in_axes=(None, 0, 0, 0, None)),
                      compiler_options=FAST_COMPILE)(
        THETA, _stack([s[0] for s in sets]), _stack([_stack(s[1]) for s in sets]),
        jnp.asarray(np.stack([s[2] for s in sets]), jnp.float32), jnp.asarray(T, jnp.int32))
    for i, (params, grads, losses) in enumerate(sets):
        single = _run(THETA, params, grads, losses)
        # the loss features divide differences of nearly equal float32 EMAs, so batched and
        # single runs round them differently (~1e-5); everything else agrees to float32
        np.testing.assert_allclose(batched[0][i], single[0], rtol=1e-5, atol=1e-4)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-4,
                                                                  atol=1e-8), batched[1:],
                     single[1:])
    assert jax.tree.structure(batched[2]) == jax.tree.structure(state)


# A user's tiny MLP regression, trained with the same loop as any optax optimizer.
_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(_RNG.normal(size=(16, 1)), jnp.float32)
MLP_PARAMS = {"w1": jnp.asarray(_RNG.normal(size=(3, 4)) * 0.5, jnp.float32),
              "b1": jnp.full((4,), 0.1), "w2": jnp.asarray(_RNG.normal(size=(4, 1)) * 0.5,
                                                           jnp.float32)}


def _mlp_loss(params):
    h = jnp.tanh(X @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - Y) ** 2)


def _train(opt: optax.GradientTransformationExtraArgs, steps: int) -> np.ndarray:
    return train_run(opt, _mlp_loss, MLP_PARAMS, steps, compiler_options=FAST_COMPILE)[0]


def test_user_trains_like_with_optax_from_initial_theta():
    """The untrained ("descent"-initialised) small VeLO already descends: steps ~0.001 of each
    tensor's RMS along an Adam-like direction."""
    lopt = _train(SMALL.optimizer(SMALL.init(jax.random.PRNGKey(4)), num_steps=30), 30)
    assert np.all(np.isfinite(lopt))
    assert np.all(np.diff(lopt) < 0), lopt
    assert lopt[-1] < 0.99 * lopt[0]


LIN_PARAMS = {"w": MLP_PARAMS["w1"][:, :2], "b": jnp.full((2,), 0.1)}


def _linear_loss(params):
    return jnp.mean((X @ params["w"] + params["b"] - Y) ** 2)


def _unroll_loss(theta):
    """Sum of the losses after each of 3 updates of a linear regression (2 tensors)."""
    opt = SMALL.optimizer(theta, num_steps=3)

    def body(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(_linear_loss)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        return (params, state), _linear_loss(params)

    _, losses = jax.lax.scan(body, (LIN_PARAMS, opt.init(LIN_PARAMS)), None, length=3)
    return jnp.sum(losses), losses


def test_meta_gradient_of_three_step_unroll():
    (_, losses), grad = jax.jit(jax.value_and_grad(_unroll_loss, has_aux=True),
                                   compiler_options=FAST_COMPILE)(THETA)
    assert np.all(np.isfinite(np.asarray(losses)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grad))
    for path in (("lstm", "w"), ("controls", "w"), ("step_size", "b"), ("bank", "w0"),
                 ("mix", "f0", "w"), ("mix", "f1", "w"), ("lstm_init_state", "cell")):
        g = grad
        for key in path:
            g = g[key]
        assert np.abs(np.asarray(g)).max() > 0, path
    # the code-form mixing never uses F2: its meta-gradient is exactly zero
    assert not np.any(np.asarray(grad["mix"]["f2"]["w"]))


def test_bad_input_errors():
    opt = SMALL.optimizer(THETA, 10)
    params = {"w": jnp.ones((2, 3))}
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(params, state)
    with pytest.raises(ValueError, match="needs the training loss"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.update(params, state, params, loss=jnp.ones(2))
    with pytest.raises(ValueError, match="built for 1 tensors"):
        two = {"a": jnp.ones(2), "w": jnp.ones((2, 3))}
        opt.update(two, state, two, loss=1.0)
    with pytest.raises(ValueError, match="num_steps >= 1"):
        SMALL.optimizer(THETA, 0)
    with pytest.raises(ValueError, match="at least one parameter"):
        opt.init({})
    with pytest.raises(ValueError, match="mixing must be one of"):
        Velo(mixing="deep_sets")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="var_rms must be one of"):
        Velo(var_rms="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ff_hidden_size >= 2"):
        Velo(ff_hidden_size=1)


def test_non_finite_loss_is_clipped_not_propagated():
    buf = velo.loss_buffer_init()
    for i, loss in enumerate([2.0, float("nan"), float("inf"), 1.0]):
        buf = velo.loss_buffer_update(buf, jnp.float32(loss), jnp.int32(i), jnp.int32(100))
    assert np.all(np.isfinite(np.asarray(buf.means)))
    assert np.all(np.isfinite(np.asarray(velo.loss_features(buf, jnp.int32(4), jnp.int32(100)))))
