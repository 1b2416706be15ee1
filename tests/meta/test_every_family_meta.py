"""Every sampled family and every augmentation under one multi-task PES outer step of 8 inner
runs (small_fc_lopt): it finishes (under a watchdog), with a finite meta-loss and gradient.
Slow: one compile per family; ``pytest -m slow -s tests/meta/test_every_family_meta.py``
prints each one's seconds."""

import time

import jax
import numpy as np
import pytest

from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.multitask import MultiTaskEstimator
from learnopt.meta.sources import MixtureEntry, TaskDraw, TaskMixture, TaskSource
from learnopt.tasks import augment
from learnopt.tasks.families import registry
from learnopt.tasks.families.taskset_data import TaskSetLimits
from learnopt.tasks.fixed.registry import get_task
from learnopt.trees import tree_all_finite

pytestmark = pytest.mark.slow

OPTIONS = {  # CPU sizes and installed data for VeLO; small TaskSet / synthetic configs
    "velo_": {"size": "cpu"},
    "taskset_": {"limits": TaskSetLimits.tiny()},
    "synthetic": {"max_dim": 100},
    "quadratic": {"max_dim": 100},
}
AUGMENTATIONS = {
    "reparam_parameter": augment.AugmentationConfig(reparam_level="parameter",
                                                    reparam_range=(0.01, 100.0)),
    "es": augment.AugmentationConfig(es_std=0.01, es_pairs=4),
    "batch": augment.AugmentationConfig(batch_fraction=0.3),
    "bf16": augment.AugmentationConfig(bf16=True),
    "normalize": augment.AugmentationConfig(normalize_gradient=True),
    "directional": augment.AugmentationConfig(num_directions=16, direction_sign=True),
    "delay": augment.AugmentationConfig(delay=3),
}
LOPT = get_learned_optimizer("small_fc_lopt")
THETA = LOPT.init(jax.random.PRNGKey(0))
SETTINGS = dict(num_slots=1, num_tasks=8, horizon=200, trunc_length=20,
                watchdog={"first_s": 900.0})


def one_outer_step(source) -> tuple[float, str]:
    engine = MultiTaskEstimator(source, LOPT, **SETTINGS)
    start = time.perf_counter()
    state = engine.init_state(THETA, jax.random.PRNGKey(1))
    out = engine.estimate(THETA, state, jax.random.PRNGKey(2))
    seconds = time.perf_counter() - start
    assert out.metrics["tasks_hung"] == 0
    assert np.isfinite(float(out.meta_loss)) and bool(tree_all_finite(out.grad))
    return seconds, engine.draw(0).task.name


@pytest.mark.parametrize("name", [name for name, _ in registry.list_families()])
def test_every_family_finishes_an_8_task_pes_outer_step(name):
    options = next(v for prefix, v in OPTIONS.items() if name.startswith(prefix))
    source = TaskSource(TaskMixture((MixtureEntry(family=name, options=options),)), seed=0)
    seconds, task = one_outer_step(source)
    print(f"\n{name}: {seconds:.1f} s ({task})")


class OneTask:
    def __init__(self, task):
        self.task, self.mixture = task, TaskMixture((MixtureEntry(task="fmnist_mlp_8x8"),), True)

    def draw(self, index):
        return TaskDraw(index, self.task, {"entry": self.task.name})


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_every_augmentation_finishes_an_8_task_pes_outer_step(name):
    task = augment.apply(get_task("fmnist_mlp_8x8"), AUGMENTATIONS[name])
    seconds, _ = one_outer_step(OneTask(task))
    print(f"\n{name}: {seconds:.1f} s ({task.name})")
