"""VeLO's per-parameter step by the native CPU kernel (its VeLO feature set) against the XLA
path: the same function under jit and vmap, for tensors of rank 0, 1, 2 and 4, and its
meta-gradient. Two steps: the second reads accumulators that the first wrote."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.learned import native
from learnopt.learned.velo import Velo

pytestmark = [pytest.mark.skipif(not native.available(), reason="numba is not installed"),
              pytest.mark.filterwarnings("error:learnopt. the native kernel")]

LOPT = Velo.small()
SHAPES = {"s": (), "b": (3,), "w": (20, 30), "k": (3, 3, 2, 4)}


@contextlib.contextmanager
def kernel(enabled: bool):
    old = native.set_enabled(enabled)
    try:
        yield
    finally:
        native.set_enabled(old)


def _params(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
    return {name: jax.random.normal(key, shape)
            for (name, shape), key in zip(SHAPES.items(), keys, strict=True)}


def _theta(seed):
    theta = LOPT.init(jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size) + 1.0)
                        .reshape(x.shape), theta)


def _steps(theta, params, count=2):
    opt = LOPT.optimizer(theta, 100)
    state = opt.init(params)
    for i in range(count):
        grads = jax.tree.map(lambda p, i=i: 0.1 * jnp.sin(p * (i + 1.0)), params)
        updates, state = opt.update(grads, state, params, loss=jnp.float32(2.0 - i))
        params = jax.tree.map(jnp.add, params, updates)
    return updates, params, state


def _fresh(fn):
    return lambda *args: fn(*args)  # jit caches traces by function; the path is chosen then


def _assert_close(tree, reference, atol):
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        scale = float(np.max(np.abs(y))) if np.size(y) else 0.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                                   atol=atol * max(scale, 1e-30))


def test_kernel_equals_xla_path_under_jit_and_vmap():
    theta, params = _theta(0), _params(1)
    thetas = jax.tree.map(lambda x: jnp.stack([x, 0.9 * x]), theta)

    def both():  # vmapped: the kernel's batch axis; the first member is the unbatched run
        return jax.jit(jax.vmap(_fresh(_steps), in_axes=(0, None)))(thetas, params)

    with kernel(True):
        assert LOPT._native()
        got = both()
    with kernel(False):
        assert not LOPT._native()
        expected = both()
    _assert_close(got, expected, atol=2e-5)  # as small_fc_lopt's kernel test
    updates = jax.tree.leaves(got[0])
    assert all(float(jnp.min(jnp.max(jnp.abs(u), axis=tuple(range(1, u.ndim))))) > 0
               for u in updates)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        updates, jax.tree.leaves(expected[0]), strict=True)) > 0  # not one path twice


def test_meta_gradient_is_the_xla_paths():
    params = _params(2)

    def loss(theta):
        updates, _, _ = _steps(theta, params, count=1)
        return sum(jnp.sum(jnp.sin(100.0 * u)) for u in jax.tree.leaves(updates))

    with kernel(True):
        got = jax.jit(jax.grad(_fresh(loss)))(_theta(3))
    with kernel(False):
        expected = jax.jit(jax.grad(_fresh(loss)))(_theta(3))
    _assert_close(got, expected, atol=1e-5)


def test_feature_sets():
    """VeLO's 30 inputs in the kernel's order: small_fc_lopt's 28 plus clip(g) and g * r."""
    names, rows, first, nf = native.feature_names(3, True, "velo")
    assert (nf, first, len(names)) == (30, 15, 18)
    assert names[:3] == ["g", "gclip", "p"] and names[14] == "gxr"
    assert native.feature_names(3, True)[2:] == (13, 28)
    assert native.num_full_features(3, "velo") == native.num_full_features(3) + 2 == 18
    with pytest.raises(ValueError, match="features must be one of"):
        native.kernel_source(3, 4, 2, 0, True, "adam")
