"""The optimizer registry: names, defaults, options and error messages."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learnopt.optimizers import OPTIMIZERS, NAdamWConfig, get_optimizer, list_optimizers

NAMES = ["sgd", "momentum", "adam", "nadamw"]


def _first_update(opt, g=(1.0, -2.0)):
    p = jnp.ones(2)
    u, _ = opt.update(jnp.asarray(g), opt.init(p), p, loss=jnp.float32(3.0))
    return np.asarray(u)


def test_listing():
    listing = list_optimizers()
    assert [name for name, _ in listing] == NAMES
    assert list(OPTIMIZERS) == NAMES
    for _, desc in listing:
        assert isinstance(desc, str) and desc and "\n" not in desc


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_takes_extra_args(name):
    opt = get_optimizer(name, num_steps=10)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    assert _first_update(opt).shape == (2,)


def test_default_learning_rates():
    np.testing.assert_allclose(_first_update(get_optimizer("sgd")), [-0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(_first_update(get_optimizer("momentum")), [-0.01, 0.02], rtol=1e-6)
    np.testing.assert_allclose(_first_update(get_optimizer("adam")), [-1e-3, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(
        _first_update(get_optimizer("nadamw", num_steps=10)), [-1e-3, 1e-3], rtol=1e-5
    )
    assert {n: i.default_learning_rate for n, i in OPTIMIZERS.items()} == {
        "sgd": 0.1,
        "momentum": 0.01,
        "adam": 1e-3,
        "nadamw": 1e-3,
    }


def test_learning_rate_and_options_pass_through():
    np.testing.assert_allclose(_first_update(get_optimizer("sgd", 0.5)), [-0.5, 1.0], rtol=1e-6)
    opt = get_optimizer("momentum", 0.1, momentum=0.5)
    p = jnp.zeros(1)
    state = opt.init(p)
    _, state = opt.update(jnp.ones(1), state, p)
    u, _ = opt.update(jnp.ones(1), state, p)
    np.testing.assert_allclose(u, [-0.15], rtol=1e-6)  # -0.1 * (0.5 * 1 + 1)


def test_nadamw_config_and_overrides():
    cfg = NAdamWConfig(learning_rate=0.05, adamw_wd=0.1)
    via_cfg = _first_update(get_optimizer("nadamw", num_steps=10, config=cfg))
    np.testing.assert_allclose(via_cfg, _first_update(cfg.optimizer(10)), rtol=1e-7)
    # u = sign(g); update = -0.05 * (sign(g) + 0.1 * 1).
    np.testing.assert_allclose(via_cfg, [-0.055, 0.045], rtol=1e-5)
    lr_override = _first_update(get_optimizer("nadamw", 0.01, num_steps=10, config=cfg))
    np.testing.assert_allclose(lr_override, [-0.011, 0.009], rtol=1e-5)
    field_override = _first_update(get_optimizer("nadamw", 0.01, num_steps=10, adamw_wd=0.0))
    np.testing.assert_allclose(field_override, [-0.01, 0.01], rtol=1e-5)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'") as err:
        get_optimizer("lion")
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_learning_rate(name, lr):
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        get_optimizer(name, lr, num_steps=10)


def test_nadamw_needs_num_steps():
    with pytest.raises(ValueError, match="num_steps is required"):
        get_optimizer("nadamw", 1e-3)


def test_unknown_option_is_named():
    with pytest.raises(
        ValueError, match=r"unexpected options \['momentum'\]; accepted options: b1"
    ):
        get_optimizer("adam", momentum=0.9)
    with pytest.raises(ValueError, match="accepted options: none"):
        get_optimizer("sgd", b1=0.9)
    with pytest.raises(ValueError, match="config must be an NAdamWConfig"):
        get_optimizer("nadamw", num_steps=10, config={"beta1": 0.9})
