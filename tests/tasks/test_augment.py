"""VeLO's task augmentations (Metz et al. 2022, VeLO, arXiv:2211.09760, App. C.5): each
one's effect, checked by number."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from learnopt import training
from learnopt.step import init_train_state
from learnopt.tasks import augment as A
from learnopt.tasks.augment import wrappers
from learnopt.tasks.base import (
    Datasets,
    NoDataSplit,
    SequenceSplit,
    Task,
    config_from_dict,
    config_to_dict,
)
from learnopt.tasks.image import ImageClassificationTask, image_datasets
from learnopt.tasks.models import standard as models

SHAPES = {"a": (), "b": (3,), "c": (2, 3), "d": (2, 1, 2, 3)}  # ranks 0, 1, 2 and 4
DIM = sum(math.prod(s) for s in SHAPES.values())  # 22


class ToyTask(Task):
    """``0.5 ||M z - y||^2 (+ sum(c * sin z))`` over the flattened rank-0/1/2/4 tensors."""

    name = "toy"

    def __init__(self, nonlinear: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.m = jnp.asarray(rng.normal(size=(DIM, DIM)) / math.sqrt(DIM), jnp.float32)
        self.y = jnp.asarray(rng.normal(size=DIM), jnp.float32)
        self.c = jnp.asarray(rng.normal(size=DIM), jnp.float32)
        self.nonlinear = nonlinear

    def init(self, key):  # one draw, cut into the tensors (cheap to compile)
        z = jax.random.normal(key, (DIM,))
        return A.unflatten_vector(z, {n: jnp.zeros(s) for n, s in SHAPES.items()})

    def loss(self, params, key, batch):
        z = ravel_pytree(params)[0].astype(jnp.float32)
        loss = 0.5 * jnp.sum((self.m @ z - self.y) ** 2)
        if self.nonlinear:
            loss = loss + jnp.sum(self.c * jnp.sin(z))
        return loss


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


# -- 1. reparameterisation ------------------------------------------------------------------


@pytest.mark.parametrize("level", ["global", "tensor", "parameter"])
def test_reparameterisation_keeps_the_function_and_rescales_the_gradient(level):
    inner = ToyTask(nonlinear=True)
    task = A.reparameterize_random(inner, level, (0.01, 100.0), seed=5)
    key = jax.random.PRNGKey(0)
    scales = task.scales()
    for s, shape in zip(jax.tree_util.tree_leaves(scales), SHAPES.values(), strict=True):
        assert np.shape(s) == (shape if level == "parameter" else ())
        assert np.all((np.asarray(s) >= 0.01) & (np.asarray(s) <= 100.0))
    leaf_scales = [np.asarray(s) for s in jax.tree_util.tree_leaves(scales)]
    distinct = len({float(s.ravel()[0]) for s in leaf_scales})
    assert distinct == (1 if level == "global" else len(SHAPES))

    @jax.jit
    def run(key):
        v = task.init(key)
        w = task.inner_params(v)
        return (
            task.loss(v, key, {}),
            inner.loss(inner.init(key), key, {}),
            jax.grad(task.loss)(v, key, {}),
            jax.grad(inner.loss)(w, key, {}),
            v,
            inner.init(key),
        )

    loss_v, loss_w0, grad_v, grad_w, v, w0 = run(key)
    assert float(loss_v) == pytest.approx(float(loss_w0), rel=1e-5)  # same function at init

    def full(scales):
        return flat(jax.tree_util.tree_map(lambda s, x: jnp.broadcast_to(s, x.shape), scales, v))

    assert np.allclose(flat(v) * full(scales), flat(w0), rtol=1e-5)  # v0 = w0 / s
    # chain rule: w = s * v, so dL/dv = s * dL/dw
    assert np.allclose(flat(grad_v), full(scales) * flat(grad_w), rtol=1e-4, atol=1e-6)
    # deterministic in the seed, different for another seed
    again = A.reparameterize_random(inner, level, (0.01, 100.0), seed=5).scales()
    other = A.reparameterize_random(inner, level, (0.01, 100.0), seed=6).scales()
    assert np.array_equal(full(again), full(scales))
    assert not np.allclose(full(other), full(scales))


def test_explicit_reparameterisation_and_none_level():
    inner = ToyTask()
    assert A.reparameterize_random(inner, "none", (0.1, 10.0), seed=0) is inner
    task = A.reparameterize(inner, 10.0)
    v = task.init(jax.random.PRNGKey(0))
    assert np.allclose(flat(v) * 10.0, flat(inner.init(jax.random.PRNGKey(0))), rtol=1e-6)
    per_tensor = {n: float(i + 1) for i, n in enumerate(SHAPES)}
    task = A.reparameterize(inner, per_tensor)
    assert float(task.inner_params(v)["d"].ravel()[0]) == pytest.approx(
        4 * float(v["d"].ravel()[0])
    )
    with pytest.raises(ValueError, match="structure"):
        A.reparameterize(inner, {"a": 1.0})
    with pytest.raises(ValueError, match="level"):
        A.reparameterize_random(inner, "layer", (0.1, 10.0), seed=0)


# -- 2. ES estimates ------------------------------------------------------------------------


def test_es_estimate_is_unbiased_on_a_quadratic():
    inner = ToyTask()
    task = A.es_gradient(inner, std=0.05, num_pairs=2)
    params = inner.init(jax.random.PRNGKey(0))
    true = flat(jax.grad(inner.loss)(params, None, {}))
    keys = jax.random.split(jax.random.PRNGKey(1), 3000)

    @jax.jit
    def estimates(keys):
        losses, grads = jax.vmap(lambda k: jax.value_and_grad(task.loss)(params, k, {}))(keys)
        return losses, jax.vmap(lambda g: ravel_pytree(g)[0])(grads)

    losses, samples = (np.asarray(x) for x in estimates(keys))
    assert np.allclose(losses, float(inner.loss(params, None, {})), rtol=1e-6)
    assert not np.allclose(samples[0], samples[1])  # a random estimate, not the gradient
    stderr = samples.std(0) / math.sqrt(len(samples))
    z = (samples.mean(0) - true) / stderr
    assert np.max(np.abs(z)) < 5.0, z  # unbiased: within a few standard errors, all 22
    # same key, same estimate
    k = jax.random.PRNGKey(9)
    g1, g2 = (flat(jax.grad(task.loss)(params, k, {})) for _ in range(2))
    assert np.array_equal(g1, g2)


# -- 3. batch-size reduction ----------------------------------------------------------------


def tiny_image_task(n=120, batch_size=10) -> ImageClassificationTask:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    xt, yt = x[:12], y[:12]
    ds = image_datasets(x, y, xt, yt, batch_size=batch_size)
    return ImageClassificationTask("tiny", models.MLP((5,), 3), ds)


def test_batch_size_reduction_gives_the_smaller_batch():
    inner = tiny_image_task()
    task = A.reduce_batch_size(inner, 0.35)
    assert A.reduce_batch_size(inner, 1.0) is inner
    for name in ("train", "inner_valid", "outer_valid", "test"):
        split = task.datasets.split(name)
        assert split.batch_size == 3  # int(10 * 0.35); the test split has min(10, 12) = 10
        batch = split.sample(jax.random.PRNGKey(0))
        assert batch["image"].shape == (3, 4, 4) and batch["label"].shape == (3,)
        assert next(split.iterator(0))["image"].shape == (3, 4, 4)
        assert split.abstract_batch()["image"].shape == (3, 4, 4)
    assert A.reduce_batch_size(inner, 0.01).datasets.train.batch_size == 1  # at least one
    tokens = np.arange(200) % 7
    seq = SequenceSplit(tokens, batch_size=8, seq_len=5)
    nodata = NoDataSplit()
    generic = wrappers._SlicedSplit(seq, 1.0)  # a split type the wrapper does not know
    lm = ToyTask()
    lm.datasets = Datasets(seq, generic, nodata, seq)
    reduced = A.reduce_batch_size(lm, 0.5).datasets
    assert reduced.train.sample(jax.random.PRNGKey(0))["tokens"].shape == (4, 6)
    assert reduced.inner_valid.sample(jax.random.PRNGKey(0))["tokens"].shape == (4, 6)
    assert reduced.inner_valid.abstract_batch()["tokens"].shape == (4, 6)
    assert reduced.outer_valid is nodata
    with pytest.raises(ValueError, match="fraction"):
        A.reduce_batch_size(inner, 0.0)


# -- 4. bfloat16 ------------------------------------------------------------------------------


def test_bfloat16_changes_dtypes_and_keeps_the_loss_within_tolerance():
    inner = tiny_image_task()
    task = A.to_bfloat16(inner)
    key = jax.random.PRNGKey(0)
    batch = inner.datasets.train.sample(key)

    @jax.jit
    def run(key, batch):
        p32, p16 = inner.init(key), task.init(key)
        return (
            p16,
            jax.value_and_grad(task.loss)(p16, key, batch),
            inner.loss(p32, key, batch),
            task.metrics(p16, batch),
        )

    p16, (loss16, grads16), loss32, metrics = run(key, batch)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(grads16))
    assert loss16.dtype == jnp.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    assert float(loss16) != float(loss32)  # computed in bfloat16
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    labels = wrappers._to_bf16(batch)["label"]
    assert labels.dtype == batch["label"].dtype  # integer data untouched


# -- 5. gradient normalisation -------------------------------------------------------------


def test_gradient_normalisation_gives_unit_norm():
    inner = ToyTask(nonlinear=True)
    params = inner.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    true = jax.grad(inner.loss)(params, key, {})
    g = jax.grad(A.normalize_gradient(inner).loss)(params, key, {})
    assert np.linalg.norm(flat(g)) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(flat(g), flat(true) / np.linalg.norm(flat(true)), rtol=1e-5)
    gt = jax.grad(A.normalize_gradient(inner, "tensor").loss)(params, key, {})
    for name in SHAPES:
        assert np.linalg.norm(np.asarray(gt[name])) == pytest.approx(1.0, rel=1e-5)
    assert float(A.normalize_gradient(inner).loss(params, key, {})) == float(
        inner.loss(params, key, {})
    )
    gz = jax.grad(A.normalize_gradient(ZeroGradTask()).loss)({"x": jnp.ones(3)}, key, {})
    assert np.array_equal(np.asarray(gz["x"]), np.zeros(3))  # zero stays zero, no NaN


class ZeroGradTask(Task):
    name = "flat"

    def init(self, key):
        return {"x": jnp.ones(3)}

    def loss(self, params, key, batch):
        return 0.0 * jnp.sum(params["x"])


# -- 6. directional-gradient subspace ------------------------------------------------------


def test_directional_expectation_factor():
    assert A.directional_expectation_factor(2, sign=True) == pytest.approx(2 / math.pi)
    assert A.directional_expectation_factor(3, sign=True) == pytest.approx(0.5)
    assert A.directional_expectation_factor(10_000, sign=True) == pytest.approx(
        math.sqrt(2 / (math.pi * 10_000)), rel=1e-3
    )
    assert A.directional_expectation_factor(7, sign=False) == pytest.approx(1 / 7)


@pytest.mark.parametrize("sign", [False, True])
def test_directional_subspace_expectation_matches_the_factor(sign):
    inner = ToyTask()
    task = A.directional_gradient(inner, num_directions=3, sign=sign)
    params = inner.init(jax.random.PRNGKey(0))
    true = flat(jax.grad(inner.loss)(params, None, {}))
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    samples = np.asarray(
        jax.jit(jax.vmap(lambda k: ravel_pytree(jax.grad(task.loss)(params, k, {}))[0]))(keys)
    )
    factor = A.directional_expectation_factor(DIM, sign)
    expected = factor * (true / np.linalg.norm(true) if sign else true)
    z = (samples.mean(0) - expected) / (samples.std(0) / math.sqrt(len(samples)))
    assert np.max(np.abs(z)) < 5.0, z
    if sign:  # each direction contributes a unit vector: the average has norm <= 1
        assert np.all(np.linalg.norm(samples, axis=1) <= 1.0 + 1e-5)


def test_single_direction_estimate_lies_along_one_direction():
    inner = ToyTask()
    task = A.directional_gradient(inner, num_directions=1)
    params = inner.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(3)
    g = flat(jax.grad(task.loss)(params, key, {}))
    true = flat(jax.grad(inner.loss)(params, key, {}))
    # g = <true, u> u with |u| = 1, so <g, true> = <true, u>^2 = |g|^2
    assert float(g @ true) == pytest.approx(float(g @ g), rel=1e-4)


# -- 7. delayed gradients ------------------------------------------------------------------


class CounterTask(Task):
    """``0.5 ||x||^2``: the gradient is the parameters, so it reads out which step's x."""

    name = "counter"

    def init(self, key):
        return {"x": jnp.zeros(2)}

    def loss(self, params, key, batch):
        return 0.5 * jnp.sum(params["x"] ** 2)


@pytest.mark.parametrize("delay", [1, 3])
def test_delayed_gradients_return_the_gradient_from_k_steps_ago(delay):
    task = A.delayed_gradients(CounterTask(), delay)
    tg = (task)
    x0 = {"x": jnp.full(2, 1.0)}

    def step(state, t):  # the parameters of step t hold the counter t + 1
        params = {"x": jnp.full(2, t + 1.0)}
        (loss, grads), state = tg.value_and_grad(params, jax.random.PRNGKey(0), {}, state)
        return state, (loss, grads["x"][0])

    run = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(10.0)))
    _, (losses, seen) = run(tg.grad_state_init(x0))
    t = np.arange(10)
    expected = np.maximum(t - delay, 0) + 1.0  # x_{t-k}; the initial x before step k
    assert np.array_equal(np.asarray(seen), expected)
    assert np.allclose(np.asarray(losses), expected**2)  # the stale loss 0.5 * 2 * x^2


def test_delays_compose_and_plain_tasks_need_no_state():
    tg = (A.delayed_gradients(A.delayed_gradients(CounterTask(), 2), 3))
    state = tg.grad_state_init({"x": jnp.zeros(2)})
    seen = []
    for t in range(9):
        (_, g), state = tg.value_and_grad({"x": jnp.full(2, float(t))}, None, {}, state)
        seen.append(float(g["x"][0]))
    assert seen == [0.0] * 6 + [1.0, 2.0, 3.0]  # 2 + 3 = 5 steps late
    plain = CounterTask()
    assert plain.grad_state_init({"x": jnp.ones(2)}) == ()
    (loss, g), state = plain.value_and_grad({"x": jnp.ones(2)}, None, {}, ())
    assert float(loss) == 1.0 and np.allclose(g["x"], 1.0) and state == ()
    delayed = A.delayed_gradients(CounterTask(), 2)
    assert delayed.has_gradient_state and not CounterTask().has_gradient_state
    with pytest.raises(ValueError, match="delayed_gradients last"):
        A.to_bfloat16(delayed)
    with pytest.raises(ValueError, match="delay"):
        A.delayed_gradients(CounterTask(), 0)


# -- sampling and applying ---------------------------------------------------------------


@pytest.fixture(scope="module")
def samples():
    return [A.sample_augmentation(jax.random.PRNGKey(i)) for i in range(3000)]


def test_sampled_probabilities_match_the_paper(samples):
    n = len(samples)

    def close(count, p, total=n):
        return abs(count / total - p) < 4.5 * math.sqrt(p * (1 - p) / total)

    assert close(sum(c.es_pairs > 0 for c in samples), 0.08)
    assert close(sum(c.batch_fraction < 1 for c in samples), 0.2)
    assert close(sum(c.bf16 for c in samples), 0.2)
    assert close(sum(c.normalize_gradient for c in samples), 0.05)
    assert close(sum(c.num_directions > 0 for c in samples), 0.08)
    assert close(sum(c.delay > 0 for c in samples), 0.05)
    for level, p in (("none", 2 / 7), ("global", 2 / 7), ("tensor", 2 / 7), ("parameter", 1 / 7)):
        assert close(sum(c.reparam_level == level for c in samples), p), level
    reparam = [c for c in samples if c.reparam_level != "none"]
    for r in A.REPARAM_RANGES:
        assert close(sum(c.reparam_range == r for c in reparam), 1 / 3, len(reparam))
    directional = [c for c in samples if c.num_directions > 0]
    assert close(sum(c.direction_sign for c in directional), 0.5, len(directional))


def test_sampled_values_lie_in_the_paper_ranges(samples):
    es = [c for c in samples if c.es_pairs]
    assert all(1e-3 <= c.es_std <= 0.1 and c.es_pairs in A.ES_PAIRS for c in es)
    assert {c.es_pairs for c in es} == set(A.ES_PAIRS)
    assert all(0.01 <= c.batch_fraction <= 1.0 for c in samples)
    dirs = [c.num_directions for c in samples if c.num_directions]
    assert min(dirs) >= 1 and max(dirs) <= 1024 and 8 <= np.median(dirs) <= 128  # log-uniform
    delays = [c.delay for c in samples if c.delay]
    assert set(delays) <= set(range(1, 9)) and min(delays) == 1 and max(delays) >= 6
    assert A.sample_augmentation(jax.random.PRNGKey(17)) == samples[17]  # deterministic
    for c in samples[:200]:
        assert config_from_dict(json.loads(json.dumps(config_to_dict(c))), A.CONFIG_TYPES) == c


def test_apply_everything_trains_through_the_gradient_protocol():
    config = A.AugmentationConfig(
        reparam_level="tensor",
        reparam_range=(0.1, 10.0),
        reparam_seed=3,
        es_std=0.01,
        es_pairs=4,
        batch_fraction=0.5,
        bf16=True,
        normalize_gradient=True,
        num_directions=8,
        direction_sign=True,
        delay=2,
    )
    inner = ToyTask()
    task = A.apply(inner, config)
    assert (
        task.name
        == "toy+batch0.5+bf16+reparam_tensor+es4x0.01+dirgrad8_sign+normgrad_global+delay2"
    )
    assert A.apply(inner, A.AugmentationConfig()) is inner
    assert A.AugmentationConfig().is_identity and not config.is_identity
    tg = (task)
    opt = optax.sgd(0.05)

    def step(carry, key):
        params, opt_state, gstate = carry
        (loss, grads), gstate = tg.value_and_grad(params, key, {}, gstate)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, gstate), loss

    params = task.init(jax.random.PRNGKey(0))
    carry = (params, opt.init(params), tg.grad_state_init(params))
    _, losses = jax.jit(
        lambda c: jax.lax.scan(step, c, jax.random.split(jax.random.PRNGKey(1), 4))
    )(carry)
    assert np.all(np.isfinite(np.asarray(losses)))


def test_train_step_applies_stateless_gradient_augmentations():
    inner = ToyTask()
    task = A.normalize_gradient(inner)
    step = training.make_train_step(task, optax.sgd(0.1))
    params = task.init(jax.random.PRNGKey(0))
    state = init_train_state(task, optax.sgd(0.1), params)
    state, loss = step(state, {}, jax.random.PRNGKey(1))
    # plain SGD on a normalised gradient moves exactly 0.1
    assert np.linalg.norm(flat(state.params) - flat(params)) == pytest.approx(0.1, rel=1e-4)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="reparam_level"):
        A.AugmentationConfig(reparam_level="layer")
    with pytest.raises(ValueError, match="es_std"):
        A.AugmentationConfig(es_std=0.01)
    with pytest.raises(ValueError, match="batch_fraction"):
        A.AugmentationConfig(batch_fraction=0.0)
    with pytest.raises(TypeError, match="wrap a Task"):
        A.to_bfloat16("mlp")
