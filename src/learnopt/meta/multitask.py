"""Meta-gradients from several different tasks in one outer step.

Each outer step averages the meta-gradients of ``num_slots`` task slots. A slot holds one
task drawn from a :class:`~learnopt.meta.sources.TaskSource` and a gradient estimator over
``num_tasks`` vectorised inner runs of that task (:class:`~learnopt.meta.unroll.TruncatedUnroll`),
with its own truncation state (inner runs, PES accumulators). After ``lifetime`` outer steps a
slot is replaced by the next draw, with fresh inner runs; slots start at staggered ages so that
replacements (and the compiles they bring) are spread over outer steps. A source that can only
ever draw the same task (one named task, no augmentation) never replaces its slots.

Each slot's meta-gradient is scaled to unit length before the average when ``normalize`` is
on and there is more than one slot (Metz et al. 2022, VeLO, arXiv:2211.09760, §3.3, App. D.4:
tasks whose losses and gradients differ in scale by orders of magnitude then count equally).
A slot whose meta-gradient is not finite is left out of the average and counted. Every
estimate runs under a :class:`~learnopt.watchdog.StepWatchdog`: a task whose step runs far past
its usual time is reported, abandoned and replaced by a fresh draw (``tasks_hung``).

Estimators are built through the estimator registry and compiled on first use; they are kept
in a bounded least-recently-used cache keyed by what was drawn (entry, config, augmentation),
so a task drawn again reuses its compiled program. Cache hits, misses and the seconds of
first calls (compile plus one estimate) are reported in the metrics.
"""

from __future__ import annotations

import collections
import functools
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from learnopt.learned.base import LearnedOptimizer, MetaParams
from learnopt.meta.estimators.base import Estimate, GradientEstimator
from learnopt.meta.estimators.registry import build_estimator
from learnopt.meta.sources import TaskDraw, TaskSource
from learnopt.meta.unroll import TruncatedUnroll
from learnopt.trees import tree_all_finite, tree_norm
from learnopt.watchdog import StepHangError, StepWatchdog


def combine(grads: list[Any], normalize: bool) -> tuple[Any, int]:
    """The mean of the finite gradients of ``grads`` (each scaled to unit length first when
    ``normalize``), and how many were left out as non-finite. All non-finite: NaNs.

    One compiled program per number of gradients and tree structure (run eagerly, its ~30
    small ops per gradient took about a tenth of an outer step over 4 small tasks)."""
    mean, dropped = _combine(list(grads), bool(normalize))
    return mean, int(dropped)


#: ``jax.random.fold_in`` as one compiled call (eagerly it was ~1 ms per slot and step).
_fold_in = jax.jit(jax.random.fold_in)


@functools.partial(jax.jit, static_argnums=1)
def _combine(grads: list[Any], normalize: bool) -> tuple[Any, jax.Array]:
    finite = [tree_all_finite(g) for g in grads]
    # Non-finite gradients are zeroed (and weighted 0), so no NaN reaches the sum.
    clean = [jax.tree_util.tree_map(lambda x, ok=ok: jnp.where(ok, x, 0.0), g)
             for g, ok in zip(grads, finite, strict=True)]
    count = jnp.sum(jnp.stack(finite))
    weights = [ok / jnp.maximum(count, 1).astype(jnp.float32) for ok in finite]
    if normalize:
        weights = [w / jnp.maximum(tree_norm(g), 1e-30)
                   for w, g in zip(weights, clean, strict=True)]
    weights = [jnp.where(count > 0, w, jnp.nan) for w in weights]  # nothing finite: NaNs

    def mean(*xs):
        terms = [x * w for x, w in zip(xs, weights, strict=True)]
        return sum(terms[1:], terms[0]).astype(xs[0].dtype)

    return jax.tree_util.tree_map(mean, *clean), len(grads) - count


class MultiTaskEstimator:
    """Meta-gradient estimates over ``num_slots`` tasks drawn from ``source`` (module docstring).

    ``horizon_schedule`` and ``trunc_schedule`` (:mod:`learnopt.meta.schedules`) set the inner
    horizon and the truncation length of a slot when it is drawn, from the outer step (a
    curriculum) and a per-draw key (a sampled length); all inner runs of a slot share them,
    and a slot lives ``ceil(horizon / trunc_length)`` outer steps unless ``lifetime`` is given.

    A source whose time budget has a curriculum (``source.scale_at(outer_step)`` not None,
    :class:`~learnopt.meta.sources.TaskSource`) draws each slot's task under the time scale of
    the outer step at which the slot is drawn (VeLO §3.3, App. D.3: budgets grow over
    meta-training), and the slot keeps that scale.

    The state is a plain dict: ``step`` (outer steps taken), ``next_draw`` (the index of the
    next draw), and per slot its ``draw`` index, ``age`` in outer steps, ``horizon``,
    ``trunc``, ``scale`` (only under a budget curriculum) and estimator ``state``. It is
    checkpointed like any pytree; :meth:`state_template` rebuilds the slots' tasks from their
    draw indices (and scales) to restore it.
    """

    def __init__(
        self,
        source: TaskSource,
        lopt: LearnedOptimizer,
        *,
        num_slots: int = 1,
        num_tasks: int = 8,
        horizon: int = 2000,
        trunc_length: int = 20,
        estimator: str = "pes",
        estimator_options: dict[str, Any] | None = None,
        random_offset: bool = True,
        meta_loss_split: str = "train",
        normalize: bool = True,
        lifetime: int | None = None,
        cache_size: int = 16,
        horizon_schedule: Any = None,
        trunc_schedule: Any = None,
        watchdog: dict[str, Any] | None = None,
        shared_cache: collections.OrderedDict | None = None,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if cache_size < num_slots:
            raise ValueError(f"cache_size ({cache_size}) must be >= num_slots ({num_slots})")
        if lifetime is not None and lifetime < 1:
            raise ValueError(f"lifetime must be >= 1, got {lifetime}")
        self.source = source
        self.lopt = lopt
        self.num_slots = num_slots
        self.num_tasks = num_tasks
        self.horizon = horizon
        self.trunc_length = trunc_length
        self.estimator_name = estimator
        self.estimator_options = dict(estimator_options or {})
        self.random_offset = random_offset
        self.meta_loss_split = meta_loss_split
        self.normalize = normalize
        self.lifetime = lifetime
        self.horizon_schedule = horizon_schedule
        self.trunc_schedule = trunc_schedule
        mixture = source.mixture
        self.replaces = not (
            len(mixture.entries) == 1 and mixture.entries[0].task is not None
            and not mixture.augment and horizon_schedule is None and trunc_schedule is None
        )
        self.cache_size = cache_size
        # ``shared_cache``: the compiled-estimator cache of another MultiTaskEstimator of the
        # same learned optimizer, estimator and options (a population's members share compiles).
        self._cache: collections.OrderedDict[str, GradientEstimator] = (
            collections.OrderedDict() if shared_cache is None else shared_cache
        )
        self._draws: dict[int, TaskDraw] = {}
        self._called: set[str] = set()
        self.watchdog = dict(watchdog or {})  # StepWatchdog settings, one watchdog per task
        self._watchdogs: dict[str, StepWatchdog] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.compile_seconds = 0.0

    # -- slots -------------------------------------------------------------------------
    def draw(self, index: int, scale: float | None = None) -> TaskDraw:
        """Draw ``index`` of the source, under time scale ``scale`` (None: the source's own)."""
        if (index, scale) not in self._draws:
            self._draws = {
                k: d for k, d in self._draws.items() if k[0] > index - 4 * self.num_slots
            }
            if scale is None:  # sources without a budget curriculum need not take a scale
                self._draws[(index, scale)] = self.source.draw(index)
            else:
                self._draws[(index, scale)] = self.source.draw(index, scale=scale)
        return self._draws[(index, scale)]

    def draw_scale(self, outer_step: int) -> float | None:
        """The time scale of a draw made at ``outer_step`` (``source.scale_at``), or None when
        the source has no budget curriculum."""
        scale_at = getattr(self.source, "scale_at", None)
        return None if scale_at is None else scale_at(outer_step)

    def lengths(self, outer_step: int, index: int) -> tuple[int, int]:
        """``(horizon, trunc_length)`` of draw ``index`` made at ``outer_step``."""
        key = jax.random.fold_in(jax.random.PRNGKey(0x5CED), index)
        horizon = self.horizon
        if self.horizon_schedule is not None:
            horizon = int(self.horizon_schedule(outer_step, key))
        trunc = self.trunc_length
        if self.trunc_schedule is not None:
            trunc = int(self.trunc_schedule(outer_step, jax.random.fold_in(key, 1)))
        return horizon, min(trunc, horizon)

    def slot_lifetime(self, slot: dict[str, Any]) -> int:
        if self.lifetime is not None:
            return self.lifetime
        return max(1, math.ceil(int(slot["horizon"]) / int(slot["trunc"])))

    def estimator_for(
        self, index: int, horizon: int, trunc: int, count: bool = True,
        scale: float | None = None,
    ) -> GradientEstimator:
        """The (cached) estimator of draw ``index`` (under time scale ``scale``) at these
        lengths. ``count``: a lookup for a new slot, counted as a cache hit or miss (a slot's
        later steps are not counted)."""
        draw = self.draw(index, scale)
        key = f"{draw.cache_key}|horizon={horizon}|trunc={trunc}"
        if key in self._cache:
            self.cache_hits += count
            self._cache.move_to_end(key)
            return self._cache[key]
        self.cache_misses += 1
        unroll = TruncatedUnroll(
            draw.task,
            self.lopt,
            num_tasks=self.num_tasks,
            horizon=horizon,
            trunc_length=trunc,
            random_offset=self.random_offset,
            meta_loss_split=self.meta_loss_split,
        )
        est = build_estimator(self.estimator_name, unroll, self.estimator_options)
        est.cache_key = key
        self._cache[key] = est
        while len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)
            self._called.discard(evicted)
            watchdog = self._watchdogs.pop(evicted, None)
            if watchdog is not None:
                watchdog.close()
        return est

    def _new_slot(self, theta: MetaParams, key: jax.Array, index: int, step: int, age: int):
        horizon, trunc = self.lengths(step, index)
        scale = self.draw_scale(step)
        est = self.estimator_for(index, horizon, trunc, scale=scale)
        state = est.init_state(theta, jax.random.fold_in(key, index))
        slot = {"draw": index, "age": age, "horizon": horizon, "trunc": trunc}
        if scale is not None:
            slot["scale"] = scale
        slot["state"] = state
        return slot

    @staticmethod
    def _scale(slot: dict[str, Any]) -> float | None:
        return float(slot["scale"]) if "scale" in slot else None

    def init_state(self, theta: MetaParams, key: jax.Array) -> dict[str, Any]:
        slots = [self._new_slot(theta, key, k, 0, 0) for k in range(self.num_slots)]
        for k, slot in enumerate(slots):  # staggered ages spread the replacements out
            slot["age"] = (k * self.slot_lifetime(slot)) // self.num_slots
        return {"step": 0, "next_draw": self.num_slots, "slots": slots}

    def state_template(self, theta: MetaParams, saved: dict[str, Any]) -> dict[str, Any]:
        """A state with the structure of ``saved`` (a raw state dict from a checkpoint), to
        restore it onto: its slots' tasks are rebuilt from their draw indices."""
        raw_slots = saved["slots"]
        if isinstance(raw_slots, dict):
            raw_slots = [raw_slots[str(i)] for i in range(len(raw_slots))]
        slots = []
        for raw in raw_slots:
            index, horizon, trunc = int(raw["draw"]), int(raw["horizon"]), int(raw["trunc"])
            scale = self._scale(raw)
            est = self.estimator_for(index, horizon, trunc, scale=scale)
            state = est.init_state(theta, jax.random.PRNGKey(0))
            slot = {"draw": index, "age": 0, "horizon": horizon, "trunc": trunc}
            if scale is not None:
                slot["scale"] = scale
            slot["state"] = state
            slots.append(slot)
        return {"step": 0, "next_draw": 0, "slots": slots}

    # -- one outer step --------------------------------------------------------------
    def estimate(self, theta: MetaParams, state: dict[str, Any], key: jax.Array) -> Estimate:
        grads, losses, slots = [], [], []
        sums: dict[str, float] = {}  # the slots' own estimator metrics, averaged
        step, next_draw = int(state["step"]), int(state["next_draw"])
        replaced = hung = 0
        for slot in state["slots"]:
            slot = dict(slot)
            if self.replaces and int(slot["age"]) >= self.slot_lifetime(slot):
                slot = self._new_slot(theta, key, next_draw, step, 0)
                next_draw += 1
                replaced += 1
            index, scale = int(slot["draw"]), self._scale(slot)
            est = self.estimator_for(
                index, int(slot["horizon"]), int(slot["trunc"]), False, scale
            )
            start = time.perf_counter()
            watchdog = self._watchdogs.setdefault(est.cache_key, StepWatchdog(**self.watchdog))
            try:
                meta_loss, grad, slot["state"], slot_metrics = watchdog.run(
                    est.estimate, theta, slot["state"], _fold_in(key, index),
                    task=self.draw(index, scale).task.name,
                )
            except StepHangError as e:  # abandon the task; a fresh draw takes its slot
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)
                hung += 1
                slots.append(self._new_slot(theta, key, next_draw, step, 0))
                next_draw += 1
                continue
            meta_loss = float(meta_loss)
            if est.cache_key not in self._called:
                self._called.add(est.cache_key)
                self.compile_seconds += time.perf_counter() - start
            for name, value in slot_metrics.items():
                if jnp.ndim(value) == 0:
                    sums[name] = sums.get(name, 0.0) + float(value) / self.num_slots
            slot["age"] = int(slot["age"]) + 1
            grads.append(grad)
            losses.append(meta_loss)
            slots.append(slot)
        if not grads:
            raise RuntimeError(f"every task of this outer step hung ({hung}); see docs/hangs.md")
        grad, dropped = combine(grads, self.normalize and self.num_slots > 1)
        finite = [x for x in losses if math.isfinite(x)]
        metrics = {
            **sums,
            "tasks_nonfinite": float(dropped),
            "tasks_replaced": float(replaced),
            "tasks_hung": float(hung),
            "draws": float(next_draw),
            "cache_hits": float(self.cache_hits),
            "cache_misses": float(self.cache_misses),
            "compile_seconds": round(self.compile_seconds, 3),
        }
        for i, x in enumerate(losses):
            metrics[f"meta_loss_slot{i}"] = x
        scale = self.draw_scale(step)
        if scale is not None:  # the budget curriculum's time scale for this step's draws
            metrics["time_scale"] = scale
        meta_loss = sum(finite) / len(finite) if finite else math.nan
        new_state = {"step": step + 1, "next_draw": next_draw, "slots": slots}
        return Estimate(jnp.asarray(meta_loss), grad, new_state, metrics)
