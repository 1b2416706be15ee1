"""The task contract on tiny synthetic instances: splits, losses, gradients, sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.tasks.base import (
    ArraySplit,
    Task,
    config_from_dict,
    config_to_dict,
    split_indices,
)
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticFamily, QuadraticTask
from learnopt.tasks.fixed.registry import get_task, list_tasks
from learnopt.tasks.image import ImageClassificationTask, image_datasets
from learnopt.tasks.language import LanguageModelTask, text_datasets
from learnopt.tasks.models import standard as models


def tiny_image_task(model, shape=(4, 4), n=60, classes=3, seed=0) -> ImageClassificationTask:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    xt = rng.uniform(size=(12, *shape)).astype(np.float32)
    yt = rng.integers(0, classes, size=12)
    return ImageClassificationTask("tiny", model, image_datasets(x, y, xt, yt, batch_size=5))


def tiny_lm_task() -> LanguageModelTask:
    tokens = np.random.default_rng(0).integers(0, 7, size=400)
    ds = text_datasets(tokens, vocab_size=7, batch_size=3, seq_len=6)
    return LanguageModelTask("tiny_lm", models.CharLSTM(7, embed_size=4, hidden_size=5), ds)


TINY_TASKS = {
    "mlp": lambda: tiny_image_task(models.MLP((5,), 3)),
    "conv": lambda: tiny_image_task(
        models.ConvNet(channels=(2, 3, 3), num_outputs=3), shape=(6, 6, 1)
    ),
    "lstm_lm": tiny_lm_task,
    "quadratic": lambda: QuadraticTask(QuadraticConfig(dim=4, noise_std=0.0)),
}


@pytest.mark.parametrize("name", list(TINY_TASKS))
def test_loss_finite_and_gradient_matches_finite_differences(name):
    task: Task = TINY_TASKS[name]()
    key = jax.random.PRNGKey(1)
    params = task.init(key)
    batch = task.datasets.train.sample(jax.random.PRNGKey(2))
    loss_fn = jax.jit(lambda p: task.loss(p, key, batch))
    loss = loss_fn(params)
    assert np.isfinite(float(loss))
    grads = jax.grad(lambda p: task.loss(p, key, batch))(params)
    # Directional derivative along a random unit direction, by central differences.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    direction = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    norm = math.sqrt(sum(float(jnp.sum(d**2)) for d in direction))
    direction = jax.tree_util.tree_unflatten(treedef, [d / norm for d in direction])
    eps = 1e-3
    shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, direction)
    fd = (float(loss_fn(shifted(1.0))) - float(loss_fn(shifted(-1.0)))) / (2 * eps)
    analytic = sum(
        float(jnp.sum(g * d))
        for g, d in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction), strict=True
        )
    )
    assert abs(fd - analytic) <= 2e-2 * max(1.0, abs(analytic)), (fd, analytic)


def test_classification_loss_at_init_near_log_classes_and_normalizer_clips():
    task = TINY_TASKS["mlp"]()
    params = task.init(jax.random.PRNGKey(0))
    batch = task.datasets.train.sample(jax.random.PRNGKey(0))
    loss = float(task.loss(params, None, batch))
    assert abs(loss - math.log(3)) < 0.5
    cap = 1.5 * math.log(3)
    assert float(task.normalizer(jnp.nan)) == pytest.approx(cap)
    assert float(task.normalizer(jnp.asarray(100.0))) == pytest.approx(cap)
    assert float(task.normalizer(jnp.asarray(0.5))) == pytest.approx(0.5)


def test_splits_disjoint_cover_everything_and_are_deterministic():
    a = split_indices(1000, (0.8, 0.1, 0.1), seed=0)
    b = split_indices(1000, (0.8, 0.1, 0.1), seed=0)
    assert [len(s) for s in a] == [800, 100, 100]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    union = np.concatenate(a)
    assert len(np.unique(union)) == 1000
    assert not set(a[0]) & set(a[1]) and not set(a[0]) & set(a[2]) and not set(a[1]) & set(a[2])


def test_image_splits_hold_disjoint_examples():
    x = np.arange(50, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    ds = image_datasets(x, np.zeros(50), x[:5], np.zeros(5), batch_size=2)
    ids = [set(ds.split(s).arrays["image"][:, 0, 0].tolist()) for s in ("train", "inner_valid")]
    ids.append(set(ds.outer_valid.arrays["image"][:, 0, 0].tolist()))
    assert [len(s) for s in ids] == [40, 5, 5]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    with pytest.raises(ValueError, match="valid splits: train, inner_valid"):
        ds.split("validation")


def test_iterators_and_sampling_are_deterministic_in_the_seed():
    split = ArraySplit({"x": np.arange(20)}, batch_size=4)
    first = [next(it)["x"] for it in [split.iterator(7)] for _ in range(6)]
    again = [next(it)["x"] for it in [split.iterator(7)] for _ in range(6)]
    other = [next(it)["x"] for it in [split.iterator(8)] for _ in range(6)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))
    # One epoch (5 batches) visits every example once.
    assert sorted(np.concatenate(first[:5]).tolist()) == list(range(20))
    k = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(split.sample(k)["x"], split.sample(k)["x"])


def test_text_splits_are_contiguous_and_disjoint():
    tokens = np.arange(1000) % 50
    ds = text_datasets(tokens, 50, batch_size=2, seq_len=4)
    sizes = [len(ds.split(s).tokens) for s in ("train", "inner_valid", "outer_valid", "test")]
    assert sizes == [800, 100, 50, 50]
    batch = ds.train.sample(jax.random.PRNGKey(0))["tokens"]
    assert batch.shape == (2, 5)
    np.testing.assert_array_equal(np.diff(np.asarray(batch), axis=1) % 50, 1)


def test_paper_parameter_counts():
    def count(model, shape):
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
        return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables))

    # Metz et al. 2022 (arXiv:2203.11860) App. B: the Fashion-MNIST MLP (118,282) and the
    # CIFAR-10 ConvNet (56,970).
    assert count(models.MLP((128, 128), 10), (28, 28)) == 118_282
    assert count(models.ConvNet(), (32, 32, 3)) == 56_970
    assert count(models.ConvNet(), (28, 28, 1)) == 56_970 - 2 * 9 * 32
    assert count(models.MLP((32,), 10), (8, 8)) == 64 * 32 + 32 + 32 * 10 + 10


def test_adam_reaches_the_quadratic_optimum():
    task = QuadraticTask(QuadraticConfig(dim=5, min_singular=0.5, max_singular=1.0, seed=3))
    x_star, loss_star = task.optimum()
    params = task.init(jax.random.PRNGKey(0))
    opt = optax.adam(0.05)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(task.loss)(p, None, {})
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt.init(params)), None, length=3000)[0][0]

    final = run(params)
    np.testing.assert_allclose(np.asarray(final["x"]), x_star, atol=1e-3)
    assert float(task.loss(final, None, {})) == pytest.approx(loss_star, abs=1e-5)


def test_quadratic_family_sampling_is_deterministic_and_round_trips():
    fam = QuadraticFamily()
    cfgs = [fam.sample(jax.random.PRNGKey(i)) for i in range(20)]
    assert cfgs == [fam.sample(jax.random.PRNGKey(i)) for i in range(20)]
    assert all(10 <= c.dim <= 1000 for c in cfgs)
    assert 0 < sum(c.noise_std > 0 for c in cfgs) < 20
    for c in cfgs[:3]:
        assert config_from_dict(config_to_dict(c), {"QuadraticConfig": QuadraticConfig}) == c
    with pytest.raises(ValueError, match="unknown config type"):
        config_from_dict({"type": "Nope", "fields": {}}, {"QuadraticConfig": QuadraticConfig})


def test_task_registry_names_and_unknown_name_error():
    names = [e.name for e in list_tasks()]
    assert {"fmnist_mlp_8x8", "fmnist_mlp_28x28", "fmnist_conv", "quadratic_d10"} <= set(names)
    assert any(n.startswith("char_lstm_") for n in names)
    with pytest.raises(ValueError, match="valid tasks: fmnist_mlp_8x8"):
        get_task("mnist_mlp")
    assert get_task("quadratic_d10").num_params() == 10


def test_sampling_first_used_under_jit_does_not_leak_tracers():
    split = ArraySplit({"x": np.arange(10.0)}, batch_size=3)
    first = jax.jit(lambda k: split.sample(k)["x"])(jax.random.PRNGKey(0))
    again = jax.jit(lambda k: split.sample(k)["x"] * 1.0)(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(first, again)
    seq = text_datasets(np.arange(100) % 5, 5, batch_size=2, seq_len=3).train
    jax.jit(lambda k: seq.sample(k)["tokens"])(jax.random.PRNGKey(0))
    assert jax.jit(lambda k: seq.sample(k)["tokens"])(jax.random.PRNGKey(1)).shape == (2, 4)
