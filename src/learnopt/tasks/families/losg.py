"""The ``losg_tasks`` family: resampled problems of "Learned Optimizers that Scale and
Generalize" (Wichrowska et al. 2017), as used by seed 000 App. I.2.8.

Seed 000 App. I.2.8 samples uniformly over 14 kinds: 11 base problems and 3 transformations
of a base problem (../shared/spec/three-papers.md A.3). Ranges are the paper's where it gives
them and the released code's (``task_set/tasks/losg_tasks.py``) otherwise:

* ``quadratic``: dimension log-uniform in [10, 1000]; gradient noise with probability 0.5,
  std log-uniform in [0.01, 10]. Reuses :mod:`learnopt.tasks.families.quadratic`: the matrix and
  target are those of a :class:`~learnopt.tasks.families.quadratic.QuadraticTask` drawn by
  :class:`~learnopt.tasks.families.quadratic.QuadraticFamily` (controlled singular values instead of
  the LOSG code's Gaussian matrix), loss ``0.5 ||A x - b||^2``.
* ``bowl``: ``0.5 ||sqrt(diag(c, 1)) R(angle) x||^2`` with condition number ``c``
  log-uniform in [0.01, 100], angle from {0, 0, pi/4, pi/3}; noise as above.
* ``sparse_softmax_regression``: 5 context ids in {0, 1} whose parity (flipped with
  probability 0.25) is the label; embeddings of ``n_features`` log [2, 100], logistic loss
  plus ``1e-3 * mean_p sum(p^2)``; batch log [1, 50]; samples log [1, 30]; noise as above.
* ``optimization_test_problems``: uniformly Ackley, Beale, Branin, logsumexp, Matyas,
  Michalewicz, Rosenbrock, Styblinski-Tang in 2-D, with their LOSG initial ranges; noise.
* ``fully_connected``: 2-class MLP on the LOSG "random MLP" data; input features log
  [1, 16]; sampled activation; hidden layers uniform in 2..5 of sizes log [4, 32] (one size
  for all layers half the time); batch log [1, 200]; samples log [1, 30].
* ``norm``: ``(sum_i (|W x - y|_i + 1e-6)^p)^(1/p)`` with ``W`` (N x N), ``y`` standard
  normal, N log [3, 1000], p uniform in [0.1, 5].
* ``dependency_chain``: ``x_0^2 + sum_i x_i^2 / (x_{i-1}^2 + 1e-6)``, dimension log [3, 100]
  (``dim + 1`` parameters, as in LOSG).
* ``outward_snake``: ``sum_b d_b0 / (|x| + 1e-6) + sum_b sum_i ((x_i - pi cos x_{i-1}) d_bi)^2``
  on standard-normal data rows ``d``; dimension log [3, 100]; batch log [1, 200]; samples
  log [100, 20000].
* ``min_max_well``: ``max x^2 + 1 / min x^2 - 2`` (the released code's squares; the paper
  writes ``max x + 1 / min x - 2``), dimension log [10, 1000]; noise.
* ``sum_of_quadratics``: ``sum_b ||x - d_b||^2 - sum_b ||d_b||^2`` on sign-symmetric normal
  data; dimension log [3, 100]; batch log [1, 200]; samples log [100, 20000].
* ``projection_quadratic``: ``sum_b ||x * d_b||^2``; same sizes.
* Transformations of a base problem drawn uniformly from the ten above other than
  ``sparse_softmax_regression``:

  - ``sparse_problems``: each gradient entry is zeroed with probability uniform in
    [0.9, 0.99]; extra gradient noise with probability 0.5, std log [0.01, 10].
  - ``rescale_problems``: the loss is multiplied by a scale log-uniform in [0.001, 1000]
    (the paper's words; the released code rescales the parameters instead).
  - ``log_objective``: ``log(f + 1e-6) - log(1e-6)``. Departure: ``f`` is floored at 0 first
    (data-dependent objectives such as ``sum_of_quadratics`` can dip below 0 on a batch,
    where the released code returns NaN).

"Noise" is LOSG's gradient noise: ``N(0, std^2)`` added to every gradient entry. We add it
through the loss as ``std * (<xi, x> - stop_gradient(<xi, x>))``, which leaves the loss value
unchanged and adds ``std * xi`` to the gradient. Gradient sparsity uses the same device:
``x * m + stop_gradient(x * (1 - m))`` has the value of ``x`` and passes gradient only where
``m = 1``. Base-problem noise is kept under the transformations (the released code drops it
there, since the wrapper's own gradient function replaces the base's).

Parameters are initialised as in LOSG: standard normal, times ``1.2 / sqrt(rows)`` for the
softmax problems, and uniform on each test function's box. Every split serves the same
synthetic data (LOSG problems have no held-out data). The normalizer divides the loss by
``|loss at init|`` (mean over 4 initialisations, noise-free, first data batch), clipped to
[0, 1.5]: TaskSet normalises by baseline runs we do not have, and this keeps "no progress"
at 1 for every problem.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.base import ArraySplit, Datasets, Task, TaskFamily, no_data
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticFamily, QuadraticTask
from learnopt.tasks.families.taskset_parts import (
    activation_fn,
    bernoulli,
    choice,
    key_rng,
    log_float,
    log_int,
    sample_activation,
    uniform_int,
)

EPSILON = 1e-6
L2_REG_SCALE = 1e-3
BASE_PROBLEMS = (
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
TRANSFORMATIONS = ("sparse_problems", "rescale_problems", "log_objective")
LOSG_KINDS = BASE_PROBLEMS + TRANSFORMATIONS
TRANSFORMABLE = tuple(p for p in BASE_PROBLEMS if p != "sparse_softmax_regression")
TEST_FUNCTIONS = (
    "ackley",
    "beale",
    "branin",
    "logsumexp",
    "matyas",
    "michalewicz",
    "rosenbrock",
    "styblinski_tang",
)
NOISE_RANGE = (0.01, 10.0)
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


def _noise(rng: np.random.Generator) -> float:
    return log_float(rng, *NOISE_RANGE) if bernoulli(rng, 0.5) else 0.0


def _sample_base(rng: np.random.Generator, problem: str) -> dict:
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
            "angle": float(choice(rng, (0.0, 0.0, math.pi / 4, math.pi / 3))),
            "noise_std": _noise(rng),
        }
    if problem == "sparse_softmax_regression":
        return {
            "n_features": log_int(rng, 2, 100),
            "n_classes": 2,
            "noise_std": _noise(rng),
            "batch_size": log_int(rng, 1, 50),
            "n_samples": log_int(rng, 1, 30),
        }
    if problem == "optimization_test_problems":
        return {"function": choice(rng, TEST_FUNCTIONS), "noise_std": _noise(rng)}
    if problem == "fully_connected":
        n_layers = uniform_int(rng, 2, 5)
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
        return {"dim": log_int(rng, 10, 1000), "noise_std": _noise(rng)}
    raise ValueError(f"unknown LOSG problem {problem!r}; valid: {', '.join(BASE_PROBLEMS)}")


def sample_losg_config(key: jax.Array) -> LOSGConfig:
    """A config from seed 000 App. I.2.8's distribution (see the module docstring)."""
    rng = key_rng(key, "losg_tasks")
    kind = choice(rng, LOSG_KINDS)
    problem = choice(rng, TRANSFORMABLE) if kind in TRANSFORMATIONS else kind
    fields = _sample_base(rng, problem)
    if kind == "sparse_problems":
        fields["zero_probability"] = float(rng.uniform(0.9, 0.99))
        fields["sparse_noise_std"] = _noise(rng)
    elif kind == "rescale_problems":
        fields["loss_scale"] = log_float(rng, 0.001, 1000.0)
    seed = int(rng.integers(0, 100000))
    return LOSGConfig(kind=kind, problem=problem, seed=seed, **fields)


# --- problem definitions ----------------------------------------------------------------------

Objective = Callable[[list[jax.Array], dict], jax.Array]
Initializer = Callable[[jax.Array], list[jax.Array]]


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


def _test_function(name: str) -> tuple[Initializer, Objective]:
    pi = math.pi

    def fn(f):
        return lambda ps, batch: f(ps[0][0], ps[0][1])

    if name == "ackley":

        def f(x, y):
            return (
                -20 * jnp.exp(-0.2 * jnp.sqrt(0.5 * (x**2 + y**2)))
                - jnp.exp(0.5 * (jnp.cos(2 * pi * x) + jnp.cos(2 * pi * y)))
                + math.e
                + 20.0
            )

        return _uniform_init((-32.768,) * 2, (32.768,) * 2), fn(f)
    if name == "beale":

        def f(x, y):
            return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2

        return _uniform_init((-4.5,) * 2, (4.5,) * 2), fn(f)
    if name == "branin":
        b, c, t = 5.1 / (4 * pi**2), 5 / pi, 1 / (8 * pi)

        def f(x, y):
            return (y - b * x**2 + c * x - 6.0) ** 2 + 10 * (1 - t) * jnp.cos(x) + 10.0

        return _uniform_init((-5.0, 0.0), (10.0, 15.0)), fn(f)
    if name == "logsumexp":

        def f(x, y):
            return jnp.log(
                jnp.exp(x + 3 * y - 0.1) + jnp.exp(x - 3 * y - 0.1) + jnp.exp(-x - 0.1) + 1.0
            )

        return _normal_init([(2,)]), fn(f)
    if name == "matyas":
        return _uniform_init((-10.0,) * 2, (10.0,) * 2), fn(
            lambda x, y: 0.26 * (x**2 + y**2) - 0.48 * x * y
        )
    if name == "michalewicz":

        def f(x, y):
            m = 5
            return 2.0 - (
                jnp.sin(x) * jnp.sin(x**2 / pi) ** (2 * m)
                + jnp.sin(y) * jnp.sin(2 * y**2 / pi) ** (2 * m)
            )

        return _uniform_init((0.0, 0.0), (pi, pi)), fn(f)
    if name == "rosenbrock":
        return _uniform_init((-5.0,) * 2, (10.0,) * 2), fn(
            lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2
        )
    if name == "styblinski_tang":

        def f(x, y):
            return 0.5 * sum(v**4 - 16 * v**2 + 5 * v for v in (x, y)) + 80.0

        return _uniform_init((-5.0,) * 2, (5.0,) * 2), fn(f)
    raise ValueError(f"unknown test function {name!r}; valid: {', '.join(TEST_FUNCTIONS)}")


def _logistic_loss(logits: jax.Array, labels: jax.Array, params: list[jax.Array]) -> jax.Array:
    """LOSG's 2-class loss: sigmoid cross-entropy on the first logit, plus L2 regularisation."""
    z = logits[:, 0]
    y = labels.astype(z.dtype)
    ce = jnp.mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))))
    reg = jnp.mean(jnp.stack([jnp.sum(p**2) for p in params]))
    return ce + L2_REG_SCALE * reg


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


def random_symmetric_data(n_features: int, n_samples: int, rng: np.random.Generator):
    """LOSG's ``random_symmetric`` data: ``n/2`` normal rows and their negatives."""
    half = rng.normal(size=(n_samples // 2, n_features))
    return np.concatenate([half, -half]).astype(np.float32)


def noisy_parity_data(n_samples: int, n_classes: int, rng: np.random.Generator):
    """LOSG's ``noisy_parity_class`` data: 5 context ids, label their sum mod ``n_classes``
    with a flip of probability 0.25."""
    x = rng.integers(0, n_classes, (n_samples, 5))
    y = (x.sum(1) + rng.binomial(1, 0.25, n_samples)) % n_classes
    return x.astype(np.int32), y.astype(np.int32)


@dataclasses.dataclass
class Problem:
    """A built base problem: parameter initializer, objective, data (or ``None``)."""

    init: Initializer
    objective: Objective
    data: dict[str, np.ndarray] | None = None


def build_problem(cfg: LOSGConfig) -> Problem:
    """The base problem ``cfg.problem`` with its matrices and data drawn from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    p = cfg.problem
    if p == "quadratic":
        q = QuadraticTask(
            QuadraticConfig(cfg.dim, cfg.min_singular, cfg.max_singular, 0.0, cfg.seed)
        )
        a, b = jnp.asarray(q.a, jnp.float32), jnp.asarray(q.b, jnp.float32)
        return Problem(
            _normal_init([(cfg.dim,)]), lambda ps, _: 0.5 * jnp.sum((a @ ps[0] - b) ** 2)
        )
    if p == "bowl":
        c, t = cfg.condition_number, cfg.angle
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        m = jnp.asarray(np.sqrt(np.diag([c, 1.0])) @ rot, jnp.float32)
        return Problem(_normal_init([(2,)]), lambda ps, _: 0.5 * jnp.sum((m @ ps[0]) ** 2))
    if p == "sparse_softmax_regression":
        nf, nc = cfg.n_features, cfg.n_classes
        x, y = noisy_parity_data(cfg.n_samples, nc, rng)

        def objective(ps, batch):
            emb, w, bias = ps
            feats = jnp.sum(emb[batch["x"]], axis=1)
            return _logistic_loss(feats @ w + bias, batch["y"], ps)

        shapes = [(nc, nf), (nf, nc), (nc,)]
        return Problem(_normal_init(shapes, _softmax_scale), objective, {"x": x, "y": y})
    if p == "optimization_test_problems":
        init, objective = _test_function(cfg.function)
        return Problem(init, objective)
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

        return Problem(_normal_init(shapes, _softmax_scale), objective, {"x": x, "y": y})
    if p == "norm":
        w = jnp.asarray(rng.normal(size=(cfg.dim, cfg.dim)), jnp.float32)
        yv = jnp.asarray(rng.normal(size=(cfg.dim,)), jnp.float32)
        power = cfg.norm_power

        def objective(ps, _):
            return jnp.sum((jnp.abs(w @ ps[0] - yv) + EPSILON) ** power) ** (1.0 / power)

        return Problem(_normal_init([(cfg.dim,)]), objective)
    if p == "dependency_chain":

        def objective(ps, _):
            x = ps[0]
            return x[0] ** 2 + jnp.sum(x[1:] ** 2 / (x[:-1] ** 2 + EPSILON))

        return Problem(_normal_init([(cfg.dim + 1,)]), objective)
    if p == "outward_snake":
        x, _ = random_mlp_data(cfg.dim, cfg.n_samples, rng)

        def objective(ps, batch):
            v, d = ps[0], batch["x"]
            radius = jnp.sqrt(jnp.sum(v**2))
            rad_loss = jnp.sum(d[:, 0] / (radius + EPSILON))
            sin_dist = v[1:] - jnp.cos(v[:-1]) * math.pi
            return rad_loss + jnp.sum((sin_dist * d[:, 1:]) ** 2)

        return Problem(_normal_init([(cfg.dim,)]), objective, {"x": x})
    if p == "min_max_well":

        def objective(ps, _):
            sq = ps[0] ** 2
            return jnp.max(sq) + 1.0 / jnp.min(sq) - 2.0 + 1e-12

        return Problem(_normal_init([(cfg.dim,)]), objective)
    if p in ("sum_of_quadratics", "projection_quadratic"):
        x = random_symmetric_data(cfg.dim, max(2, cfg.n_samples // 2 * 2), rng)
        if p == "sum_of_quadratics":

            def objective(ps, batch):
                d = batch["x"]
                return jnp.sum((ps[0] - d) ** 2) - jnp.sum(d**2) + 1e-12

        else:

            def objective(ps, batch):
                return jnp.sum((ps[0] * batch["x"]) ** 2)

        return Problem(_normal_init([(1, cfg.dim)]), objective, {"x": x})
    raise ValueError(f"unknown LOSG problem {p!r}; valid: {', '.join(BASE_PROBLEMS)}")


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
    """A built LOSG problem; params are ``{"p0": ..., "p1": ...}`` in LOSG's order."""

    def __init__(self, config: LOSGConfig):
        if config.kind not in LOSG_KINDS:
            raise ValueError(f"unknown LOSG kind {config.kind!r}; valid: {', '.join(LOSG_KINDS)}")
        self.config = config
        self.name = f"losg_{config.kind}" + (
            f"_{config.problem}" if config.kind in TRANSFORMATIONS else ""
        )
        self.problem = build_problem(config)
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
            obj = jnp.log(jnp.maximum(obj, 0.0) + EPSILON) - math.log(EPSILON)
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
    """Seed 000 App. I.2.8 ``losg_tasks`` (see the module docstring)."""

    name = "losg_tasks"
    config_type = LOSGConfig

    def sample(self, key: jax.Array) -> LOSGConfig:
        return sample_losg_config(key)

    def task(self, config: LOSGConfig) -> LOSGTask:
        return LOSGTask(config)
