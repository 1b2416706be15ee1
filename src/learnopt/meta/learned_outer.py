"""A learned optimizer as the outer optimizer: meta-parameters updated by a learned optimizer.

Metz et al. 2020, "Tasks, stability, architecture, and compute: training more effective
learned optimizers" (arXiv:2009.11243, §4.6, App. F.4) train a freshly initialised learned
optimizer with an already trained one in place of Adam. The learned outer optimizer sees the
meta-gradient estimate as its gradient and, having no validation loss, "the training loss for
both" loss features: the outer loss of the estimate. It has no hyperparameters, but it still
needs the elementwise outer-gradient clip of ``[-0.1, 0.1]``; without it "no progress" is
made. Metz et al. 2021, "Training Learned Optimizers with Randomly Initialized Learned
Optimizers" (arXiv:2101.07367) use a population member's current ("online") meta-parameters
as the outer optimizer of another member (:mod:`learnopt.meta.pbt`).

:func:`learned_outer_optimizer` is an ``optax.GradientTransformationExtraArgs`` over the
meta-parameters ``theta`` of the optimizer being trained (the "params" of the outer
problem)::

    outer = learned_outer_optimizer(get_learned_optimizer("small_fc_lopt"), trained_theta)
    learner = Learner(optimizer=outer)             # meta.learner, in place of Adam
    state = learner.init(fresh_theta)
    state, applied = learner.apply(state, meta_grad, loss=meta_loss)

``update(grads, state, params, *, loss=None, outer_theta=None)``: ``grads`` (the meta-gradient)
is clipped to ``[-clip, clip]`` elementwise, then given to the outer learned optimizer built
from ``outer_theta`` (the online meta-parameters of another optimizer, a traced argument, so
a changing ``outer_theta`` does not recompile) or, when that is None, from the ``theta`` given
at construction. ``loss`` (the outer loss) is passed as both ``loss`` and ``valid_loss``
(arXiv:2009.11243, App. F.4); optimizers without loss features ignore it. The state is the
outer learned optimizer's own state (its accumulators) over ``params``; its structure does not
depend on ``theta``, so one state can be carried while the outer meta-parameters change.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.learned.base import LearnedOptimizer, MetaParams

DEFAULT_CLIP = 0.1  # arXiv:2009.11243, App. F.4: "[-0.1, 0.1]"
DEFAULT_NUM_STEPS = 10_000  # the inner horizon the outer optimizer is told (App. F.4: 10k)


class LearnedOuterState(NamedTuple):
    """The outer learned optimizer's state over the trained meta-parameters."""

    inner: Any


def clip_elementwise(tree: Any, clip: float | None) -> Any:
    """Every value of ``tree`` clipped to ``[-clip, clip]`` (unchanged for 0 or None)."""
    if not clip:
        return tree
    return jax.tree_util.tree_map(lambda g: jnp.clip(g, -clip, clip), tree)


def learned_outer_optimizer(
    lopt: LearnedOptimizer,
    theta: MetaParams | None = None,
    *,
    clip: float | None = DEFAULT_CLIP,
    num_steps: int = DEFAULT_NUM_STEPS,
) -> optax.GradientTransformationExtraArgs:
    """``lopt`` with meta-parameters ``theta`` as an optax outer optimizer (module docstring).

    Args:
      lopt: the outer learned optimizer's architecture (any of ``learned.registry``).
      theta: its meta-parameters; None means every ``update`` must pass ``outer_theta``.
      clip: elementwise clip of the meta-gradient before the outer optimizer sees it
        (0.1 as in arXiv:2009.11243, App. F.4); 0 or None: no clip.
      num_steps: the horizon the outer optimizer is built for (its time features).
    """
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)
                             or not math.isfinite(clip) or clip < 0):
        raise ValueError(f"clip must be a finite number >= 0 (0 or None: off), got {clip!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    fixed = theta

    def opt_for(outer_theta: MetaParams | None) -> optax.GradientTransformation:
        use = fixed if outer_theta is None else outer_theta
        if use is None:
            raise ValueError("learned_outer_optimizer was built without theta: pass "
                             "outer_theta= to update (the outer optimizer's meta-parameters)")
        return lopt.optimizer(use, num_steps)

    def init_fn(params: Any) -> LearnedOuterState:
        # The state's structure does not depend on the meta-parameters: build it with any.
        template = fixed if fixed is not None else lopt.init(jax.random.PRNGKey(0))
        return LearnedOuterState(lopt.optimizer(template, num_steps).init(params))

    def update_fn(updates: Any, state: LearnedOuterState, params: Any = None, *,
                  loss: Any = None, outer_theta: MetaParams | None = None, **extra: Any):
        del extra
        if params is None:
            raise ValueError("the learned outer optimizer needs params (the trained theta)")
        grads = clip_elementwise(updates, clip)
        kwargs = {}
        if loss is not None:
            loss = jnp.asarray(loss, jnp.float32)
            kwargs = {"loss": loss, "valid_loss": loss}
        new_updates, inner = opt_for(outer_theta).update(grads, state.inner, params, **kwargs)
        return new_updates, LearnedOuterState(inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
