"""The NAdamW schedule (arXiv:2203.11860, App. F.1, Eqs. 4-9, as the library runs them), by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.optimizers import cosine_warmup_schedule

T = 100


def _at(schedule, step):
    return float(schedule(step))


def test_constant_phase_mid_decay_and_end_without_warmup():
    # lr 0.2, min_lr = 0.1 * 0.2 = 0.02 (a multiplier, not the absolute 0.1 of Eq. 5).
    s = cosine_warmup_schedule(0.2, T, constant_fraction=0.3, min_lr_mult=0.1)
    assert _at(s, 0) == pytest.approx(0.2, rel=1e-6)
    assert _at(s, 10) == pytest.approx(0.2, rel=1e-6)  # constant phase: x = max(10, 30) = 30
    assert _at(s, 30) == pytest.approx(0.2, rel=1e-6)  # decay starts at T * c_constant
    # Mid-decay: (65 - 30) / (100 - 30) = 0.5, cos(pi/2) = 0: (0.2 - 0.02) * 0.5 + 0.02.
    assert _at(s, 65) == pytest.approx(0.11, rel=1e-5)
    # A quarter in: (47.5 - 30) / 70 = 0.25.
    want = (0.2 - 0.02) * (0.5 * math.cos(math.pi * 0.25) + 0.5) + 0.02
    assert _at(s, 47.5) == pytest.approx(want, rel=1e-5)
    assert _at(s, 100) == pytest.approx(0.02, rel=1e-5)  # the end: min_lr
    assert _at(s, 150) == pytest.approx(0.02, rel=1e-5)  # past the end: held


def test_warmup_runs_over_max_of_warmup_and_constant_fraction():
    # The library quirk kept: warm-up lasts T * max(0.1, 0.3) = 30 steps, not 10.
    s = cosine_warmup_schedule(1.0, T, warmup_fraction=0.1, constant_fraction=0.3, min_lr_mult=0.1)
    assert _at(s, 0) == 0.0
    assert _at(s, 5) == pytest.approx(5 / 30, rel=1e-6)
    assert _at(s, 15) == pytest.approx(0.5, rel=1e-6)
    assert _at(s, 20) == pytest.approx(20 / 30, rel=1e-6)  # past c_warmup * T, still ramping
    assert _at(s, 30) == pytest.approx(1.0, rel=1e-6)  # ramp done, decay starts
    assert _at(s, 65) == pytest.approx(0.9 * 0.5 + 0.1, rel=1e-5)
    assert _at(s, 100) == pytest.approx(0.1, rel=1e-5)


def test_warmup_longer_than_constant_phase_drops_at_its_end():
    # c_warmup 0.5 > c_constant 0.2: ramp over 50 steps while the cosine runs from 20.
    s = cosine_warmup_schedule(1.0, T, warmup_fraction=0.5, constant_fraction=0.2)
    assert _at(s, 49) == pytest.approx(49 / 50, rel=1e-6)
    want = 0.5 * math.cos(math.pi * (50 - 20) / 80) + 0.5
    assert _at(s, 50) == pytest.approx(want, rel=1e-5)


def test_pure_cosine_and_full_constant():
    s = cosine_warmup_schedule(0.5, T)
    assert _at(s, 0) == pytest.approx(0.5, rel=1e-6)
    assert _at(s, 50) == pytest.approx(0.25, rel=1e-5)
    assert _at(s, 100) == pytest.approx(0.0, abs=1e-7)
    # c_constant = 1: the library computes 0/0; here the rate stays at alpha_base.
    s = cosine_warmup_schedule(0.5, T, constant_fraction=1.0)
    for step in (0, 50, 100, 200):
        assert _at(s, step) == pytest.approx(0.5, rel=1e-6)


def test_traced_hyperparameters_have_finite_gradients():
    def lr_at(lr, wf, cf, step):
        s = cosine_warmup_schedule(lr, T, warmup_fraction=wf, constant_fraction=cf)
        return s(step)

    grad_fn = jax.jit(jax.grad(lr_at, argnums=(0, 1, 2)))
    for wf, cf in [(0.0, 0.0), (0.0, 1.0), (0.1, 0.0)]:
        grads = grad_fn(0.1, wf, cf, 40.0)
        assert all(np.isfinite(float(g)) for g in grads)
    batched = jax.vmap(lr_at, in_axes=(0, 0, 0, None))(
        jnp.array([1.0, 1.0]), jnp.array([0.0, 0.1]), jnp.array([0.3, 0.3]), 15.0
    )
    np.testing.assert_allclose(batched, [1.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(learning_rate=0.0, num_steps=10), "learning_rate must be a finite number > 0"),
        (dict(learning_rate=0.1, num_steps=None), "num_steps is required"),
        (dict(learning_rate=0.1, num_steps=2.5), "num_steps must be an integer >= 1"),
        (dict(learning_rate=0.1, num_steps=10, warmup_fraction=-0.1), "warmup_fraction"),
        (dict(learning_rate=0.1, num_steps=10, min_lr_mult=1.5), "min_lr_mult"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cosine_warmup_schedule(**kwargs)
