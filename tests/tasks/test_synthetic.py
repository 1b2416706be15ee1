"""The synthetic ensemble of Wichrowska et al. 2017 (arXiv:1703.04813, §4.1): known optima,
problem properties, the family."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.tasks.base import NoDataSplit, config_from_dict, config_to_dict
from learnopt.tasks.families import synthetic as S

# -- literature functions at their published optima (Surjanovic & Bingham 2013) -----------

PUBLISHED = [
    ("rosenbrock", S.rosenbrock, [1.0, 1.0], 0.0),
    ("rosenbrock_5d", S.rosenbrock, [1.0] * 5, 0.0),
    ("beale", S.beale, [3.0, 0.5], 0.0),
    ("booth", S.booth, [1.0, 3.0], 0.0),
    ("matyas", S.matyas, [0.0, 0.0], 0.0),
    ("ackley", S.ackley, [0.0, 0.0], 0.0),
    ("branin_1", S.branin, [-math.pi, 12.275], 0.397887),
    ("branin_2", S.branin, [math.pi, 2.275], 0.397887),
    ("branin_3", S.branin, [9.42478, 2.475], 0.397887),
    ("styblinski_tang_2d", S.styblinski_tang, [-2.903534] * 2, -39.16599 * 2),
    ("styblinski_tang_3d", S.styblinski_tang, [-2.903534] * 3, -39.16599 * 3),
    ("michalewicz", S.michalewicz, [2.20, 1.57], -1.8013),
    ("logsumexp", S.logsumexp_2d, [-0.5 * math.log(2.0), 0.0], 1.2695545),
]


def test_published_minimum_values():
    rng = np.random.default_rng(0)
    points = [jnp.asarray(x, jnp.float32) for _, _, x, _ in PUBLISHED]
    nearby = [
        x + jnp.asarray(rng.normal(size=(64, x.shape[0])) * 0.05, jnp.float32) for x in points
    ]

    @jax.jit
    def run(points, nearby):  # one compilation for all 13 cases
        cases = zip(PUBLISHED, points, nearby, strict=True)
        return [(fn(x), jax.vmap(fn)(n)) for (_, fn, _, _), x, n in cases]

    for (name, _, x, value), (at, around) in zip(PUBLISHED, run(points, nearby), strict=True):
        # Published values carry 5-6 digits (Styblinski-Tang's -39.16599 is -39.16617 exactly).
        assert float(at) == pytest.approx(value, abs=1e-3 * max(1.0, len(x) / 2)), name
        # A local minimum: every nearby point is higher (the tabulated argmins are rounded,
        # so compare against the function's value at the point, not the published value).
        assert np.all(np.asarray(around) >= float(at) - 1e-4), name


def test_exact_minima_constants():
    st = S.TEST_FUNCTIONS["styblinski_tang"]
    assert st.minimum(1) == pytest.approx(-39.16616570377, abs=1e-9)
    assert st.argmin(3) == pytest.approx([-2.903534] * 3, abs=1e-6)
    assert S.TEST_FUNCTIONS["branin"].minimum(2) == pytest.approx(0.3978873577, abs=1e-9)
    assert S.TEST_FUNCTIONS["michalewicz"].minimum(2) == pytest.approx(-1.8013034, abs=1e-6)
    assert S.TEST_FUNCTIONS["logsumexp"].minimum(2) == pytest.approx(1.26955454, abs=1e-7)


@pytest.mark.parametrize("function", sorted(S.TEST_FUNCTIONS))
def test_test_function_tasks_have_minimum_zero(function):
    """§4.1: offsets make the global minimum 0; no point of the init box goes below."""
    task = S.TestFunctionTask(S.ProblemConfig("test_function", 2, function=function))
    params, value = task.optimum()
    keys = jax.random.split(jax.random.PRNGKey(0), 256)

    @jax.jit
    def run(params, keys):
        loss, grad = jax.value_and_grad(task.loss)(params, None, {})
        inits = jax.vmap(task.init)(keys)
        return loss, grad, inits, jax.vmap(lambda p: task.loss(p, None, {}))(inits)

    loss, grad, inits, losses = run(params, keys)
    assert value == 0.0
    assert float(loss) == pytest.approx(0.0, abs=2e-5)
    assert np.all(np.abs(np.asarray(grad["x"])) < 1e-4)  # the exact argmin is stationary
    assert np.all(np.asarray(losses) >= -2e-5)
    x = np.asarray(inits["x"])
    low = np.asarray(task.function.init_low)
    high = np.asarray(task.function.init_high)
    assert np.all(x >= low - 1e-6) and np.all(x <= high + 1e-6)


# -- the other problems ---------------------------------------------------------------------

DATA = dict(num_examples=40, batch_size=10)
WITH_OPTIMUM = {
    "quadratic_bowl": S.ProblemConfig("quadratic_bowl", 5, condition=30.0, seed=1),
    "norm_p0.5": S.ProblemConfig("norm", 4, power=0.5, seed=2),
    "norm_p3": S.ProblemConfig("norm", 4, power=3.0, seed=2),
    "dependency_chain": S.ProblemConfig("dependency_chain", 4),
    "min_max_well": S.ProblemConfig("min_max_well", 6),
    "minibatch_quadratic": S.ProblemConfig("minibatch_quadratic", 4, seed=3, **DATA),
    "sum_of_quadratics": S.ProblemConfig("sum_of_quadratics", 4, seed=4, **DATA),
    "projection_quadratic": S.ProblemConfig("projection_quadratic", 4, seed=5, **DATA),
}


@pytest.mark.parametrize("name", list(WITH_OPTIMUM))
def test_problems_reach_zero_at_their_optimum(name):
    task = S.build_problem(WITH_OPTIMUM[name])
    params, value = task.optimum()
    split = task.datasets.train
    batch = {} if isinstance(split, NoDataSplit) else split.full()

    @jax.jit
    def run(params, batch, key):
        loss, grad = jax.value_and_grad(task.loss)(params, key, batch)
        return loss, grad, task.loss(task.init(key), key, batch)

    loss, grad, init_loss = run(params, batch, jax.random.PRNGKey(0))
    assert value == 0.0
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    if not name.startswith(("min_max_well", "norm")):  # a tie of max/min; a norm's cone
        assert np.max(np.abs(np.asarray(grad["x"]))) < 1e-2
    assert float(init_loss) > 1e-2


def test_bowl_has_exact_condition_number_and_coupling():
    task = S.QuadraticBowlTask(S.ProblemConfig("quadratic_bowl", 6, condition=250.0, seed=7))
    hessian = task.a.astype(np.float64).T @ task.a
    eig = np.linalg.eigvalsh(hessian)
    assert eig.max() / eig.min() == pytest.approx(250.0, rel=1e-4)
    off_diagonal = hessian - np.diag(np.diag(hessian))
    assert np.abs(off_diagonal).max() > 1e-2  # coupled, not axis-aligned


def test_logistic_regression_data_separable_by_teacher_unless_flipped():
    clean = S.LogisticRegressionTask(
        S.ProblemConfig("logistic_regression", 5, num_examples=300, batch_size=20, seed=3)
    )
    data = clean.datasets.train.full()
    assert data["x"].shape == (300, 5) and clean.datasets.train.batch_size == 20
    teacher = {k: jnp.asarray(v) for k, v in clean.teacher.items()}
    assert float(clean.metrics(teacher, data)["accuracy"]) == 1.0
    # Scaling a separating solution drives the loss towards its infimum 0.
    losses = [
        float(clean.loss(jax.tree_util.tree_map(lambda v, c=c: c * v, teacher), None, data))
        for c in (1.0, 10.0, 100.0, 1000.0)
    ]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 1e-4
    noisy = S.LogisticRegressionTask(
        S.ProblemConfig(
            "logistic_regression", 5, num_examples=300, batch_size=20, label_flip=0.2, seed=3
        )
    )
    acc = float(noisy.metrics(teacher, noisy.datasets.train.full())["accuracy"])
    assert 0.7 < acc < 0.9


def test_minibatch_quadratic_is_square_inner_product():
    task = S.build_problem(S.ProblemConfig("minibatch_quadratic", 3, seed=0, **DATA))
    batch = task.datasets.train.sample(jax.random.PRNGKey(0))
    assert batch["d"].shape == (10, 3)
    x = jnp.array([0.3, -1.0, 2.0])
    expected = np.mean((np.asarray(batch["d"]) @ np.asarray(x)) ** 2)
    assert float(task.loss({"x": x}, None, batch)) == pytest.approx(expected, rel=1e-5)


def test_sum_of_quadratics_full_data_is_squared_norm():
    task = S.build_problem(S.ProblemConfig("sum_of_quadratics", 3, seed=0, **DATA))
    data = task.datasets.train.full()
    assert np.allclose(data["d"].sum(0), 0.0, atol=1e-5)  # pairs (d, -d)
    x = jnp.array([0.5, -1.0, 2.0])
    assert float(task.loss({"x": x}, None, data)) == pytest.approx(5.25, rel=1e-4)


def test_min_max_well_gradient_touches_two_coordinates():
    task = S.build_problem(S.ProblemConfig("min_max_well", 8))
    params = task.init(jax.random.PRNGKey(3))
    grad = np.asarray(jax.grad(task.loss)(params, None, {})["x"])
    assert np.count_nonzero(grad) == 2
    x = np.asarray(params["x"])
    assert set(np.flatnonzero(grad)) == {int(np.argmin(x**2)), int(np.argmax(x**2))}


def test_outward_snake_descends_along_its_valley_towards_infinity():
    task = S.OutwardSnakeTask(S.ProblemConfig("outward_snake", 4, seed=0, **DATA))
    data = task.datasets.train.full()
    assert set(np.unique(data["d"])) <= {0.0, 1.0}

    def on_valley(x0):
        x = [x0]
        for _ in range(3):
            x.append(math.pi * math.cos(x[-1]))
        return {"x": jnp.asarray(x, jnp.float32)}

    losses = [float(task.loss(on_valley(r), None, data)) for r in (1.0, 10.0, 100.0, 1000.0)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 1e-3


def test_dependency_chain_couples_each_link_to_the_previous():
    task = S.build_problem(S.ProblemConfig("dependency_chain", 3))
    x = {"x": jnp.array([0.0, 0.0, 1e-2, 0.0])}
    # x_2 = 0.01 over x_1 = 0 costs 1e-4 / 1e-6 = 100: it must wait for its predecessor.
    assert float(task.loss(x, None, {})) == pytest.approx(100.0, rel=1e-3)
    assert task.init(jax.random.PRNGKey(0))["x"].shape == (4,)


# -- transformations ------------------------------------------------------------------------

BOWL = S.ProblemConfig("quadratic_bowl", 4, condition=10.0, seed=0)


def test_noisy_gradient_is_unbiased_with_the_stated_std():
    plain = S.build_problem(BOWL)
    noisy = S.build_problem(dataclasses.replace(BOWL, noise_std=0.7))
    params = plain.init(jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    losses, grads = jax.jit(jax.vmap(lambda k: jax.value_and_grad(noisy.loss)(params, k, {})))(keys)
    true = np.asarray(jax.grad(plain.loss)(params, None, {})["x"])
    assert np.allclose(np.asarray(losses), float(plain.loss(params, None, {})))
    g = np.asarray(grads["x"])
    assert np.all(np.abs(g.mean(0) - true) < 5 * 0.7 / math.sqrt(4000))
    assert np.allclose(g.std(0), 0.7, rtol=0.06)


def test_sparse_gradient_zeroes_the_stated_fraction():
    base = S.build_problem(S.ProblemConfig("quadratic_bowl", 50, condition=5.0, seed=1))
    sparse = S.sparse_gradient(base, 0.93)
    params = base.init(jax.random.PRNGKey(0))
    true = np.asarray(jax.grad(base.loss)(params, None, {})["x"])
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    grads = np.asarray(jax.jit(jax.vmap(lambda k: jax.grad(sparse.loss)(params, k, {})))(keys)["x"])
    kept = grads != 0
    assert kept.mean() == pytest.approx(0.07, abs=0.01)  # 10,000 entries
    assert np.allclose(grads[kept], np.broadcast_to(true, grads.shape)[kept], rtol=1e-5, atol=1e-5)


def test_rescale_is_a_change_of_variables():
    config = S.SyntheticConfig((BOWL,), "rescale", scale_range=(0.01, 100.0), seed=3)
    task = S.build_task(config)
    base = S.build_problem(BOWL)
    s = np.asarray(task.scales()["x"])
    assert s.shape == (4,) and np.all((s >= 0.01) & (s <= 100.0)) and s.max() / s.min() > 1.5
    x_star = base.optimum()[0]["x"]
    assert float(task.loss({"x": jnp.asarray(x_star / s)}, None, {})) == pytest.approx(0, abs=1e-4)
    v = {"x": jnp.array([0.1, -0.2, 0.3, 0.05])}
    gv = np.asarray(jax.grad(task.loss)(v, None, {})["x"])
    gw = np.asarray(jax.grad(base.loss)({"x": v["x"] * s}, None, {})["x"])
    assert np.allclose(gv, s * gw, rtol=1e-5)


@pytest.mark.parametrize("kind", ["log", "power"])
def test_monotone_objectives_keep_the_minimum_at_zero(kind):
    config = S.SyntheticConfig((BOWL,), kind, power=1.7)
    task = S.build_task(config)
    base = S.build_problem(BOWL)
    x_star = base.optimum()[0]
    assert float(task.loss(x_star, None, {})) == pytest.approx(0.0, abs=1e-4)
    points = [{"x": x_star["x"] + t} for t in (0.1, 0.5, 1.0, 3.0)]
    f = [float(base.loss(p, None, {})) for p in points]
    g = [float(task.loss(p, None, {})) for p in points]
    expected = [
        math.log(v + 1e-6) - math.log(1e-6) if kind == "log" else (v + 1e-6) ** 1.7 - 1e-6**1.7
        for v in f
    ]
    assert np.allclose(g, expected, rtol=1e-4)
    assert all(a < b for a, b in zip(g, g[1:], strict=False))


def test_multi_task_sum_concatenates_parameters_and_sums_losses():
    configs = (
        BOWL,
        S.ProblemConfig("minibatch_quadratic", 3, seed=1, **DATA),
        S.ProblemConfig("test_function", 2, function="beale"),
    )
    task = S.build_task(S.SyntheticConfig(configs))
    parts = [S.build_problem(c) for c in configs]
    params = task.init(jax.random.PRNGKey(0))
    assert sorted(params) == ["task0", "task1", "task2"]
    batch = task.datasets.train.sample(jax.random.PRNGKey(1))
    assert batch["task0"] == {} and batch["task1"]["d"].shape == (10, 3)
    key = jax.random.PRNGKey(2)
    keys = jax.random.split(key, 3)
    total = sum(
        float(p.loss(params[f"task{i}"], keys[i], batch[f"task{i}"])) for i, p in enumerate(parts)
    )
    assert float(task.loss(params, key, batch)) == pytest.approx(total, rel=1e-5)
    grads = jax.grad(task.loss)(params, key, batch)
    g2 = jax.grad(parts[2].loss)(params["task2"], keys[2], batch["task2"])
    assert np.allclose(grads["task2"]["x"], g2["x"])
    first = next(task.datasets.test.iterator(0))
    assert first["task1"]["d"].shape == (10, 3)


def test_normalizer_is_the_log_loss_of_eq_14():
    task = S.build_problem(BOWL)
    out = np.asarray(task.normalizer(jnp.array([1.0, 0.0, -3.0, jnp.nan, jnp.inf])))
    assert out[0] == pytest.approx(0.0, abs=1e-6)
    assert out[1] == pytest.approx(math.log(1e-8)) and out[2] == out[1]
    assert out[3] == out[4] == pytest.approx(math.log(1e30), rel=1e-6)


# -- the family -----------------------------------------------------------------------------

FAMILY = S.SyntheticFamily(max_dim=6, max_examples=200)


@pytest.fixture(scope="module")
def sampled():
    keys = [jax.random.PRNGKey(1000 + i) for i in range(100)]
    return [FAMILY.sample(k) for k in keys], keys


def test_family_samples_are_valid_deterministic_and_round_trip(sampled):
    configs, keys = sampled
    assert FAMILY.sample(keys[7]) == configs[7]
    assert len({json.dumps(config_to_dict(c), sort_keys=True) for c in configs}) == 100
    for c in configs:
        again = config_from_dict(json.loads(json.dumps(config_to_dict(c))), S.CONFIG_TYPES)
        assert again == c
        assert 1 <= len(c.problems) <= 4
        for p in c.problems:
            assert p.dim <= 6 + 1
            if p.problem in S.DATA_PROBLEMS:
                assert 10 <= p.batch_size <= 200 and p.batch_size <= p.num_examples <= 200
            assert p.noise_std == 0.0 or 0.1 <= p.noise_std <= 2.0
        if c.transform == "sparse":
            assert 0.9 <= c.zero_prob <= 0.99
        if c.transform == "rescale":
            assert 1e-3 <= c.scale_range[0] <= c.scale_range[1] <= 1e3
        if c.transform == "power":
            assert 0.5 <= c.power <= 2.0


def test_family_covers_every_kind(sampled):
    configs, _ = sampled
    kinds = set()
    for c in configs:
        kinds.add("multi_task" if len(c.problems) > 1 else c.transform)
        kinds.update(p.problem for p in c.problems if c.transform == "none")
    assert kinds - {"none"} == set(S.KINDS)


def test_family_uses_the_paper_ranges_without_caps():
    family = S.SyntheticFamily(kinds=("min_max_well", "norm", "logistic_regression"))
    dims = {"min_max_well": [], "norm": [], "logistic_regression": []}
    for k in (jax.random.PRNGKey(i) for i in range(60)):
        p = family.sample(k).problems[0]
        dims[p.problem].append(p.dim)
    assert min(dims["min_max_well"]) >= 10 and max(dims["min_max_well"]) <= 1000
    assert min(dims["norm"]) >= 3 and max(dims["norm"]) > 100
    assert max(dims["logistic_regression"]) <= 100


def test_every_kind_builds_with_finite_init_loss_and_gradient():
    """One sampled task of each of the 15 kinds: init, batch, loss, gradient, normalizer."""
    tasks = {}
    for kind in S.KINDS:
        family = S.SyntheticFamily(max_dim=5, max_examples=200, kinds=(kind,))
        tasks[kind] = family.task(family.sample(jax.random.PRNGKey(0)))

    @jax.jit
    def run(key):  # one compilation for all kinds
        out = {}
        for kind, task in tasks.items():
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, len(out)), 3)
            params = task.init(k1)
            batch = task.datasets.train.sample(k2)
            loss, grads = jax.value_and_grad(task.loss)(params, k3, batch)
            out[kind] = (loss, grads, task.normalizer(loss))
        return out

    for kind, (loss, grads, norm) in run(jax.random.PRNGKey(7)).items():
        assert np.isfinite(float(loss)) and np.isfinite(float(norm)), (kind, tasks[kind].name)
        leaves = jax.tree_util.tree_leaves(grads)
        assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves), kind


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="unknown problem"):
        S.ProblemConfig("cubic")
    with pytest.raises(ValueError, match="unknown test function"):
        S.ProblemConfig("test_function", 2, function="rastrigin")
    with pytest.raises(ValueError, match="2-D"):
        S.ProblemConfig("test_function", 3, function="beale")
    with pytest.raises(ValueError, match="batch_size"):
        S.ProblemConfig("minibatch_quadratic", 3, num_examples=5, batch_size=10)
    with pytest.raises(ValueError, match="unknown transform"):
        S.SyntheticConfig((BOWL,), "cube")
    with pytest.raises(ValueError, match="unknown kinds"):
        S.SyntheticFamily(kinds=("bowl",))
