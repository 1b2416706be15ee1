"""small_fc_lopt (arXiv:2203.11860, §2.2, App. A): parameter count, features by hand, both
compute paths, optax usage, jit / vmap, and meta-gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import QPARAMS, quadratic_loss, scan_losses, train_like_optax

from learnopt.learned import common
from learnopt.learned.adafac_mlp import SmallFcLOpt, SmallFcLOptState

CONCAT = SmallFcLOpt(compute="concat")
ELEMENTWISE = SmallFcLOpt(compute="elementwise")
TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)

# Decay offsets chosen so the decays are round numbers: 1 - beta doubled for momentum, halved
# for AdaFactor, unchanged for rms (checked in test_init_decays_and_weights).
LOG2 = math.log(2.0) / 10.0
ROUND_DECAYS = {"momentum": [0.8, 0.98, 0.998], "rms": [0.999], "adafactor": [0.95, 0.995, 0.9995]}

# Tensors of rank 0, 1, 2 and 4 with their factored dims (d1, d0) worked out by hand.
SHAPES = {"s": (), "b": (3,), "w": (2, 3), "k": (5, 2, 3, 4)}
FACTORED = {"w": (0, 1), "k": (3, 0)}


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS, G1, G2 = _tree(0), _tree(1), _tree(2, scale=3.0)


def _run(lopt: SmallFcLOpt):
    """init + two updates; returns the second update and the state (one compile per path)."""

    def run(theta, params, g1, g2):
        opt = lopt.optimizer(theta, num_steps=100)
        state = opt.init(params)
        _, state = opt.update(g1, state, params, loss=jnp.asarray(1.0))
        return opt.update(g2, state, params, loss=jnp.asarray(1.0))

    return run


RUN = {"concat": jax.jit(_run(CONCAT)), "elementwise": jax.jit(_run(ELEMENTWISE))}
INIT = jax.jit(ELEMENTWISE.init)  # both paths share theta's layout; compile it once


def _with_decay_offsets(theta):
    return dict(
        theta,
        momentum_decays=jnp.full((3,), LOG2, jnp.float32),
        rms_decays=jnp.zeros((1,), jnp.float32),
        adafactor_decays=jnp.full((3,), -LOG2, jnp.float32),
    )


def _perturb(theta, seed: int, scale: float):
    """theta plus NumPy noise (NumPy, so no per-shape eager compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), theta
    )


def _select_theta(k: int, magnitude_bias: float = 0.0):
    """A theta whose MLP outputs direction d = (normalised) input k and magnitude m = bias:
    d = relu(relu(x_k)) - relu(relu(-x_k)) = x_k."""
    w0, w1, w2 = np.zeros((39, 4)), np.zeros((4, 4)), np.zeros((4, 2))
    w0[k, 0], w0[k, 1] = 1.0, -1.0
    w1[0, 0] = w1[1, 1] = 1.0
    w2[0, 0], w2[1, 0] = 1.0, -1.0
    nn = {
        "w0": w0,
        "b0": np.zeros(4),
        "w1": w1,
        "b1": np.zeros(4),
        "w2": w2,
        "b2": np.array([0.0, magnitude_bias]),
    }
    nn = {name: jnp.asarray(x, jnp.float32) for name, x in nn.items()}
    return _with_decay_offsets({"nn": nn})


# The NumPy reference uses the float32 decays the code computes: 1 - 0.9995 in float32 is only
# good to ~1e-4 relative, which would otherwise dominate the comparison.
_DECAYS = {k: np.asarray(v, np.float64) for k, v in ELEMENTWISE.decays(_select_theta(0)).items()}
MOM_DECAYS, RMS_DECAYS, FAC_DECAYS = _DECAYS["momentum"], _DECAYS["rms"], _DECAYS["adafactor"]


def _ema(xs, decays):
    v = 0.0
    for x in xs:
        v = decays * v + (1 - decays) * x[..., None]
    return v


def _numpy_features(p, g1, g2, dims):
    """The 28 features of arXiv:2203.11860, App. A (as the released code), float64, shape
    p.shape + (28,)."""
    p, g1, g2 = (np.asarray(x, np.float64).reshape(np.shape(x) or (1,)) for x in (p, g1, g2))
    m = _ema([g1, g2], MOM_DECAYS)
    rms = _ema([g1**2, g2**2], RMS_DECAYS)
    r = 1 / np.sqrt(rms + 1e-6)
    if dims is None:
        v = _ema([g1**2 + 1e-30, g2**2 + 1e-30], FAC_DECAYS)
        fac_g = g2[..., None] / np.sqrt(v + 1e-9)
        row = col = v
        fac_mom = m / np.sqrt(v + 1e-6)
    else:
        d1, d0 = dims
        mv = lambda x: np.moveaxis(x, (d1, d0), (-2, -1))  # noqa: E731
        back = lambda x: np.moveaxis(x, (-3, -2), (d1, d0))  # noqa: E731 (K stays last)
        s1, s2 = mv(g1**2 + 1e-30), mv(g2**2 + 1e-30)
        vr = _ema([s1.mean(-1), s2.mean(-1)], FAC_DECAYS)[..., :, None, :]  # (..., n1, 1, K)
        vc = _ema([s1.mean(-2), s2.mean(-2)], FAC_DECAYS)[..., None, :, :]  # (..., 1, n0, K)
        pre = back(1 / np.sqrt(vr / vr.mean(axis=-3, keepdims=True)) / np.sqrt(vc))
        row = back(np.broadcast_to(vr, mv(g2).shape + (3,)))
        col = back(np.broadcast_to(vc, mv(g2).shape + (3,)))
        fac_g = g2[..., None] * pre
        fac_mom = m * pre
    feats = np.concatenate(
        [
            g2[..., None],
            p[..., None],
            m,
            rms,
            m * r,
            r,
            fac_g,
            row,
            col,
            1 / np.sqrt(row + 1e-8),
            1 / np.sqrt(col + 1e-8),
            fac_mom,
        ],
        -1,
    )
    axes = tuple(range(p.ndim))
    return feats / np.sqrt(1e-5 + np.mean(feats**2, axis=axes, keepdims=True))


def test_meta_parameter_count_is_197():
    assert CONCAT.num_meta_params() == 197
    assert ELEMENTWISE.num_meta_params() == 197
    assert CONCAT.num_tensor_features == 28 and CONCAT.num_inputs == 39
    shapes = jax.eval_shape(CONCAT.init, jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(shapes["nn"])) == 190  # 39*4+4 + 4*4+4 + 4*2+2
    assert shapes["nn"]["w0"].shape == (39, 4) and shapes["nn"]["w2"].shape == (4, 2)
    assert SmallFcLOpt().compute == "elementwise" and SmallFcLOpt.name == "small_fc_lopt"


def test_init_decays_and_weights():
    theta = INIT(jax.random.PRNGKey(0))
    decays = ELEMENTWISE.decays(theta)
    np.testing.assert_allclose(decays["momentum"], [0.9, 0.99, 0.999], rtol=1e-6)
    np.testing.assert_allclose(decays["rms"], [0.999], rtol=1e-6)
    np.testing.assert_allclose(decays["adafactor"], [0.9, 0.99, 0.999], rtol=1e-6)
    for name, values in ROUND_DECAYS.items():
        np.testing.assert_allclose(_DECAYS[name], values, rtol=1e-5)
    for i, fan_in in enumerate((39, 4, 4)):
        w = np.asarray(theta["nn"][f"w{i}"])
        assert np.abs(w).max() <= 2 / math.sqrt(fan_in) + 1e-6
        assert not np.any(np.asarray(theta["nn"][f"b{i}"]))


@pytest.mark.parametrize("path", ["concat", "elementwise"])
def test_every_feature_by_hand(path):
    """Select each of the 39 inputs in turn: the update must be -0.001 * that input."""
    thetas = [_select_theta(k) for k in range(39)] + [_select_theta(0, magnitude_bias=500.0)]
    outs = [RUN[path](theta, PARAMS, G1, G2) for theta in thetas]
    assert all(int(state.iteration) == 2 for _, state in outs)
    for name, shape in SHAPES.items():
        feats = _numpy_features(PARAMS[name], G1[name], G2[name], FACTORED.get(name))
        got = np.stack([np.asarray(u[name], np.float64).reshape(shape or (1,)) for u, _ in outs])
        for k in range(28):
            np.testing.assert_allclose(
                got[k],
                -1e-3 * feats[..., k],
                rtol=2e-5,
                atol=1e-10,
                err_msg=f"feature {k} of {name}",
            )
        for j, x in enumerate(TIME_SCALES):  # second update: t = 1, tanh(1/x - 1)
            np.testing.assert_allclose(
                got[28 + j],
                -1e-3 * math.tanh(1.0 / x - 1.0),
                rtol=1e-5,
                err_msg=f"time feature {j}",
            )
        # magnitude m = 500: step = 0.001 * d * exp(0.001 * 500)
        np.testing.assert_allclose(got[39], -1e-3 * feats[..., 0] * math.exp(0.5), rtol=2e-5)


def test_compute_paths_agree():
    theta = INIT(jax.random.PRNGKey(3))
    # a generic theta: perturbed weights, nonzero biases and decay offsets
    theta = _perturb(theta, seed=4, scale=0.3)
    for th in (INIT(jax.random.PRNGKey(5)), theta):
        ua, sa = RUN["concat"](th, PARAMS, G1, G2)
        ub, sb = RUN["elementwise"](th, PARAMS, G1, G2)
        for name in SHAPES:
            diff = np.abs(np.asarray(ua[name]) - np.asarray(ub[name])) / CONCAT.step_mult
            assert diff.mean() < 1e-6 and diff.max() < 1e-5, name
        assert max(np.abs(np.asarray(u)).max() for u in jax.tree.leaves(ua)) > 1e-6
        # the native kernel (elementwise path on CPU) updates the accumulators itself:
        # equal up to float rounding (fused multiply-adds, float64 sums)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=2e-6, atol=1e-6 * float(np.max(np.abs(b), initial=0.0))), sa, sb)


def test_state_shapes_and_jit():
    opt = ELEMENTWISE.optimizer(INIT(jax.random.PRNGKey(0)), num_steps=7)
    state = jax.jit(opt.init)(PARAMS)
    assert isinstance(state, SmallFcLOptState)
    assert state.momentum.m["k"].shape == (3, 5, 2, 3, 4)  # decays first
    assert state.rms.rms["s"].shape == (1,)
    assert state.factored.v_row["k"].shape == (3, 2, 3, 4)  # largest dim (axis 0) removed
    assert state.factored.v_col["k"].shape == (3, 5, 2, 3)  # 2nd largest (axis 3) removed
    assert state.factored.v_full["b"].shape == (3, 3)
    assert int(state.num_steps) == 7 and int(state.iteration) == 0
    _, state2 = RUN["elementwise"](INIT(jax.random.PRNGKey(0)), PARAMS, G1, G2)
    assert jax.tree.structure(state2) == jax.tree.structure(state)
    assert all(
        a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2), strict=True)
    )


def test_vmap_over_thetas_and_param_sets():
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    thetas = [_perturb(INIT(k), seed=i, scale=0.1) for i, k in enumerate(keys)]
    params = [_tree(10 + i) for i in range(3)]
    grads = [(_tree(20 + i), _tree(30 + i)) for i in range(3)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    ub, sb = jax.vmap(RUN["elementwise"])(
        stack(thetas), stack(params), stack([g[0] for g in grads]), stack([g[1] for g in grads])
    )
    for i in range(3):
        ui, si = RUN["elementwise"](thetas[i], params[i], *grads[i])
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-9),
            (ub, sb),
            (ui, si),
        )


def _train_like_adam(opt: optax.GradientTransformationExtraArgs, steps: int):
    """The user's loop, written once for optax.adam and the learned optimizer alike."""
    return train_like_optax(opt, quadratic_loss, QPARAMS, steps)


def test_user_trains_like_with_adam():
    adam = _train_like_adam(optax.adam(1e-2), 30)
    # theta = normalised gradient descent with step 0.001 * exp(2)
    lopt = _train_like_adam(ELEMENTWISE.optimizer(_select_theta(0, 2000.0), 30), 30)
    assert np.all(np.isfinite(adam)) and np.all(np.isfinite(lopt))
    assert adam[-1] < adam[0]
    assert lopt[-1] < 0.9 * lopt[0]
    assert np.all(np.diff(lopt) < 0)


def _unroll_loss(theta):
    return scan_losses(ELEMENTWISE.optimizer(theta, num_steps=3), quadratic_loss, QPARAMS, 3)


def test_init_theta_finite_and_meta_gradient():
    theta = INIT(jax.random.PRNGKey(0))
    (_, losses), grad = jax.jit(jax.value_and_grad(_unroll_loss, has_aux=True))(theta)
    assert np.all(np.isfinite(np.asarray(losses)))
    leaves = jax.tree.leaves(grad)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert np.abs(np.asarray(grad["nn"]["w0"])).max() > 0
    assert np.abs(np.asarray(grad["momentum_decays"])).max() > 0


def test_bad_input_errors():
    opt = CONCAT.optimizer(INIT(jax.random.PRNGKey(0)), 10)
    state = opt.init(QPARAMS)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(QPARAMS, state)
    with pytest.raises(ValueError, match="different tree structures"):
        opt.update({"w": QPARAMS["w"]}, state, QPARAMS)
    with pytest.raises(ValueError, match="compute must be one of"):
        SmallFcLOpt(compute="matmul")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one rms decay"):
        SmallFcLOpt(initial_rms_decays=(0.9, 0.99))
    assert common.factored_dims(SHAPES["k"]) == FACTORED["k"]
