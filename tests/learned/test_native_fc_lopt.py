"""The native CPU kernel of fc_lopt's update: against a float64 NumPy reference, against the
XLA matmul path (jit, vmap, meta-gradients), and equal bits on any number of threads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import (
    assert_close,
    assert_meta_gradient_is_the_xla_paths,
    kernel,
    loop_copies,
    on_both_paths,
    params,
    steps,
)

from learnopt.learned import common, native, native_fc_lopt
from learnopt.learned.mlp import FcLOpt

pytestmark = [pytest.mark.skipif(not native.available(), reason="numba is not installed"),
              pytest.mark.filterwarnings("error:learnopt. the native kernel")]

T = len(common.TIME_SCALES)


def _arrays(rng, b, n, k, h, layers, num_time):
    def f(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {"p": f(b, n), "g": f(b, n, scale=0.01), "m": f(b, k, n, scale=0.01),
            "decays": rng.uniform(0.0, 1.0, (b, k)).astype(np.float32),
            "w0": f(b, 2 + k + num_time, h, scale=0.5), "b0": f(b, h, scale=0.1),
            "time": f(b, num_time), "wh": f(b, layers - 1, h, h, scale=0.5),
            "bh": f(b, layers - 1, h, scale=0.1), "wo": f(b, h, 2, scale=0.5),
            "bo": f(b, 2, scale=0.1),
            "consts": np.tile(np.asarray([0.01, 0.001, 1e-5, 0.0], np.float32), (b, 1))}


def _reference(a):
    """The update and momenta in float64, written out as the paper's MLP on stacked features."""
    f64 = {name: np.asarray(x, np.float64) for name, x in a.items()}
    updates, moms = [], []
    for b in range(f64["p"].shape[0]):
        d = f64["decays"][b][:, None]
        m = d * f64["m"][b] + (1 - d) * f64["g"][b][None]
        x = np.concatenate([f64["g"][b][None], f64["p"][b][None], m]).T
        x = x / np.sqrt(f64["consts"][b, 2] + np.mean(x**2, axis=0))
        x = np.concatenate([x, np.broadcast_to(f64["time"][b], (x.shape[0],) + f64["time"][b]
                                               .shape)], axis=1)
        h = np.maximum(x @ f64["w0"][b] + f64["b0"][b], 0)
        for li in range(f64["wh"].shape[1]):
            h = np.maximum(h @ f64["wh"][b, li] + f64["bh"][b, li], 0)
        out = h @ f64["wo"][b] + f64["bo"][b]
        exp_mult, step_mult = f64["consts"][b, :2]
        updates.append(-out[:, 0] * np.exp(exp_mult * out[:, 1]) * step_mult)
        moms.append(m)
    return np.stack(updates), np.stack(moms)


# (batch, entries, decays, width, hidden layers, time features): a block's remainder, more
# chunks than threads (9,000 entries: 3 chunks per member), one and three hidden layers
CASES = [(1, 5, 2, 8, 2, T), (2, 9000, 2, 8, 2, T), (3, 300, 3, 4, 1, 2), (1, 260, 3, 4, 3, 2)]


@pytest.mark.parametrize("b, n, k, h, layers, num_time", CASES)
def test_kernel_against_float64_reference(b, n, k, h, layers, num_time):
    a = _arrays(np.random.default_rng(n + layers), b, n, k, h, layers, num_time)
    update, m = _reference(a)
    outs = [native_fc_lopt.numpy_call(k, h, layers, num_time, a, num_threads=threads)
            for threads in (1, 2, 3)]
    np.testing.assert_allclose(outs[0]["update"], update, rtol=0,
                               atol=2e-6 * np.abs(update).max())
    np.testing.assert_allclose(outs[0]["m_out"], m, rtol=0, atol=1e-7)
    for out in outs[1:]:  # the chunks, and so the bits, do not depend on the threads
        assert np.array_equal(out["update"], outs[0]["update"])
        assert np.array_equal(out["m_out"], outs[0]["m_out"])


def test_momenta_in_place():
    a = _arrays(np.random.default_rng(3), 2, 9000, 2, 8, 2, T)
    expected = native_fc_lopt.numpy_call(2, 8, 2, T, a)
    m = a["m"].copy()
    out = native_fc_lopt.numpy_call(2, 8, 2, T, {**a, "m": m}, out={"m_out": m})
    assert out["m_out"] is m and np.array_equal(m, expected["m_out"])
    assert np.array_equal(out["update"], expected["update"])


def test_nonfinite_values_propagate():
    a = _arrays(np.random.default_rng(4), 1, 40, 2, 8, 2, T)
    a["g"][0, 3] = np.nan
    a["bo"][0, 1] = 1e5  # exp(0.01 * ~1e5) overflows: inf steps, as XLA's exp gives
    out = native_fc_lopt.numpy_call(2, 8, 2, T, a)["update"]
    assert np.isnan(out).all()  # a NaN feature makes its normaliser, so every entry, NaN
    a["g"][0, 3] = 0.0
    assert np.isinf(native_fc_lopt.numpy_call(2, 8, 2, T, a)["update"]).all()


LOPT = FcLOpt(hidden_size=8, decays=(0.5, 0.9))


def _theta(seed):
    theta = LOPT.init(jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: x + 0.3 * jnp.sign(jnp.sin(jnp.arange(x.size) + 1.0))
                        .reshape(x.shape), theta)


def _three_steps(theta, p):
    return steps(LOPT, theta, p)


def test_kernel_equals_xla_path_under_jit_and_vmap():
    theta, p = _theta(0), params(1)
    thetas = jax.tree.map(lambda x: jnp.stack([x, 0.9 * x]), theta)

    assert LOPT._native()
    with kernel(False):
        assert not LOPT._native()
    got, expected = on_both_paths(lambda th, ths, p: (
        _three_steps(th, p), jax.vmap(_three_steps, in_axes=(0, None))(ths, p)), theta, thetas, p)
    assert_close(got, expected, atol=2e-6)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree.leaves(got[0][0]), jax.tree.leaves(expected[0][0]), strict=True))
    assert diff > 0  # two computations: equal to rounding, not bit for bit
    assert float(jnp.max(jnp.abs(got[0][0]["w"]))) > 0


def test_meta_gradient_is_the_xla_paths():
    assert_meta_gradient_is_the_xla_paths(_three_steps, _theta(3), params(2))


def test_source_names_its_sizes_and_checks_them():
    src = native_fc_lopt.kernel_source(6, 32, 2, 11)
    assert "K=6, H=32, L=2, T=11" in src and "def xla_entry" in src
    assert native_fc_lopt.group(32) == 8 and native_fc_lopt.group(6) == 2
    with pytest.raises(ValueError, match="layers >= 1"):
        native_fc_lopt.kernel_source(6, 32, 0, 11)


def test_default_kernel_builds():
    """The kernel of the paper's sizes builds (a failure would only warn and fall back)."""
    assert native_fc_lopt.ready(6, 32, 2, T) and FcLOpt()._native()


def test_training_loop_updates_the_momenta_in_place():
    """In a jitted training loop the kernel writes the new momenta over the loop's own array:
    the compiled loop body copies no full-size momentum, and the result is the XLA path's."""
    lopt = FcLOpt()
    opt = lopt.optimizer(lopt.init(jax.random.PRNGKey(3)), 100)
    p = params(4, {"w": (24, 40), "b": (40,)})
    with kernel(True):
        copies, got = loop_copies(opt, p)
    assert copies == []
    with kernel(False):
        _, want = loop_copies(opt, p)
    assert_close(got, want, atol=2e-5)
