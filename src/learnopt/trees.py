"""Small pytree utilities shared across the package."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_all_finite(tree: Any) -> jax.Array:
    """A scalar bool array: True when every entry of every leaf of ``tree`` is finite.

    An empty tree is finite. Traceable (usable under ``jit``).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_dot(a: Any, b: Any) -> jax.Array:
    """``sum_leaves sum(a * b)`` in float32 (the inner product of two like-shaped trees)."""
    parts = [
        jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    ]
    return sum(parts, jnp.zeros((), jnp.float32))


def tree_norm(tree: Any) -> jax.Array:
    """The Euclidean norm over all entries of all leaves (float32)."""
    return jnp.sqrt(tree_dot(tree, tree))
