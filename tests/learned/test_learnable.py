"""Learnable SGD / SGDM / Adam equal the optax optimizers at the decoded hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.learned.learnable import LearnableAdam, LearnableSGD, LearnableSGDM

KEY = jax.random.PRNGKey(0)


def _params():
    # Rank 0, 1, 2 and 4 tensors (a conv kernel is rank 4), per the design conventions.
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    return {
        "scalar": jax.random.normal(k[0], ()),
        "bias": jax.random.normal(k[1], (3,)),
        "dense": jax.random.normal(k[2], (4, 3)),
        "conv": jax.random.normal(k[3], (3, 3, 2, 4)),
    }


def _run(opt, params, num_steps=6):
    """Params after ``num_steps`` updates with deterministic pseudo-gradients."""
    state = opt.init(params)
    for i in range(num_steps):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
        grads = jax.tree_util.tree_unflatten(
            treedef, [p + jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
        )
        updates, state = opt.update(grads, state, params, loss=jnp.asarray(1.0))
        params = optax.apply_updates(params, updates)
    return params


def _assert_trees(a, b, exact=True, rtol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.shape == y.shape
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def test_sgd_equals_optax_sgd():
    lopt = LearnableSGD(initial_lr=0.1)
    theta = lopt.init(KEY)
    assert set(theta) == {"log_lr"}
    lr = lopt.hyperparameters(theta)["learning_rate"]
    # float32 exp(log(0.1)) is 0.1 within one ulp.
    assert abs(float(lr) - 0.1) <= float(np.spacing(np.float32(0.1)))
    params = _params()
    ours = _run(lopt.optimizer(theta, num_steps=10), params)
    _assert_trees(ours, _run(optax.sgd(lr), params))
    _assert_trees(ours, _run(optax.sgd(0.1), params), exact=False, rtol=1e-6)
    # One step by hand: x - lr * g.
    x = jnp.arange(3.0)
    g = jnp.ones(3)
    upd, _ = lopt.optimizer(theta, 10).update(g, lopt.optimizer(theta, 10).init(x), x, loss=0.0)
    np.testing.assert_allclose(np.asarray(x + upd), [-0.1, 0.9, 1.9], rtol=1e-6)


def test_sgdm_equals_optax_momentum():
    lopt = LearnableSGDM(initial_lr=0.05, initial_momentum=0.9)
    theta = lopt.init(KEY)
    assert set(theta) == {"log_lr", "momentum_logit"}
    h = lopt.hyperparameters(theta)
    np.testing.assert_allclose(float(h["momentum"]), 0.9, rtol=1e-6)
    params = _params()
    ours = _run(lopt.optimizer(theta, 10), params)
    _assert_trees(ours, _run(optax.sgd(h["learning_rate"], momentum=h["momentum"]), params))
    _assert_trees(ours, _run(optax.sgd(0.05, momentum=0.9), params), exact=False, rtol=1e-5)
    # Two steps by hand: u1 = -lr g1, u2 = -lr (g2 + m g1).
    opt = lopt.optimizer(theta, 10)
    x = jnp.zeros(2)
    u1, s = opt.update(jnp.array([1.0, 2.0]), opt.init(x), x, loss=0.0)
    u2, _ = opt.update(jnp.array([3.0, -1.0]), s, x + u1, loss=0.0)
    np.testing.assert_allclose(np.asarray(u1), [-0.05, -0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u2), [-0.05 * 3.9, -0.05 * 0.8], rtol=1e-5)


def test_adam_equals_optax_adam():
    lopt = LearnableAdam(initial_lr=1e-2, initial_b1=0.8, initial_b2=0.99, initial_eps=1e-6)
    theta = lopt.init(KEY)
    assert set(theta) == {"log_lr", "b1_logit", "b2_logit", "log_eps"}
    h = lopt.hyperparameters(theta)
    for name, want in (("learning_rate", 1e-2), ("b1", 0.8), ("b2", 0.99), ("eps", 1e-6)):
        np.testing.assert_allclose(float(h[name]), want, rtol=1e-6)
    params = _params()
    ours = _run(lopt.optimizer(theta, 10), params)
    same = optax.adam(h["learning_rate"], b1=h["b1"], b2=h["b2"], eps=h["eps"])
    _assert_trees(ours, _run(same, params))
    nominal = optax.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6)
    _assert_trees(ours, _run(nominal, params), exact=False, rtol=1e-5)
    # First Adam step by hand: bias-corrected m/sqrt(v) = g/|g|, so update = -lr g/(|g| + eps).
    opt = lopt.optimizer(theta, 10)
    x = jnp.zeros(2)
    u, _ = opt.update(jnp.array([0.5, -2.0]), opt.init(x), x, loss=0.0)
    np.testing.assert_allclose(np.asarray(u), [-1e-2, 1e-2], rtol=1e-5)


def test_adam_meta_gradient_is_finite_when_a_gradient_is_exactly_zero():
    # A parameter the loss ignores (a dead ReLU unit) keeps v = 0; through optax.adam's
    # sqrt(v) its meta-gradient was inf * 0 = NaN.
    lopt = LearnableAdam(initial_lr=0.1)

    def meta_loss(theta):
        opt = lopt.optimizer(theta, 3)
        x = jnp.array([1.0, 2.0])
        state = opt.init(x)
        for _ in range(3):
            g = jnp.array([2.0 * x[0], 0.0])  # loss x0^2: x1 gets exactly zero gradient
            u, state = opt.update(g, state, x, loss=0.0)
            x = x + u
        return x[0] ** 2

    grads = jax.grad(meta_loss)(lopt.init(KEY))
    assert all(np.isfinite(float(v)) for v in grads.values()), grads
    assert float(grads["log_lr"]) != 0.0


def test_default_adam_hyperparameters_round_trip():
    h = LearnableAdam().hyperparameters(LearnableAdam().init(KEY))
    np.testing.assert_allclose(float(h["learning_rate"]), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(h["b1"]), 0.9, rtol=1e-7)
    # 1 - b2 = 1e-3 is resolved to float32's spacing near 1 (6e-8): 1e-4 relative.
    np.testing.assert_allclose(1.0 - float(h["b2"]), 1e-3, rtol=1e-4)
    np.testing.assert_allclose(float(h["eps"]), 1e-8, rtol=1e-6)


def test_meta_gradient_of_learning_rate_by_hand():
    # f(x) = 0.5 |x|^2; one SGD step gives x1 = (1 - lr) x0 and
    # L(log_lr) = 0.5 (1 - lr)^2 |x0|^2, so dL/dlog_lr = -lr (1 - lr) |x0|^2.
    lopt = LearnableSGD(initial_lr=0.3)
    x0 = jnp.array([1.0, -2.0, 0.5])

    def loss_after_step(theta):
        opt = lopt.optimizer(theta, 1)
        g = x0
        upd, _ = opt.update(g, opt.init(x0), x0, loss=0.5 * jnp.sum(x0**2))
        x1 = x0 + upd
        return 0.5 * jnp.sum(x1**2)

    theta = lopt.init(KEY)
    got = jax.grad(loss_after_step)(theta)["log_lr"]
    np.testing.assert_allclose(float(got), -0.3 * 0.7 * 5.25, rtol=1e-5)


def test_vmaps_over_a_batch_of_thetas():
    lopt = LearnableSGDM(0.1, 0.5)
    thetas = jax.tree_util.tree_map(lambda x: x + jnp.array([0.0, 0.1]), lopt.init(KEY))

    def step(theta, x):
        opt = lopt.optimizer(theta, 5)
        upd, _ = opt.update(x, opt.init(x), x, loss=0.0)
        return x + upd

    out = jax.vmap(step, in_axes=(0, None))(thetas, jnp.ones(2))
    np.testing.assert_allclose(np.asarray(out[:, 0]), [0.9, 1 - 0.1 * np.exp(0.1)], rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LearnableSGD(initial_lr=0.0),
        lambda: LearnableSGDM(initial_momentum=1.0),
        lambda: LearnableAdam(initial_b2=-0.1),
        lambda: LearnableAdam(initial_eps=0.0),
    ],
)
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError, match="must be in"):
        make()
