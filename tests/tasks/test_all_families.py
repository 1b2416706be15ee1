"""Every sampled family, 100 configs each: the tasks they build have finite init, loss and
gradient (issue: "100 sampled configs give valid tasks"). Tiny sizes on synthetic in-memory
data, so no installed data set is needed; still slow (one compile per sampled shape).

Compile time dominates. A TaskSet / synthetic / quadratic config has its own shapes, so run
op by op every primitive compiles afresh (about 8 s a config for ``taskset_mlp`` on 2 busy
cores, 13 min for the entry); these entries instead compile ``init`` and
``value_and_grad(loss)`` once per config with XLA's cheap CPU settings (3-5 times faster).
The checks are the same: finite params, finite normalised loss, finite gradient, 100
configs. The ``velo_*`` entries keep the op-by-op calls they were validated with.
"""

import jax
import numpy as np
import pytest

from learnopt.tasks.families import velo as families
from learnopt.tasks.families import synthetic
from learnopt.tasks.families import taskset
from learnopt.tasks.families.quadratic import QuadraticFamily
from learnopt.tasks.families.taskset_data import TaskSetLimits

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


# XLA's cheap CPU settings (as in test_taskset.py): several times less compile time.
CHEAP = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def call_eager(fn, *args):
    return fn(*args)


def call_compiled(fn, *args):
    """``fn(*args)``, jitted and compiled with :data:`CHEAP` settings."""
    return jax.jit(fn).lower(*args).compile(compiler_options=CHEAP)(*args)


def finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_BUILDERS))
def test_100_sampled_tasks_have_finite_init_loss_and_gradient(name):
    family = FAMILY_BUILDERS[name]()
    call = call_eager if name.startswith("velo_") else call_compiled
    bad = []
    for i in range(100):
        config = family.sample(jax.random.PRNGKey(i))
        task = family.task(config)
        params = call(task.init, jax.random.PRNGKey(i))
        batch = task.datasets.train.sample(jax.random.PRNGKey(i + 1))
        loss, grads = call(jax.value_and_grad(task.loss), params, jax.random.PRNGKey(i + 2), batch)
        if not (finite(params) and finite(task.normalizer(loss)) and finite(grads)):
            bad.append((i, float(loss)))
    assert not bad, f"{len(bad)} of 100 sampled tasks not finite: {bad[:5]}"
