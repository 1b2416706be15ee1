"""A learned optimizer as the outer optimizer (Metz et al. 2020, arXiv:2009.11243, App. F.4):
the elementwise clip, the loss feature, online meta-parameters, and that a hand-set theta
descends a quadratic meta-loss through the outer learner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.learned_outer import clip_elementwise, learned_outer_optimizer
from learnopt.meta.learner import Learner


def descent_theta(lopt):
    """small_fc_lopt meta-parameters whose direction output is the normalised gradient:
    hidden units relu(g), relu(-g), output d = relu(g) - relu(-g) = g, magnitude 0, so each
    value moves by -0.001 * g / rms(g)."""
    theta = jax.tree_util.tree_map(jnp.zeros_like, lopt.init(jax.random.PRNGKey(0)))
    nn = dict(theta["nn"])
    nn["w0"] = nn["w0"].at[0, 0].set(1.0).at[0, 1].set(-1.0)
    nn["w1"] = nn["w1"].at[0, 0].set(1.0).at[1, 1].set(1.0)
    nn["w2"] = nn["w2"].at[0, 0].set(1.0).at[1, 0].set(-1.0)
    return {**theta, "nn": nn}


@pytest.fixture(scope="module")
def lopt():
    return get_learned_optimizer("small_fc_lopt")


def test_clip_elementwise():
    tree = {"a": jnp.array([-3.0, -0.05, 0.0, 0.07, 2.0])}
    np.testing.assert_allclose(clip_elementwise(tree, 0.1)["a"], [-0.1, -0.05, 0.0, 0.07, 0.1])
    assert clip_elementwise(tree, None) is tree and clip_elementwise(tree, 0) is tree


def test_clip_is_applied_before_the_outer_optimizer(lopt):
    """Gradients past the clip give the same update as gradients at the clip."""
    theta = lopt.init(jax.random.PRNGKey(1))
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    outer = learned_outer_optimizer(lopt, theta, clip=0.1)
    state = outer.init(params)
    big = {"w": jnp.array([5.0, -7.0, 0.1, -0.1, 30.0, -0.1])}
    at_clip = {"w": jnp.array([0.1, -0.1, 0.1, -0.1, 0.1, -0.1])}
    u_big, _ = outer.update(big, state, params, loss=1.0)
    u_clip, _ = outer.update(at_clip, state, params, loss=1.0)
    np.testing.assert_array_equal(u_big["w"], u_clip["w"])
    # without a clip the two differ (the direction features see the raw gradient)
    free = learned_outer_optimizer(lopt, theta, clip=None)
    u_free, _ = free.update(big, free.init(params), params, loss=1.0)
    assert not np.allclose(u_free["w"], u_clip["w"])


def test_default_clip_is_a_tenth():
    import inspect

    sig = inspect.signature(learned_outer_optimizer)
    assert sig.parameters["clip"].default == 0.1


def test_bad_clip_is_refused(lopt):
    with pytest.raises(ValueError, match="clip"):
        learned_outer_optimizer(lopt, None, clip=-1.0)


def test_online_theta_overrides_and_does_not_recompile(lopt):
    params = {"w": jnp.ones(4)}
    outer = learned_outer_optimizer(lopt, None)
    state = outer.init(params)
    grads = {"w": jnp.array([0.05, -0.02, 0.01, 0.0])}
    traces = []

    @jax.jit
    def step(theta):
        traces.append(1)
        return outer.update(grads, state, params, loss=0.5, outer_theta=theta)[0]

    a = step(lopt.init(jax.random.PRNGKey(2)))
    b = step(descent_theta(lopt))
    assert len(traces) == 1
    assert not np.allclose(a["w"], b["w"])
    with pytest.raises(ValueError, match="outer_theta"):
        outer.update(grads, state, params)


def test_loss_reaches_an_optimizer_with_loss_features():
    """rnn_fc_lopt reads loss and valid_loss: both get the outer loss."""
    lopt = get_learned_optimizer("rnn_fc_lopt")
    theta = lopt.init(jax.random.PRNGKey(0))
    params = {"w": jnp.ones(3)}
    outer = learned_outer_optimizer(lopt, theta)
    state = outer.init(params)
    g = {"w": jnp.array([0.01, -0.02, 0.03])}
    u1, _ = outer.update(g, state, params, loss=1.0)
    u2, _ = outer.update(g, state, params, loss=5.0)
    assert np.all(np.isfinite(u1["w"])) and np.all(np.isfinite(u2["w"]))


def test_hand_set_theta_reduces_a_quadratic_meta_loss_through_the_learner(lopt):
    """The outer learner with a learned outer optimizer (descent_theta) trains a fresh
    small_fc_lopt theta on the meta-loss 0.5 ||theta - target||^2."""
    start = lopt.init(jax.random.PRNGKey(3))
    target = jax.tree_util.tree_map(lambda x: x + 0.3, start)

    def meta_loss(theta):
        sq = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), theta, target)
        return 0.5 * sum(jax.tree_util.tree_leaves(sq))

    learner = Learner(optimizer=learned_outer_optimizer(lopt, descent_theta(lopt), clip=0.1),
                      max_staleness=None)
    state = learner.init(start)
    first = float(meta_loss(start))
    grad_fn = jax.jit(jax.value_and_grad(meta_loss))
    for _ in range(150):
        loss, grad = grad_fn(state.theta)
        state, applied = learner.apply(state, grad, loss=loss)
        assert applied
    last = float(meta_loss(state.theta))
    assert last < 0.5 * first, (first, last)
    # Adam-free: the step is ~1e-3 per value, as small_fc_lopt's output scale sets it
    moved = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), state.theta, start)
    assert max(float(x) for x in jax.tree_util.tree_leaves(moved)) < 0.35


def test_nonfinite_updates_are_dropped(lopt):
    theta = lopt.init(jax.random.PRNGKey(0))
    bad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), theta)
    learner = Learner(optimizer=learned_outer_optimizer(lopt, None), max_staleness=None)
    state = learner.init(theta)
    grad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.01), theta)
    new, applied = learner.apply(state, grad, loss=1.0, outer_theta=bad)
    assert not applied and int(new.num_dropped) == 1
    for a, b in zip(jax.tree_util.tree_leaves(new.theta), jax.tree_util.tree_leaves(theta),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_learner_is_unchanged():
    """The added optimizer argument leaves the default clipped Adam as it was."""
    theta = {"w": jnp.array([1.0, -2.0])}
    grad = {"w": jnp.array([10.0, -0.5])}
    learner = Learner(1e-2, clip=3.0)
    state, ok = learner.apply(learner.init(theta), grad)
    ref = optax.chain(optax.clip(3.0), optax.adam(1e-2))
    upd, _ = ref.update(grad, ref.init(theta), theta)
    assert ok
    np.testing.assert_allclose(state.theta["w"], theta["w"] + upd["w"], rtol=1e-6)
