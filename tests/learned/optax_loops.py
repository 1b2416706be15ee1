"""The user's optax loop, shared by the learned-optimizer tests: one jitted step
(value_and_grad, update with ``loss=``, apply_updates), the same for optax.adam and a
learned optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def train_like_optax(opt, loss_fn, params, steps: int) -> np.ndarray:
    """Per-step losses of ``steps`` steps of ``opt`` on ``loss_fn`` from ``params``."""
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return np.array(losses)


def scan_losses(opt, loss_fn, params, steps: int):
    """``(mean loss, per-step losses)`` of a ``lax.scan`` unroll: differentiable in ``opt``'s
    meta-parameters when ``opt`` is built from a traced theta."""

    def body(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return jnp.mean(losses), losses
