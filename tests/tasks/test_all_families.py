"""Every sampled family, 100 configs each: the tasks they build have finite init, loss and
gradient (issue: "100 sampled configs give valid tasks"). Tiny sizes on synthetic in-memory
data, so no installed data set is needed; still slow (one compile per sampled shape)."""

import jax
import numpy as np
import pytest

from learnopt.tasks import families, synthetic, taskset
from learnopt.tasks.quadratic import QuadraticFamily
from learnopt.tasks.taskset_data import TaskSetLimits

FAMILY_BUILDERS = {
    **{
        f"velo_{n}": (lambda n=n: families.make_family(n, size="tiny", data="synthetic"))
        for n in families.FAMILIES
    },
    **{
        f"taskset_{n}": (lambda n=n: taskset.get_family(n, TaskSetLimits.tiny(), synthetic=True))
        for n in taskset.FAMILIES
    },
    "synthetic": lambda: synthetic.SyntheticFamily(max_dim=20, max_examples=200),
    "quadratic": lambda: QuadraticFamily(max_dim=50),
}


def finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_BUILDERS))
def test_100_sampled_tasks_have_finite_init_loss_and_gradient(name):
    family = FAMILY_BUILDERS[name]()
    bad = []
    for i in range(100):
        config = family.sample(jax.random.PRNGKey(i))
        task = family.task(config)
        params = task.init(jax.random.PRNGKey(i))
        batch = task.datasets.train.sample(jax.random.PRNGKey(i + 1))
        loss, grads = jax.value_and_grad(task.loss)(params, jax.random.PRNGKey(i + 2), batch)
        if not (finite(params) and finite(task.normalizer(loss)) and finite(grads)):
            bad.append((i, float(loss)))
    assert not bad, f"{len(bad)} of 100 sampled tasks not finite: {bad[:5]}"
