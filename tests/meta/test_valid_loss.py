"""Validation-loss plumbing of the unroll: ``valid_loss=`` for optimizers that use it
(arXiv:2009.11243, App. C.3) and a meta-objective on another split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.learned.base import LearnedOptimizer
from learnopt.meta.unroll import TruncatedUnroll
from learnopt.step import declare_extra_args
from learnopt.tasks.base import ArraySplit, Datasets
from learnopt.tasks.image import ImageClassificationTask
from learnopt.tasks.models import standard as models

RNG = np.random.default_rng(0)
A = RNG.uniform(size=(1, 3, 3)).astype(np.float32)  # every inner_valid example
B = RNG.uniform(size=(1, 3, 3)).astype(np.float32)  # every outer_valid example


def split(x, y):
    return ArraySplit({"image": x, "label": np.asarray(y, np.int32)}, batch_size=4)


DATASETS = Datasets(
    train=split(RNG.uniform(size=(20, 3, 3)).astype(np.float32), RNG.integers(0, 2, 20)),
    inner_valid=split(np.repeat(A, 6, 0), np.zeros(6)),
    outer_valid=split(np.repeat(B, 6, 0), np.ones(6)),
    test=split(np.repeat(B, 6, 0), np.ones(6)),
    extra_info={"num_classes": 2, "image_shape": (3, 3)},
)
TASK = ImageClassificationTask("tiny", models.MLP((3,), 2), DATASETS)


class RecordingSGD(LearnedOptimizer):
    """SGD whose state keeps the last ``valid_loss`` it was given."""

    name = "recording_sgd"

    def init(self, key):
        return {"lr": jnp.asarray(0.1)}

    def optimizer(self, theta, num_steps):
        def init(params):
            return jnp.asarray(-1.0)

        def update(grads, state, params=None, *, loss=None, valid_loss=None, **_):
            return jax.tree_util.tree_map(lambda g: -theta["lr"] * g, grads), valid_loss

        return declare_extra_args(
            optax.GradientTransformationExtraArgs(init, update), ("loss", "valid_loss")
        )


def test_valid_loss_is_the_inner_valid_loss_and_meta_loss_can_use_outer_valid():
    lopt = RecordingSGD()
    theta = lopt.init(None)
    unroll = TruncatedUnroll(
        TASK,
        lopt,
        num_tasks=2,
        horizon=10,
        trunc_length=1,
        random_offset=False,
        meta_loss_split="outer_valid",
    )
    state = unroll.init_state(theta, jax.random.PRNGKey(0))
    before = state.params
    state, out = unroll.unroll(theta, state, jax.random.PRNGKey(1))
    for i in range(2):
        p = jax.tree_util.tree_map(lambda x, i=i: x[i], before)
        valid = TASK.loss(p, None, {"image": jnp.asarray(A), "label": jnp.zeros(1, jnp.int32)})
        outer = TASK.loss(p, None, {"image": jnp.asarray(B), "label": jnp.ones(1, jnp.int32)})
        np.testing.assert_allclose(state.opt_state[i], valid, rtol=1e-5)
        np.testing.assert_allclose(out.losses[0, i], outer, rtol=1e-5)
        assert not np.isclose(float(out.raw_losses[0, i]), float(outer))  # raw stays train loss
