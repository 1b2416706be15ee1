"""Training a learned optimizer as a task: the ``lopt`` family of VeLO App. C.3.9
(Metz et al. 2022, VeLO, arXiv:2211.09760).

A task of this family is a meta-objective. Its parameters are the meta-parameters ``theta`` of
a small learned optimizer; its loss is the mean normalised training loss of an inner MLP
classifier (drawn from the C.3.1 family) trained for ``num_steps`` steps by that learned
optimizer, averaged over ``outer_batch_size`` inner runs with their own initialisations and
data. Its gradient is the exact gradient of that full unroll (backpropagation through the
inner training, rematerialised per step), so an optimizer trained on this family learns to
meta-train learned optimizers.

Config (C.3.9):

* static: the architecture, one of ``learnable_adam`` (meta-learned Adam hyperparameters),
  ``learnable_sgdm`` / ``learnable_sgd`` (SGD hyperparameters with or without momentum),
  ``fc_lopt`` (the per-parameter MLP optimizer of the released code's ``MLPLOpt``) and
  ``small_fc_lopt`` (``AdafacMLPLOpt``), uniformly; for the two MLP optimizers a hidden size
  log-uniform in 2-512, a number of hidden layers log-uniform in 1-4, and the two step-scaling
  multipliers (``exp_mult``, ``step_mult``) log-uniform in 1e-5..1 (zero and unused for the
  others); inner steps log-uniform in 1-100; outer batch size log-uniform in 1-8; and the
  static config of the inner MLP task (C.3.1).
* dynamic: the dynamic config of the inner MLP task (initializer, init scale, activation), so
  LOpt tasks that share a static config vectorise under ``vmap`` like the other families.

The meta-loss is the mean over the outer batch and over steps ``t = 1..num_steps`` of the
inner task's D.4 normalised training loss after ``t`` updates (the released code averages
``t = 0..num_steps-1``). ``size="cpu"`` (default) caps the ranges so that one meta-gradient
costs well under a second on 2 CPU cores; ``size="paper"`` uses the paper's, ``size="tiny"``
is for tests. Departures (inner dynamic config, meta-loss steps, compute path, sizes) are in
docs/departures-tasks.md.

The batch of an LOpt task is the inner batches stacked to ``[outer_batch_size, num_steps + 1,
...]`` (:class:`StackedSplit`); ``task.datasets.train.sample(key)`` draws it inside jit.

The family is listed in :mod:`learnopt.tasks.families.registry` as ``"velo_lopt"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.learned.adafac_mlp import SmallFcLOpt
from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.learnable import LearnableAdam, LearnableSGD, LearnableSGDM
from learnopt.learned.mlp import FcLOpt
from learnopt.step import init_train_state, inner_step
from learnopt.tasks.augment import log_uniform
from learnopt.tasks.base import Datasets, Task
from learnopt.tasks.families import velo as F

ARCHITECTURES = ("learnable_adam", "learnable_sgdm", "learnable_sgd", "fc_lopt", "small_fc_lopt")
MLP_ARCHITECTURES = ("fc_lopt", "small_fc_lopt")
MULT_RANGE = (1e-5, 1.0)  # exp_mult and step_mult, log-uniform (C.3.9)
NORMALIZER_NONFINITE = 10.0


@dataclasses.dataclass(frozen=True)
class LOptStatic:
    """C.3.9 static config: the learned optimizer, the unroll, and the inner MLP's static
    config. ``hidden_size``, ``hidden_layers``, ``exp_mult`` and ``step_mult`` are 0 for the
    learnable hand-designed architectures."""

    inner: F.MLPStatic = F.MLPStatic()
    architecture: str = "small_fc_lopt"
    hidden_size: int = 4
    hidden_layers: int = 2
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    num_steps: int = 10
    outer_batch_size: int = 2

    def __post_init__(self):
        if isinstance(self.inner, Mapping):  # after a JSON round trip
            object.__setattr__(self, "inner", F.MLPStatic(**self.inner))

    @property
    def paper_dataset(self) -> str:
        return self.inner.paper_dataset

    @property
    def dataset(self) -> str:
        return self.inner.dataset

    def learned_optimizer(self) -> LearnedOptimizer:
        """The learned optimizer this config trains."""
        if self.architecture == "learnable_adam":
            return LearnableAdam()
        if self.architecture == "learnable_sgdm":
            return LearnableSGDM()
        if self.architecture == "learnable_sgd":
            return LearnableSGD()
        kwargs = dict(hidden_size=self.hidden_size, hidden_layers=self.hidden_layers,
                      exp_mult=self.exp_mult, step_mult=self.step_mult)
        if self.architecture == "fc_lopt":
            return FcLOpt(**kwargs)
        if self.architecture == "small_fc_lopt":
            return SmallFcLOpt(**kwargs, compute="concat")
        raise ValueError(f"unknown architecture {self.architecture!r}; valid: {ARCHITECTURES}")

    def cost_features(self) -> dict[str, float]:
        """Cost features for :mod:`learnopt.tasks.timing`: ``outer * steps`` inner training
        steps, each with a learned-optimizer update of about ``2 * meta_params`` FLOPs per
        inner parameter for the MLP optimizers (a few tens for the others), and a backward
        pass through all of it (x3)."""
        inner = self.inner.cost_features()
        runs = self.outer_batch_size * self.num_steps
        if self.architecture in MLP_ARCHITECTURES:
            per_param = 2.0 * self.learned_optimizer().num_meta_params()
        else:
            per_param = 30.0
        return {
            "flops": 3.0 * runs * (inner["flops"] + per_param * inner["params"]),
            "activations": runs * inner["activations"],
            "params": inner["params"],
            "batch": self.outer_batch_size * inner["batch"],
            "layers": self.num_steps * inner["layers"],
            "inputs": runs * inner["inputs"],
        }


@dataclasses.dataclass(frozen=True)
class LOptConfig(F.FamilyConfig):
    static: LOptStatic
    dynamic: F.InitActDynamic
    family: ClassVar[str] = "lopt"


class StackedSplit:
    """A split whose batch is ``shape`` (e.g. ``(outer_batch, steps)``) batches of another
    split stacked on leading axes. ``sample`` works inside jit; ``iterator`` is deterministic
    in the seed."""

    def __init__(self, split: Any, shape: tuple[int, ...]):
        self.split = split
        self.shape = tuple(shape)
        self.count = math.prod(self.shape)

    def _reshape(self, batch):
        return jax.tree_util.tree_map(lambda x: x.reshape(*self.shape, *x.shape[1:]), batch)

    def sample(self, key: jax.Array):
        return self._reshape(jax.vmap(self.split.sample)(jax.random.split(key, self.count)))

    def iterator(self, seed: int) -> Iterator[Any]:
        inner = self.split.iterator(seed)
        while True:
            batches = [next(inner) for _ in range(self.count)]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
            yield self._reshape(stacked)

    def abstract_batch(self):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((*self.shape, *x.shape), x.dtype),
            self.split.abstract_batch(),
        )


def unrolled_meta_loss(
    task: Task,
    lopt: LearnedOptimizer,
    theta,
    num_steps: int,
    key: jax.Array,
    batches,
    valid_batches=None,
) -> jax.Array:
    """One inner run: init ``task``, train it ``num_steps`` steps with ``lopt`` at ``theta`` on
    ``batches[:-1]`` and return the mean normalised training loss after each update, the loss
    after update ``t`` taken on ``batches[t]`` (leading axis of ``batches``: ``num_steps + 1``).
    ``valid_batches`` (leading axis ``num_steps``) are needed only by optimizers that read
    ``valid_loss`` (see :mod:`learnopt.step`); the LOpt family's architectures read none."""
    k_init, k_steps = jax.random.split(key)
    keys = jax.random.split(k_steps, num_steps + 1)
    opt = lopt.optimizer(theta, num_steps)

    @jax.checkpoint
    def step(state, xs):
        batch, valid_batch, k = xs
        return inner_step(task, opt, state, batch, k, valid_batch)

    first = jax.tree_util.tree_map(lambda x: x[:num_steps], batches)
    state = init_train_state(task, opt, task.init(k_init))
    state, losses = jax.lax.scan(step, state, (first, valid_batches, keys[:-1]))
    last = jax.tree_util.tree_map(lambda x: x[num_steps], batches)
    after = jnp.concatenate([losses[1:], task.loss(state.params, keys[-1], last)[None]])
    return jnp.mean(task.normalizer(after))


class InnerTaskAt(Task):
    """A sampled task at a given (possibly traced) dynamic config: the inner task of an
    LOpt task, whose dynamic config is vectorised by the caller."""

    def __init__(self, task: Any, dyn: Any):
        self.task, self.dyn = task, dyn
        self.name = task.name

    def init(self, key):
        return self.task.init_dynamic(self.dyn, key)

    def loss(self, params, key, batch):
        return self.task.loss_dynamic(self.dyn, params, key, batch)

    def normalizer(self, loss):
        return self.task.normalizer_dynamic(self.dyn, loss)


class LOptTask(F.SampledTask):
    """The meta-objective of C.3.9: ``loss(theta) = mean over outer batch and steps of the
    inner MLP's normalised training loss while ``lopt.optimizer(theta)`` trains it``."""

    batch_reducible = False  # C.5: batch-size reduction is not applied to LOpt tasks

    def __init__(self, config: LOptConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.inner = F.MLPTask(F.MLPConfig(s.inner, config.dynamic), data)
        self.lopt = s.learned_optimizer()
        mlp = ""
        if s.architecture in MLP_ARCHITECTURES:
            mlp = f"_{s.hidden_size}x{s.hidden_layers}_e{s.exp_mult:.2g}_s{s.step_mult:.2g}"
        self.name = (f"lopt_{s.architecture}{mlp}_steps{s.num_steps}"
                     f"_outer{s.outer_batch_size}_on_{self.inner.name}")

    def _make_datasets(self) -> Datasets:
        inner = self.inner.datasets
        shape = self.batch_shape
        return Datasets(
            train=StackedSplit(inner.train, shape),
            inner_valid=StackedSplit(inner.inner_valid, shape),
            outer_valid=StackedSplit(inner.outer_valid, shape),
            test=StackedSplit(inner.test, shape),
            extra_info=inner.extra_info,
        )

    @property
    def batch_shape(self) -> tuple[int, int]:
        """Leading axes of a batch: the outer batch, then ``num_steps + 1`` inner batches."""
        return (self.static.outer_batch_size, self.static.num_steps + 1)

    def abstract_batch(self):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((*self.batch_shape, *x.shape), x.dtype),
            self.inner.abstract_batch(),
        )

    @functools.cached_property
    def param_shapes(self):  # type: ignore[override]
        return jax.eval_shape(self.lopt.init, jax.random.PRNGKey(0))

    def init_dynamic(self, dyn: Any, key: jax.Array):
        del dyn  # the meta-parameters do not depend on the inner task
        return self.lopt.init(key)

    def unrolled_loss(self, dyn: Any, theta, key: jax.Array, batches) -> jax.Array:
        """:func:`unrolled_meta_loss` of the inner MLP at dynamic config ``dyn``."""
        inner = InnerTaskAt(self.inner, dyn)
        return unrolled_meta_loss(inner, self.lopt, theta, self.static.num_steps, key, batches)

    def loss_dynamic(self, dyn: Any, params, key: jax.Array | None, batch) -> jax.Array:
        """Mean of :meth:`unrolled_loss` over the outer batch (``key=None``: a fixed key 0)."""
        key = jax.random.PRNGKey(0) if key is None else key
        keys = jax.random.split(key, self.static.outer_batch_size)
        losses = jax.vmap(lambda k, b: self.unrolled_loss(dyn, params, k, b))(keys, batch)
        return jnp.mean(losses)

    def normalizer_dynamic(self, dyn: Any, loss: jax.Array) -> jax.Array:
        del dyn
        top = NORMALIZER_NONFINITE
        loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=top, posinf=top, neginf=top)
        return jnp.clip(loss, -10.0, 10.0)

    def metrics(self, params, batch):
        return {"loss": self.loss(params, None, batch)}


class LOptFamily(F.SampledFamily):
    """C.3.9: learned optimizers meta-trained on inner MLP tasks (module docstring)."""

    name = "lopt"
    config_type = LOptConfig
    task_type = LOptTask
    RANGES = {
        "paper": {"hidden_size": (2, 512), "hidden_layers": (1, 4), "num_steps": (1, 100),
                  "outer_batch_size": (1, 8)},
        "cpu": {"hidden_size": (2, 32), "hidden_layers": (1, 2), "num_steps": (1, 20),
                "outer_batch_size": (1, 4)},
        "tiny": {"hidden_size": (2, 4), "hidden_layers": (1, 2), "num_steps": (1, 3),
                 "outer_batch_size": (1, 2)},
    }  # fmt: skip
    INNER_RANGES: ClassVar[dict[str, dict[str, tuple[int, int]]]] = {
        "paper": F.MLPFamily.RANGES["paper"],
        "cpu": {"hidden_size": (8, 32), "num_layers": (0, 2), "image_size": (4, 8),
                "batch_size": (4, 32)},
        "tiny": F.MLPFamily.RANGES["tiny"],
    }  # fmt: skip

    def __init__(self, size: str = "cpu", data: str = "registry",
                 substitutes: Mapping[str, str] | None = None):
        super().__init__(size, data, substitutes)
        self.inner_family = F.MLPFamily(size, data, substitutes)

    @property
    def inner_ranges(self) -> dict[str, tuple[int, int]]:
        return self.INNER_RANGES[self.size]

    def _sample_static(self, rng, r):
        inner = self.inner_family._sample_static(rng, self.inner_ranges)
        architecture = F.choice(rng, ARCHITECTURES)
        if architecture in MLP_ARCHITECTURES:
            mlp = dict(
                hidden_size=F.log_uniform_int(rng, *r["hidden_size"]),
                hidden_layers=F.log_uniform_int(rng, *r["hidden_layers"]),
                exp_mult=log_uniform(rng, *MULT_RANGE),
                step_mult=log_uniform(rng, *MULT_RANGE),
            )
        else:
            mlp = dict(hidden_size=0, hidden_layers=0, exp_mult=0.0, step_mult=0.0)
        return LOptStatic(
            inner=inner,
            architecture=architecture,
            num_steps=F.log_uniform_int(rng, *r["num_steps"]),
            outer_batch_size=F.log_uniform_int(rng, *r["outer_batch_size"]),
            **mlp,
        )

    def _sample_dynamic(self, rng):
        return F.InitActDynamic(**F.sample_init_act(rng))

    def _ranges_to_check(self, config):
        if config.static.architecture in MLP_ARCHITECTURES:
            return {**self.ranges, "exp_mult": MULT_RANGE, "step_mult": MULT_RANGE}
        return {k: v for k, v in self.ranges.items() if k not in ("hidden_size", "hidden_layers")}

    def _check_extra(self, config):
        s = config.static
        if s.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {s.architecture!r} not in {ARCHITECTURES}")
        if s.architecture not in MLP_ARCHITECTURES:
            unused = {"hidden_size": s.hidden_size, "hidden_layers": s.hidden_layers,
                      "exp_mult": s.exp_mult, "step_mult": s.step_mult}
            if any(v != 0 for v in unused.values()):
                raise ValueError(f"{s.architecture} takes no MLP settings; got {unused}")
        for field, (lo, hi) in self.inner_ranges.items():
            value = getattr(s.inner, field)
            if not lo <= value <= hi:
                raise ValueError(f"inner {field}={value} outside [{lo}, {hi}]")
        F.image_check(F.MLPConfig(s.inner, config.dynamic))


CONFIG_TYPES: dict[str, type] = {"LOptConfig": LOptConfig}
