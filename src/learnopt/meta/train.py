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
``checkpoint.msgpack`` and ``theta.msgpack`` (the latest full state, and the latest
meta-parameters alone for evaluation; both ``learnopt.io`` checkpoints holding the config
and a format version, written atomically), ``checkpoint_<step>.msgpack`` (copies of the
last ``keep_checkpoints`` full states), ``metrics.jsonl`` (one line per outer step; on
resume, lines past the checkpoint are dropped so each step appears once) and ``.lock``.

**Faults and bad input.** Nothing is written before the config, the learned optimizer, the
estimator and the run directory have been checked, so a refused command leaves nothing that
would refuse the corrected one. ``run()`` holds an exclusive ``flock`` on ``OUT/.lock`` (the
file holds the holder's pid): a second writer on the same directory gets
:class:`RunLockedError` naming that pid before it writes anything; under the lock, a resume
first removes the temporary files of atomic writes that a killed writer left. SIGINT and
SIGTERM end the current outer step (a second signal abandons it), write a checkpoint and raise
:class:`RunInterrupted` (the command line exits 130 or 143 with one line). On resume each
checkpoint is checked on load (readable, the run's config, the expected structure); a bad
latest one falls back to the newest good ``checkpoint_<step>.msgpack`` with a
:class:`CheckpointFallbackWarning` naming both. After ``max_nonfinite_steps`` consecutive
outer steps whose meta-gradient was not finite (and so was dropped by the learner) the run
checkpoints and raises :class:`MetaTrainingDiverged` (exit code 3). Every JSON file and
line written is strict JSON: a non-finite number is written as ``null`` and the record
names it under ``"nonfinite"``.

**Time budget.** ``max_seconds`` counts training time, not compilation: the seconds spent
in the first call of each compiled program (the estimator's ``compile_seconds`` metric, the
learner's first update) are left out, so a budget buys the same number of outer steps
however long XLA takes to compile; ``"seconds"`` in ``metrics.jsonl`` is this budgeted time,
summed over resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import threading
import time
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from learnopt.io import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checkpoint_bytes,
    dumps_json,
    finite_json,
    load_checkpoint,
    machine_info,
    restore_state,
    save_checkpoint,
)
from learnopt.learned.common import ACCUMULATOR_LAYOUT
from learnopt.learned.registry import get_learned_optimizer
from learnopt.meta.config_checks import check_positive_int, check_seconds, check_seed
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
    # Training seconds, compile time excluded (the first call of each compiled program).
    max_seconds: float | None = None
    checkpoint_every: int = 100
    # Full-state copies kept as checkpoint_<step>.msgpack (resume falls back along them).
    keep_checkpoints: int = 3
    # Stop (checkpointed, MetaTrainingDiverged) after this many consecutive outer steps whose
    # meta-gradient was not finite; None: never stop.
    max_nonfinite_steps: int | None = 20
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
        for name in ("num_tasks", "horizon", "trunc_length", "task_slots", "checkpoint_every",
                     "outer_steps", "keep_checkpoints", "keep_theta_every", "max_nonfinite_steps"):
            value = getattr(self, name)
            if value is None and name in ("keep_theta_every", "max_nonfinite_steps"):
                continue
            check_positive_int(name, value, " (nothing to train)" if name == "outer_steps" else "")
        check_seconds("max_seconds", self.max_seconds, " (nothing to train)")
        check_seed(self.seed)
        for name in ("horizon_schedule", "trunc_schedule"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, schedule_from_dict(value).to_dict())
        if self.task_lifetime is not None and self.task_lifetime < 1:
            raise ValueError(f"task_lifetime must be >= 1 or None, got {self.task_lifetime}")
        _, nonfinite = finite_json(self.to_dict())
        if nonfinite:  # config.json must be strict JSON, and a NaN setting is a mistake
            raise ValueError(f"config values must be finite numbers: {', '.join(nonfinite)}")

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
        return dumps_json(self.to_dict(), indent=2) + "\n"

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
BUDGET_FIELDS = ("outer_steps", "max_seconds", "checkpoint_every", "keep_theta_every",
                 "keep_checkpoints", "max_nonfinite_steps")


def build_estimator_over_tasks(
    config: MetaTrainConfig, lopt, **options: Any
) -> MultiTaskEstimator:
    """The multi-task estimator of ``config``: its task mixture, slots and estimator.
    ``options``: further MultiTaskEstimator arguments (``cache_size``, ``shared_cache``)."""
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
        **options,
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


# --- faults -----------------------------------------------------------------------------------


class RunLockedError(ValueError):
    """Another process is writing the run directory: it holds ``OUT/.lock``."""

    def __init__(self, out: Path, pid: int | None):
        self.out, self.pid = out, pid
        holder = f"process {pid}" if pid is not None else "another process (pid not known yet)"
        super().__init__(
            f"{out} is in use: {holder} is meta-training into it (it holds {out / '.lock'}); "
            "wait for it to finish or stop it, or use another run directory"
        )


class RunInterrupted(KeyboardInterrupt):
    """``run()`` stopped on SIGINT or SIGTERM after writing a checkpoint.

    ``step`` is the outer step checkpointed, ``exit_code`` the shell's ``128 + signal``
    (130 for SIGINT, 143 for SIGTERM). A subclass of ``KeyboardInterrupt``, so a caller's
    ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"interrupted at outer step {step}; checkpoint saved to {checkpoint}; "
                         "rerun the same command to resume")


class MetaTrainingDiverged(RuntimeError):
    """``max_nonfinite_steps`` consecutive meta-gradients were not finite; the run stopped
    after writing a checkpoint. The command line exits with ``exit_code`` (3)."""

    exit_code = 3

    def __init__(self, message: str, step: int, checkpoint: Path):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class CheckpointFallbackWarning(RuntimeWarning):
    """A run's latest checkpoint could not be used; it resumed from an earlier one."""


class _Abandon(BaseException):
    """Raised by the signal handler on a second signal: abandon the current outer step."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``OUT/.lock``; the file holds the holder's pid.

    The lock belongs to the open file, so it ends with the process however that ends (a
    SIGKILL included): a stale ``.lock`` file never blocks a later run."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.created = False  # whether acquire() created the file
        self._fd: int | None = None

    def acquire(self) -> None:
        self.created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"cannot open the run lock {self.path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise RunLockedError(self.path.parent, int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a finished run's pid would mislead
        finally:
            os.close(fd)  # and closing releases the lock


# Temporary files of the files run() writes atomically (learnopt.io.atomic_open names them
# ``.NAME.XXXX.tmp``): checkpoint*.msgpack, theta.msgpack, metrics.jsonl, config.json, machine.json.
_RUN_FILE_PREFIXES = (".checkpoint", ".theta.msgpack.", ".metrics.jsonl.", ".config.json.",
                      ".machine.json.")


def _numbered_step(path: Path) -> int | None:
    """The step of ``checkpoint_<step>.msgpack``, None for other names."""
    digits = path.name[len("checkpoint_"):-len(".msgpack")]
    return int(digits) if digits.isdigit() else None


class MetaTrainer:
    """Owns one run directory; ``run()`` meta-trains, resuming if a checkpoint exists.

    Construction reads but writes nothing: it refuses a run directory that is a file or
    cannot be created, and a ``config.json`` there of another config (other than
    ``BUDGET_FIELDS``). ``run()`` creates the directory, takes its lock and writes the
    run's files once the initial (or resumed) state has been built.
    """

    def __init__(self, config: MetaTrainConfig, out_dir: str | os.PathLike, lopt=None):
        self.config = config
        self.out = Path(out_dir)
        self._check_out()
        self._saved_config()
        if lopt is None:
            lopt = get_learned_optimizer(config.lopt, config.lopt_config)
        self.lopt = lopt
        self.estimator = build_estimator_over_tasks(config, self.lopt)
        self.learner = Learner.from_config(config.learner_config())
        self.key = jax.random.PRNGKey(config.seed)
        self._signal: int | None = None  # the first SIGINT/SIGTERM received during run()
        self._saving = False  # the final checkpoint is being written: do not abandon it

    # -- the run directory ---------------------------------------------------------------
    def _check_out(self) -> None:
        """Refuse (ValueError) a run directory that is a file or cannot be created."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"the run directory {out} exists and is not a directory")
        base = out
        while not base.exists():  # the nearest existing ancestor
            base = base.parent
        if not base.is_dir():
            raise ValueError(f"cannot create the run directory {out}: {base} is not a directory")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write to {base} (permission denied), so not to the run "
                             f"directory {out}")

    def _saved_config(self) -> MetaTrainConfig | None:
        """The run's ``config.json`` (None if there is none), refused if it is unreadable or
        differs from this config in more than the budget fields."""
        path = self.out / "config.json"
        if not path.is_file():
            return None
        try:
            saved = MetaTrainConfig.from_json(path.read_text())
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a readable run config ({e}); fix or delete it, "
                             "or use another run directory") from e
        budget = {k: getattr(self.config, k) for k in BUDGET_FIELDS}
        if dataclasses.replace(saved, **budget) != self.config:
            raise ValueError(
                f"{path} holds a different config; use a new directory or the same "
                f"config (only {', '.join(BUDGET_FIELDS)} may change on resume)"
            )
        return saved

    def _make_dirs(self) -> list[Path]:
        """Create the run directory and missing parents; returns those created."""
        missing = []
        path = self.out
        while not path.exists():
            missing.append(path)
            path = path.parent
        created = []
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                for done in reversed(created):
                    with contextlib.suppress(OSError):
                        done.rmdir()
                raise ValueError(f"cannot create the run directory {self.out}: "
                                 f"{e.strerror or e}") from e
            created.append(path)
        return created

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunLock]:
        """Create the run directory and hold its lock (``OUT/.lock``) for the block.

        Raises :class:`RunLockedError` (a ``ValueError``) naming the holder's pid if another
        process holds it. If the block ends before ``config.json`` exists (a refused run),
        the lock file and the directories created here are removed again."""
        self._check_out()
        created = self._make_dirs()
        lock = RunLock(self.out)
        try:
            lock.acquire()
            yield lock
        finally:
            lock.release()
            if not (self.out / "config.json").exists():  # no run was started: leave no trace
                if lock.created:
                    with contextlib.suppress(OSError):
                        lock.path.unlink()
                for path in reversed(created):
                    with contextlib.suppress(OSError):
                        path.rmdir()

    def _write_run_files(self) -> None:
        """``config.json`` (new, or with a changed budget) and ``machine.json``."""
        if self._saved_config() != self.config:
            atomic_write_text(self.out / "config.json", self.config.to_json())
        if not (self.out / "machine.json").exists():
            atomic_write_json(self.out / "machine.json", machine_info())

    # -- state ---------------------------------------------------------------------------
    def init_state(self, with_estimator: bool = True) -> dict[str, Any]:
        _, est_key = initial_keys(self.config.seed)
        theta = initial_theta(self.config, self.lopt)
        state = {"learner": self.learner.init(theta), "step": 0, "seconds": 0.0,
                 "accumulator_layout": ACCUMULATOR_LAYOUT}
        if with_estimator:
            state["estimator"] = self.estimator.init_state(theta, est_key)
        return state

    def save(self, state: dict[str, Any]) -> None:
        """``checkpoint.msgpack`` (the latest state), its copy ``checkpoint_<step>.msgpack``
        (the newest ``keep_checkpoints`` copies are kept) and ``theta.msgpack``."""
        config = self.config.to_dict()
        step = int(state["step"])
        data = checkpoint_bytes(state, config)
        atomic_write_bytes(self.out / "checkpoint.msgpack", data)
        atomic_write_bytes(self.out / f"checkpoint_{step:07d}.msgpack", data)
        save_checkpoint(self.out / "theta.msgpack", state["learner"].theta, config)
        kept = 0
        for other_step, path in self._numbered_checkpoints():  # newest first
            # Copies past this step are of a future this run did not reach (a fallback
            # resumed before them); they would otherwise outrank the good ones.
            if other_step > step or kept >= self.config.keep_checkpoints:
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                kept += 1

    def _numbered_checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.out.glob("checkpoint_*.msgpack"):
            step = _numbered_step(path)
            if step is not None:
                found.append((step, path))
        return sorted(found, reverse=True)

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints in the order a resume tries them: ``checkpoint.msgpack``,
        then the kept ``checkpoint_<step>.msgpack`` copies, newest first."""
        latest = self.out / "checkpoint.msgpack"
        return [latest] * latest.is_file() + [p for _, p in self._numbered_checkpoints()]

    def save_theta_copy(self, state: dict[str, Any]) -> Path:
        """``thetas/theta_<step>.msgpack``: theta at this outer step, kept for evaluation."""
        path = self.out / "thetas" / f"theta_{int(state['step']):07d}.msgpack"
        path.parent.mkdir(exist_ok=True)
        return save_checkpoint(path, state["learner"].theta, self.config.to_dict())

    def restore(self, with_estimator: bool = True) -> dict[str, Any] | None:
        """The state of the newest usable checkpoint, or None if there is none.

        Each of :meth:`checkpoints` is tried in turn and checked on load (readable, of the
        expected structure); one that is not is skipped with a
        :class:`CheckpointFallbackWarning` naming it and the file used. If none is usable,
        :class:`learnopt.io.CheckpointError` names them all. A checkpoint written under a
        different config (other than the budget fields) raises ``ValueError`` naming the
        file: it belongs to another run, and no fallback is tried.

        Without ``with_estimator`` (a distributed run) only theta, the learner and the step
        come back; with it, a checkpoint of a distributed run gets fresh inner runs.
        """
        candidates = self.checkpoints()
        if not candidates:
            return None
        bad: list[CheckpointError] = []
        for path in candidates:
            try:
                state = self._restore_from(path, with_estimator)
            except CheckpointError as e:
                bad.append(e)
                continue
            if bad:
                skipped = "; ".join(getattr(e, "reason", str(e)) for e in bad)
                warnings.warn(CheckpointFallbackWarning(
                    f"resuming from {path} (outer step {int(state['step'])}): the newer "
                    f"checkpoint{'s are' if len(bad) > 1 else ' is'} unusable: {skipped}"
                ), stacklevel=2)
            return state
        raise CheckpointError(
            f"{self.out} has no usable checkpoint: "
            + "; ".join(getattr(e, "reason", str(e)) for e in bad),
            "replace them with good copies, or delete them to start the run over (its "
            "config.json is kept), or use another run directory",
        )

    def _restore_from(self, path: Path, with_estimator: bool) -> dict[str, Any]:
        ckpt = load_checkpoint(path)
        if ckpt.config is not None:
            try:
                saved = MetaTrainConfig.from_dict(ckpt.config)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: its config is not a meta-training config "
                                      f"({e})") from e
            budget = {k: getattr(self.config, k) for k in BUDGET_FIELDS}
            if dataclasses.replace(saved, **budget) != self.config:
                raise ValueError(f"{path} was written under a different config than "
                                 f"{self.out / 'config.json'}")
        theta = initial_theta(self.config, self.lopt)
        template = {"learner": self.learner.init(theta), "step": 0, "seconds": 0.0}
        try:
            saved = dict(ckpt.state)
            layout = saved.pop("accumulator_layout", 0)
            if with_estimator and "estimator" in saved and layout != ACCUMULATOR_LAYOUT:
                # The inner runs' optimizer states of an older accumulator layout cannot be
                # read as this one's: they restart; theta, the learner and the step are kept.
                warnings.warn(f"{path}: written with accumulator layout {layout} (this learnopt "
                              f"uses {ACCUMULATOR_LAYOUT}); the inner runs restart from fresh "
                              "tasks, theta and the outer learner resume", stacklevel=3)
                saved.pop("estimator")
            if not with_estimator:
                saved.pop("estimator", None)
            elif "estimator" in saved:
                template["estimator"] = self.estimator.state_template(theta, saved["estimator"])
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: the checkpoint does not match this run's state "
                                  f"({type(e).__name__}: {e})") from e
        state = restore_state(template, saved, str(path))
        state["accumulator_layout"] = ACCUMULATOR_LAYOUT
        if with_estimator and "estimator" not in state:  # a distributed run's checkpoint
            state["estimator"] = self.estimator.init_state(theta, initial_keys(self.config.seed)[1])
        return state

    # -- loop ----------------------------------------------------------------------------
    def _trim_metrics(self, step: int) -> int:
        """Drop the lines of ``metrics.jsonl`` past ``step`` (and lines cut short by a kill;
        lines of older versions with bare NaN become strict JSON). Returns the
        ``nonfinite_streak`` recorded at ``step`` (0 if none)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return 0
        text = path.read_text()
        keep, last = [], None
        changed = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if record["step"] > step:
                    changed = True
                    continue
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                changed = True
                continue
            if finite_json(record)[1]:
                line, changed = _record_line(record), True
            keep.append(line)
            last = record
        if changed:
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        if last is not None and last["step"] == step:
            return int(last.get("nonfinite_streak") or 0)
        return 0

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM set a flag that ``_run`` checks between outer steps; a second
        one abandons the current step. Only in the main thread (where Python runs signal
        handlers); the previous handlers are restored afterwards."""
        self._signal, self._saving = None, False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is None:
                self._signal = signum
            elif not self._saving:
                raise _Abandon(signum)

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def run(self, progress: bool = True, gradients: Any = None) -> dict[str, Any]:
        """Meta-train until ``outer_steps`` or ``max_seconds``, resuming from the checkpoint.

        ``max_seconds`` counts training time only: the seconds spent in the first call of
        each compiled program (the estimator's ``compile_seconds``, the learner's first
        update) are not counted.

        ``gradients`` (e.g. :class:`learnopt.distributed.RayMetaGradients`, built from this
        config) supplies the meta-gradients instead of this process's estimator:
        ``gradients.next(theta, version)`` returns ``(grad, version, metrics)`` results, applied
        in arrival order with the learner's staleness rule. The inner runs then live in the
        workers, so a resumed distributed run restarts them (theta and the learner resume).

        Holds the run directory's lock (:class:`RunLockedError` if another process has it).
        Raises :class:`RunInterrupted` after SIGINT/SIGTERM and :class:`MetaTrainingDiverged`
        after ``max_nonfinite_steps`` consecutive non-finite meta-gradients, each once a
        checkpoint of the last completed outer step is written.
        """
        with self.lock(), self._stop_on_signals():
            return self._run(progress, gradients)

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files (``.NAME.XXXX.tmp``) of this run's atomic writes that
        a writer killed mid-write (SIGKILL, power loss) left behind. Only the lock's holder
        writes these files, so under the lock none is in use; other files are kept."""
        thetas = (self.out / "thetas", (".theta_",))
        for folder, prefixes in ((self.out, _RUN_FILE_PREFIXES), thetas):
            for path in folder.glob(".*.tmp"):
                if path.name.startswith(prefixes):
                    with contextlib.suppress(OSError):
                        path.unlink()

    def _run(self, progress: bool, gradients) -> dict[str, Any]:
        cfg = self.config
        local = gradients is None  # the estimator state lives here, not in workers
        self._remove_stale_temporaries()
        state = self.restore(with_estimator=local)
        resumed = state is not None
        if state is None:
            state = self.init_state(with_estimator=local)
        self._write_run_files()
        start_step = int(state["step"])
        streak = self._trim_metrics(start_step)  # consecutive non-finite meta-gradients
        seconds0 = float(state["seconds"])
        timed = cfg.max_seconds is not None
        bar = tqdm(
            total=cfg.max_seconds if timed else cfg.outer_steps,
            initial=min(seconds0, cfg.max_seconds) if timed else start_step,
            unit="s" if timed else "it",
            bar_format=("{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
                        if timed else None),
            disable=not progress,
            mininterval=1.0,
            desc=f"meta-train {cfg.lopt} ({cfg.estimator})",
        )
        # Compile seconds of this process (or its workers) so far: not part of the budget.
        compile0 = self.estimator.compile_seconds
        worker_compile: dict[Any, float] = {}
        estimator_compile = apply_compile = 0.0
        first_apply = True
        t0 = time.perf_counter()
        stop = None  # "signal" or "diverged"
        try:
            with open(self.out / "metrics.jsonl", "a", buffering=1) as log:
                while int(state["step"]) < cfg.outer_steps:
                    if self._signal is not None:
                        stop = "signal"
                        break
                    if cfg.max_nonfinite_steps is not None and streak >= cfg.max_nonfinite_steps:
                        stop = "diverged"
                        break
                    elapsed = (seconds0 + time.perf_counter() - t0
                               - estimator_compile - apply_compile)
                    if timed and elapsed >= cfg.max_seconds:
                        break
                    step = int(state["step"])
                    step_start = time.perf_counter()
                    if local:
                        meta_loss, grad, est_state, metrics = self.estimator.estimate(
                            state["learner"].theta, state["estimator"],
                            jax.random.fold_in(self.key, step),
                        )
                        version = None  # computed at the current theta
                        estimator_compile = self.estimator.compile_seconds - compile0
                    else:  # the first gradient to arrive from the workers
                        learner = state["learner"]
                        (grad, version, metrics), *_ = gradients.next(
                            learner.theta, int(learner.step))
                        meta_loss, est_state = metrics.pop("meta_loss"), None
                        if "compile_seconds" in metrics:  # workers compile side by side
                            worker_compile[metrics.get("worker")] = float(
                                metrics["compile_seconds"])
                        estimator_compile = max(worker_compile.values(), default=0.0)
                    apply_start = time.perf_counter()
                    learner_state, applied = self.learner.apply(state["learner"], grad, version)
                    if first_apply:  # the learner's update compiles on its first call
                        jax.block_until_ready(learner_state.theta)
                        apply_compile, first_apply = time.perf_counter() - apply_start, False
                    dropped = int(learner_state.num_dropped) > int(state["learner"].num_dropped)
                    new_streak = streak + 1 if dropped else 0
                    new_state = {
                        "learner": learner_state,
                        "step": step + 1,
                        "seconds": (seconds0 + time.perf_counter() - t0
                                    - estimator_compile - apply_compile),
                        "accumulator_layout": ACCUMULATOR_LAYOUT,
                    }
                    if local:
                        new_state["estimator"] = est_state
                    dt = time.perf_counter() - step_start
                    record = {
                        "step": step + 1,
                        "meta_loss": float(meta_loss),
                        "applied": applied,
                        "num_dropped": int(learner_state.num_dropped),
                        "num_stale": int(learner_state.num_stale),
                        "nonfinite_streak": new_streak,
                        "grad_norm": _global_norm(grad),
                        "outer_lr": float(self.learner.learning_rate_at(learner_state)),
                        "seconds": round(new_state["seconds"], 3),
                        **{k: float(np.asarray(v)) for k, v in metrics.items()
                           if np.ndim(v) == 0},
                    }
                    log.write(_record_line(record) + "\n")
                    # The step is done (a second signal past here keeps it: one assignment).
                    state, streak = new_state, new_streak
                    bar.set_postfix(
                        step=step + 1,
                        meta_loss=f"{record['meta_loss']:.4f}",
                        steps_per_s=f"{1 / max(dt, 1e-9):.2f}",
                        refresh=False,
                    )
                    if timed:
                        bar.update(max(0.0, min(state["seconds"], cfg.max_seconds) - bar.n))
                    else:
                        bar.update(1)
                    if cfg.keep_theta_every and state["step"] % cfg.keep_theta_every == 0:
                        self.save_theta_copy(state)
                    if state["step"] % cfg.checkpoint_every == 0:
                        log.flush()
                        self.save(state)
        except _Abandon:
            stop = "signal"
        finally:
            self._saving = True
            bar.close()
        step = int(state["step"])
        if stop is None and cfg.max_nonfinite_steps is not None:
            if streak >= cfg.max_nonfinite_steps:
                stop = "diverged"
        if stop == "signal":
            self._trim_metrics(step)  # the line of an abandoned step
        self.save(state)
        checkpoint = self.out / "checkpoint.msgpack"
        if stop == "signal":
            raise RunInterrupted(self._signal or signal.SIGINT, step, checkpoint)
        if stop == "diverged":
            raise MetaTrainingDiverged(
                f"meta-training diverged: the meta-gradients of the last {streak} outer steps "
                f"(to outer step {step}) were not finite and were dropped, so theta no longer "
                f"changes; checkpoint saved to {checkpoint}. Start a new run with a lower "
                f"outer learning rate (outer_lr {cfg.outer_lr:g}) or clip, or raise "
                f"max_nonfinite_steps (now {cfg.max_nonfinite_steps}) to go on",
                step, checkpoint,
            )
        return {"state": state, "resumed": resumed, "start_step": start_step}


def _global_norm(tree: Any) -> float:
    """The Euclidean norm of all entries of a meta-gradient (NaN if any is not finite)."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
    with np.errstate(over="ignore", invalid="ignore"):
        return math.sqrt(sum(float(np.sum(np.square(x))) for x in leaves))


def _record_line(record: Mapping[str, Any]) -> str:
    """One strict-JSON line of ``metrics.jsonl``: non-finite values become ``null`` and are
    named under ``"nonfinite"``."""
    clean, bad = finite_json(dict(record))
    if bad:
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(bad))
    return json.dumps(clean, allow_nan=False)


def load_theta(run_dir: str | os.PathLike, lopt) -> Any:
    """The latest theta of a run directory, restored onto ``lopt.init``'s structure."""
    template = lopt.init(jax.random.PRNGKey(0))
    return load_checkpoint(Path(run_dir) / "theta.msgpack", template).state
