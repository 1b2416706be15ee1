"""The fixed benchmark suite: composition, budgets, and the tasks made for it."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from learnopt.bench.suite import EXCLUDED, KINDS, SUITES, BenchTask, bench_task, suite
from learnopt.tasks.data.registry import DatasetNotFoundError
from learnopt.tasks.fixed.registry import TASKS, bench_names, get_task

# XLA:CPU options that about halve compile time (values unchanged): no backend optimisation,
# the older (faster to compile) fusion code generator.
CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench_suite_time.json"


def dense(*dims):
    """Parameters of a stack of dense layers with biases."""
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=False))


def test_full_suite_covers_every_kind_and_quick_is_a_small_spread_subset():
    full, quick = suite("full"), suite("quick")
    names = [t.name for t in full]
    assert len(full) >= 24 and len(set(names)) == len(names)
    assert {t.kind for t in full} == set(KINDS) and len(KINDS) == 11
    counts = {k: sum(t.kind == k for t in full) for k in KINDS}
    assert min(counts.values()) >= 2 and max(counts.values()) <= 6, counts
    assert set(SUITES["quick"]) < set(SUITES["full"])
    assert 5 <= len(quick) <= 7 and len({t.kind for t in quick}) == len(quick)
    for t in full:
        assert isinstance(t, BenchTask) and t.kind in KINDS
        assert 200 <= t.steps <= 2000, t
        assert t.why and "\n" not in t.why and len(t.why) <= 100, t.name
        assert t.name in TASKS and bench_task(t.name) == t


def test_meta_training_tasks_are_excluded_and_new_tasks_all_in_the_suite():
    names = set(SUITES["full"])
    assert set(EXCLUDED) == {"fmnist_mlp_8x8", "ImageMLP_FashionMnist8_Relu32"}
    assert not names & set(EXCLUDED)
    assert set(bench_names()) <= names  # every task made for the suite is used
    assert len(bench_names()) == 26 and len(names - set(bench_names())) == 5
    assert all(TASKS[n].description.startswith("[bench] ") for n in bench_names())


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid suites: quick, full"):
        suite("medium")
    with pytest.raises(ValueError, match="valid names: .*Quadratic_d100_cond1e3"):
        bench_task("fmnist_mlp_8x8")


def test_parameter_counts_of_new_tasks_match_hand_counts():
    expected = {
        "ImageMLP_Digits8_Tanh64x64_bs32": dense(64, 64, 64, 10),  # 8,970
        "ImageMLPAE_Digits8_32x8x32_bs32": dense(64, 32, 8, 32, 64),  # 4,744
        # encoder 64 -> 32 -> (mu, log sigma) of 4; decoder 4 -> 32 -> (mu, log sigma) of 64
        "VAE_Digits8_32x4x32_Tanh_bs32": dense(64, 32, 8) + dense(4, 32, 128),  # 6,728
        # 3x3 convs 1 -> 16 -> 16 -> 16, spatial mean, dense 16 -> 10
        "Conv_Digits8_16x16x16_Tanh_bs32": 160 + 2 * (9 * 16 * 16 + 16) + dense(16, 10),
        # patch conv 4x4x1 -> 64, class token, 5 positions; one block (2 LayerNorms, qkv,
        # output projection, MLP 64-128-64); final LayerNorm; head
        "VIT_Digits8_patch4_64x4heads_1layer_bs64": (16 * 64 + 64) + 64 + 5 * 64
        + 4 * 64 + dense(64, 192) + dense(64, 64) + dense(64, 128, 64) + 2 * 64 + dense(64, 10),
        "Quadratic_d100_cond1e3": 100,
        "Synthetic_LogisticRegression_d50_flip10_bs32": 51,
    }
    assert expected["ImageMLP_Digits8_Tanh64x64_bs32"] == 8970
    assert expected["VIT_Digits8_patch4_64x4heads_1layer_bs64"] == 35722
    for name, count in expected.items():
        assert get_task(name).num_params() == count, name


def test_parameter_counts_of_flows_and_mnist1d_match_hand_counts():
    try:
        nvp = get_task("Flow_NVP_FashionMnist14_64x64_2bijectors_bs64")
        maf = get_task("Flow_MAF_Digits8_128_3bijectors_bs32")
        m1d = get_task("ImageMLP_Mnist1d_Gelu128x128_bs64")
    except DatasetNotFoundError as e:
        pytest.skip(str(e))
    # each NVP coupling net maps the 98 kept pixels to a shift and log-scale of the other 98
    assert nvp.num_params() == 2 * dense(98, 64, 64, 196) == 46472
    # each MADE maps 64 -> 128 -> 2 x 64; the masks zero weights but keep the kernel shapes
    assert maf.num_params() == 3 * dense(64, 128, 128) == 74496
    assert m1d.num_params() == dense(40, 128, 128, 10) == 23050


def test_measured_times_are_within_budget_and_match_the_suite():
    result = json.loads(RESULTS.read_text())
    rows = {r["task"]: r for r in result["rows"]}
    assert set(rows) == set(SUITES["full"])
    for t in suite("full"):
        row = rows[t.name]
        assert row["steps"] == t.steps and row["kind"] == t.kind, t.name
        assert row["run_seconds"] <= 5.0 and row["finite"], row
    full = sum(rows[n]["run_seconds"] for n in SUITES["full"])
    quick = sum(rows[n]["run_seconds"] for n in SUITES["quick"])
    assert full <= 90.0 and quick <= 15.0
    assert result["suite_run_seconds"]["full"] == pytest.approx(full, abs=0.05)
    assert result["machine"]["cpu_count"] >= 1


@pytest.mark.parametrize("name", bench_names())
def test_new_task_initialises_with_finite_loss_and_gradient(name):
    """Init, a two-example batch and the task's own gradient (noise, sparsity included), in
    one cheaply compiled program (``CHEAP_COMPILE``: this checks values, not speed). The
    batch comes from the numpy iterator; in-jit sampling is what
    benchmarks/bench_suite_time.py runs (its results say every run stayed finite)."""
    try:
        task = get_task(name)
        batch = next(task.datasets.train.iterator(0))
    except DatasetNotFoundError as e:
        pytest.skip(str(e))
    batch = jax.tree_util.tree_map(lambda x: x[:2], batch)

    def check(key, batch):
        k_init, k_loss = jax.random.split(key)
        params = task.init(k_init)
        (loss, grads), _ = task.value_and_grad(params, k_loss, batch, task.grad_state_init(params))
        leaves = jax.tree_util.tree_leaves(grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        nonzero = sum(jnp.sum(jnp.abs(g)) for g in leaves) > 0
        return loss, task.normalizer(loss), finite, nonzero

    key = jax.random.PRNGKey(0)
    compiled = jax.jit(check).lower(key, batch).compile(compiler_options=CHEAP_COMPILE)
    loss, normalized, finite, nonzero = compiled(key, batch)
    assert jnp.isfinite(loss) and jnp.isfinite(normalized), (loss, normalized)
    assert bool(finite) and bool(nonzero)
