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


def test_the_architecture_config_is_saved_and_rebuilt_through_the_registry(tmp_path):
    from learnopt.io import load_checkpoint
    from learnopt.learned.adafac_mlp import SmallFcLOpt
    from learnopt.learned.registry import learned_optimizer_config

    lopt = SmallFcLOpt(hidden_size=6, initial_momentum_decays=(0.5, 0.9, 0.99))
    theta = lopt.init(jax.random.PRNGKey(1))
    spec = learned_optimizer_config(lopt)
    meta = {"architecture": spec["name"], "architecture_config": spec["config"], "task": "t"}
    path = pretrained.save(tmp_path / "wide.msgpack", theta, meta)
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == 1 and ckpt.config == meta  # the metadata is the config
    loaded, theta2, meta2 = pretrained.load(str(path))
    assert meta2 == meta and loaded.config() == lopt.config()
    # 39 inputs -> 6 -> 6 -> 2: 39*6+6 + 6*6+6 + 6*2+2 = 296 weights + 3+1+3 decay logits.
    assert loaded.num_meta_params() == 303 != SmallFcLOpt().num_meta_params()
    for a, b in zip(
        jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(theta2), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_the_shipped_file_is_read_unchanged_with_its_recorded_hyperparameters():
    from learnopt.io import load_checkpoint

    name = "small_fc_lopt_fmnist8"
    path = pretrained.HERE / f"{name}.msgpack"
    assert load_checkpoint(path).format_version == 0  # written before format versions
    lopt, theta, meta = pretrained.load(name)
    assert lopt.config() == meta["architecture_hyperparameters"]
    assert lopt.num_meta_params() == meta["num_meta_params"] == 197
    assert pretrained.describe(name).startswith("small_fc_lopt meta-trained on fmnist_mlp_8x8")


def test_a_corrupt_or_foreign_file_is_refused_naming_it(tmp_path):
    from learnopt.io import CheckpointError, save_checkpoint

    good = (pretrained.HERE / "small_fc_lopt_fmnist8.msgpack").read_bytes()
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match=f"{cut}: not a readable checkpoint"):
        pretrained.load(str(cut))
    foreign = save_checkpoint(tmp_path / "foreign.msgpack", {"w": jnp.ones(2)}, {"task": "t"})
    with pytest.raises(CheckpointError, match="foreign.msgpack: its metadata does not name"):
        pretrained.load(str(foreign))
    wrong = tmp_path / "wrong.msgpack"
    pretrained.save(wrong, {"log_lr": jnp.zeros(3)}, {"architecture": "learnable_sgd"})
    with pytest.raises(CheckpointError, match=r"wrong.msgpack: .*log_lr.* shape \(3,\)"):
        pretrained.load(str(wrong))


def test_the_general_optimizer_records_its_distribution_and_comes_guarded():
    """``small_fc_lopt_general``: meta-trained on a mixture that lists no bench-suite task,
    with its lineage; ``optimizer`` wraps it in the divergence guard (which needs ``loss=``),
    ``guard=False`` gives the bare learned optimizer with the same first update."""
    from learnopt.bench.suite import SUITES

    meta, _ = pretrained.read("small_fc_lopt_general")
    entries = meta["task_distribution"]["entries"]
    assert len(entries) == 14 and meta["architecture"] == "small_fc_lopt"
    named = {e["task"] for e in entries if "task" in e}
    assert not named & set(SUITES["full"])
    assert meta["guard"] == {"blowup_factor": 1.0, "shrink": 0.5}
    assert meta["lineage"][0]["outer_steps"] == 1276
    assert meta["outer_steps"] >= 1000 and meta["meta_train_config"]["init_theta"]
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 0.5)}
    guarded = pretrained.optimizer("small_fc_lopt_general", num_steps=100)
    bare = pretrained.optimizer("small_fc_lopt_general", num_steps=100, guard=False)
    with pytest.raises(ValueError, match="loss"):
        guarded.update(grads, guarded.init(params), params)
    u_guarded, _ = guarded.update(grads, guarded.init(params), params, loss=jnp.asarray(1.0))
    u_bare, _ = bare.update(grads, bare.init(params), params, loss=jnp.asarray(1.0))
    np.testing.assert_allclose(u_guarded["w"], u_bare["w"], rtol=1e-6)
