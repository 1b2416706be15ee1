"""Task augmentations of VeLO meta-training.

Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv:2211.09760, App. C.5, with the probabilities the paper states (they match the
released ``parametric.py`` of learned_optimization, github.com/google/learned_optimization).
Each augmentation is a function ``Task -> Task`` returning a wrapped task:

1. weight reparameterisation (:func:`reparameterize`, :func:`reparameterize_random`):
   level uniform over ``[None, None, global, global, tensor, tensor, parameter]``, the scale
   range one of (0.001, 1000), (0.01, 100), (0.1, 10), each scale log-uniform inside it;
2. ES gradient estimates (:func:`es_gradient`), p = 0.08: std log-uniform in [0.001, 0.1],
   antithetic pairs in {1, 2, 4, 8, 16};
3. batch-size reduction (:func:`reduce_batch_size`), p = 0.2: a factor uniform in [0.01, 1];
4. bfloat16 training (:func:`to_bfloat16`), p = 0.2;
5. gradient normalisation (:func:`normalize_gradient`), p = 0.05;
6. directional-gradient subspace (:func:`directional_gradient`), p = 0.08: the average of
   1-1024 (log-uniform) directional derivatives, with probability 0.5 only their sign;
7. delayed gradients (:func:`delayed_gradients`), p = 0.05: a delay log-uniform in 1-8 steps.

Augmentations 2, 5 and 6 keep the loss and replace its gradient (``jax.custom_vjp``), so
``jax.value_and_grad(task.loss)`` sees them; the delay needs state across steps and overrides the
task's gradient protocol (``grad_state_init`` / ``value_and_grad``), which every training loop
calls through :func:`learnopt.step.inner_step`. How gradients reach the optimizer, the order
:func:`apply` uses and the expectation of the directional estimate are in docs/derivations.md
§5; the choices the paper leaves open are in docs/departures.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.base import (
    ArraySplit,
    Datasets,
    NoDataSplit,
    SequenceSplit,
    Task,
)
from learnopt.trees import tree_dot, tree_norm

Params = Any
Batch = Any
GradFn = Callable[[Params, jax.Array], Params]

REPARAM_LEVELS = ("none", "global", "tensor", "parameter")

# Constants folded into the loss key so estimator noise is independent of the key the
# inner loss itself receives.
_ES_TAG = 0x5E5
_GRAD_TAG = 0xD1C
_REPARAM_TAG = 0x5CA


# -- tree helpers -----------------------------------------------------------------------------


def _safe_inverse(norm: jax.Array) -> jax.Array:
    return jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)


def unflatten_vector(vector: jax.Array, like: Params) -> Params:
    """Cut a flat vector into leaves shaped like ``like`` (in ``tree_leaves`` order)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = math.prod(jnp.shape(leaf))
        out.append(vector[start : start + size].reshape(jnp.shape(leaf)))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def normal_tree(key: jax.Array, like: Params) -> Params:
    """Standard normal float32 leaves shaped like ``like``, from one draw (cheap to compile)."""
    return unflatten_vector(jax.random.normal(key, (num_parameters(like),)), like)


def uniform_tree(key: jax.Array, like: Params) -> Params:
    """Uniform [0, 1) float32 leaves shaped like ``like``, from one draw."""
    return unflatten_vector(jax.random.uniform(key, (num_parameters(like),)), like)


def _cast_like(tree: Params, like: Params) -> Params:
    return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x, jnp.result_type(y)), tree, like)


def num_parameters(params: Params) -> int:
    """Total number of entries over all leaves (arrays or shape structs)."""
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)))


# -- the wrapper base -----------------------------------------------------------------------


class TaskWrapper(Task):
    """A task delegating everything to ``task``; augmentations override parts."""

    tag = "wrapped"

    def __init__(self, task: Task):
        if not isinstance(task, Task):
            raise TypeError(f"augmentations wrap a Task, got {type(task).__name__}")
        if task.has_gradient_state:
            raise ValueError(
                f"{type(self).__name__} cannot wrap {task.name!r}, which has gradient state "
                "(delayed gradients); apply delayed_gradients last (outermost)"
            )
        self.task = task
        self.name = f"{task.name}+{self.tag}"
        self.datasets = task.datasets

    def init(self, key: jax.Array) -> Params:
        return self.task.init(key)

    def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
        return self.task.loss(params, key, batch)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return self.task.normalizer(loss)

    def metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        return self.task.metrics(params, batch)


# -- 1. weight reparameterisation -----------------------------------------------------------


class ReparameterizedTask(TaskWrapper):
    """``w = s * v``: the optimizer trains ``v``, initialised at ``w0 / s`` (C.5 item 1).

    The loss at initialisation equals the inner task's; the gradient is
    ``dL/dv = s * dL/dw`` (chain rule).
    """

    def __init__(self, task: Task, scale_fn: Callable[[], Params], level: str):
        self.tag = f"reparam_{level}"
        super().__init__(task)
        self._scale_fn = scale_fn
        self.level = level

    def scales(self) -> Params:
        """The scale ``s`` per leaf (a scalar per leaf at global/tensor level)."""
        return self._scale_fn()

    def inner_params(self, params: Params) -> Params:
        """The inner task's parameters ``w = s * v``."""
        return jax.tree_util.tree_map(
            lambda v, s: v * jnp.asarray(s, v.dtype), params, self._scale_fn()
        )

    def init(self, key: jax.Array) -> Params:
        w0 = self.task.init(key)
        return jax.tree_util.tree_map(
            lambda w, s: w / jnp.asarray(s, w.dtype), w0, self._scale_fn()
        )

    def loss(self, params, key, batch):
        return self.task.loss(self.inner_params(params), key, batch)

    def metrics(self, params, batch):
        return self.task.metrics(self.inner_params(params), batch)


def _abstract_params(task: Task) -> Params:
    return jax.eval_shape(task.init, jax.random.PRNGKey(0))


def reparameterize(task: Task, scales: float | Params) -> ReparameterizedTask:
    """Reparameterise with explicit scales: one float, or a pytree like the parameters.

    Tree leaves may be scalars (one scale per tensor) or arrays of the leaf's shape
    (one per parameter).
    """
    abstract = _abstract_params(task)
    if isinstance(scales, int | float):
        if not scales > 0:
            raise ValueError(f"reparameterisation scale must be > 0, got {scales}")
        tree = jax.tree_util.tree_map(lambda _: np.float32(scales), abstract)
        return ReparameterizedTask(task, lambda: tree, "global")
    if jax.tree_util.tree_structure(scales) != jax.tree_util.tree_structure(abstract):
        raise ValueError(
            "scales must be a float or a pytree with the parameters' structure "
            f"{jax.tree_util.tree_structure(abstract)}, got {jax.tree_util.tree_structure(scales)}"
        )
    tree = jax.tree_util.tree_map(lambda s: np.asarray(s, np.float32), scales)
    return ReparameterizedTask(task, lambda: tree, "explicit")


def reparameterize_random(
    task: Task, level: str, scale_range: tuple[float, float], seed: int
) -> Task:
    """Reparameterise with scales log-uniform in ``scale_range`` (C.5 item 1).

    ``level``: ``"none"`` (the task itself), ``"global"`` (one scale),
    ``"tensor"`` (one per leaf) or ``"parameter"`` (one per entry). The scales are
    a deterministic function of ``seed`` and the parameter structure.
    """
    if level not in REPARAM_LEVELS:
        raise ValueError(f"reparam level must be one of {REPARAM_LEVELS}, got {level!r}")
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
    if level == "none":
        return task
    abstract = _abstract_params(task)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    log_lo, log_hi = math.log(lo), math.log(hi)

    def scale_fn():
        key = jax.random.fold_in(jax.random.PRNGKey(seed), _REPARAM_TAG)
        if level == "parameter":
            u = uniform_tree(key, abstract)
        else:
            draws = jax.random.uniform(key, (1 if level == "global" else len(leaves),))
            u = jax.tree_util.tree_unflatten(
                treedef, [draws[0 if level == "global" else i] for i in range(len(leaves))]
            )
        return jax.tree_util.tree_map(lambda x: jnp.exp(log_lo + (log_hi - log_lo) * x), u)

    return ReparameterizedTask(task, scale_fn, level)


# -- gradient replacement through custom_vjp -------------------------------------------------


class GradientModifiedTask(TaskWrapper):
    """The inner loss with its gradient replaced by ``estimate(params, key, batch, g)``.

    ``estimate`` receives a zero-argument function ``g`` giving the true gradient
    (its backward pass is only run when called) and returns the gradient the
    optimizer sees. Written with ``jax.custom_vjp``: ``jax.value_and_grad(loss)``
    returns ``(inner loss, estimate * cotangent)``.
    """

    def __init__(
        self,
        task: Task,
        estimate: Callable[[Params, jax.Array, Batch, Callable[[], Params]], Params],
        tag: str,
        needs_true_grad: bool = True,
    ):
        self.tag = tag
        super().__init__(task)
        inner_loss = task.loss

        @jax.custom_vjp
        def loss(params, key, batch):
            return inner_loss(params, key, batch)

        def fwd(params, key, batch):
            if needs_true_grad:
                value, vjp = jax.vjp(lambda p: inner_loss(p, key, batch), params)
            else:
                value, vjp = inner_loss(params, key, batch), None
            return value, (params, key, batch, vjp, value)

        def bwd(res, cotangent):
            params, key, batch, vjp, value = res

            def true_grad():
                if vjp is None:
                    raise ValueError("this gradient estimate was declared without true gradients")
                return vjp(jnp.ones_like(value))[0]

            grads = estimate(params, key, batch, true_grad)
            grads = jax.tree_util.tree_map(
                lambda g, p: jnp.asarray(g * cotangent, jnp.result_type(p)), grads, params
            )
            return grads, None, None

        loss.defvjp(fwd, bwd)
        self._loss = loss

    def loss(self, params, key, batch):
        return self._loss(params, key, batch)


def modify_gradient(task: Task, fn: GradFn, tag: str = "modified_grad") -> GradientModifiedTask:
    """Replace the gradient by ``fn(grads, key)`` (key derived from the loss key)."""

    def estimate(params, key, batch, true_grad):
        del params, batch
        return fn(true_grad(), jax.random.fold_in(key, _GRAD_TAG))

    return GradientModifiedTask(task, estimate, tag)


# -- 2. ES gradient estimates --------------------------------------------------------------


def es_gradient(task: Task, std: float, num_pairs: int) -> GradientModifiedTask:
    """Replace the gradient by an antithetic ES estimate (C.5 item 2; Salimans 2017).

    ``g = 1/(2 std n) sum_i [L(x + std e_i) - L(x - std e_i)] e_i``, ``e_i ~ N(0, I)``,
    every evaluation with the step's key and batch. The loss value is unchanged.
    """
    if not std > 0:
        raise ValueError(f"ES std must be > 0, got {std}")
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"ES num_pairs must be a positive int, got {num_pairs!r}")
    inner_loss = task.loss

    def estimate(params, key, batch, true_grad):
        del true_grad
        keys = jax.random.split(jax.random.fold_in(key, _ES_TAG), num_pairs)
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

        def body(i, acc):
            eps = normal_tree(keys[i], params)
            pos = _cast_like(jax.tree_util.tree_map(lambda p, e: p + std * e, params, eps), params)
            neg = _cast_like(jax.tree_util.tree_map(lambda p, e: p - std * e, params, eps), params)
            diff = jnp.asarray(inner_loss(pos, key, batch), jnp.float32) - jnp.asarray(
                inner_loss(neg, key, batch), jnp.float32
            )
            coef = diff / (2.0 * std * num_pairs)
            return jax.tree_util.tree_map(lambda a, e: a + coef * e, acc, eps)

        return jax.lax.fori_loop(0, num_pairs, body, zeros)

    return GradientModifiedTask(task, estimate, f"es{num_pairs}x{std:.3g}", needs_true_grad=False)


# -- 3. batch-size reduction -----------------------------------------------------------------


class _SlicedSplit:
    """Any split, its batches cut to the first ``batch_size(n)`` examples of each leaf."""

    def __init__(self, split: Any, fraction: float):
        self.split = split
        self.fraction = fraction

    def _size(self, n: int) -> int:
        return max(1, int(n * self.fraction))

    def _cut(self, batch):
        return jax.tree_util.tree_map(lambda x: x[: self._size(x.shape[0])], batch)

    def sample(self, key: jax.Array):
        return self._cut(self.split.sample(key))

    def iterator(self, seed: int) -> Iterator[Any]:
        for batch in self.split.iterator(seed):
            yield self._cut(batch)

    def abstract_batch(self):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((self._size(x.shape[0]), *x.shape[1:]), x.dtype),
            self.split.abstract_batch(),
        )


def _reduce_split(split: Any, fraction: float) -> Any:
    if isinstance(split, NoDataSplit):
        return split
    if isinstance(split, ArraySplit):
        return ArraySplit(split.arrays, max(1, int(split.batch_size * fraction)))
    if isinstance(split, SequenceSplit):
        return SequenceSplit(split.tokens, max(1, int(split.batch_size * fraction)), split.seq_len)
    return _SlicedSplit(split, fraction)


class ReducedBatchTask(TaskWrapper):
    """The inner task with every split's batch size times ``fraction`` (C.5 item 3)."""

    def __init__(self, task: Task, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError(f"batch fraction must be in (0, 1], got {fraction}")
        self.tag = f"batch{fraction:.3g}"
        super().__init__(task)
        self.fraction = float(fraction)
        ds = task.datasets
        self.datasets = Datasets(
            train=_reduce_split(ds.train, fraction),
            inner_valid=_reduce_split(ds.inner_valid, fraction),
            outer_valid=_reduce_split(ds.outer_valid, fraction),
            test=_reduce_split(ds.test, fraction),
            extra_info=ds.extra_info,
        )


def reduce_batch_size(task: Task, fraction: float) -> Task:
    """Batches of ``max(1, int(batch_size * fraction))`` examples (C.5 item 3)."""
    if fraction == 1.0:
        return task
    return ReducedBatchTask(task, fraction)


# -- 4. bfloat16 ---------------------------------------------------------------------------


def _to_bf16(tree: Any) -> Any:
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


class BFloat16Task(TaskWrapper):
    """Parameters and floating-point data in bfloat16 (C.5 item 4)."""

    tag = "bf16"

    def init(self, key):
        return _to_bf16(self.task.init(key))

    def loss(self, params, key, batch):
        loss = self.task.loss(_to_bf16(params), key, _to_bf16(batch))
        return jnp.asarray(loss, jnp.float32)

    def metrics(self, params, batch):
        return self.task.metrics(_to_bf16(params), _to_bf16(batch))


def to_bfloat16(task: Task) -> BFloat16Task:
    """Train ``task`` in bfloat16 (C.5 item 4)."""
    return BFloat16Task(task)


# -- 5. gradient normalisation ---------------------------------------------------------------


def normalize_gradient(task: Task, mode: str = "global") -> GradientModifiedTask:
    """Unit-norm gradients (C.5 item 5): over all tensors (``"global"``) or per tensor."""
    if mode not in ("global", "tensor"):
        raise ValueError(f"normalize_gradient mode must be 'global' or 'tensor', got {mode!r}")

    def fn(grads, key):
        del key
        if mode == "global":
            inv = _safe_inverse(tree_norm(grads))
            return jax.tree_util.tree_map(lambda g: g * inv, grads)
        return jax.tree_util.tree_map(lambda g: g * _safe_inverse(tree_norm(g)), grads)

    return modify_gradient(task, fn, f"normgrad_{mode}")


# -- 6. directional-gradient subspace -------------------------------------------------------


def directional_expectation_factor(num_params: int, sign: bool) -> float:
    """``E[estimate] = factor * g`` (magnitude) or ``factor * g / ||g||`` (sign).

    With ``u`` uniform on the unit sphere of ``R^d``: ``E[<g, u> u] = g / d`` and
    ``E[sign(<g, u>) u] = E|u_1| g / ||g||`` with
    ``E|u_1| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))``.
    """
    d = int(num_params)
    if d < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}")
    if not sign:
        return 1.0 / d
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def directional_gradient(task: Task, num_directions: int, sign: bool = False) -> Task:
    """Average of ``n`` random directional derivatives (C.5 item 6).

    ``(1/n) sum_i <g, u_i> u_i`` (or ``sign(<g, u_i>) u_i``) with ``u_i`` uniform on
    the unit sphere of all parameters. Expectation: see
    :func:`directional_expectation_factor`.
    """
    if not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions must be a positive int, got {num_directions!r}")

    def fn(grads, key):
        keys = jax.random.split(key, num_directions)
        zeros = jax.tree_util.tree_map(lambda g: jnp.zeros(jnp.shape(g), jnp.float32), grads)

        def body(i, acc):
            u = normal_tree(keys[i], grads)
            inv = _safe_inverse(tree_norm(u))
            amount = tree_dot(grads, u) * inv
            if sign:
                amount = jnp.sign(amount)
            coef = amount * inv / num_directions
            return jax.tree_util.tree_map(lambda a, e: a + coef * e, acc, u)

        return jax.lax.fori_loop(0, num_directions, body, zeros)

    tag = f"dirgrad{num_directions}" + ("_sign" if sign else "")
    return modify_gradient(task, fn, tag)


# -- 7. delayed gradients ------------------------------------------------------------------


class DelayedGradientTask(Task):
    """Gradients from ``delay`` steps ago (C.5 item 7); see ``Task.value_and_grad``.

    State: the last ``delay`` parameter values (oldest first) and the inner
    task's gradient state. At step ``t`` the loss and gradient are evaluated at
    the parameters of step ``t - delay`` on the current key and batch; the
    buffer starts filled with the parameters given to :meth:`grad_state_init`.
    ``loss`` is the inner loss at the given parameters (for evaluation).
    """

    has_gradient_state = True

    def __init__(self, task: Task, delay: int):
        if not isinstance(task, Task):
            raise TypeError(f"augmentations wrap a Task, got {type(task).__name__}")
        if not isinstance(delay, int) or delay < 1:
            raise ValueError(f"delay must be a positive int, got {delay!r}")
        self.task = task
        self.delay = delay
        self.name = f"{task.name}+delay{delay}"
        self.datasets = task.datasets

    def init(self, key):
        return self.task.init(key)

    def loss(self, params, key, batch):
        return self.task.loss(params, key, batch)

    def normalizer(self, loss):
        return self.task.normalizer(loss)

    def metrics(self, params, batch):
        return self.task.metrics(params, batch)

    def grad_state_init(self, params: Params) -> tuple[Params, Any]:
        buffer = jax.tree_util.tree_map(
            lambda p: jnp.repeat(jnp.asarray(p)[None], self.delay, axis=0), params
        )
        return buffer, self.task.grad_state_init(params)

    def value_and_grad(self, params, key, batch, state):
        buffer, inner_state = state
        stale = jax.tree_util.tree_map(lambda b: b[0], buffer)
        (loss, grads), inner_state = self.task.value_and_grad(stale, key, batch, inner_state)
        buffer = jax.tree_util.tree_map(
            lambda b, p: jnp.concatenate([b[1:], jnp.asarray(p, b.dtype)[None]], axis=0),
            buffer,
            params,
        )
        return (loss, grads), (buffer, inner_state)


def delayed_gradients(task: Task, delay: int) -> DelayedGradientTask:
    """Gradients computed ``delay`` steps late (C.5 item 7); see :class:`DelayedGradientTask`."""
    return DelayedGradientTask(task, delay)
