"""Quadratic tasks: a fixed quadratic and a sampled family of them.

The quadratic family follows the LOSG "quadratic" problem of Metz et al. 2020, "Tasks,
stability, architecture, and compute", arXiv:2009.11243, App. I.2.8: a loss ``0.5 * || A x - b
||^2`` over a vector ``x`` of log-uniform dimension in [10, 1000], with gradient noise of
log-uniform scale in [0.01, 10] with probability 1/2. Its optimum ``x* = A^+ b`` and optimum
loss are known in closed form, which makes it the reference problem for checking optimizers and
meta-gradient estimators against exact answers.

The paper leaves the distribution of ``A`` unspecified; we build
``A = U diag(s) V^T`` with random orthogonal ``U, V`` and singular values
log-uniform between a smallest value in [1e-3, 1] and a largest in [1, 10], so
the condition number is controlled directly. The optional
gradient noise is additive Gaussian on the loss's gradient, emulating
minibatch noise; it is expressed through the loss with a random linear term
whose expectation is zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.base import Task, TaskFamily, no_data


@dataclasses.dataclass(frozen=True)
class QuadraticConfig:
    """A quadratic ``0.5 ||A x - b||^2 + noise_std * <xi, x>`` with ``xi ~ N(0, I)``."""

    dim: int = 10
    min_singular: float = 0.1
    max_singular: float = 1.0
    noise_std: float = 0.0
    seed: int = 0


class QuadraticTask(Task):
    """``0.5 ||A x - b||^2`` with an optional zero-mean random linear term.

    ``optimum()`` returns ``(x*, loss(x*))`` for the noise-free loss.
    """

    def __init__(self, config: QuadraticConfig = QuadraticConfig()):
        if config.dim < 1:
            raise ValueError(f"dim must be >= 1, got {config.dim}")
        if not 0 < config.min_singular <= config.max_singular:
            raise ValueError(
                "need 0 < min_singular <= max_singular, got "
                f"{config.min_singular}, {config.max_singular}"
            )
        self.config = config
        self.name = f"quadratic_d{config.dim}"
        self.datasets = no_data()
        rng = np.random.default_rng(config.seed)
        u, _ = np.linalg.qr(rng.normal(size=(config.dim, config.dim)))
        v, _ = np.linalg.qr(rng.normal(size=(config.dim, config.dim)))
        s = np.exp(
            rng.uniform(np.log(config.min_singular), np.log(config.max_singular), config.dim)
        )
        self.a = (u * s) @ v.T
        self.b = rng.normal(size=config.dim)

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        return {"x": jax.random.normal(key, (self.config.dim,))}

    def loss(self, params, key, batch) -> jax.Array:
        del batch
        r = jnp.asarray(self.a, jnp.float32) @ params["x"] - jnp.asarray(self.b, jnp.float32)
        loss = 0.5 * jnp.sum(r**2)
        if self.config.noise_std > 0:
            xi = jax.random.normal(key, params["x"].shape)
            loss = loss + self.config.noise_std * jnp.dot(xi, params["x"])
        return loss

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return jnp.clip(jnp.nan_to_num(loss, nan=1e4, posinf=1e4), 0.0, 1e4)

    def optimum(self) -> tuple[np.ndarray, float]:
        x = np.linalg.lstsq(self.a, self.b, rcond=None)[0]
        return x, float(0.5 * np.sum((self.a @ x - self.b) ** 2))


class QuadraticFamily(TaskFamily):
    """Sampled quadratics (App. I.2.8, LOSG "quadratic"); see the module docstring."""

    name = "quadratic"
    config_type = QuadraticConfig

    def __init__(self, min_dim: int = 10, max_dim: int = 1000):
        self.min_dim, self.max_dim = min_dim, max_dim

    def sample(self, key: jax.Array) -> QuadraticConfig:
        k = jax.random.split(key, 6)
        log_dim = jax.random.uniform(
            k[0], (), minval=np.log(self.min_dim), maxval=np.log(self.max_dim)
        )
        lo = 10 ** float(jax.random.uniform(k[1], (), minval=-3.0, maxval=0.0))
        hi = 10 ** float(jax.random.uniform(k[2], (), minval=0.0, maxval=1.0))
        noisy = bool(jax.random.bernoulli(k[3]))
        noise = float(10 ** jax.random.uniform(k[4], (), minval=-2.0, maxval=1.0)) if noisy else 0.0
        seed = int(jax.random.randint(k[5], (), 0, 2**31 - 1))
        return QuadraticConfig(
            dim=int(round(float(np.exp(log_dim)))),
            min_singular=lo,
            max_singular=hi,
            noise_std=noise,
            seed=seed,
        )

    def task(self, config: QuadraticConfig) -> QuadraticTask:
        return QuadraticTask(config)
