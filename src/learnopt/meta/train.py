"""The meta-training loop: estimator -> learner, with checkpoint/resume and metrics.

Seed 004 App. D.1's setup at CPU scale: PES (or TBPTT) meta-gradients of the
mean normalised training loss, outer Adam with an elementwise clip of 3.0.

Every random choice of outer step ``k`` derives from ``fold_in(seed_key, k)``,
and a checkpoint holds everything that changes between steps (the learner
state, the estimator state with all inner runs and PES accumulators, the
step). So a run that is killed and resumed from its last checkpoint repeats
exactly the steps it lost and reaches the same theta as an uninterrupted run.

Files in ``out_dir``: ``config.json`` (the MetaTrainConfig), ``checkpoint.msgpack``
(written atomically: temp file, fsync, rename), ``theta.msgpack`` (the latest
meta-parameters alone, for evaluation), ``metrics.jsonl`` (one line per outer
step; on resume, lines past the checkpoint are dropped so each step appears
once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from learnopt.meta.learner import Learner


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json``)."""

    task: str = "fmnist_mlp_8x8"
    lopt: str = "small_fc_lopt"
    estimator: str = "pes"  # "pes" or "tbptt"
    num_tasks: int = 8
    horizon: int = 2000
    trunc_length: int = 20
    std: float = 0.01
    outer_lr: float = 3e-4
    clip: float = 3.0
    outer_steps: int = 100_000
    max_seconds: float | None = None
    checkpoint_every: int = 100
    seed: int = 0
    meta_loss_split: str = "train"  # or "outer_valid" (seed 000 App. C)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MetaTrainConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


# Fields that say how long to run, not what is run: a resumed run may change them.
BUDGET_FIELDS = ("outer_steps", "max_seconds", "checkpoint_every")


def build_estimator(config: MetaTrainConfig, task, lopt):
    """The gradient estimator named by ``config.estimator`` over ``task`` and ``lopt``."""
    from learnopt.meta.estimators.pes import PES
    from learnopt.meta.estimators.tbptt import TruncatedBPTT
    from learnopt.meta.unroll import TruncatedUnroll

    unroll = TruncatedUnroll(
        task,
        lopt,
        num_tasks=config.num_tasks,
        horizon=config.horizon,
        trunc_length=config.trunc_length,
        random_offset=True,
        meta_loss_split=config.meta_loss_split,
    )
    if config.estimator == "pes":
        return PES(unroll, std=config.std)
    if config.estimator == "tbptt":
        return TruncatedBPTT(unroll)
    raise ValueError(f"unknown estimator {config.estimator!r}; valid: pes, tbptt")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


class MetaTrainer:
    """Owns one run directory; ``run()`` meta-trains, resuming if a checkpoint exists."""

    def __init__(self, config: MetaTrainConfig, out_dir: str | os.PathLike, task=None, lopt=None):
        from learnopt.learned.registry import get_learned_optimizer
        from learnopt.tasks.fixed.registry import get_task

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
                cfg_path.write_text(config.to_json())
        else:
            cfg_path.write_text(config.to_json())
            (self.out / "machine.json").write_text(json.dumps(machine_info(), indent=2) + "\n")
        self.task = task if task is not None else get_task(config.task)
        self.lopt = lopt if lopt is not None else get_learned_optimizer(config.lopt)
        self.estimator = build_estimator(config, self.task, self.lopt)
        self.learner = Learner(config.outer_lr, config.clip)
        self.key = jax.random.PRNGKey(config.seed)

    # -- state ---------------------------------------------------------------------------
    def init_state(self) -> dict[str, Any]:
        theta_key, est_key = jax.random.split(jax.random.fold_in(self.key, -1 % 2**31))
        theta = self.lopt.init(theta_key)
        return {
            "learner": self.learner.init(theta),
            "estimator": self.estimator.init_state(theta, est_key),
            "step": 0,
            "seconds": 0.0,
        }

    def save(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.out / "checkpoint.msgpack", serialization.to_bytes(state))
        theta = serialization.to_bytes(state["learner"].theta)
        atomic_write_bytes(self.out / "theta.msgpack", theta)

    def restore(self) -> dict[str, Any] | None:
        path = self.out / "checkpoint.msgpack"
        if not path.exists():
            return None
        return serialization.from_bytes(self.init_state(), path.read_bytes())

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

    def run(self, progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        state = self.restore()
        resumed = state is not None
        if state is None:
            state = self.init_state()
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
                meta_loss, grad, est_state, metrics = self.estimator.estimate(
                    state["learner"].theta, state["estimator"], jax.random.fold_in(self.key, step)
                )
                learner_state, applied = self.learner.apply(state["learner"], grad)
                state = {
                    "learner": learner_state,
                    "estimator": est_state,
                    "step": step + 1,
                    "seconds": seconds0 + time.perf_counter() - t0,
                }
                dt = time.perf_counter() - step_start
                record = {
                    "step": step + 1,
                    "meta_loss": float(meta_loss),
                    "applied": applied,
                    "num_dropped": int(learner_state.num_dropped),
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
                if state["step"] % cfg.checkpoint_every == 0:
                    log.flush()
                    self.save(state)
        bar.close()
        self.save(state)
        return {"state": state, "resumed": resumed, "start_step": start_step}


def load_theta(run_dir: str | os.PathLike, lopt) -> Any:
    """The latest theta of a run directory, restored onto ``lopt.init``'s structure."""
    template = lopt.init(jax.random.PRNGKey(0))
    return serialization.from_bytes(template, (Path(run_dir) / "theta.msgpack").read_bytes())


def main(argv: list[str] | None = None) -> int:
    """``python -m learnopt.meta.train OUT_DIR [--config CONFIG.json]``."""
    import argparse

    p = argparse.ArgumentParser(description="meta-train a learned optimizer (resumable)")
    p.add_argument("out_dir")
    p.add_argument("--config", default=None, help="JSON MetaTrainConfig (default: OUT_DIR's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg_path = Path(args.config) if args.config else Path(args.out_dir) / "config.json"
    config = MetaTrainConfig.from_json(cfg_path.read_text()) if cfg_path.exists() else None
    if config is None:
        raise SystemExit(f"no config: give --config or put config.json in {args.out_dir}")
    MetaTrainer(config, args.out_dir).run(progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
