"""Search spaces: the LR grid (arXiv:2203.11860, §2.1) and the NAdamW sampler (App. F.2)."""

import math

import jax
import numpy as np
import pytest

from learnopt.optimizers import (
    LR_GRID,
    NAdamWConfig,
    sample_nadamw_config,
    sample_nadamw_configs,
)

N = 2000


def test_lr_grid_values():
    assert isinstance(LR_GRID, tuple) and len(LR_GRID) == 15
    assert all(type(x) is float for x in LR_GRID)
    assert LR_GRID[0] == pytest.approx(1e-7, rel=1e-12)
    assert LR_GRID[-1] == 1.0
    for k, lr in enumerate(LR_GRID):
        assert lr == pytest.approx(10.0 ** (-7 + k / 2), rel=1e-12)
    ratios = np.array(LR_GRID[1:]) / np.array(LR_GRID[:-1])
    np.testing.assert_allclose(ratios, math.sqrt(10), rtol=1e-12)
    # Whole decades are exact.
    assert LR_GRID[2] == pytest.approx(1e-6, rel=1e-15)
    assert LR_GRID[12] == pytest.approx(0.1, rel=1e-15)


@pytest.fixture(scope="module")
def samples():
    return sample_nadamw_configs(0, N)


def _col(samples, name):
    return np.array([getattr(c, name) for c in samples], dtype=float)


def _within(x, lo, hi):
    return bool(np.all(x >= lo * (1 - 1e-9)) and np.all(x <= hi * (1 + 1e-9)))


def test_sampler_ranges(samples):
    assert all(isinstance(c, NAdamWConfig) for c in samples)
    lr = _col(samples, "learning_rate")
    assert _within(lr, 1e-5, 1.0)
    assert _within(1 - _col(samples, "beta1"), 1e-3, 1.0)
    assert _within(1 - _col(samples, "beta2"), 1e-5, 1.0)
    assert _within(_col(samples, "eps"), 1e-8, 1e4)
    for name, lo, hi in [
        ("l2_wd", 1e-5, 1e-1),
        ("adamw_wd", 1e-5, 1e-1),
        ("min_lr_mult", 1e-5, 1.0),
        ("warmup_fraction", 1e-5, 1e-1),
    ]:
        x = _col(samples, name)
        assert _within(x[x != 0], lo, hi), name
    cf = _col(samples, "constant_fraction")
    assert np.all(cf >= 0) and np.all(cf < 1)


def test_sampler_probabilities(samples):
    nes = np.mean([c.use_nesterov for c in samples])
    assert abs(nes - 0.5) < 0.05
    l2 = _col(samples, "l2_wd")
    aw = _col(samples, "adamw_wd")
    both = np.mean((l2 > 0) & (aw > 0))
    no_l2 = np.mean((l2 == 0) & (aw > 0))
    no_aw = np.mean((l2 > 0) & (aw == 0))
    assert both + no_l2 + no_aw == pytest.approx(1.0)  # never both zero
    for frac in (both, no_l2, no_aw):
        assert abs(frac - 1 / 3) < 0.05
    assert abs(np.mean(_col(samples, "min_lr_mult") > 0) - 0.5) < 0.05
    assert abs(np.mean(_col(samples, "warmup_fraction") > 0) - 0.5) < 0.05


def test_sampler_is_log_uniform_where_stated(samples):
    # Medians of log10 sit mid-range for log-uniform draws; uniform draws would not.
    def med(x):
        return float(np.median(np.log10(x)))

    assert med(_col(samples, "learning_rate")) == pytest.approx(-2.5, abs=0.2)
    assert med(1 - _col(samples, "beta1")) == pytest.approx(-1.5, abs=0.15)
    assert med(1 - _col(samples, "beta2")) == pytest.approx(-2.5, abs=0.2)
    assert med(_col(samples, "eps")) == pytest.approx(-2.0, abs=0.5)
    assert np.mean(_col(samples, "constant_fraction")) == pytest.approx(0.5, abs=0.03)


def test_sampler_is_deterministic():
    assert sample_nadamw_config(7) == sample_nadamw_config(7)
    assert sample_nadamw_config(7) != sample_nadamw_config(8)
    k = jax.random.PRNGKey(3)
    assert sample_nadamw_config(k) == sample_nadamw_config(k)
    assert sample_nadamw_config(k) == sample_nadamw_config(jax.random.key(3))
    assert sample_nadamw_config(k) != sample_nadamw_config(jax.random.PRNGKey(4))
    assert sample_nadamw_configs(5, 3) == sample_nadamw_configs(5, 3)
    assert sample_nadamw_configs(5, 3)[0] == sample_nadamw_config(5)
    rng = np.random.default_rng(5)
    assert [sample_nadamw_config(rng) for _ in range(3)] == sample_nadamw_configs(5, 3)


def test_sampled_config_runs_one_step():
    import jax.numpy as jnp

    cfg = sample_nadamw_config(11)
    opt = cfg.optimizer(num_steps=10)
    p = jnp.ones(3)
    u, _ = opt.update(jnp.ones(3), opt.init(p), p)
    assert np.all(np.isfinite(np.asarray(u)))


@pytest.mark.parametrize("bad", ["seed", 1.5, -1, None, True])
def test_sampler_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed|PRNG key"):
        sample_nadamw_config(bad)


def test_sample_configs_rejects_bad_num():
    with pytest.raises(ValueError, match="num must be an integer >= 0"):
        sample_nadamw_configs(0, -1)
