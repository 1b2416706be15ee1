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

from learnopt.tasks.base import TaskFamily
from learnopt.tasks.families import registry
from learnopt.tasks.families.taskset_data import TaskSetLimits

# Cheap options per family group (see registry.get_family for what each group takes).
TINY_OPTIONS = {
    "velo_": dict(size="tiny", data="synthetic"),
    "taskset_": dict(limits=TaskSetLimits.tiny(), synthetic=True),
    "synthetic": dict(max_dim=20, max_examples=200),
    "quadratic": dict(max_dim=50),
}


def tiny_options(name: str) -> dict:
    return next(opts for prefix, opts in TINY_OPTIONS.items() if name.startswith(prefix))


FAMILY_BUILDERS = {
    name: (lambda name=name: registry.get_family(name, **tiny_options(name)))
    for name, _ in registry.list_families()
}


def test_registry_has_every_family_once_and_each_is_a_task_family():
    names = [name for name, _ in registry.list_families()]
    assert len(names) == len(set(names)) == 9 + 11 + 2  # VeLO, TaskSet, synthetic, quadratic
    assert sum(n.startswith("velo_") for n in names) == 9
    assert sum(n.startswith("taskset_") for n in names) == 11
    for name, description in registry.list_families():
        family = FAMILY_BUILDERS[name]()
        assert isinstance(family, TaskFamily), name
        assert description and "\n" not in description and len(description) <= 90, name
        assert isinstance(family.sample(jax.random.PRNGKey(0)), family.config_type), name
    with pytest.raises(ValueError, match="valid families: velo_mlp, velo_conv"):
        registry.get_family("mlp")


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
