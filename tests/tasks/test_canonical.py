"""The canonical (VeLOdrome-style) tasks build on the installed data with finite losses."""

import jax
import numpy as np
import pytest

from learnopt.tasks.data import registry
from learnopt.tasks.fixed.registry import TASKS, bench_names, canonical_names, get_task


@pytest.mark.slow
@pytest.mark.parametrize("name", canonical_names())
def test_canonical_task_loss_and_gradient_finite(name):
    if not (registry.is_present("fashion_mnist") and registry.is_present("shakespeare")):
        pytest.skip("data not installed (run make setup)")
    task = get_task(name)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.datasets.train.sample(jax.random.PRNGKey(1))
    loss, grads = jax.jit(jax.value_and_grad(task.loss))(params, jax.random.PRNGKey(2), batch)
    assert np.isfinite(float(loss)) and np.isfinite(float(task.normalizer(loss)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


def test_unknown_canonical_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: .*ImageMLP_FashionMnist8_Relu32"):
        get_task("ImageMLP_Cifar10")


def test_one_registry_with_one_line_descriptions():
    names = canonical_names()
    # 10 VeLOdrome-style tasks (7 families) and 2 LOpt tasks, in the one task registry.
    assert len(names) == 12 and names[0] == "ImageMLP_FashionMnist8_Relu32"
    assert all(TASKS[n].canonical and TASKS[n].description.startswith("[canonical]") for n in names)
    assert len(TASKS) == 9 + 12 + 26 and len(bench_names()) == 26  # named, canonical, bench
    for entry in TASKS.values():
        assert entry.description and "\n" not in entry.description, entry.name
        assert len(entry.description) <= 100, entry.name
