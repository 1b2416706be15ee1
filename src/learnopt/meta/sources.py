"""Where meta-training tasks come from: a declared, seeded mixture of families and named tasks.

A :class:`TaskMixture` lists entries, each a sampled family (a name of
:mod:`learnopt.tasks.families.registry`, with the family's options) or a named task (of
:mod:`learnopt.tasks.fixed.registry`), with a weight. A draw picks an entry by weight, samples
a config when the entry is a family, and wraps the task in augmentations drawn with VeLO's
probabilities when ``augment`` is on (Metz et al. 2022, VeLO, arXiv:2211.09760, App. C.5).

With a ``time_budget`` (VeLO §3.2, App. C.5), each draw first picks a maximum time per step from
the phase's thresholds (scaled to this machine by ``time_scale``); entries of VeLO families
that the paper does not allow at that budget are left out of the draw, and a VeLO family's
config is rejection-sampled under the budget with the step-time model of
:mod:`learnopt.tasks.timing`. Other entries (named tasks, TaskSet and synthetic families) are
not budgeted.

A budget may grow during meta-training, so that larger problems enter later: VeLO trains in
phases of growing time budgets (§3.3, App. D.3; the phase-two thresholds of the released code
are 2.5-5x phase one's).
``time_budget.curriculum`` is a :class:`~learnopt.meta.schedules.TimeBudgetCurriculum` whose
value at the outer step of a draw *multiplies* ``time_scale`` (``time_scale`` stays the
calibration to this machine; the curriculum is a unitless growth factor, ``start=1`` begins at
the plain budget): the scale in effect is :meth:`TaskSource.scale_at` of that outer step.

Draw ``i`` depends only on the mixture, the seed, ``i`` and the scale in effect
(:meth:`TaskSource.draw`; without a curriculum, ``time_scale``), so a resumed run rebuilds the
tasks it was training from their indices and scales (the multi-task estimator keeps both in
its slots).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from learnopt.meta.schedules import TimeBudgetCurriculum
from learnopt.tasks import augment, timing
from learnopt.tasks.base import Task, config_to_dict
from learnopt.tasks.families import velo
from learnopt.tasks.families.registry import FAMILIES, VELO_PREFIX, get_family
from learnopt.tasks.fixed.registry import TASKS, get_task

PHASES = {
    1: (timing.PHASE_ONE_THRESHOLDS, timing.PHASE_ONE_PROBS),
    2: (timing.PHASE_TWO_THRESHOLDS, timing.PHASE_TWO_PROBS),
}


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    """One source of tasks: ``family`` (a family name) or ``task`` (a named task), a weight,
    and the family's constructor options (``{"size": "cpu"}``, ...)."""

    family: str | None = None
    task: str | None = None
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.family is None) == (self.task is None):
            raise ValueError(f"a mixture entry names exactly one of family or task: {self}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.task is not None and self.options:
            raise ValueError(f"options apply to families only, got {dict(self.options)}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight} for {self.name}")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def name(self) -> str:
        return self.family if self.family is not None else self.task

    @property
    def velo_family(self) -> str | None:
        """The short VeLO family name (``mlp``, ...), or None for other entries."""
        if self.family is not None and self.family.startswith(VELO_PREFIX):
            return self.family[len(VELO_PREFIX):]
        return None


def budget_curriculum(data: Any) -> TimeBudgetCurriculum:
    """The curriculum of a :class:`TimeBudget`: a :class:`TimeBudgetCurriculum` or its dict
    (``{"kind": "time_budget", "start": 1.0, "end": 4.0, "num_steps": 20000}``; ``kind`` may be
    left out). Raises ``ValueError`` for another kind, unknown or missing keys, bad values."""
    if isinstance(data, TimeBudgetCurriculum):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"time_budget.curriculum must be a table/dict, got {data!r}")
    kind = data.get("kind", TimeBudgetCurriculum.kind)
    if kind != TimeBudgetCurriculum.kind:
        raise ValueError(
            f"time_budget.curriculum must be of kind {TimeBudgetCurriculum.kind!r} (a geometric "
            f"growth of time_scale: start, end, num_steps), got kind {kind!r}"
        )
    return TimeBudgetCurriculum.from_dict({**data, "kind": kind})


@dataclasses.dataclass(frozen=True)
class TimeBudget:
    """VeLO's time-budgeted sampling: thresholds of ``phase`` (1 or 2) times ``time_scale``,
    predicted with the step-time model saved at ``model`` (``learnopt time-model``).

    ``curriculum`` (optional, a :class:`TimeBudgetCurriculum` dict): ``time_scale`` is
    multiplied by its value at the outer step of each draw (:meth:`scale_at`)."""

    model: str
    phase: int = 1
    time_scale: float = 10.0
    max_tries: int = 100
    curriculum: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"time_budget.phase must be 1 or 2, got {self.phase}")
        if not self.time_scale > 0:
            raise ValueError(f"time_budget.time_scale must be > 0, got {self.time_scale}")
        if self.curriculum is not None:
            object.__setattr__(
                self, "curriculum", budget_curriculum(self.curriculum).to_dict()
            )

    def scale_at(self, outer_step: int) -> float:
        """The time scale of a draw made at ``outer_step``: ``time_scale * curriculum(step)``
        (``time_scale`` without a curriculum), rounded to float32 so that it survives a
        checkpoint in either precision unchanged."""
        if self.curriculum is None:
            return float(self.time_scale)
        factor = float(budget_curriculum(self.curriculum)(outer_step))
        return float(np.float32(self.time_scale * factor))


@dataclasses.dataclass(frozen=True)
class TaskMixture:
    """The declared task distribution of a meta-training run (module docstring)."""

    entries: tuple[MixtureEntry, ...]
    augment: bool = False
    time_budget: TimeBudget | None = None

    def __post_init__(self):
        if not self.entries:
            raise ValueError("a task mixture needs at least one entry")

    @classmethod
    def single(cls, task: str) -> TaskMixture:
        return cls((MixtureEntry(task=task),))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "entries": [
                {k: v for k, v in dataclasses.asdict(e).items() if v not in (None, {})}
                for e in self.entries
            ],
            "augment": self.augment,
        }
        if self.time_budget is not None:
            budget = dataclasses.asdict(self.time_budget)
            if budget["curriculum"] is None:
                del budget["curriculum"]  # as written before curricula existed
            out["time_budget"] = budget
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskMixture:
        unknown = set(data) - {"entries", "augment", "time_budget"}
        if unknown:
            raise ValueError(
                f"unknown task-mixture keys {sorted(unknown)}; known: entries, augment, "
                "time_budget"
            )
        entries = []
        for e in data.get("entries", ()):
            bad = set(e) - {"family", "task", "weight", "options"}
            if bad:
                raise ValueError(
                    f"unknown mixture-entry keys {sorted(bad)}; known: family, task, weight, "
                    "options"
                )
            entries.append(MixtureEntry(**e))
        budget = data.get("time_budget")
        if budget:
            known = [f.name for f in dataclasses.fields(TimeBudget)]
            bad = set(budget) - set(known)
            if bad:
                raise ValueError(
                    f"unknown time_budget keys {sorted(bad)}; known: {', '.join(known)}"
                )
        return cls(
            tuple(entries),
            bool(data.get("augment", False)),
            TimeBudget(**budget) if budget else None,
        )


@dataclasses.dataclass(frozen=True)
class TaskDraw:
    """One drawn task: the task, its index, and a JSON-ready description of what was drawn."""

    index: int
    task: Task
    spec: Mapping[str, Any]

    @property
    def cache_key(self) -> str:
        """Equal for draws that build the same computation (same entry, config, augmentation)."""
        return json.dumps(self.spec, sort_keys=True, default=str)


class TaskSource:
    """Seeded draws from a :class:`TaskMixture`: ``draw(i)`` is a pure function of ``i``."""

    def __init__(self, mixture: TaskMixture, seed: int = 0):
        self.mixture = mixture
        budget = mixture.time_budget
        self.curriculum = (
            budget_curriculum(budget.curriculum)
            if budget is not None and budget.curriculum is not None else None
        )
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x7A5C)
        self._families: dict[int, Any] = {}
        weights = np.asarray([e.weight for e in mixture.entries], float)
        self.weights = weights / weights.sum()
        self._model = None
        if mixture.time_budget is not None:
            self._model = timing.TimeModel.load(mixture.time_budget.model)

    def _family(self, i: int):
        if i not in self._families:
            entry = self.mixture.entries[i]
            self._families[i] = get_family(entry.family, **entry.options)
        return self._families[i]

    def _allowed(self, threshold: float | None) -> np.ndarray:
        """Entry weights with VeLO entries not allowed at ``threshold`` removed (App. C.5)."""
        if threshold is None:
            return self.weights
        allowed = (
            velo.SMALL_BUDGET_FAMILIES
            if threshold < timing.SMALL_BUDGET_LIMIT
            else velo.LARGE_BUDGET_FAMILIES
        )
        keep = np.asarray(
            [e.velo_family is None or e.velo_family in allowed for e in self.mixture.entries]
        )
        if not keep.any():
            return self.weights  # nothing allowed: fall back to the plain mixture
        w = np.where(keep, self.weights, 0.0)
        return w / w.sum()

    def _keys(self, index: int) -> list[jax.Array]:
        return list(jax.random.split(jax.random.fold_in(self.key, index), 4))

    def choose(self, index: int) -> tuple[int, float | None]:
        """Which entry draw ``index`` uses, and its time budget (None without one)."""
        k_budget, k_entry, _, _ = self._keys(index)
        budget = self.mixture.time_budget
        threshold = None
        if budget is not None:
            thresholds, probs = PHASES[budget.phase]
            threshold = timing.sample_budget(k_budget, thresholds, probs)
        weights = self._allowed(threshold)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(k_entry)).tolist())
        return int(rng.choice(len(weights), p=weights)), threshold

    def scale_at(self, outer_step: int) -> float | None:
        """The time scale for draws made at ``outer_step`` under the budget's curriculum
        (:meth:`TimeBudget.scale_at`), or None without a curriculum (draws then use
        ``time_scale``, as :meth:`draw` does without ``scale``)."""
        if self.curriculum is None:
            return None
        return self.mixture.time_budget.scale_at(outer_step)

    def draw(self, index: int, scale: float | None = None) -> TaskDraw:
        """The ``index``-th task of the run (deterministic in ``index`` and ``scale``).

        ``scale``: the time scale in effect (:meth:`scale_at` of the outer step of the draw);
        None uses ``time_budget.time_scale``. A budgeted draw made with a ``scale`` records it
        in its spec (``time_scale``), and so in its cache key.
        """
        _, _, k_config, k_augment = self._keys(index)
        budget = self.mixture.time_budget
        if scale is not None:
            if budget is None:
                raise ValueError("a draw's scale applies to a mixture with a time_budget only")
            if not 0 < scale < float("inf"):
                raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        i, threshold = self.choose(index)
        entry = self.mixture.entries[i]
        spec: dict[str, Any] = {"entry": entry.name}
        if entry.task is not None:
            task = get_task(entry.task)
        else:
            family = self._family(i)
            if threshold is not None and entry.velo_family is not None:
                time_scale = budget.time_scale if scale is None else scale
                config = timing.sample_within_budget(
                    family, k_config, threshold * time_scale, self._model, budget.max_tries,
                )
                spec["max_seconds_per_step"] = threshold * time_scale
                if scale is not None:
                    spec["time_scale"] = scale
            else:
                config = family.sample(k_config)
            spec["options"] = dict(entry.options)
            spec["config"] = config_to_dict(config)
            task = family.task(config)
        if self.mixture.augment:
            aug = augment.sample_augmentation(k_augment)
            if not aug.is_identity:
                task = augment.apply(task, aug)
                spec["augmentation"] = config_to_dict(aug)
        return TaskDraw(index, task, spec)
