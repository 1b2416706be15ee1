"""Pretrained learned optimizers shipped with the package.

One line from optax::

    opt = learnopt.pretrained.optimizer("small_fc_lopt_fmnist8", num_steps=2000)

Each shipped file is self-describing: a ``learnopt.io`` checkpoint whose state is
``theta`` and whose config is the metadata: the architecture's registry name
(``architecture``) and constructor hyperparameters (``architecture_config``), task,
estimator, meta-training config, outer steps, wall time, machine, the command that
reproduces it, and the evaluation it passed. ``load`` rebuilds the architecture
from the metadata alone, through ``learned.registry``.

Files written before checkpoint format versions (format 0: a msgpack map of a
``metadata`` JSON string, with the hyperparameters under
``architecture_hyperparameters``, and ``theta``) still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import optax

from learnopt.io import (
    CheckpointError,
    load_checkpoint,
    machine_info,
    restore_state,
    save_checkpoint,
)
from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.registry import default_config, learned_optimizer_from_config

HERE = Path(__file__).parent
SUFFIX = ".msgpack"


def available() -> list[str]:
    """Names of the shipped pretrained optimizers."""
    return sorted(p.name[: -len(SUFFIX)] for p in HERE.glob(f"*{SUFFIX}"))


def _path(name: str) -> Path:
    if os.sep in name or name.endswith(SUFFIX):
        return Path(name)
    path = HERE / f"{name}{SUFFIX}"
    if not path.exists():
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")
    return path


def save(path: str | os.PathLike, theta: Any, metadata: dict[str, Any]) -> Path:
    """Write ``theta`` and its ``metadata`` to one file, atomically.

    ``metadata`` must name the ``architecture`` (a ``learned.registry`` name) and may give
    its ``architecture_config`` (constructor hyperparameters; defaults otherwise). It must
    be JSON-ready.
    """
    if "architecture" not in metadata:
        raise ValueError("metadata must name the 'architecture' (a learned optimizer name)")
    return save_checkpoint(path, theta, config=metadata)


def read(name: str) -> tuple[dict[str, Any], Any]:
    """``(metadata, theta state dict)`` of a shipped name or file, without building anything."""
    path = _path(name)
    ckpt = load_checkpoint(path)
    if ckpt.format_version == 0:  # {"metadata": JSON text, "theta": state dict}
        raw = ckpt.state
        if set(raw) != {"metadata", "theta"}:
            raise CheckpointError(f"{path}: not a pretrained optimizer file (keys "
                                  f"{', '.join(sorted(raw))}; expected metadata, theta)")
        return json.loads(raw["metadata"]), raw["theta"]
    if not isinstance(ckpt.config, dict) or "architecture" not in ckpt.config:
        raise CheckpointError(f"{path}: its metadata does not name the 'architecture'")
    return ckpt.config, ckpt.state


def architecture(metadata: dict[str, Any]) -> LearnedOptimizer:
    """The learned optimizer a file's metadata describes (registry name and config)."""
    name = metadata["architecture"]
    if "architecture_config" in metadata:
        config = metadata["architecture_config"]
    else:  # format 0 files: the numeric/string attributes of the optimizer object
        accepted = default_config(name)
        config = {k: v for k, v in metadata.get("architecture_hyperparameters", {}).items()
                  if k in accepted}
    return learned_optimizer_from_config(name, config)


def load(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(lopt, theta, metadata)`` of a shipped name or a file path."""
    metadata, theta_dict = read(name)
    lopt = architecture(metadata)
    template = jax.eval_shape(lopt.init, jax.random.PRNGKey(0))
    theta = restore_state(template, theta_dict, source=str(_path(name)))
    return lopt, theta, metadata


def describe(name: str) -> str:
    """One line: architecture, meta-training task, estimator and outer steps (with those of
    the runs it started from)."""
    meta, _ = read(name)
    steps = meta.get("outer_steps")
    if steps and meta.get("lineage"):  # runs it started from count too
        steps += sum(int(run["outer_steps"]) for run in meta["lineage"])
    task = str(meta.get("task", "?")).split(" (")[0]  # a mixture's entries are in the file
    return (f"{meta['architecture']} meta-trained on {task} with "
            f"{meta.get('estimator', '?')}" + (f", {steps:,} outer steps" if steps else ""))


def optimizer(
    name: str, num_steps: int, guard: bool | None = None
) -> optax.GradientTransformationExtraArgs:
    """The pretrained optimizer as an optax transformation.

    A file whose metadata holds ``guard`` (the settings of :func:`learnopt.learned.guard.guarded`)
    comes wrapped in the divergence guard (docs/stability.md); its ``update`` then needs
    ``loss=`` (the loss at the current parameters). ``guard=False`` returns the bare learned
    optimizer, ``guard=True`` wraps it even if the file does not ask for it.
    """
    from learnopt.learned.guard import guarded

    lopt, theta, metadata = load(name)
    opt = lopt.optimizer(theta, num_steps)
    settings = metadata.get("guard")
    if guard is None:
        guard = settings is not None
    return guarded(opt, **(settings or {})) if guard else opt


def export_run(
    run_dir: str | os.PathLike,
    name: str,
    command: str,
    evaluation: dict[str, Any] | None = None,
    guard: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
) -> Path:
    """Ship the theta of a meta-training run as ``pretrained/NAME.msgpack``.

    The metadata records the architecture, the run's full config (task,
    estimator, truncation, outer optimizer), outer steps and wall time from
    its metrics, the machine it ran on, ``command`` (which reproduces it)
    and, if given, the evaluation it passed, the settings of the divergence guard that
    :func:`optimizer` applies (``guard``), and the earlier runs it started from (``lineage``).
    """
    from learnopt.meta.report import read_metrics
    from learnopt.meta.train import MetaTrainConfig

    run = Path(run_dir)
    config = MetaTrainConfig.from_json((run / "config.json").read_text())
    lopt = learned_optimizer_from_config(config.lopt, config.lopt_config)
    theta = load_checkpoint(run / "theta.msgpack", lopt.init(jax.random.PRNGKey(0))).state
    last = read_metrics(run)[-1]
    machine_path = run / "machine.json"
    if config.tasks is None:
        task = config.task
    else:
        entries = [e.get("family") or e.get("task") for e in config.tasks["entries"]]
        task = f"a mixture of {len(entries)} task families and tasks ({', '.join(entries)})"
    metadata = {
        "architecture": config.lopt,
        "architecture_config": lopt.config(),
        "num_meta_params": lopt.num_meta_params(),
        "task": task,
        "task_distribution": config.mixture().to_dict(),
        "estimator": config.estimator,
        "meta_train_config": json.loads(config.to_json()),
        "outer_steps": last["step"],
        "wall_seconds": last["seconds"],
        "dropped_nonfinite_gradients": last.get("num_dropped", 0),
        "final_meta_loss": last["meta_loss"],
        "machine": json.loads(machine_path.read_text())
        if machine_path.exists()
        else machine_info(),
        "command": command,
        "evaluation": evaluation or {},
    }
    if guard is not None:
        metadata["guard"] = dict(guard)
    if lineage:
        metadata["lineage"] = list(lineage)
    return save(HERE / f"{name}{SUFFIX}", theta, metadata)
