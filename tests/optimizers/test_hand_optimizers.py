"""SGD, SGDM and Adam (arXiv:2203.11860, §2.1) against hand computation and optax."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.optimizers import adam, sgd, sgdm

G1 = np.array([0.5, -1.0, 2.0])
G2 = np.array([-0.25, 0.75, 1.0])


def _updates(opt, grads, params=None):
    p = jnp.zeros(3) if params is None else params
    state = opt.init(p)
    out = []
    for g in grads:
        u, state = opt.update(jnp.asarray(g, jnp.float32), state, p, loss=jnp.float32(0.0))
        out.append(np.asarray(u))
    return out


def test_sgd_step():
    (u,) = _updates(sgd(0.1), [G1])
    np.testing.assert_allclose(u, [-0.05, 0.1, -0.2], rtol=1e-6)


def test_heavy_ball_momentum_two_steps_by_hand():
    # m1 = g1; m2 = 0.9 g1 + g2; update = -lr m.
    u1, u2 = _updates(sgdm(0.1), [G1, G2])
    np.testing.assert_allclose(u1, [-0.05, 0.1, -0.2], rtol=1e-6)
    m2 = 0.9 * G1 + G2  # [0.2, -0.15, 2.8]
    np.testing.assert_allclose(u2, -0.1 * m2, rtol=1e-6)
    np.testing.assert_allclose(u2, [-0.02, 0.015, -0.28], rtol=1e-5)


def test_adam_matches_optax_adam_with_paper_constants():
    grads = [G1, G2, -G1, 3 * G2]
    ours = _updates(adam(1e-2), grads)
    ref = _updates(optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8), grads)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # And the first step by hand: mhat = g, vhat = g^2, so -lr * sign(g).
    # (float32: 1 - 0.999 carries a relative error of about 1e-5.)
    np.testing.assert_allclose(ours[0], -1e-2 * np.sign(G1), rtol=1e-4)


@pytest.mark.parametrize("make", [sgd, sgdm, adam])
def test_extra_args_and_schedules_accepted(make):
    opt = make(optax.linear_schedule(0.1, 0.0, 10))
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    state = opt.init(jnp.zeros(3))
    u, _ = opt.update(jnp.ones(3), state, None, loss=1.0, key=None)
    assert u.shape == (3,)


@pytest.mark.parametrize("make", [sgd, sgdm, adam])
@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf"), True])
def test_bad_learning_rate(make, lr):
    with pytest.raises(ValueError, match="learning_rate"):
        make(lr)


def test_bad_momentum_and_betas():
    with pytest.raises(ValueError, match=r"momentum must lie in \[0.0, 1.0\)"):
        sgdm(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="b2 must lie in"):
        adam(0.1, b2=1.5)
