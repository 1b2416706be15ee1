"""fc_lopt (Metz et al. 2019, arXiv:1810.10180, as in arXiv:2203.11860, §4): parameter count,
features by hand, optax usage, jit / vmap, and meta-gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_loops import QPARAMS, quadratic_loss, scan_losses, train_like_optax

from learnopt.learned.mlp import FcLOpt, FcLOptState

LOPT = FcLOpt()
INIT = jax.jit(LOPT.init)
# float32 values of the fixed decays, as the code holds them (1 - float32(0.9999) is 2e-4 off
# 1e-4 in relative terms, more than the comparison's tolerance)
DECAYS = np.array([0.1, 0.5, 0.9, 0.99, 0.999, 0.9999], np.float32).astype(np.float64)
TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)
SHAPES = {"s": (), "b": (3,), "w": (2, 3), "k": (3, 3, 2, 4)}


def _tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS, G1, G2 = _tree(0), _tree(1), _tree(2, scale=3.0)


@jax.jit
def run(theta, params, g1, g2):
    opt = LOPT.optimizer(theta, num_steps=100)
    state = opt.init(params)
    _, state = opt.update(g1, state, params, loss=jnp.asarray(1.0))
    return opt.update(g2, state, params, loss=jnp.asarray(1.0))


def _select_theta(k: int, magnitude_bias: float = 0.0):
    """MLP with direction d = input k (relu(x) - relu(-x)) and magnitude m = magnitude_bias."""
    w0, w1, w2 = np.zeros((19, 32)), np.zeros((32, 32)), np.zeros((32, 2))
    w0[k, 0], w0[k, 1] = 1.0, -1.0
    w1[0, 0] = w1[1, 1] = 1.0
    w2[0, 0], w2[1, 0] = 1.0, -1.0
    theta = {
        "w0": w0,
        "b0": np.zeros(32),
        "w1": w1,
        "b1": np.zeros(32),
        "w2": w2,
        "b2": np.array([0.0, magnitude_bias]),
    }
    return {name: jnp.asarray(x, jnp.float32) for name, x in theta.items()}


def _numpy_features(p, g1, g2):
    p, g1, g2 = (np.asarray(x, np.float64).reshape(np.shape(x) or (1,)) for x in (p, g1, g2))
    m = np.zeros(p.shape + (6,))
    for g in (g1, g2):
        m = DECAYS * m + (1 - DECAYS) * g[..., None]
    feats = np.concatenate([g2[..., None], p[..., None], m], axis=-1)
    axes = tuple(range(p.ndim))
    return feats / np.sqrt(1e-5 + np.mean(feats**2, axis=axes, keepdims=True))


def test_meta_parameter_count_is_1762():
    assert LOPT.num_meta_params() == 1762  # (19*32+32) + (32*32+32) + (32*2+2)
    assert LOPT.num_inputs == 19 and LOPT.layer_sizes == (19, 32, 32, 2)
    assert FcLOpt.name == "fc_lopt"
    theta = INIT(jax.random.PRNGKey(0))
    assert np.abs(np.asarray(theta["w0"])).max() <= 2 / math.sqrt(19) + 1e-6
    assert not np.any(np.asarray(theta["b1"]))


def test_every_feature_by_hand():
    outs = [run(_select_theta(k), PARAMS, G1, G2) for k in range(19)]
    outs.append(run(_select_theta(1, magnitude_bias=-700.0), PARAMS, G1, G2))
    for name, shape in SHAPES.items():
        feats = _numpy_features(PARAMS[name], G1[name], G2[name])
        got = np.stack([np.asarray(u[name], np.float64).reshape(shape or (1,)) for u, _ in outs])
        for k in range(8):  # g, p, 6 momenta
            np.testing.assert_allclose(
                got[k],
                -1e-3 * feats[..., k],
                rtol=2e-5,
                atol=1e-10,
                err_msg=f"feature {k} of {name}",
            )
        for j, x in enumerate(TIME_SCALES):  # second update: t = 1
            np.testing.assert_allclose(got[8 + j], -1e-3 * math.tanh(1.0 / x - 1.0), rtol=1e-5)
        np.testing.assert_allclose(got[19], -1e-3 * feats[..., 1] * math.exp(-0.7), rtol=2e-5)


def test_state_jit_and_vmap():
    state = jax.jit(LOPT.optimizer(INIT(jax.random.PRNGKey(0)), 5).init)(PARAMS)
    assert isinstance(state, FcLOptState)
    assert state.momentum.m["k"].shape == (6, 3, 3, 2, 4) and state.momentum.m["s"].shape == (6,)
    assert int(state.num_steps) == 5
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    thetas = [INIT(k) for k in keys]
    params = [_tree(10 + i) for i in range(3)]
    grads = [(_tree(20 + i), _tree(30 + i)) for i in range(3)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    ub, sb = jax.vmap(run)(
        stack(thetas), stack(params), stack([g[0] for g in grads]), stack([g[1] for g in grads])
    )
    assert np.all(np.asarray(sb.iteration) == 2)
    for i in range(3):
        ui, si = run(thetas[i], params[i], *grads[i])
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-9),
            (ub, sb),
            (ui, si),
        )


def _train(opt: optax.GradientTransformationExtraArgs, steps: int):
    """The user's loop, written once for optax.adam and the learned optimizer alike."""
    return train_like_optax(opt, quadratic_loss, QPARAMS, steps)


def test_user_trains_like_with_adam():
    adam = _train(optax.adam(1e-2), 30)
    lopt = _train(LOPT.optimizer(_select_theta(0, magnitude_bias=2000.0), 30), 30)
    assert np.all(np.isfinite(adam)) and adam[-1] < adam[0]
    assert np.all(np.isfinite(lopt)) and lopt[-1] < 0.9 * lopt[0]
    assert np.all(np.diff(lopt) < 0)


def _unroll_loss(theta):
    return scan_losses(LOPT.optimizer(theta, num_steps=3), quadratic_loss, QPARAMS, 3)


def test_init_theta_finite_and_meta_gradient():
    (_, losses), grad = jax.jit(jax.value_and_grad(_unroll_loss, has_aux=True))(
        INIT(jax.random.PRNGKey(0))
    )
    assert np.all(np.isfinite(np.asarray(losses)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grad))
    assert np.abs(np.asarray(grad["w0"])).max() > 0


def test_bad_input_errors():
    opt = LOPT.optimizer(INIT(jax.random.PRNGKey(0)), 10)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(QPARAMS, opt.init(QPARAMS))
    with pytest.raises(ValueError, match="hidden_size"):
        FcLOpt(hidden_size=0)
