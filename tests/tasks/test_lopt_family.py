"""The ``lopt`` family (VeLO, arXiv:2211.09760, App. C.3.9): a meta-objective as a task.

Sampling, round trips, determinism and finite tiny tasks are covered for every family in
test_families_velo.py; here: the meta-loss against a hand-written unroll, its gradient against
finite differences, the batch layout, the sampled distribution and the C.5 exclusions.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.tasks import augment
from learnopt.tasks.families import lopt as L
from learnopt.tasks.families import registry as family_registry
from learnopt.tasks.families import velo as F

TANH = 3  # index of tanh in family_models.ACTIVATIONS: smooth, for finite differences


def sgd_task(num_steps=3, outer=2) -> L.LOptTask:
    inner = F.MLPStatic(image_size=4, hidden_size=4, num_layers=1, batch_size=4)
    static = L.LOptStatic(inner=inner, architecture="learnable_sgd", hidden_size=0,
                          hidden_layers=0, exp_mult=0.0, step_mult=0.0, num_steps=num_steps,
                          outer_batch_size=outer)
    config = L.LOptConfig(static, F.InitActDynamic(init_index=2, init_scale=0.5, activation=TANH))
    return L.LOptTask(config, data="synthetic")


@pytest.fixture(scope="module")
def task():
    return sgd_task()


@pytest.fixture(scope="module")
def batch(task):
    return task.datasets.train.sample(jax.random.PRNGKey(3))


def test_batch_stacks_outer_batch_and_steps_plus_one(task, batch):
    assert batch["image"].shape == (2, 4, 4, 4, 4, 1)  # outer 2, steps 3 + 1, batch 4, 4x4x1
    assert batch["label"].shape == (2, 4, 4)
    abstract = task.abstract_batch()
    assert {k: v.shape for k, v in abstract.items()} == {k: v.shape for k, v in batch.items()}
    split = task.datasets.train
    assert {k: v.shape for k, v in split.abstract_batch().items()} == {
        k: v.shape for k, v in batch.items()
    }
    a, b = next(split.iterator(7)), next(split.iterator(7))
    np.testing.assert_array_equal(a["image"], b["image"])  # deterministic in the seed
    assert a["image"].shape == batch["image"].shape
    # The stacked inner batches are distinct draws.
    assert not np.array_equal(np.asarray(batch["image"][0, 0]), np.asarray(batch["image"][0, 1]))


def test_meta_loss_equals_a_hand_written_sgd_unroll(task, batch):
    lr = 0.3
    key = jax.random.PRNGKey(5)
    got = float(task.loss({"log_lr": jnp.asarray(math.log(lr))}, key, batch))
    inner = task.inner

    @jax.jit
    def by_hand(batch):
        per_run = []
        for i, k in enumerate(jax.random.split(key, 2)):
            k_init, k_steps = jax.random.split(k)
            keys = jax.random.split(k_steps, 4)
            params = inner.init(k_init)
            after = []
            for t in range(3):
                b = jax.tree_util.tree_map(lambda x, i=i, t=t: x[i, t], batch)
                g = jax.grad(inner.loss)(params, keys[t], b)
                params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, g)
                nxt = jax.tree_util.tree_map(lambda x, i=i, t=t: x[i, t + 1], batch)
                after.append(inner.normalizer(inner.loss(params, keys[t + 1], nxt)))
            per_run.append(sum(after) / 3)
        return sum(per_run) / 2

    assert got == pytest.approx(float(by_hand(batch)), rel=1e-5, abs=1e-5)


def test_meta_gradient_matches_central_differences(task, batch):
    key = jax.random.PRNGKey(5)
    f = jax.jit(lambda log_lr: task.loss({"log_lr": log_lr}, key, batch))
    x = jnp.asarray(math.log(0.3))
    grad = float(jax.grad(f)(x))
    eps = 1e-2
    fd = (float(f(x + eps)) - float(f(x - eps))) / (2 * eps)
    assert abs(grad) > 1e-3  # the meta-loss depends on the learning rate
    assert grad == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_one_inner_step_still_has_a_meta_gradient():
    # The loss is taken after each update, so even num_steps=1 depends on theta.
    t = sgd_task(num_steps=1, outer=1)
    b = t.datasets.train.sample(jax.random.PRNGKey(0))
    g = jax.grad(lambda lr: t.loss({"log_lr": lr}, jax.random.PRNGKey(1), b))(jnp.log(0.3))
    assert abs(float(g)) > 1e-4


def test_sampled_distribution_covers_the_architectures_and_ranges():
    family = L.LOptFamily(size="paper", data="synthetic")
    configs = [family.sample(jax.random.PRNGKey(i)) for i in range(300)]
    arch = collections.Counter(c.static.architecture for c in configs)
    assert set(arch) == set(L.ARCHITECTURES)
    assert all(40 <= n <= 80 for n in arch.values()), arch  # uniform over 5: 60 expected
    mlp = [c.static for c in configs if c.static.architecture in L.MLP_ARCHITECTURES]
    other = [c.static for c in configs if c.static.architecture not in L.MLP_ARCHITECTURES]
    assert all(s.hidden_size == 0 and s.exp_mult == 0.0 for s in other)
    hidden = np.array([s.hidden_size for s in mlp])
    assert hidden.min() <= 4 and hidden.max() >= 128  # log-uniform over 2-512
    mults = np.array([s.step_mult for s in mlp])
    assert mults.min() < 1e-4 and mults.max() > 0.1
    assert np.median(np.log10(mults)) == pytest.approx(-2.5, abs=0.6)
    steps = np.array([c.static.num_steps for c in configs])
    assert steps.min() == 1 and steps.max() >= 50
    assert {c.static.outer_batch_size for c in configs} >= {1, 8}


def test_check_rejects_settings_outside_the_ranges():
    family = L.LOptFamily(size="cpu", data="synthetic")
    config = family.sample(jax.random.PRNGKey(0))
    s = config.static
    with pytest.raises(ValueError, match="num_steps"):
        family.check(L.LOptConfig(L.LOptStatic(**{**vars(s), "num_steps": 500}), config.dynamic))
    bad_inner = F.MLPStatic(**{**vars(s.inner), "image_size": 32})
    with pytest.raises(ValueError, match="inner image_size"):
        family.check(L.LOptConfig(L.LOptStatic(**{**vars(s), "inner": bad_inner}),
                                  config.dynamic))
    with pytest.raises(ValueError, match="architecture"):
        family.check(L.LOptConfig(L.LOptStatic(**{**vars(s), "architecture": "velo"}),
                                  config.dynamic))


def test_registered_and_excluded_from_budgets_and_batch_reduction(task):
    assert isinstance(family_registry.get_family("velo_lopt"), L.LOptFamily)
    assert "lopt" not in F.LARGE_BUDGET_FAMILIES  # C.5 lists no LOpt family under a budget
    config = augment.AugmentationConfig(batch_fraction=0.5)
    assert augment.apply(task, config) is task  # batch-size reduction skips LOpt tasks
    mlp = task.inner
    assert augment.apply(mlp, config).datasets.train.batch_size == 2


def test_cost_features_scale_with_the_unroll(task):
    small = task.static.cost_features()
    big = L.LOptStatic(**{**vars(task.static), "num_steps": 30}).cost_features()
    assert big["flops"] == pytest.approx(10 * small["flops"])
    assert big["params"] == small["params"] == task.inner.num_params()
