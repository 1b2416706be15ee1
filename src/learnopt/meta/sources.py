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

Draw ``i`` depends only on the mixture, the seed and ``i`` (:meth:`TaskSource.draw`), so a
resumed run rebuilds the tasks it was training from their indices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

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


@dataclasses.dataclass(frozen=True)
class TimeBudget:
    """VeLO's time-budgeted sampling: thresholds of ``phase`` (1 or 2) times ``time_scale``,
    predicted with the step-time model saved at ``model`` (``learnopt time-model``)."""

    model: str
    phase: int = 1
    time_scale: float = 10.0
    max_tries: int = 100

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"time_budget.phase must be 1 or 2, got {self.phase}")
        if not self.time_scale > 0:
            raise ValueError(f"time_budget.time_scale must be > 0, got {self.time_scale}")


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
            out["time_budget"] = dataclasses.asdict(self.time_budget)
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

    def draw(self, index: int) -> TaskDraw:
        """The ``index``-th task of the run (deterministic)."""
        _, _, k_config, k_augment = self._keys(index)
        budget = self.mixture.time_budget
        i, threshold = self.choose(index)
        entry = self.mixture.entries[i]
        spec: dict[str, Any] = {"entry": entry.name}
        if entry.task is not None:
            task = get_task(entry.task)
        else:
            family = self._family(i)
            if threshold is not None and entry.velo_family is not None:
                config = timing.sample_within_budget(
                    family, k_config, threshold * budget.time_scale, self._model,
                    budget.max_tries,
                )
                spec["max_seconds_per_step"] = threshold * budget.time_scale
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
