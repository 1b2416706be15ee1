"""The user's optax loop and a scan unroll, shared by the learned-optimizer tests: one jitted
step (value_and_grad, update with ``loss=``, apply_updates), the same for optax.adam and a
learned optimizer; plus the small least-squares problem most of those tests train."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

X = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 12.0
Y = jnp.array([1.0, -1.0, 0.5, 2.0], jnp.float32)
QPARAMS = {"w": jnp.full((4, 4), 0.5, jnp.float32), "b": jnp.zeros(4, jnp.float32)}


def quadratic_loss(params):
    """Mean squared error of a 4->4 linear map on 3 fixed inputs (minimum 0 is reachable)."""
    return jnp.mean((X @ params["w"] + params["b"] - Y) ** 2)


def train_run(opt, loss_fn, params, steps: int, compiler_options: dict | None = None):
    """``(per-step losses, final params, final state)`` of ``steps`` jitted steps."""
    state = opt.init(params)

    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    step = jax.jit(step, compiler_options=compiler_options)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return np.array(losses), params, state


def train_like_optax(opt, loss_fn, params, steps: int) -> np.ndarray:
    """Per-step losses of ``steps`` steps of ``opt`` on ``loss_fn`` from ``params``."""
    return train_run(opt, loss_fn, params, steps)[0]


def scan_run(opt, loss_fn, params, steps: int, extra: Callable | None = None):
    """``((final params, final state), per-step losses)`` of a ``lax.scan`` unroll,
    differentiable in ``opt``'s meta-parameters when ``opt`` is built from a traced theta.
    ``extra(loss)`` gives further keyword arguments of ``update`` (e.g. ``valid_loss``)."""

    def body(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        kwargs = extra(loss) if extra else {}
        updates, state = opt.update(grads, state, params, loss=loss, **kwargs)
        return (optax.apply_updates(params, updates), state), loss

    return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)


def scan_losses(opt, loss_fn, params, steps: int, extra: Callable | None = None):
    """``(mean loss, per-step losses)`` of :func:`scan_run`."""
    _, losses = scan_run(opt, loss_fn, params, steps, extra)
    return jnp.mean(losses), losses
