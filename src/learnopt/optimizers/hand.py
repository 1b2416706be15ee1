"""SGD, SGD with heavy-ball momentum, and Adam: the learning-rate-tuned baselines.

Seed 004 (Metz et al. 2022, "Practical tradeoffs between memory, compute, and
performance in learned optimizers"), §2.1 and App. F: SGD, SGDM with momentum
0.9 (the text's "SGM" is a typo) and Adam with beta1 = 0.9, beta2 = 0.999,
eps = 1e-8, each tuned over the learning rates of
:data:`learnopt.optimizers.search.LR_GRID`.

Each is built from optax primitives and wrapped with
``optax.with_extra_args_support``, so ``update(grads, state, params, loss=...)``
works exactly as for the learned optimizers (extra keyword arguments are
ignored). ``learning_rate`` may be a float, a traced scalar (for vmapped LR
sweeps) or an optax schedule; a concrete value must be finite and > 0.

Update rules (``t`` counts from 1, ``lr`` the learning rate):

* ``sgd``:      ``phi <- phi - lr g``
* ``sgdm``:     heavy ball (Polyak 1964) in the optax/PyTorch form
  ``m <- momentum m + g``, ``phi <- phi - lr m`` with ``m_0 = 0``; the gradient
  is not damped by ``1 - momentum``, so the steady-state step is
  ``lr / (1 - momentum)`` = 10 lr at momentum 0.9.
* ``adam``:     Kingma & Ba 2014 with bias correction, eps outside the square root:
  ``phi <- phi - lr mhat / (sqrt(vhat) + eps)``, identical to ``optax.adam``.
"""

from __future__ import annotations

from typing import Any

import optax

from learnopt.optimizers._validate import check_learning_rate, check_range

LearningRate = Any  # float | jax.Array | optax.Schedule


def sgd(learning_rate: LearningRate) -> optax.GradientTransformationExtraArgs:
    """Plain SGD, ``phi <- phi - lr g`` (seed 004 §2.1)."""
    check_learning_rate(learning_rate)
    return optax.with_extra_args_support(optax.sgd(learning_rate))


def sgdm(
    learning_rate: LearningRate, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
    """SGD with heavy-ball momentum, 0.9 by default (seed 004 §2.1, "SGDM").

    ``m <- momentum m + g``; ``phi <- phi - lr m``.
    """
    check_learning_rate(learning_rate)
    check_range(momentum, "momentum", 0.0, 1.0, high_open=True)
    return optax.with_extra_args_support(
        optax.sgd(learning_rate, momentum=momentum, nesterov=False)
    )


def adam(
    learning_rate: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
    """Adam with the paper's beta1 = 0.9, beta2 = 0.999, eps = 1e-8 (seed 004 §2.1)."""
    check_learning_rate(learning_rate)
    check_range(b1, "b1", 0.0, 1.0, high_open=True)
    check_range(b2, "b2", 0.0, 1.0, high_open=True)
    check_range(eps, "eps", 0.0, float("inf"))
    return optax.with_extra_args_support(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
