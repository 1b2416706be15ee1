"""learnopt.compilation: the estimators' XLA options and the persistent compile cache."""

import jax
import numpy as np
import pytest

from learnopt import compilation
from learnopt.learned.adafac_mlp import SmallFcLOpt
from learnopt.meta.estimators.base import pair_perturbations, sample_perturbations
from learnopt.meta.estimators.pes import PES
from learnopt.meta.unroll import TruncatedUnroll
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticTask


def test_program_options_lower_the_cpu_level_only():
    assert compilation.program_options("cpu") == {"xla_backend_optimization_level": 2}
    assert compilation.program_options("gpu") == {}
    assert compilation.program_options("tpu") == {}


def test_cache_dir_from_the_environment(tmp_path):
    assert compilation.cache_dir({"LEARNOPT_COMPILE_CACHE": str(tmp_path)}) == tmp_path
    for off in ("0", "off", "false", "no"):
        assert compilation.cache_dir({"LEARNOPT_COMPILE_CACHE": off}) is None
    default = compilation.cache_dir({})
    assert default is not None and default.parts[-3:] == (".cache", "learnopt", "xla")


def test_enable_persistent_cache_points_jax_at_the_folder(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = tmp_path / "xla"
        assert compilation.enable_persistent_cache(folder) == folder
        assert folder.is_dir() and jax.config.jax_compilation_cache_dir == str(folder)
        monkeypatch.setenv("LEARNOPT_COMPILE_CACHE", "0")
        jax.config.update("jax_compilation_cache_dir", before)
        assert compilation.enable_persistent_cache() is None
        assert jax.config.jax_compilation_cache_dir == before
        blocked = tmp_path / "file"
        blocked.write_text("")
        assert compilation.enable_persistent_cache(blocked / "xla") is None  # cannot mkdir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_pes_estimate_is_the_same_at_both_optimisation_levels():
    # The level changes how XLA's CPU backend optimises the code, never the arithmetic
    # (no fast-math): two PES steps of small_fc_lopt on a quadratic agree to float rounding.
    task = QuadraticTask(QuadraticConfig(dim=6, seed=1))
    lopt = SmallFcLOpt()
    theta = lopt.init(jax.random.PRNGKey(0))
    est = PES(TruncatedUnroll(task, lopt, num_tasks=2, horizon=8, trunc_length=4), jit=False)
    state = jax.jit(est.init_state)(theta, jax.random.PRNGKey(1))
    outs = []
    for jit in (jax.jit, compilation.jit_program):
        fn, s = jit(est.estimate), state
        for i in range(2):
            loss, grad, s, _ = fn(theta, s, jax.random.PRNGKey(2 + i))
        outs.append((float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])))
    assert np.isfinite(outs[0][0]) and np.any(outs[0][1] != 0)
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)


def test_perturbations_are_one_draw_cut_into_leaves():
    theta = {"a": np.zeros((3, 4), np.float32), "b": np.zeros((5,), np.float32)}
    key = jax.random.PRNGKey(3)
    eps = sample_perturbations(theta, key, 0.5, 200)
    assert eps["a"].shape == (200, 3, 4) and eps["b"].shape == (200, 5)
    flat = 0.5 * jax.random.normal(key, (200, 17))  # leaves in tree order: a (12), b (5)
    np.testing.assert_array_equal(eps["a"].reshape(200, 12), flat[:, :12])
    np.testing.assert_array_equal(eps["b"], flat[:, 12:])
    both = np.concatenate([eps["a"].reshape(200, 12), eps["b"]], axis=1)
    assert abs(both.std() - 0.5) < 0.02  # 3,400 draws: std within ~3 standard errors
    assert np.abs(np.corrcoef(both.T) - np.eye(17)).max() < 0.3  # independent elements
    pairs = pair_perturbations(theta, key, 0.5, num_pairs=2, num_runs=100)
    np.testing.assert_array_equal(pairs["b"].reshape(200, 5), eps["b"])


@pytest.mark.parametrize("bad", [{"LEARNOPT_COMPILE_CACHE": "  "}])
def test_blank_cache_setting_means_the_default(bad):
    assert compilation.cache_dir(bad) == compilation.cache_dir({})


def test_before_jax_is_imported_the_cache_goes_through_the_environment(tmp_path):
    # learnopt commands enable the cache before anything imports jax: the folder is handed
    # over through JAX_COMPILATION_CACHE_DIR, which jax reads on import (and Ray workers
    # inherit), so a command that never compiles does not import jax for it.
    import subprocess
    import sys

    code = (
        "import sys; from learnopt.compilation import enable_persistent_cache as e; "
        f"folder = e({str(tmp_path)!r}); assert 'jax' not in sys.modules; "
        "import jax; print(jax.config.jax_compilation_cache_dir)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(tmp_path)
