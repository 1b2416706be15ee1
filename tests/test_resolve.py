"""Optimizers named on the command line: hand-designed with options, pretrained, run dirs."""

import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.resolve import resolve_optimizer


def _one_update(opt, grad=1.0):
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = opt.init(params)
    g = {"w": jnp.asarray([grad, grad])}
    updates, _ = opt.update(g, state, params, loss=jnp.asarray(1.0))
    return np.asarray(updates["w"])


def test_hand_designed_spec_with_options():
    sgd = resolve_optimizer("sgd:lr=0.25")
    assert (sgd.label, sgd.kind, sgd.setting) == ("sgd:lr=0.25", "hand", "lr=0.25")
    np.testing.assert_allclose(_one_update(sgd.make(10)), [-0.25, -0.25])
    # The first Adam step is lr * sign(g) (bias-corrected moments).
    np.testing.assert_allclose(_one_update(resolve_optimizer("adam:lr=3e-3").make(10), 5.0),
                               [-3e-3, -3e-3], rtol=1e-4)
    assert resolve_optimizer("adam").setting == "lr=0.001"


@pytest.mark.parametrize("spec, match", [
    ("adam:lr", "key=value"),
    ("adam:lr=fast", "needs a number"),
    ("adam:beta=0.5", "unexpected options"),
    ("adam:lr=-1", "learning"),
    ("bogus", "unknown optimizer 'bogus'"),
    ("", "non-empty"),
])
def test_bad_specs_are_refused_with_a_reason(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_optimizer(spec)


def test_pretrained_and_run_directory(tmp_path):
    from learnopt import pretrained
    from learnopt.io import save_checkpoint
    from learnopt.meta.train import MetaTrainConfig

    name = pretrained.available()[0]
    shipped = resolve_optimizer(name)
    assert shipped.kind == "pretrained" and np.all(np.isfinite(_one_update(shipped.make(100))))
    # A run directory: its config and latest theta (here the shipped theta, copied).
    lopt, theta, _ = pretrained.load(name)
    run = tmp_path / "myrun"
    run.mkdir()
    config = MetaTrainConfig(lopt=lopt.name, lopt_config=lopt.config())
    (run / "config.json").write_text(config.to_json())
    with pytest.raises(FileNotFoundError, match="without a theta"):
        resolve_optimizer(str(run))
    save_checkpoint(run / "theta.msgpack", theta)
    from_run = resolve_optimizer(str(run) + "/")
    assert from_run.label == "myrun" and from_run.kind == "run"
    np.testing.assert_array_equal(_one_update(from_run.make(100)),
                                  _one_update(shipped.make(100)))


def test_a_learning_rate_given_apart_sets_a_hand_designed_optimizer_only():
    """`learnopt train --optimizer NAME --lr LR` goes through resolve_optimizer."""
    from learnopt import pretrained

    sgd = resolve_optimizer("sgd", learning_rate=0.5)
    assert sgd.setting == "lr=0.5"
    np.testing.assert_allclose(_one_update(sgd.make(10)), [-0.5, -0.5])
    assert resolve_optimizer("sgd:lr=0.5", learning_rate=0.5).setting == "lr=0.5"
    with pytest.raises(ValueError, match="two learning rates"):
        resolve_optimizer("sgd:lr=0.5", learning_rate=0.1)
    with pytest.raises(ValueError, match="learned optimizer takes no learning rate"):
        resolve_optimizer(pretrained.available()[0], learning_rate=0.1)
    with pytest.raises(ValueError, match="learning"):
        resolve_optimizer("adam", learning_rate=-1.0)
