"""NAdamW (arXiv:2203.11860, App. F.1, Eqs. 10-21) against updates worked out by hand in numpy."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.optimizers import NAdamWConfig, nadamw

# A diagonal quadratic, f(phi) = sum(0.5 * A phi^2 + C phi), so grad = A phi + C.
A = np.array([1.0, 2.0, 0.5])
C = np.array([0.1, -0.3, 0.2])
PHI0 = np.array([0.5, -1.5, 2.0])

HP = dict(
    learning_rate=0.1,
    beta1=0.8,
    beta2=0.95,
    eps=1e-3,  # large enough that eps placement matters
    l2_wd=0.05,
    adamw_wd=0.02,
    warmup_fraction=0.0,
    constant_fraction=0.0,
    min_lr_mult=0.1,
)
T = 4


def _alpha(t):
    """Eqs. 4-9 as the library runs them, for wf = cf = 0: cosine from lr to 0.1 lr."""
    lr, lo = HP["learning_rate"], HP["min_lr_mult"] * HP["learning_rate"]
    return (lr - lo) * (0.5 * math.cos(math.pi * t / T) + 0.5) + lo


def _hand_two_steps(nesterov: bool):
    b1, b2, eps = HP["beta1"], HP["beta2"], HP["eps"]
    l2, wd = HP["l2_wd"], HP["adamw_wd"]
    b = 1.0 if nesterov else 0.0

    # t = 0
    phi0 = PHI0
    g0 = A * phi0 + C + l2 * phi0  # Eq. 13 with the l2_wd * phi scale
    m1 = (1 - b1) * g0
    v1 = (1 - b2) * g0**2
    mhat = m1 / (1 - b1)
    vhat = v1 / (1 - b2)
    u_hb = mhat / (np.sqrt(vhat) + eps)
    u_nes = (b1 * mhat + (1 - b1) * g0) / (np.sqrt(vhat) + eps)
    a0 = _alpha(0)
    phi1 = phi0 - (1 - b) * a0 * u_hb - b * a0 * u_nes - a0 * wd * phi0

    # t = 1
    g1 = A * phi1 + C + l2 * phi1
    m2 = b1 * m1 + (1 - b1) * g1
    v2 = b2 * v1 + (1 - b2) * g1**2
    mhat = m2 / (1 - b1**2)
    vhat = v2 / (1 - b2**2)
    u_hb = mhat / (np.sqrt(vhat) + eps)
    u_nes = (b1 * mhat + (1 - b1) * g1) / (np.sqrt(vhat) + eps)
    a1 = _alpha(1)
    phi2 = phi1 - (1 - b) * a1 * u_hb - b * a1 * u_nes - a1 * wd * phi1
    return phi1, phi2


def _run(opt, steps):
    phi = jnp.asarray(PHI0, jnp.float32)
    state = opt.init(phi)
    out = []
    for _ in range(steps):
        grad = jnp.asarray(A, jnp.float32) * phi + jnp.asarray(C, jnp.float32)
        updates, state = opt.update(grad, state, phi, loss=jnp.float32(1.0))
        phi = optax.apply_updates(phi, updates)
        out.append(np.asarray(phi))
    return out, state


@pytest.mark.parametrize("nesterov", [True, False])
def test_one_and_two_steps_match_hand_computation(nesterov):
    phi1, phi2 = _hand_two_steps(nesterov)
    (got1, got2), state = _run(nadamw(**HP, use_nesterov=nesterov, num_steps=T), 2)
    np.testing.assert_allclose(got1, phi1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got2, phi2, rtol=1e-5, atol=1e-7)
    assert int(state.count) == 2


def test_nesterov_and_heavy_ball_differ():
    on1, on2 = _hand_two_steps(True)
    off1, off2 = _hand_two_steps(False)
    # At t = 0, mhat = g, so both directions coincide; they part at t = 1.
    np.testing.assert_allclose(on1, off1, rtol=1e-12)
    assert np.max(np.abs(on2 - off2)) > 1e-4


def test_first_step_is_minus_lr_times_sign():
    # No decay, tiny eps: mhat = g and vhat = g^2 at t = 0, so the step is -lr * sign(g)
    # for both Nesterov and heavy ball.
    for nes in (True, False):
        opt = nadamw(learning_rate=1e-3, use_nesterov=nes, num_steps=10)
        g = jnp.array([2.0, -0.5, 1e-3])
        updates, _ = opt.update(g, opt.init(g))
        np.testing.assert_allclose(updates, [-1e-3, 1e-3, -1e-3], rtol=1e-4)


def test_weight_decay_signs_shrink_weights():
    # Zero loss gradient: only the two decays act, and both must pull phi toward 0.
    # Coupled l2 alone: g = l2 * phi, so the first step is -lr * sign(phi).
    phi = jnp.array([1.0, -2.0])
    opt = nadamw(learning_rate=0.1, l2_wd=0.01, num_steps=10)
    updates, _ = opt.update(jnp.zeros(2), opt.init(phi), phi)
    np.testing.assert_allclose(updates, [-0.1, 0.1], rtol=1e-5)
    # Decoupled alone: u = 0 (eps > 0), the step is -lr * adamw_wd * phi.
    opt = nadamw(learning_rate=0.1, adamw_wd=0.5, num_steps=10)
    updates, _ = opt.update(jnp.zeros(2), opt.init(phi), phi)
    np.testing.assert_allclose(updates, [-0.05, 0.1], rtol=1e-6)


def test_first_update_with_warmup_is_zero():
    opt = nadamw(learning_rate=0.1, warmup_fraction=0.1, adamw_wd=0.1, num_steps=10)
    phi = jnp.ones(3)
    updates, state = opt.update(jnp.ones(3), opt.init(phi), phi)
    np.testing.assert_array_equal(updates, np.zeros(3))
    # The second update (schedule step 1 of a 10-step ramp) is not.
    updates, _ = opt.update(jnp.ones(3), state, phi)
    assert np.all(np.asarray(updates) < 0)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 1, 3, 2)])
def test_elementwise_on_rank_0_1_2_4(shape):
    n = int(np.prod(shape))
    g = np.linspace(-1.0, 2.0, n).reshape(shape)
    p = np.linspace(0.5, -0.5, n).reshape(shape)
    opt = nadamw(learning_rate=0.1, l2_wd=0.1, adamw_wd=0.1, eps=0.1, num_steps=5)
    tree = {"w": jnp.asarray(p, jnp.float32)}
    updates, _ = opt.update({"w": jnp.asarray(g, jnp.float32)}, opt.init(tree), tree)
    gg = g + 0.1 * p  # t = 0: mhat = gg, sqrt(vhat) = |gg|
    want = -0.1 * (gg / (np.abs(gg) + 0.1) + 0.1 * p)
    assert updates["w"].shape == shape
    np.testing.assert_allclose(updates["w"], want, rtol=1e-5, atol=1e-7)


def test_hyperparameters_can_be_vmapped():
    phi = jnp.asarray(PHI0, jnp.float32)
    grad = jnp.asarray(A * PHI0 + C, jnp.float32)

    def one_step(lr, nes):
        opt = nadamw(**{**HP, "learning_rate": lr}, use_nesterov=nes, num_steps=T)
        state = opt.init(phi)
        _, state = opt.update(grad, state, phi)
        updates, _ = opt.update(grad, state, phi)
        return updates

    lrs = jnp.array([0.1, 0.01])
    nes = jnp.array([True, False])
    batched = jax.vmap(one_step)(lrs, nes)
    for i in range(2):
        single = one_step(float(lrs[i]), bool(nes[i]))
        np.testing.assert_allclose(batched[i], single, rtol=1e-5)


def test_params_required_when_decay_is_on():
    opt = nadamw(learning_rate=0.1, adamw_wd=0.1, num_steps=10)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(jnp.ones(2), opt.init(jnp.ones(2)))
    # Without decay, params may be omitted.
    opt = nadamw(learning_rate=0.1, num_steps=10)
    updates, _ = opt.update(jnp.ones(2), opt.init(jnp.ones(2)))
    assert updates.shape == (2,)


def test_is_extra_args_transformation():
    opt = nadamw(num_steps=10)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    _, state = opt.update(jnp.ones(2), opt.init(jnp.ones(2)), None, loss=1.0, foo="bar")
    assert int(state.count) == 1


def test_config_dict_round_trip():
    cfg = NAdamWConfig(
        learning_rate=3e-4,
        beta1=0.95,
        beta2=0.99,
        eps=1e-6,
        l2_wd=1e-3,
        adamw_wd=1e-2,
        use_nesterov=False,
        warmup_fraction=0.05,
        constant_fraction=0.25,
        min_lr_mult=0.01,
    )
    d = cfg.to_dict()
    assert sorted(d) == sorted(
        [
            "learning_rate",
            "beta1",
            "beta2",
            "eps",
            "l2_wd",
            "adamw_wd",
            "use_nesterov",
            "warmup_fraction",
            "constant_fraction",
            "min_lr_mult",
        ]
    )
    assert NAdamWConfig.from_dict(d) == cfg
    assert NAdamWConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta1 = 0.5  # type: ignore[misc]


def test_config_coerces_numpy_values_to_python():
    cfg = NAdamWConfig(learning_rate=np.float64(0.01), use_nesterov=np.bool_(False))
    assert type(cfg.learning_rate) is float and cfg.use_nesterov is False
    json.dumps(cfg.to_dict())


def test_config_optimizer_matches_function():
    cfg = NAdamWConfig(**HP, use_nesterov=True)
    (_, a2), _ = _run(cfg.optimizer(T), 2)
    (_, b2), _ = _run(nadamw(**HP, use_nesterov=True, num_steps=T), 2)
    np.testing.assert_array_equal(a2, b2)
    assert float(cfg.schedule(T)(T)) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
        ("beta1", 1.0, r"beta1 must lie in \[0.0, 1.0\)"),
        ("beta2", -0.1, r"beta2 must lie in \[0.0, 1.0\)"),
        ("eps", -1e-8, "eps must lie in"),
        ("l2_wd", -1.0, "l2_wd must lie in"),
        ("adamw_wd", float("inf"), "adamw_wd must lie in"),
        ("warmup_fraction", 1.5, "warmup_fraction must lie in"),
        ("constant_fraction", -0.1, "constant_fraction must lie in"),
        ("min_lr_mult", 2.0, "min_lr_mult must lie in"),
        ("use_nesterov", 1, "use_nesterov must be a bool"),
    ],
)
def test_config_rejects_bad_values(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        NAdamWConfig(**{field: value})


def test_config_from_dict_rejects_unknown_and_missing_keys():
    d = NAdamWConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        NAdamWConfig.from_dict({**d, "lr": 0.1})
    del d["eps"]
    with pytest.raises(ValueError, match=r"missing keys \['eps'\]"):
        NAdamWConfig.from_dict(d)


def test_nadamw_requires_num_steps():
    with pytest.raises(ValueError, match="num_steps is required"):
        nadamw(num_steps=None)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        nadamw(num_steps=0)
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        nadamw(learning_rate=optax.constant_schedule(0.1), num_steps=10)


@pytest.mark.parametrize("beta2", [1 - 1e-5, 0.999, 0.0])
def test_bias_correction_is_accurate_for_beta_near_one_and_zero(beta2):
    # beta1 = 0, eps = 0: the first bias-corrected step is exactly -lr * sign(g). A naive
    # float32 1 - beta2**1 is off by ~1e-3 relative at beta2 = 1 - 1e-5 (the F.2 edge).
    opt = nadamw(
        learning_rate=1.0, beta1=0.0, beta2=beta2, eps=0.0, use_nesterov=False, num_steps=10
    )
    g = jnp.array([3.0, -0.25])
    updates, _ = opt.update(g, opt.init(g))
    np.testing.assert_allclose(updates, [-1.0, 1.0], rtol=1e-6)
