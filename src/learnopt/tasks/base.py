"""The task contract: Task, TaskFamily, data splits.

Follows the Task / TaskFamily / Datasets layering of Metz et al. 2020, "Tasks,
stability, architecture, and compute: Training more effective learned optimizers,
and using them to train themselves", arXiv:2009.11243, §3.2 and App. I: a task is a
loss over parameters with its own data, and a family is a distribution over tasks
from which configs are sampled.

* ``Task.init(key) -> params``; ``Task.loss(params, key, batch) -> scalar``.
* ``Task.datasets`` holds four splits, ``train``, ``inner_valid``,
  ``outer_valid`` and ``test``. Each split can be read two ways:
  ``split.sample(key)`` draws one batch inside jit/vmap/scan (used by
  meta-training), and ``split.iterator(seed)`` yields shuffled epochs of
  batches deterministically (used by plain training and evaluation).
* ``Task.value_and_grad(params, key, batch, grad_state)`` and
  ``Task.grad_state_init(params)``: the gradient protocol every training loop uses
  (``jax.value_and_grad(loss)`` unless the task has gradient state, e.g. delayed
  gradients).
* ``Task.normalizer(loss)`` maps a loss onto a comparable scale (finite,
  clipped), as used by the meta-objective.
* ``TaskFamily.sample(key) -> config`` and ``TaskFamily.task(config) -> Task``;
  configs are frozen dataclasses that round-trip through ``config_to_dict`` /
  ``config_from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Batch = Any

SPLIT_NAMES = ("train", "inner_valid", "outer_valid", "test")


class ArraySplit:
    """A split of examples held as equal-length arrays (images, labels, ...).

    ``sample(key)`` draws ``batch_size`` examples uniformly with replacement
    (jit-compatible); ``iterator(seed)`` walks seeded permutations epoch by
    epoch, dropping the ragged tail of each epoch.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"split arrays must have equal length, got {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_examples < batch_size:
            raise ValueError(
                f"split has {self.num_examples} examples, fewer than batch_size {batch_size}"
            )
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = batch_size
        self._device_arrays: dict[str, jax.Array] | None = None

    def _device(self) -> dict[str, jax.Array]:
        if self._device_arrays is None:  # concrete arrays, even if first used under a trace
            with jax.ensure_compile_time_eval():
                self._device_arrays = {k: jnp.asarray(v) for k, v in self.arrays.items()}
        return self._device_arrays

    def sample(self, key: jax.Array) -> dict[str, jax.Array]:
        idx = jax.random.randint(key, (self.batch_size,), 0, self.num_examples)
        return {k: v[idx] for k, v in self._device().items()}

    def iterator(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        per_epoch = self.num_examples // self.batch_size
        while True:
            perm = rng.permutation(self.num_examples)
            for i in range(per_epoch):
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                yield {k: v[idx] for k, v in self.arrays.items()}

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            k: jax.ShapeDtypeStruct((self.batch_size, *v.shape[1:]), v.dtype)
            for k, v in self.arrays.items()
        }

    def full(self) -> dict[str, np.ndarray]:
        """All examples of the split (for exact evaluation on a test set)."""
        return self.arrays


class SequenceSplit:
    """A split that is one long token stream, read as windows of ``seq_len + 1``.

    Each batch is ``{"tokens": int32[batch, seq_len + 1]}``; a language model
    predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int):
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if len(tokens) < seq_len + 2:
            raise ValueError(f"stream of {len(tokens)} tokens too short for seq_len {seq_len}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_windows = len(tokens) - seq_len - 1
        self._device_tokens: jax.Array | None = None

    def _windows(self, xp, tokens, starts):
        return tokens[starts[:, None] + xp.arange(self.seq_len + 1)[None, :]]

    def sample(self, key: jax.Array) -> dict[str, jax.Array]:
        if self._device_tokens is None:
            with jax.ensure_compile_time_eval():
                self._device_tokens = jnp.asarray(self.tokens)
        starts = jax.random.randint(key, (self.batch_size,), 0, self.num_windows)
        return {"tokens": self._windows(jnp, self._device_tokens, starts)}

    def iterator(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        while True:
            starts = rng.integers(0, self.num_windows, size=self.batch_size)
            yield {"tokens": self._windows(np, self.tokens, starts)}

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {"tokens": jax.ShapeDtypeStruct((self.batch_size, self.seq_len + 1), np.int32)}


class NoDataSplit:
    """The split of a task whose loss takes no data (quadratics, synthetic functions)."""

    def sample(self, key: jax.Array) -> dict:
        del key
        return {}

    def iterator(self, seed: int) -> Iterator[dict]:
        del seed
        while True:
            yield {}

    def abstract_batch(self) -> dict:
        return {}


Split = ArraySplit | SequenceSplit | NoDataSplit


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The four splits of arXiv:2009.11243, App. I.1.2: train, inner_valid, outer_valid, test."""

    train: Split
    inner_valid: Split
    outer_valid: Split
    test: Split
    extra_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


def no_data() -> Datasets:
    s = NoDataSplit()
    return Datasets(s, s, s, s)


def split_indices(n: int, fractions: tuple[float, float, float], seed: int = 0):
    """Disjoint train / inner_valid / outer_valid index sets over ``n`` examples.

    The convention of learned_optimization's datasets (the code of arXiv:2009.11243) is
    train[0:80%], train[80:90%], train[90:100%] of the original training set (the test
    set stays apart).
    The order is a seeded permutation, so classes stay balanced in expectation
    even if the source file is sorted.
    """
    if not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return perm[:a], perm[a:b], perm[b:]


def clip_normalizer(max_loss: float) -> Callable[[jax.Array], jax.Array]:
    """``clip(nan_to_num(loss, nan=max), 0, max)``: the classification normalizer.

    Metz et al. 2022 (arXiv:2203.11860, App. D.1) clip the meta-objective at the loss
    at initialisation;
    for ``C``-way classification that is ``ln C``; the released code clips at
    ``1.5 ln C``. We take the code's value via ``max_loss`` (see the task).
    """

    def normalize(loss):
        loss = jnp.nan_to_num(loss, nan=max_loss, posinf=max_loss, neginf=max_loss)
        return jnp.clip(loss, 0.0, max_loss)

    return normalize


class Task:
    """A training problem: parameters, a loss and its data (arXiv:2009.11243, §3.2)."""

    name: str = "task"
    datasets: Datasets = no_data()
    # False for tasks whose batches must keep their size (learned-optimizer tasks, which the
    # batch-size-reduction augmentation of VeLO, arXiv:2211.09760, App. C.5, skips).
    batch_reducible: bool = True

    def init(self, key: jax.Array) -> Params:
        raise NotImplementedError

    def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return jnp.nan_to_num(loss, nan=1e6, posinf=1e6)

    # -- the gradient protocol: how every training loop gets a loss and a gradient ----------
    # A task whose gradient needs memory across steps (delayed gradients) sets
    # ``has_gradient_state = True`` and overrides both methods; every other task, augmented or
    # not, keeps these defaults, and its gradient is ``jax.value_and_grad(loss)``.
    has_gradient_state: bool = False

    def grad_state_init(self, params: Params) -> Any:
        """The gradient state of a run starting at ``params`` (``()`` for most tasks)."""
        del params
        return ()

    def value_and_grad(
        self, params: Params, key: jax.Array, batch: Batch, grad_state: Any
    ) -> tuple[tuple[jax.Array, Params], Any]:
        """``((loss, grads), grad_state)``: the loss and the gradient the optimizer receives."""
        return jax.value_and_grad(self.loss)(params, key, batch), grad_state

    def metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Extra evaluation metrics on a batch (accuracy for classifiers)."""
        del params, batch
        return {}

    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class TaskFamily:
    """A distribution over tasks: ``sample(key) -> config``, ``task(config) -> Task``."""

    name: str = "family"
    config_type: type = object

    def sample(self, key: jax.Array) -> Any:
        raise NotImplementedError

    def task(self, config: Any) -> Task:
        raise NotImplementedError

    def sample_task(self, key: jax.Array) -> Task:
        return self.task(self.sample(key))


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass, tagged with its type name."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"configs must be dataclasses, got {type(config).__name__}")
    return {"type": type(config).__name__, "fields": dataclasses.asdict(config)}


def config_from_dict(data: Mapping[str, Any], types: Mapping[str, type]) -> Any:
    """Inverse of :func:`config_to_dict` given the known config types by name."""
    name = data.get("type")
    if name not in types:
        raise ValueError(f"unknown config type {name!r}; known: {', '.join(sorted(types))}")
    cls = types[name]
    fields = dict(data["fields"])
    # JSON turns tuples into lists; restore tuple-typed fields.
    for f in dataclasses.fields(cls):
        if isinstance(fields.get(f.name), list):
            fields[f.name] = tuple(fields[f.name])
    return cls(**fields)
