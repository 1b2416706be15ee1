"""The LearnedOptimizer interface.

A learned optimizer is a function of meta-parameters ``theta`` that returns an
ordinary optax transformation, so a user trains a model with it exactly as
with ``optax.adam``. This is the layering of Metz et al. 2020 (arXiv:2009.11243, §3) and
Metz et al. 2022 (arXiv:2203.11860, §2), with the parameters kept out of the optimizer state,
unlike learned_optimization (github.com/google/learned_optimization):

    lopt = SmallFcLOpt()
    theta = lopt.init(jax.random.PRNGKey(0))
    opt = lopt.optimizer(theta, num_steps=2000)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, loss=loss)
    params = optax.apply_updates(params, updates)

``theta`` is a pytree of arrays; ``optimizer`` must be traceable in ``theta``
(meta-gradients flow through it) and its state must survive jit and vmap.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import optax

MetaParams = Any


class LearnedOptimizer(abc.ABC):
    """Meta-parameters in, an optax ``GradientTransformationExtraArgs`` out."""

    name: str = "learned_optimizer"

    @abc.abstractmethod
    def init(self, key: jax.Array) -> MetaParams:
        """Initial meta-parameters ``theta``."""

    @abc.abstractmethod
    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """The inner optimizer for a run of ``num_steps`` steps.

        Its ``update(grads, state, params, **extra_args)`` returns updates to add to the
        parameters. The extra arguments (``loss``, ``valid_loss``) and how an optimizer
        declares the ones it reads are defined once, in :mod:`learnopt.step`.
        """

    def num_meta_params(self, key: jax.Array | None = None) -> int:
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0) if key is None else key)
        return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
