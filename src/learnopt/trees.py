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
