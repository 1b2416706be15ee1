"""The Wichrowska ensemble and the LOSG problems.

Two families over one set of problem definitions:

* :class:`SyntheticFamily`: the synthetic meta-training ensemble of Wichrowska et al. 2017,
  "Learned Optimizers that Scale and Generalize", arXiv:1703.04813, §4.1;
* :class:`LOSGFamily`: TaskSet's ``losg_tasks`` (Metz et al. 2020, "Tasks, stability,
  architecture, and compute", arXiv:2009.11243, App. I.2.8), the same problems resampled with
  the ranges and conventions of the released LOSG code (sums over the batch, LOSG's offsets),
  which TaskSet's family in :mod:`learnopt.tasks.families.taskset` wraps.

The objectives both use (:func:`norm_objective`, :func:`dependency_chain`,
:func:`min_max_well`, :func:`outward_snake`, :func:`sum_of_quadratics`,
:func:`projection_quadratic`, the test functions, :func:`log_objective`) are defined once;
where the two differ (batch sum or mean, offsets) it is an argument.

The ensemble's problems are small, chosen to cover common properties of loss landscapes and
stochastic gradients. All have a global
minimum of 0 (§4.1: "in some cases a constant offset was added"), except
logistic regression on non-separable data (minimum above 0) and the outward
snake (infimum 0 at infinity); minibatch losses of the sum of quadratics can
dip below 0 (their full-data minimum is 0).

Base problems (``ProblemConfig.problem``):

* ``test_function`` (§4.1.1): Ackley, Beale, Booth, Branin, log-sum-exp,
  Matyas, Michalewicz, Rosenbrock, Styblinski-Tang, in 2-D, each minus its
  known minimum; initialised uniformly in the usual search box (the boxes of the
  released LOSG ``problem_generator.py``). The raw functions
  (:func:`rosenbrock`, ... , Surjanovic & Bingham 2013 forms) are public.
* ``quadratic_bowl`` (§4.1.2): ``0.5 (x - x*)^T H (x - x*)`` with
  ``H = Q^T diag(lambda) Q``, ``Q`` a random rotation (the random coupling),
  eigenvalues log-uniform between 1 and the condition number, which is exact.
* ``logistic_regression`` (§4.1.2, §4.1.3): mean sigmoid cross-entropy of a linear
  model on Gaussian inputs labelled by a random linear teacher, so the data is
  linearly separable unless labels are flipped (``label_flip``).
* ``minibatch_quadratic`` (§4.1.3): ``mean_b <x, d_b>^2`` over random input
  vectors ``d_b`` (the paper's "square inner product").
* ``norm`` (LOSG): ``(sum_i (|W x - y|_i + eps)^p)^(1/p) - N^(1/p) eps``.
* ``dependency_chain`` (§4.1.4): ``x_0^2 + sum_i x_i^2 / (x_{i-1}^2 + eps)``.
* ``outward_snake`` (§4.1.4, the oscillating valley with its minimum at
  infinity): ``mean_b [d_b0 / (||x|| + eps) + sum_i ((x_i - pi cos x_{i-1}) d_bi)^2]``
  with binary data ``d``.
* ``min_max_well`` (§4.1.4): ``max_i x_i^2 + 1 / min_i x_i^2 - 2``: gradients on
  two coordinates only, discontinuous.
* ``sum_of_quadratics`` (LOSG): ``mean_b ||x - d_b||^2 - mean_b ||d_b||^2`` on a
  dataset of pairs ``(d, -d)``, so the full-data minimum is 0 at 0.
* ``projection_quadratic`` (LOSG): ``mean_b sum_i (x_i d_bi)^2``.

Transformations (``SyntheticConfig.transform``, §4.1.5 and LOSG):

* additive Gaussian gradient noise on full-batch problems (``noise_std``,
  §4.1.3), through :func:`noisy_gradient`;
* ``sparse``: each gradient entry zeroed with probability 0.9-0.99, with
  probability 0.5 Gaussian noise first (:func:`sparse_gradient`);
* ``rescale``: a linear change of variables ``x = s * v`` with per-parameter
  ``s`` log-uniform inside a range drawn from [0.001, 1000] (the paper's
  "change the relative scale of parameters"; the released code uses one global
  scale, the case of a narrow range), via ``augment.reparameterize_random``;
* ``log``: ``log(f + 1e-6) - log(1e-6)`` (LOSG ``LogObjective``);
* ``power``: ``(f + 1e-6)^p - 1e-6^p`` with ``p`` log-uniform in [0.5, 2]
  (§4.1.5's "raising to a power");
* multi-task: a config with several problems sums their losses over the
  concatenation (a dict) of their parameters (§4.1.5).

Ranges: batch sizes 10-200 and noise std 0.1-2.0 are §4.1.3's; the paper gives no others,
so the rest follow the LOSG ranges of App. I.2.8, and our own choices fill the remaining gaps
(docs/departures-tasks.md lists them).

The family draws one of 15 kinds uniformly: the 10 base problems and the
``sparse``, ``rescale``, ``log``, ``power`` and ``multi_task`` (2-4 base
problems) transformations, whose base problems are drawn uniformly.

Every synthetic task's ``normalizer`` is ``log(clip(loss, 0, 1e30) + 1e-8)``:
the mean over steps is then §4.1's meta-objective (eq. 14, the average log
loss) up to its constant second term. Where the ensemble departs from the
released LOSG code (batch means, the chain's ``x_0^2`` once, Michalewicz's
``m``), see docs/departures-tasks.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.tasks import augment
from learnopt.tasks.base import ArraySplit, Datasets, NoDataSplit, Task, TaskFamily, no_data
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticFamily, QuadraticTask
from learnopt.tasks.families.taskset_parts import (
    activation_fn,
    bernoulli,
    key_rng,
    log_float,
    log_int,
    sample_activation,
)
from learnopt.tasks.families.taskset_parts import choice as taskset_choice
from learnopt.tasks.families.taskset_parts import uniform_int as taskset_uniform_int

Params = Any

# -- the literature test functions (§4.1.1) -------------------------------------------------


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` with gradient 0 (not NaN) at ``s = 0``."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def rosenbrock(x: jax.Array) -> jax.Array:
    """``sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``; minimum 0 at ``(1, ..., 1)``."""
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def ackley(x: jax.Array) -> jax.Array:
    """Ackley (a=20, b=0.2, c=2 pi); minimum 0 at the origin."""
    d = x.shape[-1]
    return (
        -20.0 * jnp.exp(-0.2 * _safe_sqrt(jnp.sum(x**2) / d))
        - jnp.exp(jnp.sum(jnp.cos(2.0 * jnp.pi * x)) / d)
        + 20.0
        + jnp.e
    )


def beale(x: jax.Array) -> jax.Array:
    """Beale; minimum 0 at ``(3, 0.5)``."""
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def booth(x: jax.Array) -> jax.Array:
    """Booth; minimum 0 at ``(1, 3)``."""
    return (x[0] + 2.0 * x[1] - 7.0) ** 2 + (2.0 * x[0] + x[1] - 5.0) ** 2


def branin(x: jax.Array) -> jax.Array:
    """Branin; minimum ``5 / (4 pi) = 0.397887``.

    Attained at ``(-pi, 12.275)``, ``(pi, 2.275)`` and ``(9.42478, 2.475)``.
    """
    b = 5.1 / (4.0 * math.pi**2)
    c = 5.0 / math.pi
    t = 1.0 / (8.0 * math.pi)
    return (x[1] - b * x[0] ** 2 + c * x[0] - 6.0) ** 2 + 10.0 * (1.0 - t) * jnp.cos(x[0]) + 10.0


def logsumexp_2d(x: jax.Array) -> jax.Array:
    """``log(e^{x+3y-0.1} + e^{x-3y-0.1} + e^{-x-0.1} + 1)`` (LOSG ``LogSumExp``).

    Minimum ``log(1 + 2 sqrt(2) e^{-0.1})`` at ``(-ln(2)/2, 0)``.
    """
    a, b = x[0], x[1]
    terms = jnp.stack([a + 3.0 * b - 0.1, a - 3.0 * b - 0.1, -a - 0.1, jnp.zeros_like(a)])
    return jax.nn.logsumexp(terms)


def matyas(x: jax.Array) -> jax.Array:
    """Matyas; minimum 0 at the origin."""
    return 0.26 * (x[0] ** 2 + x[1] ** 2) - 0.48 * x[0] * x[1]


def michalewicz(x: jax.Array, m: float = 10.0) -> jax.Array:
    """``-sum_i sin(x_i) sin(i x_i^2 / pi)^(2m)``; 2-D minimum -1.8013 at ``(2.20, 1.57)``."""
    i = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    return -jnp.sum(jnp.sin(x) * jnp.sin(i * x**2 / jnp.pi) ** (2 * m))


def styblinski_tang(x: jax.Array) -> jax.Array:
    """``0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)``; minimum -39.16617 d at ``x_i = -2.903534``."""
    return 0.5 * jnp.sum(x**4 - 16.0 * x**2 + 5.0 * x)


_ST_ARGMIN = -2.903534027771177
_LSE_MIN = math.log(1.0 + 2.0 * math.sqrt(2.0) * math.exp(-0.1))


@dataclasses.dataclass(frozen=True)
class TestFunction:
    """A literature function with its known minimum and its initialisation box."""

    fn: Callable[[jax.Array], jax.Array]
    minimum: Callable[[int], float]
    argmin: Callable[[int], np.ndarray]
    init_low: tuple[float, float]
    init_high: tuple[float, float]
    any_dim: bool = False


TEST_FUNCTIONS: dict[str, TestFunction] = {
    "ackley": TestFunction(
        ackley, lambda d: 0.0, lambda d: np.zeros(d), (-32.768,) * 2, (32.768,) * 2, True
    ),
    "beale": TestFunction(
        beale, lambda d: 0.0, lambda d: np.array([3.0, 0.5]), (-4.5, -4.5), (4.5, 4.5)
    ),
    "booth": TestFunction(
        booth, lambda d: 0.0, lambda d: np.array([1.0, 3.0]), (-10.0, -10.0), (10.0, 10.0)
    ),
    "branin": TestFunction(
        branin,
        lambda d: 5.0 / (4.0 * math.pi),
        lambda d: np.array([math.pi, 2.275]),
        (-5.0, 0.0),
        (10.0, 15.0),
    ),
    "logsumexp": TestFunction(
        logsumexp_2d,
        lambda d: _LSE_MIN,
        lambda d: np.array([-0.5 * math.log(2.0), 0.0]),
        (-2.0, -2.0),
        (2.0, 2.0),
    ),
    "matyas": TestFunction(
        matyas, lambda d: 0.0, lambda d: np.zeros(2), (-10.0, -10.0), (10.0, 10.0)
    ),
    "michalewicz": TestFunction(
        michalewicz,
        lambda d: -1.8013034100985537,
        lambda d: np.array([2.2029055201726, math.pi / 2]),
        (0.0, 0.0),
        (math.pi, math.pi),
    ),
    "rosenbrock": TestFunction(
        rosenbrock, lambda d: 0.0, lambda d: np.ones(d), (-5.0,) * 2, (10.0,) * 2, True
    ),
    "styblinski_tang": TestFunction(
        styblinski_tang,
        lambda d: 0.5 * d * (_ST_ARGMIN**4 - 16.0 * _ST_ARGMIN**2 + 5.0 * _ST_ARGMIN),
        lambda d: np.full(d, _ST_ARGMIN),
        (-5.0,) * 2,
        (5.0,) * 2,
        True,
    ),
}

# -- objectives shared by the ensemble and the LOSG problems (one definition each) -------------
#
# ``reduction`` says how a data problem combines its batch: ``"mean"`` (the ensemble; the scale
# does not depend on the batch size) or ``"sum"`` (the released LOSG code, which TaskSet's
# ``losg_tasks`` follows). Vectors ``x`` may carry a leading axis of 1 (LOSG's ``(1, dim)``
# parameters); it broadcasts against the batch.

SHARED_EPS = 1e-6


def reduce_batch(terms: jax.Array, reduction: str) -> jax.Array:
    """Per-example terms ``[batch, ...]`` combined over the batch: ``"mean"`` averages the
    per-example sums, ``"sum"`` adds every term (the released LOSG code's order)."""
    if reduction == "mean":
        return jnp.mean(jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1))
    if reduction == "sum":
        return jnp.sum(terms)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def norm_objective(x: jax.Array, w: jax.Array, y: jax.Array, power: float) -> jax.Array:
    """``(sum_i (|W x - y|_i + eps)^p)^(1/p)`` (LOSG ``Norm``; minimum ``N^(1/p) eps``)."""
    r = jnp.abs(w @ x - y) + SHARED_EPS
    return jnp.sum(r**power) ** (1.0 / power)


def dependency_chain(x: jax.Array) -> jax.Array:
    """``x_0^2 + sum_{i>=1} x_i^2 / (x_{i-1}^2 + eps)``: a chain of couplings (§4.1.4)."""
    return x[0] ** 2 + jnp.sum(x[1:] ** 2 / (x[:-1] ** 2 + SHARED_EPS))


def min_max_well(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``max_i x_i^2 + 1 / (min_i x_i^2 + eps) - 2`` (squares, as the released LOSG code; the
    paper writes ``max x + 1 / min x - 2``); minimum 0 at ``|x_i| = 1``."""
    sq = x**2
    return jnp.max(sq) + 1.0 / (jnp.min(sq) + eps) - 2.0


def outward_snake(x: jax.Array, d: jax.Array, reduction: str = "mean") -> jax.Array:
    """``reduce_b [d_b0 / (||x|| + eps) + sum_{i>=1} ((x_i - pi cos x_{i-1}) d_bi)^2]``."""
    radius = _safe_sqrt(jnp.sum(x**2))
    radial = d[:, 0] / (radius + SHARED_EPS)
    valley = ((x[1:] - jnp.pi * jnp.cos(x[:-1])) * d[:, 1:]) ** 2
    if reduction == "sum":
        return jnp.sum(radial) + jnp.sum(valley)
    return reduce_batch(radial + jnp.sum(valley, axis=-1), reduction)


def sum_of_quadratics(x: jax.Array, d: jax.Array, reduction: str = "mean") -> jax.Array:
    """``reduce_b ||x - d_b||^2 - reduce_b ||d_b||^2``."""
    return reduce_batch((x - d) ** 2, reduction) - reduce_batch(d**2, reduction)


def projection_quadratic(x: jax.Array, d: jax.Array, reduction: str = "mean") -> jax.Array:
    """``reduce_b sum_i (x_i d_bi)^2`` (LOSG ``ProjectionQuadratic``)."""
    return reduce_batch((x * d) ** 2, reduction)


def log_objective(f: jax.Array) -> jax.Array:
    """``log(max(f, 0) + eps) - log(eps)`` (LOSG ``LogObjective``, floored at 0)."""
    return jnp.log(jnp.maximum(f, 0.0) + SHARED_EPS) - math.log(SHARED_EPS)


def symmetric_data(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` Gaussian rows in pairs ``(d, -d)`` (the last pair cut to one row if ``n`` is odd;
    LOSG's ``random_symmetric`` data for even ``n``)."""
    half = rng.normal(size=((n + 1) // 2, d))
    return np.concatenate([half, -half])[:n].astype(np.float32)


def norm_data(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The norm problem's ``W`` (``d x d``) and ``y``, standard normal."""
    w = rng.normal(size=(d, d)).astype(np.float32)
    y = rng.normal(size=d).astype(np.float32)
    return w, y


PROBLEMS = (
    "quadratic_bowl",
    "logistic_regression",
    "minibatch_quadratic",
    "test_function",
    "norm",
    "dependency_chain",
    "outward_snake",
    "min_max_well",
    "sum_of_quadratics",
    "projection_quadratic",
)
DATA_PROBLEMS = (
    "logistic_regression",
    "minibatch_quadratic",
    "outward_snake",
    "sum_of_quadratics",
    "projection_quadratic",
)
TRANSFORMS = ("none", "sparse", "rescale", "log", "power")
KINDS = PROBLEMS + ("sparse", "rescale", "log", "power", "multi_task")

_MIN_DIM = {
    "quadratic_bowl": 1,
    "logistic_regression": 1,
    "minibatch_quadratic": 1,
    "test_function": 1,
    "norm": 1,
    "dependency_chain": 1,
    "outward_snake": 2,
    "min_max_well": 1,
    "sum_of_quadratics": 1,
    "projection_quadratic": 1,
}


# -- configs ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
    """One base problem. Fields a problem does not use keep their defaults.

    ``dim``: parameters (the chain has ``dim`` links, ``dim + 1`` parameters);
    ``function``: the test function's name; ``condition``: the bowl's condition
    number; ``power``: the norm's ``p``; ``num_examples`` / ``batch_size``: data
    problems; ``label_flip``: logistic regression; ``noise_std``: additive
    gradient noise (full-batch problems); ``seed``: the problem's random data.
    """

    problem: str
    dim: int = 2
    function: str = ""
    condition: float = 1.0
    power: float = 2.0
    num_examples: int = 0
    batch_size: int = 0
    label_flip: float = 0.0
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.problem not in PROBLEMS:
            raise ValueError(f"unknown problem {self.problem!r}; known: {', '.join(PROBLEMS)}")
        if not isinstance(self.dim, int) or self.dim < _MIN_DIM[self.problem]:
            raise ValueError(
                f"{self.problem} needs an int dim >= {_MIN_DIM[self.problem]}, got {self.dim!r}"
            )
        if self.problem == "test_function":
            if self.function not in TEST_FUNCTIONS:
                raise ValueError(
                    f"unknown test function {self.function!r}; known: {', '.join(TEST_FUNCTIONS)}"
                )
            if not TEST_FUNCTIONS[self.function].any_dim and self.dim != 2:
                raise ValueError(f"test function {self.function} is 2-D, got dim={self.dim}")
            if self.function == "rosenbrock" and self.dim < 2:
                raise ValueError("rosenbrock needs dim >= 2")
        if self.problem == "quadratic_bowl" and not self.condition >= 1.0:
            raise ValueError(f"condition number must be >= 1, got {self.condition}")
        if self.problem == "norm" and not self.power > 0:
            raise ValueError(f"norm power must be > 0, got {self.power}")
        if self.problem in DATA_PROBLEMS:
            if self.batch_size < 1 or self.num_examples < self.batch_size:
                raise ValueError(
                    f"{self.problem} needs 1 <= batch_size <= num_examples, got "
                    f"batch_size={self.batch_size}, num_examples={self.num_examples}"
                )
        if not 0.0 <= self.label_flip < 0.5:
            raise ValueError(f"label_flip must be in [0, 0.5), got {self.label_flip}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """A task of the ensemble: one problem (or a multi-task sum) and a transformation.

    ``transform`` is one of ``TRANSFORMS``; its settings: ``zero_prob`` and
    ``sparse_noise_std`` (sparse), ``scale_range`` (rescale), ``power`` (power);
    ``seed`` draws the sparse masks' and rescaling's randomness.
    """

    problems: tuple[ProblemConfig, ...]
    transform: str = "none"
    zero_prob: float = 0.0
    sparse_noise_std: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    power: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # config_from_dict hands nested problems back as dicts: rebuild them.
        problems = tuple(ProblemConfig(**p) if isinstance(p, Mapping) else p for p in self.problems)
        object.__setattr__(self, "problems", problems)
        object.__setattr__(self, "scale_range", tuple(self.scale_range))
        if not problems or not all(isinstance(p, ProblemConfig) for p in problems):
            raise ValueError("problems must be a non-empty tuple of ProblemConfig")
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"unknown transform {self.transform!r}; known: {', '.join(TRANSFORMS)}"
            )
        if self.transform == "sparse" and not 0.0 < self.zero_prob < 1.0:
            raise ValueError(f"sparse zero_prob must be in (0, 1), got {self.zero_prob}")
        if self.sparse_noise_std < 0:
            raise ValueError(f"sparse_noise_std must be >= 0, got {self.sparse_noise_std}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power}")


# -- base tasks ---------------------------------------------------------------------------


def log_normalizer(loss: jax.Array) -> jax.Array:
    """``log(clip(loss, 0, 1e30) + 1e-8)`` with NaN/inf mapped to the top (§4.1, eq. 14)."""
    loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=1e30, posinf=1e30, neginf=0.0)
    return jnp.log(jnp.clip(loss, 0.0, 1e30) + 1e-8)


class SyntheticTask(Task):
    """A vector problem: ``params = {"x": float32[dim]}``, ``loss = f(x, batch)``."""

    def __init__(self, config: ProblemConfig, datasets: Datasets | None = None):
        self.config = config
        self.name = f"{config.problem}_d{config.dim}"
        self.datasets = datasets if datasets is not None else no_data()

    def init(self, key: jax.Array) -> Params:
        return {"x": jax.random.normal(key, (self.config.dim,), jnp.float32)}

    def objective(self, params: Params, batch: Any) -> jax.Array:
        raise NotImplementedError

    def loss(self, params, key, batch) -> jax.Array:
        del key
        return self.objective(params, batch)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return log_normalizer(loss)

    def optimum(self) -> tuple[Params, float] | None:
        """Parameters attaining the minimum and its value, where known (full data)."""
        return None


class TestFunctionTask(SyntheticTask):
    """A §4.1.1 function minus its minimum; init uniform in its search box."""

    def __init__(self, config: ProblemConfig):
        super().__init__(config)
        self.function = TEST_FUNCTIONS[config.function]
        self.name = f"{config.function}_d{config.dim}"
        self._offset = float(self.function.minimum(config.dim))

    def init(self, key):
        d = self.config.dim
        low = np.resize(np.asarray(self.function.init_low, np.float32), d)
        high = np.resize(np.asarray(self.function.init_high, np.float32), d)
        return {"x": jax.random.uniform(key, (d,), jnp.float32, low, high)}

    def objective(self, params, batch):
        del batch
        return self.function.fn(params["x"]) - self._offset

    def optimum(self):
        x = np.asarray(self.function.argmin(self.config.dim), np.float32)
        return {"x": x}, 0.0


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


class QuadraticBowlTask(SyntheticTask):
    """``0.5 ||A (x - x*)||^2``, ``A = diag(sqrt(lambda)) Q``: coupled bowl (§4.1.2)."""

    def __init__(self, config: ProblemConfig):
        super().__init__(config)
        rng = np.random.default_rng(config.seed)
        d = config.dim
        log_cond = math.log(config.condition)
        logs = rng.uniform(0.0, log_cond, size=d)
        if d >= 2:
            logs[0], logs[1] = 0.0, log_cond  # the condition number is exact
        self.eigenvalues = np.exp(logs)
        self.rotation = _random_rotation(rng, d)
        self.a = (np.sqrt(self.eigenvalues)[:, None] * self.rotation).astype(np.float32)
        self.x_star = rng.normal(size=d).astype(np.float32)

    def objective(self, params, batch):
        del batch
        r = jnp.asarray(self.a) @ (params["x"] - jnp.asarray(self.x_star))
        return 0.5 * jnp.sum(r**2)

    def optimum(self):
        return {"x": self.x_star}, 0.0


class NormTask(SyntheticTask):
    """``(sum_i (|W x - y|_i + eps)^p)^(1/p) - N^(1/p) eps`` (LOSG ``Norm``)."""

    def __init__(self, config: ProblemConfig):
        super().__init__(config)
        d = config.dim
        self.w, self.y = norm_data(np.random.default_rng(config.seed), d)
        self._offset = float(d ** (1.0 / config.power) * SHARED_EPS)

    def objective(self, params, batch):
        del batch
        w, y = jnp.asarray(self.w), jnp.asarray(self.y)
        return norm_objective(params["x"], w, y, self.config.power) - self._offset

    def optimum(self):
        x = np.linalg.solve(self.w.astype(np.float64), self.y.astype(np.float64))
        return {"x": x.astype(np.float32)}, 0.0


class DependencyChainTask(SyntheticTask):
    """``x_0^2 + sum_{i>=1} x_i^2 / (x_{i-1}^2 + eps)``: a chain of couplings (§4.1.4)."""

    def init(self, key):
        return {"x": jax.random.normal(key, (self.config.dim + 1,), jnp.float32)}

    def objective(self, params, batch):
        del batch
        return dependency_chain(params["x"])

    def optimum(self):
        return {"x": np.zeros(self.config.dim + 1, np.float32)}, 0.0


class MinMaxWellTask(SyntheticTask):
    """``max_i x_i^2 + 1 / min_i x_i^2 - 2``: sparse, discontinuous gradients (§4.1.4)."""

    def objective(self, params, batch):
        del batch
        return min_max_well(params["x"])

    def optimum(self):
        return {"x": np.ones(self.config.dim, np.float32)}, 0.0


# -- data problems --------------------------------------------------------------------------


def _datasets(draw: Callable[[int], dict[str, np.ndarray]], n: int, batch_size: int) -> Datasets:
    """Train of ``n`` examples; valid and test splits freshly drawn, ``max(bs, n // 10)``."""
    small = max(batch_size, n // 10)
    return Datasets(
        train=ArraySplit(draw(n), batch_size),
        inner_valid=ArraySplit(draw(small), batch_size),
        outer_valid=ArraySplit(draw(small), batch_size),
        test=ArraySplit(draw(small), batch_size),
    )


class LogisticRegressionTask(SyntheticTask):
    """Linear logistic regression on Gaussian inputs labelled by a random teacher (§4.1.2).

    ``params = {"w": [dim], "b": []}``; labels ``[x . w* + b* > 0]``, each flipped
    with probability ``label_flip``. Separable data has infimum 0 at infinity.
    """

    def __init__(self, config: ProblemConfig):
        rng = np.random.default_rng(config.seed)
        d = config.dim
        teacher = rng.normal(size=d)
        bias = 0.5 * rng.normal()

        def draw(n):
            x = rng.normal(size=(n, d)).astype(np.float32)
            y = (x @ teacher + bias > 0).astype(np.int32)
            flip = rng.uniform(size=n) < config.label_flip
            return {"x": x, "y": np.where(flip, 1 - y, y).astype(np.int32)}

        super().__init__(config, _datasets(draw, config.num_examples, config.batch_size))
        self.teacher = {"w": teacher.astype(np.float32), "b": np.float32(bias)}

    def init(self, key):
        d = self.config.dim
        w = jax.random.normal(key, (d,), jnp.float32) / math.sqrt(d)
        return {"w": w, "b": jnp.zeros((), jnp.float32)}

    def logits(self, params, x):
        return x @ params["w"] + params["b"]

    def objective(self, params, batch):
        logits = self.logits(params, batch["x"])
        return optax.sigmoid_binary_cross_entropy(logits, batch["y"].astype(logits.dtype)).mean()

    def metrics(self, params, batch):
        logits = self.logits(params, batch["x"])
        return {
            "loss": self.objective(params, batch),
            "accuracy": jnp.mean((logits > 0).astype(jnp.int32) == batch["y"]),
        }


class MinibatchQuadraticTask(SyntheticTask):
    """``mean_b <x, d_b>^2`` over random vectors ``d_b ~ N(0, I)`` (§4.1.3)."""

    def __init__(self, config: ProblemConfig):
        rng = np.random.default_rng(config.seed)
        draw = lambda n: {"d": rng.normal(size=(n, config.dim)).astype(np.float32)}
        super().__init__(config, _datasets(draw, config.num_examples, config.batch_size))

    def objective(self, params, batch):
        return jnp.mean((batch["d"] @ params["x"]) ** 2)

    def optimum(self):
        return {"x": np.zeros(self.config.dim, np.float32)}, 0.0


class ProjectionQuadraticTask(SyntheticTask):
    """``mean_b sum_i (x_i d_bi)^2`` on symmetric Gaussian data (LOSG ``ProjectionQuadratic``)."""

    def __init__(self, config: ProblemConfig):
        rng = np.random.default_rng(config.seed)
        draw = lambda n: {"d": symmetric_data(rng, n, config.dim)}
        super().__init__(config, _datasets(draw, config.num_examples, config.batch_size))

    def objective(self, params, batch):
        return projection_quadratic(params["x"], batch["d"])

    def optimum(self):
        return {"x": np.zeros(self.config.dim, np.float32)}, 0.0


class SumOfQuadraticsTask(SyntheticTask):
    """``mean_b ||x - d_b||^2 - mean_b ||d_b||^2`` on data in pairs ``(d, -d)`` (LOSG).

    On the full (symmetric) data this is ``||x||^2``: minimum 0 at 0; a minibatch
    loss is ``||x||^2 - 2 <x, mean_b d_b>`` and can be negative.
    """

    def __init__(self, config: ProblemConfig):
        rng = np.random.default_rng(config.seed)
        draw = lambda n: {"d": symmetric_data(rng, n, config.dim)}
        super().__init__(config, _datasets(draw, config.num_examples, config.batch_size))

    def objective(self, params, batch):
        return sum_of_quadratics(params["x"], batch["d"])

    def optimum(self):
        return {"x": np.zeros(self.config.dim, np.float32)}, 0.0


class OutwardSnakeTask(SyntheticTask):
    """A winding valley out to infinity (§4.1.4; LOSG ``OutwardSnake``), binary data.

    ``mean_b [d_b0 / (||x|| + 1e-6) + sum_{i>=1} ((x_i - pi cos x_{i-1}) d_bi)^2]``:
    the valley floor is ``x_i = pi cos x_{i-1}`` and the loss falls like
    ``1 / ||x||`` along it; infimum 0 at infinity.
    """

    def __init__(self, config: ProblemConfig):
        rng = np.random.default_rng(config.seed)
        draw = lambda n: {"d": rng.integers(0, 2, size=(n, config.dim)).astype(np.float32)}
        super().__init__(config, _datasets(draw, config.num_examples, config.batch_size))

    def objective(self, params, batch):
        return outward_snake(params["x"], batch["d"])


_PROBLEM_CLASSES: dict[str, Callable[[ProblemConfig], SyntheticTask]] = {
    "quadratic_bowl": QuadraticBowlTask,
    "logistic_regression": LogisticRegressionTask,
    "minibatch_quadratic": MinibatchQuadraticTask,
    "test_function": TestFunctionTask,
    "norm": NormTask,
    "dependency_chain": DependencyChainTask,
    "outward_snake": OutwardSnakeTask,
    "min_max_well": MinMaxWellTask,
    "sum_of_quadratics": SumOfQuadraticsTask,
    "projection_quadratic": ProjectionQuadraticTask,
}


# -- transformations (§4.1.3, §4.1.5) -------------------------------------------------------


def noisy_gradient(task: Task, std: float) -> Task:
    """Add ``N(0, std^2)`` noise to every gradient entry (§4.1.3); the loss is unchanged."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return task

    def fn(grads, key):
        noise = augment.normal_tree(key, grads)
        return jax.tree_util.tree_map(lambda g, n: g + std * n, grads, noise)

    return augment.modify_gradient(task, fn, f"noise{std:.3g}")


def sparse_gradient(task: Task, zero_prob: float, noise_std: float = 0.0) -> Task:
    """Zero each gradient entry with probability ``zero_prob`` (§4.1.5; LOSG ``SparseProblem``).

    With ``noise_std > 0``, Gaussian noise is added to the entries that are kept.
    """
    if not 0.0 <= zero_prob < 1.0:
        raise ValueError(f"zero_prob must be in [0, 1), got {zero_prob}")

    def fn(grads, key):
        k_mask, k_noise = jax.random.split(key)
        keep = augment.uniform_tree(k_mask, grads)
        if noise_std > 0:
            noise = augment.normal_tree(k_noise, grads)
            grads = jax.tree_util.tree_map(lambda g, n: g + noise_std * n, grads, noise)
        return jax.tree_util.tree_map(lambda g, u: jnp.where(u >= zero_prob, g, 0.0), grads, keep)

    return augment.modify_gradient(task, fn, f"sparse{zero_prob:.3g}")


class MonotoneObjectiveTask(augment.TaskWrapper):
    """``log(f + eps) - log(eps)`` or ``(f + eps)^p - eps^p`` of ``f = max(loss, 0)`` (§4.1.5).

    Both are increasing and keep a minimum of 0 at the inner task's minimum.
    """

    eps = SHARED_EPS

    def __init__(self, task: Task, kind: str, power: float = 1.0):
        if kind not in ("log", "power"):
            raise ValueError(f"monotone transform must be 'log' or 'power', got {kind!r}")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.tag = "log" if kind == "log" else f"pow{power:.3g}"
        super().__init__(task)
        self.kind = kind
        self.power = float(power)

    def loss(self, params, key, batch):
        f = self.task.loss(params, key, batch)
        if self.kind == "log":
            return log_objective(f)
        f = jnp.maximum(f, 0.0)
        return (f + self.eps) ** self.power - self.eps**self.power

    def normalizer(self, loss):
        if self.kind == "log":  # already a log: clip only
            loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=100.0, posinf=100.0)
            return jnp.clip(loss, 0.0, 100.0)
        return log_normalizer(loss)


class _JointSplit:
    """Batches of several splits at once: ``{"task0": batch0, "task1": batch1, ...}``."""

    def __init__(self, splits: list[Any]):
        self.splits = splits

    def sample(self, key: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(key, len(self.splits))
        return {
            f"task{i}": s.sample(k) for i, (s, k) in enumerate(zip(self.splits, keys, strict=True))
        }

    def iterator(self, seed: int) -> Iterator[dict[str, Any]]:
        its = [s.iterator(seed + 7919 * i) for i, s in enumerate(self.splits)]
        while True:
            yield {f"task{i}": next(it) for i, it in enumerate(its)}

    def abstract_batch(self) -> dict[str, Any]:
        return {f"task{i}": s.abstract_batch() for i, s in enumerate(self.splits)}


class SumTask(Task):
    """Multi-task sum (§4.1.5): ``sum_i loss_i(params["task<i>"])`` over concatenated params."""

    def __init__(self, tasks: list[Task]):
        if len(tasks) < 1:
            raise ValueError("SumTask needs at least one task")
        for t in tasks:
            if t.has_gradient_state:
                raise ValueError(f"SumTask cannot hold {t.name!r}, which has gradient state")
        self.tasks = list(tasks)
        self.name = "sum(" + ",".join(t.name for t in tasks) + ")"
        if all(isinstance(t.datasets.train, NoDataSplit) for t in tasks):
            self.datasets = no_data()
        else:
            self.datasets = Datasets(
                *(
                    _JointSplit([t.datasets.split(name) for t in tasks])
                    for name in ("train", "inner_valid", "outer_valid", "test")
                )
            )

    def init(self, key):
        keys = jax.random.split(key, len(self.tasks))
        return {
            f"task{i}": t.init(k) for i, (t, k) in enumerate(zip(self.tasks, keys, strict=True))
        }

    def loss(self, params, key, batch):
        keys = jax.random.split(key, len(self.tasks))
        total = jnp.zeros((), jnp.float32)
        for i, (t, k) in enumerate(zip(self.tasks, keys, strict=True)):
            total = total + t.loss(params[f"task{i}"], k, batch.get(f"task{i}", {}))
        return total

    def normalizer(self, loss):
        return log_normalizer(loss)


# -- building and sampling -----------------------------------------------------------------


def build_problem(config: ProblemConfig) -> Task:
    """The task of one base problem, with its gradient noise if any."""
    task = _PROBLEM_CLASSES[config.problem](config)
    return noisy_gradient(task, config.noise_std)


def build_task(config: SyntheticConfig) -> Task:
    """The task of a :class:`SyntheticConfig` (problems, sum, then transformation)."""
    tasks = [build_problem(p) for p in config.problems]
    task = tasks[0] if len(tasks) == 1 else SumTask(tasks)
    if config.transform == "sparse":
        task = sparse_gradient(task, config.zero_prob, config.sparse_noise_std)
    elif config.transform == "rescale":
        task = augment.reparameterize_random(task, "parameter", config.scale_range, config.seed)
    elif config.transform == "log":
        task = MonotoneObjectiveTask(task, "log")
    elif config.transform == "power":
        task = MonotoneObjectiveTask(task, "power", config.power)
    return task


class SyntheticFamily(TaskFamily):
    """Wichrowska et al. 2017 §4.1's ensemble as a family (module docstring for the distribution).

    ``max_dim`` / ``max_examples`` cap sampled dimensions and dataset sizes (for
    tests and cheap runs; ``None`` keeps the paper's ranges). ``kinds`` restricts
    the kinds drawn (default: all of ``KINDS``, uniformly).
    """

    name = "synthetic"
    config_type = SyntheticConfig

    def __init__(
        self,
        max_dim: int | None = None,
        max_examples: int | None = None,
        kinds: tuple[str, ...] = KINDS,
    ):
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
        if max_dim is not None and max_dim < 3:
            raise ValueError(f"max_dim must be >= 3, got {max_dim}")
        if max_examples is not None and max_examples < 200:
            raise ValueError(f"max_examples must be >= 200 (the largest batch), got {max_examples}")
        self.max_dim = max_dim
        self.max_examples = max_examples
        self.kinds = tuple(kinds)

    def _dim(self, rng: np.random.Generator, lo: int, hi: int) -> int:
        d = augment.log_uniform_int(rng, lo, hi)
        return d if self.max_dim is None else min(d, self.max_dim)

    def _noise(self, rng: np.random.Generator) -> float:
        noisy = rng.uniform() < 0.5
        std = augment.log_uniform(rng, 0.1, 2.0)
        return std if noisy else 0.0

    def sample_problem(self, rng: np.random.Generator, problem: str | None = None) -> ProblemConfig:
        """One base problem: ``problem``, or one drawn uniformly from ``PROBLEMS``."""
        if problem is None:
            problem = str(rng.choice(PROBLEMS))
        seed = int(rng.integers(0, 2**31 - 1))
        if problem == "test_function":
            name = str(rng.choice(sorted(TEST_FUNCTIONS)))
            return ProblemConfig(problem, 2, function=name, noise_std=self._noise(rng), seed=seed)
        if problem == "quadratic_bowl":
            dim = self._dim(rng, 2, 1000)
            cond = augment.log_uniform(rng, 1.0, 1e4)
            return ProblemConfig(
                problem, dim, condition=cond, noise_std=self._noise(rng), seed=seed
            )
        if problem == "norm":
            dim = self._dim(rng, 3, 1000)
            power = float(rng.uniform(0.1, 5.0))
            return ProblemConfig(problem, dim, power=power, noise_std=self._noise(rng), seed=seed)
        if problem == "dependency_chain":
            return ProblemConfig(problem, self._dim(rng, 3, 100), noise_std=self._noise(rng))
        if problem == "min_max_well":
            return ProblemConfig(problem, self._dim(rng, 10, 1000), noise_std=self._noise(rng))
        # data problems: batch 10-200 (§4.1.3), dataset log-uniform 100-20000 (LOSG)
        dim = self._dim(rng, 2, 100) if problem == "logistic_regression" else self._dim(rng, 3, 100)
        batch = augment.log_uniform_int(rng, 10, 200)
        n = augment.log_uniform_int(rng, 100, 20000)
        if self.max_examples is not None:
            n = min(n, self.max_examples)
        n = max(n, batch)
        if problem in ("sum_of_quadratics", "projection_quadratic"):
            n += n % 2  # whole (d, -d) pairs: the full-data minimum is exactly 0
        flip = 0.0
        if problem == "logistic_regression" and rng.uniform() < 0.25:
            flip = augment.log_uniform(rng, 0.01, 0.2)
        return ProblemConfig(
            problem, dim, num_examples=n, batch_size=batch, label_flip=flip, seed=seed
        )

    def sample(self, key: jax.Array) -> SyntheticConfig:
        rng = augment.rng_from_key(key)
        kind = str(rng.choice(self.kinds))
        seed = int(rng.integers(0, 2**31 - 1))
        if kind in PROBLEMS:
            return SyntheticConfig((self.sample_problem(rng, kind),), seed=seed)
        if kind == "multi_task":
            k = int(rng.integers(2, 5))
            return SyntheticConfig(tuple(self.sample_problem(rng) for _ in range(k)), seed=seed)
        base = (self.sample_problem(rng),)
        if kind == "sparse":
            noise = augment.log_uniform(rng, 0.01, 10.0) if rng.uniform() < 0.5 else 0.0
            zero = float(rng.uniform(0.9, 0.99))
            return SyntheticConfig(
                base, "sparse", zero_prob=zero, sparse_noise_std=noise, seed=seed
            )
        if kind == "rescale":
            a, b = sorted(augment.log_uniform(rng, 1e-3, 1e3) for _ in range(2))
            return SyntheticConfig(base, "rescale", scale_range=(a, b), seed=seed)
        if kind == "log":
            return SyntheticConfig(base, "log", seed=seed)
        power = augment.log_uniform(rng, 0.5, 2.0)
        return SyntheticConfig(base, "power", power=power, seed=seed)

    def task(self, config: SyntheticConfig) -> Task:
        return build_task(config)


# == the LOSG problems and TaskSet's ``losg_tasks`` family =====================================
#
# Metz et al. 2020 (arXiv:2009.11243, App. I.2.8) resample the problems of Wichrowska et al.
# 2017 with the ranges of the released LOSG code: 11 base problems and 3 transformations of a
# base problem, uniformly. The problems shared with the ensemble above use its objectives,
# with LOSG's conventions as arguments (sums over the batch, no minimum subtracted, LOSG's
# offsets of the test functions); the ranges are listed in docs/departures-tasks.md.

LOSG_L2_REG_SCALE = 1e-3
LOSG_BASE_PROBLEMS = (
    "quadratic",
    "bowl",
    "sparse_softmax_regression",
    "optimization_test_problems",
    "fully_connected",
    "norm",
    "dependency_chain",
    "outward_snake",
    "min_max_well",
    "sum_of_quadratics",
    "projection_quadratic",
)
LOSG_TRANSFORMATIONS = ("sparse_problems", "rescale_problems", "log_objective")
LOSG_KINDS = LOSG_BASE_PROBLEMS + LOSG_TRANSFORMATIONS
LOSG_TRANSFORMABLE = tuple(p for p in LOSG_BASE_PROBLEMS if p != "sparse_softmax_regression")
# LOSG's test functions: (function, the constant the released code adds to it). Michalewicz
# uses the code's m = 5; the initialisation boxes are ``TEST_FUNCTIONS``' except logsumexp's
# (standard normal).
LOSG_TEST_FUNCTIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    "ackley": (ackley, 0.0),
    "beale": (beale, 0.0),
    "branin": (branin, 0.0),
    "logsumexp": (logsumexp_2d, 0.0),
    "matyas": (matyas, 0.0),
    "michalewicz": (lambda x: michalewicz(x, m=5.0), 2.0),
    "rosenbrock": (rosenbrock, 0.0),
    "styblinski_tang": (styblinski_tang, 80.0),
}
LOSG_NOISE_RANGE = (0.01, 10.0)
CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class LOSGConfig:
    """A sampled LOSG problem. ``kind`` is one of :data:`LOSG_KINDS`; ``problem`` is the base
    problem (``kind`` itself unless ``kind`` is a transformation). Fields a problem does not
    use stay ``None`` / default. ``seed`` fixes the problem's matrices and data."""

    kind: str
    problem: str
    seed: int
    dim: int | None = None
    noise_std: float = 0.0
    min_singular: float | None = None
    max_singular: float | None = None
    condition_number: float | None = None
    angle: float | None = None
    function: str | None = None
    n_features: int | None = None
    n_classes: int | None = None
    hidden_sizes: tuple[int, ...] = ()
    activation: str | None = None
    batch_size: int | None = None
    n_samples: int | None = None
    norm_power: float | None = None
    zero_probability: float | None = None
    sparse_noise_std: float = 0.0
    loss_scale: float | None = None


CONFIG_TYPES = {"SyntheticConfig": SyntheticConfig, "LOSGConfig": LOSGConfig}


def _losg_noise(rng: np.random.Generator) -> float:
    return log_float(rng, *LOSG_NOISE_RANGE) if bernoulli(rng, 0.5) else 0.0


def _sample_losg_base(rng: np.random.Generator, problem: str) -> dict:
    if problem == "quadratic":
        key = jax.random.PRNGKey(int(rng.integers(2**31 - 1)))
        q = QuadraticFamily(10, 1000).sample(key)
        return {
            "dim": q.dim,
            "min_singular": q.min_singular,
            "max_singular": q.max_singular,
            "noise_std": q.noise_std,
        }
    if problem == "bowl":
        return {
            "condition_number": log_float(rng, 0.01, 100.0),
            "angle": float(taskset_choice(rng, (0.0, 0.0, math.pi / 4, math.pi / 3))),
            "noise_std": _losg_noise(rng),
        }
    if problem == "sparse_softmax_regression":
        return {
            "n_features": log_int(rng, 2, 100),
            "n_classes": 2,
            "noise_std": _losg_noise(rng),
            "batch_size": log_int(rng, 1, 50),
            "n_samples": log_int(rng, 1, 30),
        }
    if problem == "optimization_test_problems":
        return {
            "function": taskset_choice(rng, tuple(LOSG_TEST_FUNCTIONS)),
            "noise_std": _losg_noise(rng),
        }
    if problem == "fully_connected":
        n_layers = taskset_uniform_int(rng, 2, 5)
        fixed = bernoulli(rng, 0.5)
        out = {
            "n_features": log_int(rng, 1, 16),
            "n_classes": 2,
            "activation": sample_activation(rng),
            "batch_size": log_int(rng, 1, 200),
            "n_samples": log_int(rng, 1, 30),
        }
        if fixed:
            out["hidden_sizes"] = (log_int(rng, 4, 32),) * n_layers
        else:
            out["hidden_sizes"] = tuple(log_int(rng, 4, 32) for _ in range(n_layers))
        return out
    if problem == "norm":
        return {"dim": log_int(rng, 3, 1000), "norm_power": float(rng.uniform(0.1, 5.0))}
    if problem == "dependency_chain":
        return {"dim": log_int(rng, 3, 100)}
    if problem in ("outward_snake", "sum_of_quadratics", "projection_quadratic"):
        return {
            "dim": log_int(rng, 3, 100),
            "batch_size": log_int(rng, 1, 200),
            "n_samples": log_int(rng, 100, 20000),
        }
    if problem == "min_max_well":
        return {"dim": log_int(rng, 10, 1000), "noise_std": _losg_noise(rng)}
    raise ValueError(f"unknown LOSG problem {problem!r}; valid: {', '.join(LOSG_BASE_PROBLEMS)}")


def sample_losg_config(key: jax.Array) -> LOSGConfig:
    """A config from the ``losg_tasks`` distribution (arXiv:2009.11243, App. I.2.8)."""
    rng = key_rng(key, "losg_tasks")
    kind = taskset_choice(rng, LOSG_KINDS)
    problem = taskset_choice(rng, LOSG_TRANSFORMABLE) if kind in LOSG_TRANSFORMATIONS else kind
    fields = _sample_losg_base(rng, problem)
    if kind == "sparse_problems":
        fields["zero_probability"] = float(rng.uniform(0.9, 0.99))
        fields["sparse_noise_std"] = _losg_noise(rng)
    elif kind == "rescale_problems":
        fields["loss_scale"] = log_float(rng, 0.001, 1000.0)
    seed = int(rng.integers(0, 100000))
    return LOSGConfig(kind=kind, problem=problem, seed=seed, **fields)


LOSGObjective = Callable[[list[jax.Array], dict], jax.Array]
LOSGInitializer = Callable[[jax.Array], list[jax.Array]]


def _normal_init(shapes: list[tuple[int, ...]], scale: Callable[[tuple], float] | None = None):
    def init(key):
        keys = jax.random.split(key, len(shapes))
        out = []
        for k, s in zip(keys, shapes, strict=True):
            x = jax.random.normal(k, s)
            out.append(x * scale(s) if scale else x)
        return out

    return init


def _uniform_init(lo: tuple[float, float], hi: tuple[float, float]):
    def init(key):
        return [jax.random.uniform(key, (2,), minval=jnp.array(lo), maxval=jnp.array(hi))]

    return init


def _softmax_scale(shape: tuple) -> float:
    return 1.2 / math.sqrt(shape[0])


def _losg_test_function(name: str) -> tuple[LOSGInitializer, LOSGObjective]:
    if name not in LOSG_TEST_FUNCTIONS:
        raise ValueError(
            f"unknown test function {name!r}; valid: {', '.join(LOSG_TEST_FUNCTIONS)}"
        )
    fn, offset = LOSG_TEST_FUNCTIONS[name]
    box = TEST_FUNCTIONS[name]
    if name == "logsumexp":
        init = _normal_init([(2,)])
    else:
        init = _uniform_init(box.init_low, box.init_high)
    return init, lambda ps, batch: fn(ps[0]) + offset


def _logistic_loss(logits: jax.Array, labels: jax.Array, params: list[jax.Array]) -> jax.Array:
    """LOSG's 2-class loss: sigmoid cross-entropy on the first logit, plus L2 regularisation."""
    z = logits[:, 0]
    y = labels.astype(z.dtype)
    ce = jnp.mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))))
    reg = jnp.mean(jnp.stack([jnp.sum(p**2) for p in params]))
    return ce + LOSG_L2_REG_SCALE * reg


def random_mlp_data(n_features: int, n_samples: int, rng: np.random.Generator):
    """LOSG's ``random_mlp`` data: normal inputs, label = sign of a 6-layer random ReLU
    network's first output (width 20)."""
    x = rng.normal(size=(n_samples, n_features))
    y, n_in = x, n_features
    scale = math.sqrt(2.0) / math.sqrt(n_features)
    for _ in range(6):
        y = np.maximum(y @ (rng.normal(size=(n_in, 20)) * scale), 0)
        n_in = 20
    return x.astype(np.float32), (y[:, 0] > 0).astype(np.int32)


def noisy_parity_data(n_samples: int, n_classes: int, rng: np.random.Generator):
    """LOSG's ``noisy_parity_class`` data: 5 context ids, label their sum mod ``n_classes``
    with a flip of probability 0.25."""
    x = rng.integers(0, n_classes, (n_samples, 5))
    y = (x.sum(1) + rng.binomial(1, 0.25, n_samples)) % n_classes
    return x.astype(np.int32), y.astype(np.int32)


@dataclasses.dataclass
class LOSGProblem:
    """A built LOSG base problem: parameter initializer, objective, data (or ``None``)."""

    init: LOSGInitializer
    objective: LOSGObjective
    data: dict[str, np.ndarray] | None = None


def build_losg_problem(cfg: LOSGConfig) -> LOSGProblem:
    """The base problem ``cfg.problem`` with its matrices and data drawn from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    p = cfg.problem
    if p == "quadratic":
        q = QuadraticTask(
            QuadraticConfig(cfg.dim, cfg.min_singular, cfg.max_singular, 0.0, cfg.seed)
        )
        a, b = jnp.asarray(q.a, jnp.float32), jnp.asarray(q.b, jnp.float32)
        return LOSGProblem(
            _normal_init([(cfg.dim,)]), lambda ps, _: 0.5 * jnp.sum((a @ ps[0] - b) ** 2)
        )
    if p == "bowl":
        c, t = cfg.condition_number, cfg.angle
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        m = jnp.asarray(np.sqrt(np.diag([c, 1.0])) @ rot, jnp.float32)
        return LOSGProblem(_normal_init([(2,)]), lambda ps, _: 0.5 * jnp.sum((m @ ps[0]) ** 2))
    if p == "sparse_softmax_regression":
        nf, nc = cfg.n_features, cfg.n_classes
        x, y = noisy_parity_data(cfg.n_samples, nc, rng)

        def objective(ps, batch):
            emb, w, bias = ps
            feats = jnp.sum(emb[batch["x"]], axis=1)
            return _logistic_loss(feats @ w + bias, batch["y"], ps)

        shapes = [(nc, nf), (nf, nc), (nc,)]
        return LOSGProblem(_normal_init(shapes, _softmax_scale), objective, {"x": x, "y": y})
    if p == "optimization_test_problems":
        init, objective = _losg_test_function(cfg.function)
        return LOSGProblem(init, objective)
    if p == "fully_connected":
        x, y = random_mlp_data(cfg.n_features, cfg.n_samples, rng)
        sizes = (cfg.n_features, *cfg.hidden_sizes, cfg.n_classes)
        shapes: list[tuple[int, ...]] = []
        for a_, b_ in zip(sizes[:-1], sizes[1:], strict=True):
            shapes += [(a_, b_), (b_,)]
        act = activation_fn(cfg.activation)

        def objective(ps, batch):
            h = batch["x"] @ ps[0] + ps[1]
            for i in range(2, len(ps), 2):
                h = act(h) @ ps[i] + ps[i + 1]
            return _logistic_loss(h, batch["y"], ps)

        return LOSGProblem(_normal_init(shapes, _softmax_scale), objective, {"x": x, "y": y})
    if p == "norm":
        w, yv = (jnp.asarray(v) for v in norm_data(rng, cfg.dim))
        power = cfg.norm_power
        return LOSGProblem(
            _normal_init([(cfg.dim,)]), lambda ps, _: norm_objective(ps[0], w, yv, power)
        )
    if p == "dependency_chain":
        return LOSGProblem(_normal_init([(cfg.dim + 1,)]), lambda ps, _: dependency_chain(ps[0]))
    if p == "outward_snake":
        x, _ = random_mlp_data(cfg.dim, cfg.n_samples, rng)
        return LOSGProblem(
            _normal_init([(cfg.dim,)]),
            lambda ps, batch: outward_snake(ps[0], batch["x"], "sum"),
            {"x": x},
        )
    if p == "min_max_well":
        # The released code adds its 1e-12 to the loss, not to the denominator.
        return LOSGProblem(
            _normal_init([(cfg.dim,)]), lambda ps, _: min_max_well(ps[0], eps=0.0) + 1e-12
        )
    if p in ("sum_of_quadratics", "projection_quadratic"):
        x = symmetric_data(rng, max(2, cfg.n_samples // 2 * 2), cfg.dim)
        if p == "sum_of_quadratics":  # + 1e-12 as the released code

            def objective(ps, batch):
                return sum_of_quadratics(ps[0], batch["x"], "sum") + 1e-12

        else:

            def objective(ps, batch):
                return projection_quadratic(ps[0], batch["x"], "sum")

        return LOSGProblem(_normal_init([(1, cfg.dim)]), objective, {"x": x})
    raise ValueError(f"unknown LOSG problem {p!r}; valid: {', '.join(LOSG_BASE_PROBLEMS)}")


def _tile(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Repeat the examples so that a batch of ``n`` can be drawn (LOSG's ``repeat()``)."""
    m = len(next(iter(arrays.values())))
    reps = -(-n // m)
    return {k: np.concatenate([v] * reps) for k, v in arrays.items()}


def _gradient_noise(xs: list[jax.Array], key: jax.Array, std: float) -> jax.Array:
    """``std * sum <xi, x>`` minus its stopped value: zero in value, ``std * xi`` in gradient."""
    keys = jax.random.split(key, len(xs))
    dot = sum(jnp.sum(jax.random.normal(k, x.shape) * x) for k, x in zip(keys, xs, strict=True))
    return std * (dot - jax.lax.stop_gradient(dot))


class LOSGTask(Task):
    """A built LOSG problem; params are ``{"p0": ..., "p1": ...}`` in LOSG's order.

    Gradient noise and sparsity act through the loss (``x * m + stop_gradient(x * (1 - m))``
    has the value of ``x`` and passes gradient only where ``m = 1``), so ``jax.grad(loss)``
    is the noisy, sparse gradient. The normalizer divides the loss by ``|loss at init|``
    (mean over 4 initialisations, noise-free, first data batch), clipped to [0, 1.5].
    """

    def __init__(self, config: LOSGConfig):
        if config.kind not in LOSG_KINDS:
            raise ValueError(f"unknown LOSG kind {config.kind!r}; valid: {', '.join(LOSG_KINDS)}")
        self.config = config
        self.name = f"losg_{config.kind}" + (
            f"_{config.problem}" if config.kind in LOSG_TRANSFORMATIONS else ""
        )
        self.problem = build_losg_problem(config)
        if self.problem.data is not None:
            bs = config.batch_size
            split = ArraySplit(_tile(self.problem.data, bs), bs)
            self.datasets = Datasets(split, split, split, split)
        else:
            self.datasets = no_data()
        self.sizes = {"num_params": None}
        self.init_loss = self._init_loss()
        self.sizes["num_params"] = self.num_params()

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        return {f"p{i}": x for i, x in enumerate(self.problem.init(key))}

    def objective(self, params: dict[str, jax.Array], batch: dict) -> jax.Array:
        """The noise-free, untransformed base objective."""
        return self.problem.objective([params[f"p{i}"] for i in range(len(params))], batch)

    def loss(self, params, key, batch) -> jax.Array:
        cfg = self.config
        xs = [params[f"p{i}"] for i in range(len(params))]
        k_noise, k_mask, k_sparse = jax.random.split(key, 3)
        if cfg.kind == "sparse_problems":
            keys = jax.random.split(k_mask, len(xs))
            masks = [
                (jax.random.uniform(k, x.shape) >= cfg.zero_probability).astype(x.dtype)
                for k, x in zip(keys, xs, strict=True)
            ]
            xs = [
                x * m + jax.lax.stop_gradient(x * (1 - m)) for x, m in zip(xs, masks, strict=True)
            ]
        obj = self.problem.objective(xs, batch)
        if cfg.noise_std > 0:
            obj = obj + _gradient_noise(xs, k_noise, cfg.noise_std)
        if cfg.kind == "sparse_problems" and cfg.sparse_noise_std > 0:
            obj = obj + _gradient_noise(xs, k_sparse, cfg.sparse_noise_std)
        if cfg.kind == "log_objective":
            obj = log_objective(obj)
        elif cfg.kind == "rescale_problems":
            obj = obj * cfg.loss_scale
        return obj

    def _init_loss(self) -> float:
        split = self.datasets.train
        batch = split.full() if isinstance(split, ArraySplit) else {}
        if batch:
            batch = {k: v[: split.batch_size] for k, v in batch.items()}

        def at_init(k):
            k_init, k_loss = jax.random.split(k)
            return self.loss(self.init(k_init), k_loss, batch)

        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        lowered = jax.jit(jax.vmap(at_init)).lower(keys)
        # A one-off evaluation: on CPU, cheap XLA settings cut the compile time several-fold.
        options = CHEAP_COMPILE if jax.default_backend() == "cpu" else None
        losses = np.asarray(lowered.compile(compiler_options=options)(keys), np.float64)
        finite = [abs(float(v)) for v in losses if math.isfinite(v)]
        return max(float(np.mean(finite)) if finite else 1.0, 1e-12)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        r = loss / self.init_loss
        return jnp.clip(jnp.nan_to_num(r, nan=1.5, posinf=1.5, neginf=0.0), 0.0, 1.5)


class LOSGFamily(TaskFamily):
    """TaskSet's ``losg_tasks`` (arXiv:2009.11243, App. I.2.8) over the LOSG problems above."""

    name = "losg_tasks"
    config_type = LOSGConfig

    def sample(self, key: jax.Array) -> LOSGConfig:
        return sample_losg_config(key)

    def task(self, config: LOSGConfig) -> LOSGTask:
        return LOSGTask(config)
