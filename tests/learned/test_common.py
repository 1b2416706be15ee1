"""Accumulators, factored statistics, normalisation and time features, checked by hand.

Reference numbers are computed in NumPy (float64) from the equations of arXiv:2203.11860
(App. A) and the released learned_optimization code (docs/derivations.md §2), independently
of the code under test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.learned import common

RTOL = 2e-6

# One compiled program per call pattern keeps the file fast (eager mode compiles op by op).
momentum_update = jax.jit(common.momentum_update)
rms_update = jax.jit(common.rms_update)
factored_update = jax.jit(common.factored_update)

G1_MAT = np.array([[0.5, -1.0, 2.0], [0.25, 3.0, -0.75]])
G2_MAT = np.array([[-1.5, 0.5, 1.0], [2.0, -0.5, 0.125]])
G1_VEC = np.array([1.0, -2.0, 0.5])
G2_VEC = np.array([-0.5, 4.0, 1.5])
DECAYS = np.array([0.5, 0.9])


def two_step_ema(x1: np.ndarray, x2: np.ndarray, decays: np.ndarray) -> np.ndarray:
    """EMA from zero after observing x1 then x2, one row per decay: shape (K,) + x.shape."""
    out = np.zeros(decays.shape + x1.shape)
    d = decays.reshape(decays.shape + (1,) * x1.ndim)
    for x in (x1, x2):
        out = d * out + (1 - d) * x[None]
    return out


@pytest.mark.parametrize("g1,g2", [(G1_MAT, G2_MAT), (G1_VEC, G2_VEC)], ids=["2x3", "vec"])
def test_momentum_two_updates(g1, g2):
    params = {"p": jnp.zeros(g1.shape)}
    state = common.momentum_init(params, len(DECAYS))
    for g in (g1, g2):
        state = momentum_update(state, {"p": jnp.asarray(g)}, jnp.asarray(DECAYS))
    # by hand for decay 0.5, first entry: 0.5 * (0.5 * g1) + 0.5 * g2
    expected = two_step_ema(g1, g2, DECAYS)
    assert expected.flat[0] == pytest.approx(0.25 * g1.flat[0] + 0.5 * g2.flat[0])
    np.testing.assert_allclose(state.m["p"], expected, rtol=RTOL)


@pytest.mark.parametrize("g1,g2", [(G1_MAT, G2_MAT), (G1_VEC, G2_VEC)], ids=["2x3", "vec"])
def test_rms_two_updates(g1, g2):
    params = [jnp.zeros(g1.shape)]
    state = common.rms_init(params, len(DECAYS))
    for g in (g1, g2):
        state = rms_update(state, [jnp.asarray(g)], jnp.asarray(DECAYS))
    np.testing.assert_allclose(state.rms[0], two_step_ema(g1**2, g2**2, DECAYS), rtol=RTOL)


def test_rms_and_factored_decays_clipped_momentum_not():
    g = jnp.ones((3,))
    rms = rms_update(common.rms_init(g, 2), g, jnp.array([1.5, -0.5]))
    np.testing.assert_allclose(rms.rms, np.array([[0.0] * 3, [1.0] * 3]))  # clipped to 1 and 0
    fac, _ = factored_update(common.factored_init(g, 1), g, jnp.array([-0.5]))
    np.testing.assert_allclose(fac.v_full[0], 1.0)  # decay clipped to 0: v = g^2
    mom = momentum_update(common.momentum_init(g, 1), g, jnp.array([-0.5]))
    np.testing.assert_allclose(mom.m, 1.5)  # (1 - (-0.5)) * 1: the code does not clip momentum


def test_factored_2x3_by_hand():
    params = {"w": jnp.zeros((2, 3))}
    state = common.factored_init(params, len(DECAYS))
    for g in (G1_MAT, G2_MAT):
        state, fac_g = factored_update(state, {"w": jnp.asarray(g)}, jnp.asarray(DECAYS))
    # 2x3: the largest dim is axis 1 (columns, d0) and the 2nd largest axis 0 (rows, d1).
    v_row = two_step_ema((G1_MAT**2).mean(axis=1), (G2_MAT**2).mean(axis=1), DECAYS)  # (K, 2)
    v_col = two_step_ema((G1_MAT**2).mean(axis=0), (G2_MAT**2).mean(axis=0), DECAYS)  # (K, 3)
    np.testing.assert_allclose(state.v_row["w"], v_row, rtol=RTOL)
    np.testing.assert_allclose(state.v_col["w"], v_col, rtol=RTOL)
    assert state.v_full["w"].shape == (2, 0)
    # AdaFactor's rank-1 estimate of E[g^2]: v_row_i * v_col_j / mean_i(v_row_i).
    v_hat = v_row[:, :, None] * v_col[:, None, :] / v_row.mean(axis=1)[:, None, None]
    np.testing.assert_allclose(fac_g["w"], G2_MAT[None] / np.sqrt(v_hat), rtol=1e-5)


def test_factored_vector_keeps_full_v():
    state = common.factored_init([jnp.zeros(3)], len(DECAYS))
    for g in (G1_VEC, G2_VEC):
        state, fac_g = factored_update(state, [jnp.asarray(g)], jnp.asarray(DECAYS))
    v = two_step_ema(G1_VEC**2, G2_VEC**2, DECAYS)
    np.testing.assert_allclose(state.v_full[0], v, rtol=RTOL)
    np.testing.assert_allclose(fac_g[0], G2_VEC[None] / np.sqrt(v + 1e-9), rtol=1e-5)
    assert state.v_row[0].shape == state.v_col[0].shape == (2, 0)


@pytest.mark.parametrize(
    "shape,dims,row,col,full",
    [
        ((), None, (3, 0), (3, 0), (3,)),
        ((5,), None, (3, 0), (3, 0), (3, 5)),
        ((4, 6), (0, 1), (3, 4), (3, 6), (3, 0)),
        ((6, 4), (1, 0), (3, 4), (3, 6), (3, 0)),
        ((4, 4), (0, 1), (3, 4), (3, 4), (3, 0)),  # tie: the later axis counts as larger
        ((3, 3, 8, 16), (2, 3), (3, 3, 3, 8), (3, 3, 3, 16), (3, 0)),  # HWIO conv kernel
        ((16, 3, 3, 8), (3, 0), (3, 3, 3, 8), (3, 16, 3, 3), (3, 0)),  # OHWI conv kernel
    ],
)
def test_factored_shapes(shape, dims, row, col, full):
    assert common.factored_dims(shape) == dims
    state = common.factored_init({"x": jnp.zeros(shape)}, 3)
    assert (state.v_row["x"].shape, state.v_col["x"].shape, state.v_full["x"].shape) == (
        row, col, full)
    new, fac_g = factored_update(state, {"x": jnp.ones(shape)}, jnp.full((3,), 0.9))
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)
    assert fac_g["x"].shape == (3,) + shape


def _numpy_factored(g_seq, decay, d1, d0):
    """AdaFactor on any rank, computed with the factored axes moved to the end."""
    vr = vc = 0.0
    for g in g_seq:
        g2 = np.moveaxis(g**2 + 1e-30, (d1, d0), (-2, -1))  # (..., n1, n0)
        vr = decay * vr + (1 - decay) * g2.mean(axis=-1)  # (..., n1)
        vc = decay * vc + (1 - decay) * g2.mean(axis=-2)  # (..., n0)
    v_hat = vr[..., :, None] * vc[..., None, :] / vr.mean(axis=-1)[..., None, None]
    return np.moveaxis(np.moveaxis(g_seq[-1], (d1, d0), (-2, -1)) / np.sqrt(v_hat),
                       (-2, -1), (d1, d0))


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (16, 3, 3, 8), (2, 5, 3)])
def test_factored_conv_kernel_against_numpy(shape):
    rng = np.random.default_rng(0)
    # rows of very different scale, so a row factor stuck at 1 would be caught
    scale = rng.uniform(0.1, 10.0, size=shape)
    gs = [rng.normal(size=shape) * scale for _ in range(2)]
    state = common.factored_init(jnp.zeros(shape), 1)
    for g in gs:
        state, fac_g = factored_update(state, jnp.asarray(g), jnp.array([0.9]))
    d1, d0 = common.factored_dims(shape)
    np.testing.assert_allclose(fac_g[0], _numpy_factored(gs, 0.9, d1, d0), rtol=1e-4)
    row, col = common.factored_preconditioners(state.v_row, state.v_col, shape)
    # a leading decay axis, then the tensor's axes
    assert row.shape[1 + d0] == 1 and row.shape[1 + d1] == shape[d1]
    assert col.shape[1 + d1] == 1 and col.shape[1 + d0] == shape[d0]
    assert float(jnp.std(row)) > 0.1  # the row factors did not collapse to 1
    np.testing.assert_allclose(jnp.mean(jnp.square(row) ** -1, axis=1 + d1), 1.0, rtol=1e-5)


def test_factored_tiles_conv():
    shape = (3, 3, 8, 16)
    v_row = jnp.arange(3 * 3 * 8, dtype=jnp.float32).reshape(1, 3, 3, 8)
    v_col = jnp.arange(3 * 3 * 16, dtype=jnp.float32).reshape(1, 3, 3, 16)
    row, col = common.factored_tiles(v_row, v_col, shape)
    assert row.shape == col.shape == (1,) + shape
    assert row[0, 1, 2, 5, 11] == v_row[0, 1, 2, 5]
    assert col[0, 1, 2, 5, 11] == v_col[0, 1, 2, 11]


@pytest.mark.parametrize("shape", [(1,), (7,), (4, 6), (3, 3, 8, 16)])
def test_second_moment_normalize(shape):
    rng = np.random.default_rng(1)
    # three feature channels of very different scales
    x = rng.normal(size=shape + (3,)) * np.array([1e-3, 1.0, 1e3])
    y = common.second_moment_normalize(jnp.asarray(x, jnp.float32),
                                       axis=tuple(range(len(shape))))
    ms = np.mean(np.square(np.asarray(y, np.float64)), axis=tuple(range(len(shape))))
    np.testing.assert_allclose(ms[1:], 1.0, rtol=1e-4)
    # eps = 1e-5 matters for the tiny channel: mean(x^2) / (1e-5 + mean(x^2))
    m0 = np.mean(x[..., 0] ** 2)
    assert ms[0] == pytest.approx(m0 / (1e-5 + m0), rel=1e-4)


def test_tanh_time_features_by_hand():
    f0 = np.asarray(common.tanh_time_features(0))
    assert f0.shape == (11,)
    np.testing.assert_allclose(f0, math.tanh(-1.0), rtol=1e-6)  # tanh(0/x - 1)
    f10 = np.asarray(common.tanh_time_features(jnp.asarray(10, jnp.int32)))
    expected = [math.tanh(10.0 / x - 1.0)
                for x in (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)]
    np.testing.assert_allclose(f10, expected, rtol=1e-6, atol=1e-7)
    assert f10[0] == pytest.approx(math.tanh(9.0))
    assert f10[2] == pytest.approx(0.0, abs=1e-7)  # t == timescale
    paper = np.asarray(common.tanh_time_features(10, shift=0.0))
    assert paper[2] == pytest.approx(math.tanh(1.0))


def test_decay_parameterisation():
    np.testing.assert_allclose(common.offset_decays((0.9, 0.999), jnp.zeros(2)), [0.9, 0.999],
                               rtol=1e-6)
    # offset log(2)/10 doubles 1 - beta
    np.testing.assert_allclose(common.offset_decays((0.9,), jnp.array([math.log(2) / 10])),
                               [0.8], rtol=1e-6)
    assert float(common.param_to_decay(common.decay_to_param(0.99))) == pytest.approx(0.99)


def test_mlp_init_and_sizes():
    nn = common.init_mlp(jax.random.PRNGKey(0), [39, 4, 4, 2])  # any sequence of sizes
    # one compiled program, the same values as sampled layer by layer outside jit
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    for i, (fan_in, fan_out) in enumerate([(39, 4), (4, 4), (4, 2)]):
        w = jax.random.truncated_normal(keys[i], -2.0, 2.0, (fan_in, fan_out), jnp.float32)
        np.testing.assert_array_equal(np.asarray(nn[f"w{i}"]), np.asarray(w / math.sqrt(fan_in)))
    assert sum(x.size for x in jax.tree.leaves(nn)) == 190
    w0 = np.asarray(nn["w0"])
    assert np.abs(w0).max() <= 2 / math.sqrt(39) + 1e-6  # truncated at two std
    assert not np.any(np.asarray(nn["b0"]))
    assert common.tree_bytes(nn) == 190 * 4
