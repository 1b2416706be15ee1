"""VeLO's per-parameter step by the native CPU kernel (its VeLO feature set) against the XLA
path: the same function under jit and vmap, for tensors of rank 0, 1, 2 and 4, and its
meta-gradient. Two steps: the second reads accumulators that the first wrote."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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

from learnopt.learned import native
from learnopt.learned.velo import Velo

pytestmark = [pytest.mark.skipif(not native.available(), reason="numba is not installed"),
              pytest.mark.filterwarnings("error:learnopt. the native kernel")]

LOPT = Velo.small()


def _theta(seed):
    theta = LOPT.init(jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size) + 1.0)
                        .reshape(x.shape), theta)


def _steps(theta, p, count=2):
    return steps(LOPT, theta, p, count, loss=True)


def test_kernel_equals_xla_path_under_jit_and_vmap():
    theta, p = _theta(0), params(1)
    thetas = jax.tree.map(lambda x: jnp.stack([x, 0.9 * x]), theta)

    assert LOPT._native()
    with kernel(False):
        assert not LOPT._native()
    # vmapped: the kernel's batch axis (the first member is the unbatched run)
    got, expected = on_both_paths(jax.vmap(_steps, in_axes=(0, None)), thetas, p)
    assert_close(got, expected, atol=2e-5)  # as small_fc_lopt's kernel test
    updates = jax.tree.leaves(got[0])
    assert all(float(jnp.min(jnp.max(jnp.abs(u), axis=tuple(range(1, u.ndim))))) > 0
               for u in updates)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        updates, jax.tree.leaves(expected[0]), strict=True)) > 0  # not one path twice


def test_meta_gradient_is_the_xla_paths():
    assert_meta_gradient_is_the_xla_paths(lambda theta, p: _steps(theta, p, count=1),
                                          _theta(3), params(2), scale=100.0)


def test_feature_sets():
    """VeLO's 30 inputs in the kernel's order: small_fc_lopt's 28 plus clip(g) and g * r."""
    names, rows, first, nf = native.feature_names(3, True, "velo")
    assert (nf, first, len(names)) == (30, 15, 18)
    assert names[:3] == ["g", "gclip", "p"] and names[14] == "gxr"
    assert native.feature_names(3, True)[2:] == (13, 28)
    assert native.num_full_features(3, "velo") == native.num_full_features(3) + 2 == 18
    with pytest.raises(ValueError, match="features must be one of"):
        native.kernel_source(3, 4, 2, 0, True, "adam")


def test_training_loop_updates_the_accumulators_in_place():
    """In a jitted training loop the kernel writes the new momenta and rms over the loop's own
    arrays: the compiled loop body copies no full-size accumulator, and the result is the XLA
    path's."""
    opt = LOPT.optimizer(_theta(5), 100)
    p = params(6, {"w": (24, 40), "b": (40,)})
    with kernel(True):
        copies, got = loop_copies(opt, p, loss=True)
    assert copies == []
    with kernel(False):
        _, want = loop_copies(opt, p, loss=True)
    assert_close(got, want, atol=2e-5)
