"""Shared by the native-kernel tests: switching the kernel, sample parameters, a few
optimizer steps, and closeness relative to each tensor's largest value."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.learned import native

#: Tensors of rank 0, 1, 2 and 4 (a vector and a scalar take the kernel of rank < 2).
SHAPES = {"s": (), "b": (3,), "w": (20, 30), "k": (3, 3, 2, 4)}


@contextlib.contextmanager
def kernel(enabled: bool):
    """The native kernels on or off for what is traced inside."""
    old = native.set_enabled(enabled)
    try:
        yield
    finally:
        native.set_enabled(old)


def params(seed: int, shapes: dict = SHAPES) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {name: jax.random.normal(key, shape)
            for (name, shape), key in zip(shapes.items(), keys, strict=True)}


def steps(lopt, theta, params, count: int = 3, loss: bool = False):
    """``(updates of the last step, final params, final state)`` after ``count`` steps on
    gradients ``0.1 sin((i + 1) p)``; ``loss``: pass a loss to ``update`` (VeLO needs one)."""
    opt = lopt.optimizer(theta, 100)
    state = opt.init(params)
    for i in range(count):
        grads = jax.tree.map(lambda p, i=i: 0.1 * jnp.sin(p * (i + 1.0)), params)
        extra = {"loss": jnp.float32(2.0 - i)} if loss else {}
        updates, state = opt.update(grads, state, params, **extra)
        params = jax.tree.map(jnp.add, params, updates)
    return updates, params, state


def fresh(fn):
    """A new function object for ``jax.jit``: jit caches traces by function, and which path
    (kernel or XLA) runs is decided when tracing."""
    return lambda *args: fn(*args)


def assert_close(tree, reference, atol: float) -> None:
    """Every leaf within ``atol`` times the reference leaf's largest value (empty leaves,
    the factored state's placeholders, are skipped)."""
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        if np.size(y) == 0:
            continue
        scale = max(float(np.max(np.abs(y))), 1e-30)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol * scale)


def on_both_paths(fn, *args):
    """``(with the kernel, without it)``: ``jit(fn)(*args)`` traced once each way."""
    with kernel(True):
        got = jax.jit(fresh(fn))(*args)
    with kernel(False):
        expected = jax.jit(fresh(fn))(*args)
    return got, expected


def assert_meta_gradient_is_the_xla_paths(lopt_steps, theta, p, scale: float = 1.0) -> None:
    """The meta-gradient of a loss of the last updates of ``lopt_steps(theta, p)`` is the
    same with the kernel (whose ``custom_jvp`` evaluates the XLA path) as without it."""

    def loss(theta):
        updates, _, _ = lopt_steps(theta, p)
        return sum(jnp.sum(jnp.sin(scale * u)) for u in jax.tree.leaves(updates))

    got, expected = on_both_paths(jax.grad(loss), theta)
    assert_close(got, expected, atol=1e-5)


def loop_copies(opt, params, count: int = 3, loss: bool = False) -> tuple[list[str], Any]:
    """Train ``params`` for ``count`` steps of ``opt`` in one ``lax.scan`` (gradients and
    ``loss`` as in :func:`steps`): the lines of the compiled loop body that copy a full-size
    accumulator (an optimizer-state array of ``(k,) + shape`` for a parameter's ``shape`` of
    rank >= 2), and the final ``(params, state)``."""
    def body(carry, i):
        p, s = carry
        grads = jax.tree.map(lambda x: 0.1 * jnp.sin(x * (i + 1.0)), p)
        extra = {"loss": 2.0 - i} if loss else {}
        updates, s = opt.update(grads, s, p, **extra)
        return (jax.tree.map(jnp.add, p, updates), s), None

    steps_ = jnp.arange(count, dtype=jnp.float32)
    run = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), steps_)[0])
    text = run.lower(params).compile().as_text()
    shapes = {x.shape for x in jax.tree.leaves(opt.init(params))
              if any(x.ndim == p.ndim + 1 and x.shape[1:] == p.shape and p.ndim >= 2
                     for p in jax.tree.leaves(params))}
    names = {"f32[" + ",".join(map(str, s)) + "]" for s in shapes}
    assert names, "no full-size accumulator in the state"
    body_name = re.search(r"while\(.*?body=%?([\w.\-]+)", text).group(1)
    block = next(b for b in text.split("\n\n") if re.match(rf"\s*%?{re.escape(body_name)} ", b))
    copies = [line.strip() for line in block.splitlines()
              if re.search(r"= (f32\[[\d,]*\])\{[^}]*\} (copy|fusion)\(", line)
              and re.search(r"= (f32\[[\d,]*\])", line).group(1) in names]
    return copies, run(params)
