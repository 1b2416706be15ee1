"""Shipped pretrained optimizers: the self-describing file format and one-line use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt import pretrained
from learnopt.learned.learnable import LearnableAdam

REQUIRED = {
    "architecture",
    "task",
    "estimator",
    "meta_train_config",
    "outer_steps",
    "wall_seconds",
    "machine",
    "command",
    "evaluation",
    "num_meta_params",
}


def test_save_load_round_trip_rebuilds_the_architecture_from_metadata(tmp_path):
    lopt = LearnableAdam(initial_lr=0.02)
    theta = jax.tree_util.tree_map(lambda x: x + 0.25, lopt.init(jax.random.PRNGKey(0)))
    path = tmp_path / "mine.msgpack"
    pretrained.save(path, theta, {"architecture": "learnable_adam", "task": "quadratic_d10"})
    loaded, theta2, meta = pretrained.load(str(path))
    assert isinstance(loaded, LearnableAdam) and meta["task"] == "quadratic_d10"
    for a, b in zip(
        jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(theta2), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    opt = pretrained.optimizer(str(path), num_steps=10)
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params, loss=1.0)
    lr = float(jnp.exp(theta["log_lr"]))
    np.testing.assert_allclose(updates["w"], -lr * np.ones(3), rtol=1e-4)  # Adam's first step
    with pytest.raises(ValueError, match="architecture"):
        pretrained.save(tmp_path / "x.msgpack", theta, {"task": "t"})


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_files_describe_themselves_and_train(name):
    lopt, theta, meta = pretrained.load(name)
    assert REQUIRED <= set(meta)
    assert meta["num_meta_params"] == lopt.num_meta_params()
    opt = pretrained.optimizer(name, num_steps=100)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = opt.init(params)
    loss_fn = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum(p["b"] ** 2)
    for _ in range(20):
        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = opt.update(g, state, params, loss=loss)
        params = optax.apply_updates(params, u)
    assert np.isfinite(float(loss_fn(params))) and float(loss_fn(params)) < 12.0
