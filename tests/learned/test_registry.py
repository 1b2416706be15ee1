"""Every registered learned optimizer, through one code path: trains the quadratic and a
small MLP with finite loss from its initial theta; its state survives jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.learned.registry import LEARNED, get_learned_optimizer, list_learned_optimizers
from learnopt.tasks.models import standard as models
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask

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
