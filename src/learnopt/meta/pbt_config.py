"""The settings of a self-training population (``learnopt pbt --config FILE``).

Metz et al. 2021, "Training Learned Optimizers with Randomly Initialized Learned Optimizers"
(arXiv:2101.07367, §2): a population of 10 randomly initialised learned optimizers, each
trained by a member of the population; every ~3 hours two members are compared on 100 tasks,
the loser takes the winner's meta-parameters and outer optimizer, then with probability 0.5
gets a different outer optimizer and with probability 0.1 a truncation length resampled from
{200, 300, 400, 800}. :class:`PBTConfig` holds those numbers (the truncation lengths times
``trunc_scale``, so CPU tasks can use {20, 30, 40, 80}) and what each member's meta-gradients
are made of: a learned optimizer, a gradient estimator and a task mixture of
:mod:`learnopt.meta.sources`, through :class:`learnopt.meta.train.MetaTrainConfig`.

``outer = "learned"`` is self-training (each member's outer optimizer is a member's online
meta-parameters, :mod:`learnopt.meta.learned_outer`); ``outer = "adam"`` is the baseline arm:
the same population mechanics with Adam as every member's outer optimizer, its learning rate
(drawn from ``adam_lrs``) taking the place of the outer-optimizer pointer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learnopt.io import dumps_json, finite_json
from learnopt.meta.config_checks import check_positive_int, check_seconds, check_seed
from learnopt.meta.train import MetaTrainConfig

OUTERS = ("learned", "adam")
PAPER_TRUNC_LENGTHS = (200, 300, 400, 800)  # arXiv:2101.07367, §2

# Fields that say how long to run or how often to save: a resumed run may change them.
BUDGET_FIELDS = ("outer_steps", "max_seconds", "checkpoint_every", "keep_theta_every",
                 "final_eval")


@dataclasses.dataclass(frozen=True)
class PBTConfig:
    """Everything that defines a population run (saved as ``config.json``).

    Members and outer optimizers:
      ``population`` (P, 10 in the paper); ``outer``: ``"learned"`` or ``"adam"``;
      ``outer_clip``: elementwise clip of the meta-gradient before the outer optimizer (0.1,
      arXiv:2009.11243, App. B and F.4); ``outer_num_steps``: the horizon a learned outer
      optimizer is built for; ``adam_lrs``: the Adam arm's learning rates (initial draw and
      explore); ``outer_lopt``/``outer_lopt_config``: the architecture of the learned outer
      optimizers, which is the members' own (they train each other).
    What a member's meta-gradient is (as in ``MetaTrainConfig``):
      ``lopt``, ``lopt_config``, ``estimator``, ``estimator_options``, ``num_tasks`` (inner
      runs per task), ``task_slots``, ``horizon``, ``tasks`` (a task mixture),
      ``meta_loss_split``, ``normalize_task_grads``.
    Population-based training:
      ``exploit_every`` (K outer steps between events), ``p_switch`` (0.5), ``p_resample``
      (0.1), ``trunc_lengths`` times ``trunc_scale``, ``copy_trunc`` (the loser also takes
      the winner's truncation length, as PBT copies hyperparameters), ``eval_tasks`` draws
      of the mixture (another seed) scored ``eval_steps`` inner steps from ``eval_seeds``
      initialisations each.
    Budget: ``outer_steps``, ``max_seconds`` (wall-clock, compiles included),
    ``checkpoint_every``, ``keep_theta_every`` (all members' thetas kept for the
    evaluation of Fig. 2), ``final_eval`` (run the evaluation when the budget is spent).
    """

    population: int = 10
    outer: str = "learned"
    outer_clip: float = 0.1
    outer_num_steps: int = 10_000
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    lopt: str = "small_fc_lopt"
    lopt_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    estimator: str = "truncated_es"
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_tasks: int = 4
    task_slots: int = 1
    horizon: int = 1000
    tasks: Mapping[str, Any] | None = None
    task: str = "fmnist_mlp_8x8"
    meta_loss_split: str = "train"
    normalize_task_grads: bool = True
    exploit_every: int = 50
    p_switch: float = 0.5
    p_resample: float = 0.1
    trunc_lengths: tuple[int, ...] = PAPER_TRUNC_LENGTHS
    trunc_scale: float = 0.1
    copy_trunc: bool = True
    eval_tasks: int = 4
    eval_steps: int = 300
    eval_seeds: int = 2
    outer_steps: int = 2000
    max_seconds: float | None = None
    checkpoint_every: int = 10
    keep_theta_every: int = 100
    final_eval: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "adam_lrs", tuple(float(x) for x in self.adam_lrs))
        object.__setattr__(self, "trunc_lengths", tuple(self.trunc_lengths))
        if self.outer not in OUTERS:
            raise ValueError(f"outer must be one of {', '.join(OUTERS)}, got {self.outer!r}")

        for name in ("population", "outer_num_steps", "num_tasks", "task_slots", "horizon",
                     "exploit_every", "eval_tasks", "eval_steps", "eval_seeds", "outer_steps",
                     "checkpoint_every", "keep_theta_every"):
            check_positive_int(name, getattr(self, name))
        if self.population < 2:
            raise ValueError(f"population must be >= 2 (exploit compares two members), got "
                             f"{self.population}")
        for name in ("p_switch", "p_resample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        clip = self.outer_clip
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not math.isfinite(clip) \
                or clip < 0:
            raise ValueError(f"outer_clip must be a finite number >= 0 (0: no clip), got {clip!r}")
        if not self.adam_lrs or not all(math.isfinite(x) and x > 0 for x in self.adam_lrs):
            raise ValueError(f"adam_lrs must be positive numbers, got {list(self.adam_lrs)}")
        if not self.trunc_lengths or not all(
            isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in self.trunc_lengths
        ):
            raise ValueError(f"trunc_lengths must be positive integers, got "
                             f"{list(self.trunc_lengths)}")
        scale = self.trunc_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0 \
                or not math.isfinite(scale):
            raise ValueError(f"trunc_scale must be a finite number > 0, got {scale!r}")
        check_seconds("max_seconds", self.max_seconds)
        check_seed(self.seed)
        # The members' meta-gradients: MetaTrainConfig checks (and completes) these fields.
        meta = self.member_meta_config(0, self.truncations()[0])
        object.__setattr__(self, "lopt_config", dict(meta.lopt_config))
        object.__setattr__(self, "estimator_options", dict(meta.estimator_options))
        object.__setattr__(self, "tasks", dict(meta.tasks))
        _, nonfinite = finite_json(self.to_dict())
        if nonfinite:
            raise ValueError(f"config values must be finite numbers: {', '.join(nonfinite)}")

    # -- derived -----------------------------------------------------------------------------
    def truncations(self) -> tuple[int, ...]:
        """The truncation lengths members draw from: ``trunc_lengths * trunc_scale``, rounded,
        at least 1 and at most the horizon."""
        return tuple(min(self.horizon, max(1, round(t * self.trunc_scale)))
                     for t in self.trunc_lengths)

    def member_meta_config(self, member_seed: int, trunc: int) -> MetaTrainConfig:
        """The meta-training config whose estimator makes a member's meta-gradients."""
        return MetaTrainConfig(
            task=self.task, lopt=self.lopt, lopt_config=dict(self.lopt_config),
            estimator=self.estimator, estimator_options=dict(self.estimator_options),
            num_tasks=self.num_tasks, horizon=self.horizon, trunc_length=trunc,
            tasks=None if self.tasks is None else dict(self.tasks), task_slots=self.task_slots,
            meta_loss_split=self.meta_loss_split,
            normalize_task_grads=self.normalize_task_grads, seed=member_seed,
            outer_steps=self.outer_steps, clip=self.outer_clip or 3.0,
        )

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_lrs"] = list(self.adam_lrs)
        out["trunc_lengths"] = list(self.trunc_lengths)
        return out

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PBTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown pbt config fields {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PBTConfig:
        """A config from a TOML file (fields at the top level, the mixture as ``[tasks]``)
        or a run's ``config.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from e

    def same_run(self, other: PBTConfig) -> bool:
        """Whether ``other`` is this run's config up to the budget fields."""
        budget = {k: getattr(self, k) for k in BUDGET_FIELDS}
        return dataclasses.replace(other, **budget) == self
