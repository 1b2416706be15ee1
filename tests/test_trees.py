"""learnopt.trees: pytree utilities."""

import jax
import jax.numpy as jnp
import pytest

from learnopt.trees import tree_all_finite


@pytest.mark.parametrize(
    "tree, finite",
    [
        ({"a": jnp.ones(3), "b": (jnp.zeros((2, 2)), jnp.asarray(1.0))}, True),
        ({"a": jnp.ones(3), "b": (jnp.zeros((2, 2)), jnp.asarray(jnp.nan))}, False),
        ({"a": jnp.asarray([1.0, jnp.inf, 0.0])}, False),
        ({"a": -jnp.inf * jnp.ones((1, 1, 1, 1))}, False),
        ({}, True),
    ],
)
def test_tree_all_finite(tree, finite):
    assert bool(tree_all_finite(tree)) is finite
    assert bool(jax.jit(tree_all_finite)(tree)) is finite
