"""Every registered learned optimizer, through one code path: trains the quadratic and a
small MLP with finite loss from its initial theta; its state survives jit and vmap."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.learned.learnable import LearnableSGD as LearnableSGDForTest
from learnopt.learned.registry import (
    LEARNED,
    default_config,
    get_learned_optimizer,
    learned_optimizer_config,
    learned_optimizer_from_config,
    list_learned_optimizers,
)
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask
from learnopt.tasks.models import standard as models

# The paper-size VeLO (2.3M meta-parameters) is counted in test_velo.py with eval_shape;
# velo_small runs the same code here.
NAMES = [n for n in LEARNED if n != "velo"]
QUAD = QuadraticTask(QuadraticConfig(dim=4, min_singular=0.5, max_singular=1.0, seed=0))
MLP = models.MLP((5,), 3)
X = jax.random.uniform(jax.random.PRNGKey(0), (8, 4, 4))
Y = jnp.arange(8) % 3


def mlp_loss(params):
    logits = MLP.apply({"params": params}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def quad_loss(params):
    return QUAD.loss(params, None, {})


def run(opt, loss_fn, params, steps=12):
    def body(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p, loss=loss)
        return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return jnp.append(losses, loss_fn(p))


@pytest.mark.parametrize("name", NAMES)
def test_trains_quadratic_and_mlp_finite_under_jit_and_vmap(name):
    lopt = get_learned_optimizer(name)
    opt = lopt.optimizer(lopt.init(jax.random.PRNGKey(1)), 100)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    quad = jax.jit(jax.vmap(lambda k: run(opt, quad_loss, QUAD.init(k))))(keys)
    mlp_params = jax.vmap(lambda k: MLP.init(k, X[:1])["params"])(keys)
    mlp = jax.jit(jax.vmap(lambda p: run(opt, mlp_loss, p)))(mlp_params)
    for losses in (quad, mlp):
        assert losses.shape == (2, 13) and np.all(np.isfinite(np.asarray(losses)))
        assert np.all(np.asarray(losses[:, -1]) <= np.asarray(losses[:, 0]) * 1.05)
    # vmap is exact: each member equals its own unbatched run.
    single = jax.jit(lambda k: run(opt, quad_loss, QUAD.init(k)))(keys[1])
    np.testing.assert_allclose(quad[1], single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_without_entries_changes_nothing_else(name):
    """Parameters may hold empty tensors (a layer of width 0, an unused embedding): they get
    empty updates, and the other tensors' updates stay finite. Optimizers whose tensors do not
    interact (per-tensor features only) give the others exactly the updates they would get
    alone."""
    lopt = get_learned_optimizer(name)
    opt = lopt.optimizer(lopt.init(jax.random.PRNGKey(1)), 100)
    w = jax.random.normal(jax.random.PRNGKey(3), (6, 5))
    grads = {"w": 0.1 * w, "empty": jnp.zeros((0,)), "empty2": jnp.zeros((3, 0))}
    params = {"w": w, "empty": jnp.zeros((0,)), "empty2": jnp.zeros((3, 0))}

    def two_steps(params, grads):
        state = opt.init(params)
        for _ in range(2):
            u, state = opt.update(grads, state, params, loss=jnp.float32(1.0))
            params = optax.apply_updates(params, u)
        return params

    both = jax.jit(two_steps)(params, grads)
    assert both["empty"].shape == (0,) and both["empty2"].shape == (3, 0)
    assert np.all(np.isfinite(np.asarray(both["w"])))
    assert not np.array_equal(np.asarray(both["w"]), np.asarray(w))
    if name in ("small_fc_lopt", "fc_lopt", "nn_adam", "learnable_sgd", "learnable_sgdm",
                "learnable_adam"):
        alone = jax.jit(two_steps)({"w": w}, {"w": grads["w"]})
        np.testing.assert_array_equal(np.asarray(both["w"]), np.asarray(alone["w"]))


def test_registry_lists_every_architecture_of_the_seeds():
    names = {n for n, _ in list_learned_optimizers()}
    assert {
        "small_fc_lopt",
        "fc_lopt",
        "nn_adam",
        "rnn_fc_lopt",
        "hierarchical_rnn",
        "velo",
    } <= names
    with pytest.raises(ValueError, match="valid: small_fc_lopt"):
        get_learned_optimizer("adam_lstm")


# One non-default hyperparameter (or two) per entry, so a config() that drops a key fails.
NON_DEFAULT = {
    "small_fc_lopt": {"hidden_size": 6, "initial_rms_decays": [0.99]},
    "fc_lopt": {"hidden_size": 8, "decays": [0.5, 0.9]},
    "nn_adam": {"lstm_size": 8, "initial_learning_rate": 1e-3},
    "rnn_fc_lopt": {"lstm_hidden_size": 8, "mlp_hidden": [8], "feature_clip": 5.0},
    "hierarchical_rnn": {"param_hidden": 4, "num_scales": 2, "init_lr_range": [1e-4, 1e-3]},
    "velo": {"lstm_hidden_size": 8, "param_inits": 4},
    "velo_small": {"ff_hidden_size": 6, "mixing": "paper"},
    "learnable_sgd": {"initial_lr": 0.05},
    "learnable_sgdm": {"initial_momentum": 0.5},
    "learnable_adam": {"initial_b2": 0.99},
}


def test_every_entry_has_a_non_default_config_here():
    assert set(NON_DEFAULT) == set(LEARNED)


@pytest.mark.parametrize("name", list(LEARNED))
def test_default_config_round_trips_through_json(name):
    lopt = get_learned_optimizer(name)
    spec = json.loads(json.dumps(learned_optimizer_config(lopt)))
    again = learned_optimizer_from_config(spec["name"], spec["config"])
    assert type(again) is type(lopt) and again.config() == lopt.config() == spec["config"]
    assert again.num_meta_params() == lopt.num_meta_params()  # eval_shape: cheap for velo


@pytest.mark.parametrize("name", list(LEARNED))
def test_config_json_from_config_gives_the_same_optimizer(name):
    lopt = LEARNED[name].constructor(**NON_DEFAULT[name])
    assert lopt.config() != default_config(name)
    spec = json.loads(json.dumps(learned_optimizer_config(lopt)))
    again = learned_optimizer_from_config(spec["name"], spec["config"])
    assert again.config() == lopt.config()
    assert again.num_meta_params() == lopt.num_meta_params()
    key = jax.random.PRNGKey(3)
    theta, theta2 = lopt.init(key), again.init(key)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.asarray([0.5, -0.25])}
    grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.05, params)
    updates = []
    for lo, th in ((lopt, theta), (again, theta2)):
        opt = lo.optimizer(th, 10)
        u, s = opt.update(grads, opt.init(params), params, loss=jnp.asarray(1.5))
        u, _ = opt.update(grads, s, optax.apply_updates(params, u), loss=jnp.asarray(1.2))
        updates.append(u)
    for a, b in zip(*(jax.tree_util.tree_leaves(u) for u in updates), strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(a) != 0) for a in jax.tree_util.tree_leaves(updates[0]))


def test_from_config_rejects_unknown_keys_and_unregistered_optimizers():
    with pytest.raises(ValueError, match=r"unknown config keys \['width'\] .*accepted: hidden"):
        learned_optimizer_from_config("small_fc_lopt", {"width": 3})
    with pytest.raises(ValueError, match="lstm_size must be >= 1"):
        learned_optimizer_from_config("nn_adam", {"lstm_size": 0})

    class Mine(LearnableSGDForTest):
        name = "mine"

    with pytest.raises(ValueError, match="not a registered learned optimizer"):
        learned_optimizer_config(Mine())
