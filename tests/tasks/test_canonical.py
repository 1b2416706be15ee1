"""The canonical (VeLOdrome-style) tasks build on the installed data with finite losses."""

import jax
import numpy as np
import pytest

from learnopt.tasks.fixed.canonical import build_canonical, canonical_names
from learnopt.tasks.data import registry


@pytest.mark.slow
@pytest.mark.parametrize("name", canonical_names())
def test_canonical_task_loss_and_gradient_finite(name):
    if not (registry.is_present("fashion_mnist") and registry.is_present("shakespeare")):
        pytest.skip("data not installed (run make setup)")
    task = build_canonical(name)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.datasets.train.sample(jax.random.PRNGKey(1))
    loss, grads = jax.jit(jax.value_and_grad(task.loss))(params, jax.random.PRNGKey(2), batch)
    assert np.isfinite(float(loss)) and np.isfinite(float(task.normalizer(loss)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


def test_unknown_canonical_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: ImageMLP_FashionMnist8_Relu32"):
        build_canonical("ImageMLP_Cifar10")
