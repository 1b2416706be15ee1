"""SGD, SGD with heavy-ball momentum, and Adam: the learning-rate-tuned baselines.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.1 and App. F: SGD, SGDM with momentum 0.9 and Adam with
beta1 = 0.9, beta2 = 0.999, eps = 1e-8, each tuned over the learning rates of
:data:`learnopt.optimizers.search.LR_GRID`.

Each is built from optax primitives and wrapped with ``optax.with_extra_args_support``, so
``update(grads, state, params, loss=...)`` works exactly as for the learned optimizers (extra
keyword arguments are ignored). ``learning_rate`` may be a float, a traced scalar (for vmapped LR
sweeps) or an optax schedule; a concrete value must be finite and > 0. SGDM is the optax/PyTorch
heavy ball ``m <- momentum m + g`` (steady-state step ``lr / (1 - momentum)``); Adam is identical
to ``optax.adam``. Update rules: docs/derivations.md §4.1.
"""

from __future__ import annotations

from typing import Any

import optax

from learnopt.optimizers._validate import check_learning_rate, check_range

LearningRate = Any  # float | jax.Array | optax.Schedule


def sgd(learning_rate: LearningRate) -> optax.GradientTransformationExtraArgs:
    """Plain SGD, ``phi <- phi - lr g`` (arXiv:2203.11860, §2.1)."""
    check_learning_rate(learning_rate)
    return optax.with_extra_args_support(optax.sgd(learning_rate))


def sgdm(
    learning_rate: LearningRate, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
    """SGD with heavy-ball momentum, 0.9 by default (arXiv:2203.11860, §2.1, "SGDM").

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
    """Adam with the paper's beta1 = 0.9, beta2 = 0.999, eps = 1e-8 (arXiv:2203.11860, §2.1)."""
    check_learning_rate(learning_rate)
    check_range(b1, "b1", 0.0, 1.0, high_open=True)
    check_range(b2, "b2", 0.0, 1.0, high_open=True)
    check_range(eps, "eps", 0.0, float("inf"))
    return optax.with_extra_args_support(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
