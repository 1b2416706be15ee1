"""Hand-designed optimizers whose hyperparameters are the meta-parameters.

Learnable SGD, SGD with momentum and Adam: the "Learnable Adam -- Adam where we meta-learn the
hyperparameters" baseline of Metz et al. 2022, "VeLO", arXiv:2211.09760, App. B.6 (Fig. 17), and
the ``LearnableSGD`` / ``LearnableSGDM`` / ``LearnableAdam`` of learned_optimization
(github.com/google/learned_optimization). ``nn_adam`` (arXiv:2203.11860, §2.2) decodes the same
four Adam hyperparameters from a network's outputs.

They are the cheapest learned optimizers and the natural first check of a meta-gradient
estimator: ``theta`` is a handful of scalars whose exact meta-gradient can be computed on a
quadratic (see ``tests/meta``). ``optimizer(theta, num_steps)`` is the optax alias at the
decoded values (``lr = exp(log_lr)``, ``beta = sigmoid(logit)``, ``eps = exp(log_eps)``), so a
step equals the optax step bit for bit (Adam with ``eps_root``, see ``EPS_ROOT``). Decoding
and rounding: docs/derivations.md §3.7; the logit parametrisation of the decays is a departure
from learned_optimization (docs/departures.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from learnopt.learned.base import LearnedOptimizer, MetaParams

# Added under Adam's square root: far below float32's resolution of any second moment above
# ~1e-22, so steps equal optax.adam's; where a parameter's gradient has been exactly zero
# (v = 0, e.g. a dead ReLU unit) it keeps the meta-gradient finite: d sqrt(v)/dv at 0 is inf
# and inf * 0 gives NaN.
EPS_ROOT = 1e-30


def _check_range(name: str, value: float, low: float, high: float | None) -> None:
    ok = value > low and (high is None or value < high)
    if not ok:
        accepted = f"({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"{name} must be in {accepted}, got {value!r}")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _scalar(x: float) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


class LearnableSGD(LearnedOptimizer):
    """SGD with a learnable learning rate: ``theta = {"log_lr"}``."""

    name = "learnable_sgd"

    def __init__(self, initial_lr: float = 0.01):
        _check_range("initial_lr", initial_lr, 0.0, None)
        self.initial_lr = initial_lr

    def config(self) -> dict[str, float]:
        """The constructor arguments (``LearnableSGD(**lopt.config())`` rebuilds it)."""
        return {"initial_lr": self.initial_lr}

    def init(self, key: jax.Array) -> MetaParams:
        del key
        return {"log_lr": _scalar(math.log(self.initial_lr))}

    def hyperparameters(self, theta: MetaParams) -> dict[str, jax.Array]:
        """The decoded hyperparameters: ``{"learning_rate"}``."""
        return {"learning_rate": jnp.exp(theta["log_lr"])}

    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del num_steps
        return optax.sgd(self.hyperparameters(theta)["learning_rate"])


class LearnableSGDM(LearnedOptimizer):
    """SGD with heavy-ball momentum: ``theta = {"log_lr", "momentum_logit"}``.

    The update is optax's: ``t = g + momentum * t``; ``update = -lr * t``.
    """

    name = "learnable_sgdm"

    def __init__(self, initial_lr: float = 0.01, initial_momentum: float = 0.9):
        _check_range("initial_lr", initial_lr, 0.0, None)
        _check_range("initial_momentum", initial_momentum, 0.0, 1.0)
        self.initial_lr = initial_lr
        self.initial_momentum = initial_momentum

    def config(self) -> dict[str, float]:
        """The constructor arguments (``LearnableSGDM(**lopt.config())`` rebuilds it)."""
        return {"initial_lr": self.initial_lr, "initial_momentum": self.initial_momentum}

    def init(self, key: jax.Array) -> MetaParams:
        del key
        return {
            "log_lr": _scalar(math.log(self.initial_lr)),
            "momentum_logit": _scalar(_logit(self.initial_momentum)),
        }

    def hyperparameters(self, theta: MetaParams) -> dict[str, jax.Array]:
        """The decoded hyperparameters: ``{"learning_rate", "momentum"}``."""
        return {
            "learning_rate": jnp.exp(theta["log_lr"]),
            "momentum": jax.nn.sigmoid(theta["momentum_logit"]),
        }

    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del num_steps
        h = self.hyperparameters(theta)
        return optax.sgd(h["learning_rate"], momentum=h["momentum"])


class LearnableAdam(LearnedOptimizer):
    """Adam: ``theta = {"log_lr", "b1_logit", "b2_logit", "log_eps"}``."""

    name = "learnable_adam"

    def __init__(
        self,
        initial_lr: float = 1e-3,
        initial_b1: float = 0.9,
        initial_b2: float = 0.999,
        initial_eps: float = 1e-8,
    ):
        _check_range("initial_lr", initial_lr, 0.0, None)
        _check_range("initial_b1", initial_b1, 0.0, 1.0)
        _check_range("initial_b2", initial_b2, 0.0, 1.0)
        _check_range("initial_eps", initial_eps, 0.0, None)
        self.initial_lr = initial_lr
        self.initial_b1 = initial_b1
        self.initial_b2 = initial_b2
        self.initial_eps = initial_eps

    def config(self) -> dict[str, float]:
        """The constructor arguments (``LearnableAdam(**lopt.config())`` rebuilds it)."""
        return {"initial_lr": self.initial_lr, "initial_b1": self.initial_b1,
                "initial_b2": self.initial_b2, "initial_eps": self.initial_eps}

    def init(self, key: jax.Array) -> MetaParams:
        del key
        return {
            "log_lr": _scalar(math.log(self.initial_lr)),
            "b1_logit": _scalar(_logit(self.initial_b1)),
            "b2_logit": _scalar(_logit(self.initial_b2)),
            "log_eps": _scalar(math.log(self.initial_eps)),
        }

    def hyperparameters(self, theta: MetaParams) -> dict[str, jax.Array]:
        """The decoded hyperparameters: ``{"learning_rate", "b1", "b2", "eps"}``."""
        return {
            "learning_rate": jnp.exp(theta["log_lr"]),
            "b1": jax.nn.sigmoid(theta["b1_logit"]),
            "b2": jax.nn.sigmoid(theta["b2_logit"]),
            "eps": jnp.exp(theta["log_eps"]),
        }

    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del num_steps
        h = self.hyperparameters(theta)
        return optax.adam(h["learning_rate"], b1=h["b1"], b2=h["b2"], eps=h["eps"],
                          eps_root=EPS_ROOT)
