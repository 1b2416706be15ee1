"""The meta-training loop: estimator -> learner, with checkpoint/resume and metrics.

The setup of Metz et al. 2022, "Practical tradeoffs between memory, compute, and
performance in learned optimizers" (arXiv:2203.11860, App. D.1) at CPU scale: PES
(Vicol et al. 2021, arXiv:2112.13835) or TBPTT meta-gradients of the mean normalised
training loss, outer Adam with an elementwise clip of 3.0. The estimator is built by
name through ``meta.estimators.registry`` and the learned optimizer by name and config
through ``learned.registry``; ``learnopt meta-train`` is the command line.

Every random choice of outer step ``k`` derives from ``fold_in(seed_key, k)``,
and a checkpoint holds everything that changes between steps (the learner
state, the estimator state with all inner runs and PES accumulators, the
step). So a run that is killed and resumed from its last checkpoint repeats
exactly the steps it lost and reaches the same theta as an uninterrupted run.

Files in ``out_dir``: ``config.json`` (the MetaTrainConfig), ``machine.json``,
``checkpoint.msgpack`` and ``theta.msgpack`` (the full state, and the latest
meta-parameters alone for evaluation; both ``learnopt.io`` checkpoints holding the config
and a format version, written atomically), ``metrics.jsonl`` (one line per outer step; on
resume, lines past the checkpoint are dropped so each step appears once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from learnopt.io import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    machine_info,
    restore_state,
    save_checkpoint,
)
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.estimators.registry import estimator_options
from learnopt.meta.learner import Learner, LearnerConfig
from learnopt.meta.multitask import MultiTaskEstimator
from learnopt.meta.schedules import schedule_from_dict
from learnopt.meta.sources import TaskMixture, TaskSource


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json``).

    ``lopt`` and ``lopt_config`` name a learned optimizer of ``learned.registry`` and its
    constructor hyperparameters; ``estimator`` and ``estimator_options`` a gradient
    estimator of ``meta.estimators.registry`` and its options (PES: ``std``). Both configs
    are completed with the defaults on construction, so equal runs have equal configs.
    """

    task: str = "fmnist_mlp_8x8"
    lopt: str = "small_fc_lopt"
    lopt_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    estimator: str = "pes"
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_tasks: int = 8
    horizon: int = 2000
    trunc_length: int = 20
    outer_lr: float = 3e-4
    clip: float = 3.0
    # Further outer-learner settings (meta.learner.LearnerConfig: warmup_steps, schedule, ...).
    learner: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    outer_steps: int = 100_000
    max_seconds: float | None = None
    checkpoint_every: int = 100
    seed: int = 0
    # or "outer_valid" (Metz et al. 2020, arXiv:2009.11243, App. C)
    meta_loss_split: str = "train"
    random_offset: bool = True
    # The task distribution: a TaskMixture as a dict (``meta.sources``); None trains ``task``.
    tasks: Mapping[str, Any] | None = None
    task_slots: int = 1
    normalize_task_grads: bool = True
    task_lifetime: int | None = None
    # Schedules of meta.schedules as dicts ({"kind": ..., ...}): the inner horizon of a task
    # drawn at an outer step (a curriculum), and its truncation length (fixed or sampled).
    horizon_schedule: Mapping[str, Any] | None = None
    trunc_schedule: Mapping[str, Any] | None = None
    # Keep a copy of theta every this many outer steps under thetas/ (None: only the latest).
    keep_theta_every: int | None = None
    # Start from a trained theta instead of a random one: a shipped pretrained name, or a
    # theta file of a run (``theta.msgpack``, ``thetas/theta_*.msgpack``) of the same
    # architecture and config. None: ``lopt.init`` with the run's seed.
    init_theta: str | None = None

    def __post_init__(self):
        lopt = get_learned_optimizer(self.lopt, self.lopt_config)
        object.__setattr__(self, "lopt_config", lopt.config())
        options = estimator_options(self.estimator, self.estimator_options)
        object.__setattr__(self, "estimator_options", options)
        object.__setattr__(self, "tasks", self.mixture().to_dict())
        object.__setattr__(self, "learner", self.learner_config().to_dict())
        for name in ("num_tasks", "horizon", "trunc_length", "task_slots", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("horizon_schedule", "trunc_schedule"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, schedule_from_dict(value).to_dict())
        if self.task_lifetime is not None and self.task_lifetime < 1:
            raise ValueError(f"task_lifetime must be >= 1 or None, got {self.task_lifetime}")

    def learner_config(self) -> LearnerConfig:
        """The outer learner: ``outer_lr`` and ``clip``, and the rest from ``learner``."""
        extra = {k: v for k, v in self.learner.items() if k not in ("learning_rate", "clip")}
        return LearnerConfig(learning_rate=self.outer_lr, clip=self.clip, **extra)

    def mixture(self) -> TaskMixture:
        """The run's task distribution (one named task when ``tasks`` is None)."""
        if self.tasks is None:
            return TaskMixture.single(self.task)
        return TaskMixture.from_dict(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetaTrainConfig:
        """A config from :meth:`to_dict`'s output, or from an older ``config.json``.

        Older files held PES's ``std`` as a top-level field; it moves into
        ``estimator_options`` (and is dropped for estimators without a ``std``).
        """
        data = dict(data)
        if "std" in data and "estimator_options" not in data:
            std = data.pop("std")
            name = data.get("estimator", cls.estimator)
            if "std" in estimator_options(name):
                data["estimator_options"] = {"std": std}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MetaTrainConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> MetaTrainConfig:
        """A config from a TOML run file (``configs/*.toml``) or a ``config.json``.

        TOML files hold the fields at the top level and the task distribution as a ``[tasks]``
        table (``augment``, ``[[tasks.entries]]``, ``[tasks.time_budget]``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from e
            return cls.from_dict(data)
        return cls.from_json(text)


# Fields that say how long to run, not what is run: a resumed run may change them.
BUDGET_FIELDS = ("outer_steps", "max_seconds", "checkpoint_every", "keep_theta_every")


def build_estimator_over_tasks(config: MetaTrainConfig, lopt) -> MultiTaskEstimator:
    """The multi-task estimator of ``config``: its task mixture, slots and estimator."""
    return MultiTaskEstimator(
        TaskSource(config.mixture(), config.seed),
        lopt,
        num_slots=config.task_slots,
        num_tasks=config.num_tasks,
        horizon=config.horizon,
        trunc_length=config.trunc_length,
        estimator=config.estimator,
        estimator_options=dict(config.estimator_options),
        random_offset=config.random_offset,
        meta_loss_split=config.meta_loss_split,
        normalize=config.normalize_task_grads,
        lifetime=config.task_lifetime,
        horizon_schedule=_schedule(config.horizon_schedule),
        trunc_schedule=_schedule(config.trunc_schedule),
    )


def _schedule(data: Mapping[str, Any] | None):
    return None if data is None else schedule_from_dict(data)


def initial_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The keys of a run's initial theta and initial estimator state."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), -1 % 2**31)))


def initial_theta(config: MetaTrainConfig, lopt) -> Any:
    """The theta a run of ``config`` starts from (the learner's and every worker's).

    ``lopt.init`` with the run's seed, or the theta that ``config.init_theta`` names (a
    shipped pretrained name or a theta file), checked against the architecture."""
    theta = lopt.init(initial_keys(config.seed)[0])
    if config.init_theta is None:
        return theta
    from learnopt import pretrained

    source = config.init_theta
    if source in pretrained.available():
        metadata, state = pretrained.read(source)
        if (metadata["architecture"] != config.lopt
                or pretrained.architecture(metadata).config() != lopt.config()):
            raise ValueError(f"init_theta {source!r} is a {metadata['architecture']} with "
                             f"another config than the run's {config.lopt}")
        return restore_state(theta, state, source=source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"init_theta {source!r} is neither a shipped pretrained "
                                f"optimizer ({', '.join(pretrained.available())}) nor a file")
    return load_checkpoint(source, theta).state


def run_thetas(run_dir: str | os.PathLike, lopt) -> list[tuple[int, Any]]:
    """``(outer step, theta)`` of a run: its initial theta, the copies kept under ``thetas/``
    and the latest, in order of step."""
    run_dir = Path(run_dir)
    config = MetaTrainConfig.from_json((run_dir / "config.json").read_text())
    template = initial_theta(config, lopt)
    found = {0: template}
    for path in sorted((run_dir / "thetas").glob("theta_*.msgpack")):
        found[int(path.stem.split("_")[1])] = load_checkpoint(path, template).state
    latest = run_dir / "checkpoint.msgpack"
    if latest.exists():
        found[int(load_checkpoint(latest).state["step"])] = load_theta(run_dir, lopt)
    return sorted(found.items())


class MetaTrainer:
    """Owns one run directory; ``run()`` meta-trains, resuming if a checkpoint exists."""

    def __init__(self, config: MetaTrainConfig, out_dir: str | os.PathLike, lopt=None):
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            saved = MetaTrainConfig.from_json(cfg_path.read_text())
            budget = {k: getattr(config, k) for k in BUDGET_FIELDS}
            if dataclasses.replace(saved, **budget) != config:
                raise ValueError(
                    f"{cfg_path} holds a different config; use a new directory or the same "
                    f"config (only {', '.join(BUDGET_FIELDS)} may change on resume)"
                )
            if saved != config:  # a longer (or shorter) budget for a resumed run
                atomic_write_text(cfg_path, config.to_json())
        else:
            atomic_write_text(cfg_path, config.to_json())
            atomic_write_json(self.out / "machine.json", machine_info())
        if lopt is None:
            lopt = get_learned_optimizer(config.lopt, config.lopt_config)
        self.lopt = lopt
        self.estimator = build_estimator_over_tasks(config, self.lopt)
        self.learner = Learner.from_config(config.learner_config())
        self.key = jax.random.PRNGKey(config.seed)

    # -- state ---------------------------------------------------------------------------
    def init_state(self, with_estimator: bool = True) -> dict[str, Any]:
        _, est_key = initial_keys(self.config.seed)
        theta = initial_theta(self.config, self.lopt)
        state = {"learner": self.learner.init(theta), "step": 0, "seconds": 0.0}
        if with_estimator:
            state["estimator"] = self.estimator.init_state(theta, est_key)
        return state

    def save(self, state: dict[str, Any]) -> None:
        config = self.config.to_dict()
        save_checkpoint(self.out / "checkpoint.msgpack", state, config)
        save_checkpoint(self.out / "theta.msgpack", state["learner"].theta, config)

    def save_theta_copy(self, state: dict[str, Any]) -> Path:
        """``thetas/theta_<step>.msgpack``: theta at this outer step, kept for evaluation."""
        path = self.out / "thetas" / f"theta_{int(state['step']):07d}.msgpack"
        path.parent.mkdir(exist_ok=True)
        return save_checkpoint(path, state["learner"].theta, self.config.to_dict())

    def restore(self, with_estimator: bool = True) -> dict[str, Any] | None:
        """The state of ``checkpoint.msgpack``, or None if there is none.

        Without ``with_estimator`` (a distributed run) only theta, the learner and the step
        come back; with it, a checkpoint of a distributed run gets fresh inner runs.

        A checkpoint written under a different config (other than the budget fields)
        raises ``ValueError`` naming the file.
        """
        path = self.out / "checkpoint.msgpack"
        if not path.exists():
            return None
        ckpt = load_checkpoint(path)
        if ckpt.config is not None:
            saved = MetaTrainConfig.from_dict(ckpt.config)
            budget = {k: getattr(self.config, k) for k in BUDGET_FIELDS}
            if dataclasses.replace(saved, **budget) != self.config:
                raise ValueError(f"{path} was written under a different config than "
                                 f"{self.out / 'config.json'}")
        theta = initial_theta(self.config, self.lopt)
        template = {"learner": self.learner.init(theta), "step": 0, "seconds": 0.0}
        saved = dict(ckpt.state)
        if not with_estimator:
            saved.pop("estimator", None)
        elif "estimator" in saved:
            template["estimator"] = self.estimator.state_template(theta, saved["estimator"])
        state = restore_state(template, saved, str(path))
        if with_estimator and "estimator" not in state:  # a distributed run's checkpoint
            state["estimator"] = self.estimator.init_state(theta, initial_keys(self.config.seed)[1])
        return state

    # -- loop ----------------------------------------------------------------------------
    def _trim_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
                continue
        path.write_text("".join(line + "\n" for line in keep))

    def run(self, progress: bool = True, gradients: Any = None) -> dict[str, Any]:
        """Meta-train until ``outer_steps`` or ``max_seconds``, resuming from the checkpoint.

        ``gradients`` (e.g. :class:`learnopt.distributed.RayMetaGradients`, built from this
        config) supplies the meta-gradients instead of this process's estimator:
        ``gradients.next(theta, version)`` returns ``(grad, version, metrics)`` results, applied
        in arrival order with the learner's staleness rule. The inner runs then live in the
        workers, so a resumed distributed run restarts them (theta and the learner resume).
        """
        return self._run(progress, gradients)

    def _run(self, progress: bool, gradients) -> dict[str, Any]:
        cfg = self.config
        local = gradients is None  # the estimator state lives here, not in workers
        state = self.restore(with_estimator=local)
        resumed = state is not None
        if state is None:
            state = self.init_state(with_estimator=local)
        start_step = int(state["step"])
        self._trim_metrics(start_step)
        bar = tqdm(
            total=cfg.outer_steps,
            initial=start_step,
            disable=not progress,
            mininterval=1.0,
            desc=f"meta-train {cfg.lopt} ({cfg.estimator})",
        )
        t0 = time.perf_counter()
        seconds0 = float(state["seconds"])
        with open(self.out / "metrics.jsonl", "a", buffering=1) as log:
            while state["step"] < cfg.outer_steps:
                elapsed = seconds0 + time.perf_counter() - t0
                if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                    break
                step = int(state["step"])
                step_start = time.perf_counter()
                if gradients is None:
                    meta_loss, grad, est_state, metrics = self.estimator.estimate(
                        state["learner"].theta, state["estimator"],
                        jax.random.fold_in(self.key, step),
                    )
                    version = None  # computed at the current theta
                else:  # the first gradient to arrive from the workers
                    learner = state["learner"]
                    (grad, version, metrics), *_ = gradients.next(learner.theta, int(learner.step))
                    meta_loss, est_state = metrics.pop("meta_loss"), None
                learner_state, applied = self.learner.apply(state["learner"], grad, version)
                state = {
                    "learner": learner_state,
                    "step": step + 1,
                    "seconds": seconds0 + time.perf_counter() - t0,
                }
                if gradients is None:
                    state["estimator"] = est_state
                dt = time.perf_counter() - step_start
                record = {
                    "step": step + 1,
                    "meta_loss": float(meta_loss),
                    "applied": applied,
                    "num_dropped": int(learner_state.num_dropped),
                    "num_stale": int(learner_state.num_stale),
                    "outer_lr": float(self.learner.learning_rate_at(learner_state)),
                    "seconds": round(state["seconds"], 3),
                    **{k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0},
                }
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    meta_loss=f"{record['meta_loss']:.4f}",
                    steps_per_s=f"{1 / dt:.2f}",
                    refresh=False,
                )
                bar.update(1)
                if cfg.keep_theta_every and state["step"] % cfg.keep_theta_every == 0:
                    self.save_theta_copy(state)
                if state["step"] % cfg.checkpoint_every == 0:
                    log.flush()
                    self.save(state)
        bar.close()
        self.save(state)
        return {"state": state, "resumed": resumed, "start_step": start_step}


def load_theta(run_dir: str | os.PathLike, lopt) -> Any:
    """The latest theta of a run directory, restored onto ``lopt.init``'s structure."""
    template = lopt.init(jax.random.PRNGKey(0))
    return load_checkpoint(Path(run_dir) / "theta.msgpack", template).state
