"""Pretrained learned optimizers shipped with the package.

One line from optax::

    opt = learnopt.pretrained.optimizer("small_fc_lopt_fmnist8", num_steps=2000)

Each shipped file is self-describing: a msgpack holding ``metadata`` (a JSON
string: architecture name and hyperparameters, task, estimator, meta-training
config, outer steps, wall time, machine, the command that reproduces it, and
the evaluation it passed) and ``theta``. ``load`` rebuilds the architecture
from the metadata alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import optax
from flax import serialization

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


def save(path: str | os.PathLike, theta: Any, metadata: dict[str, Any]) -> None:
    """Write ``theta`` and its ``metadata`` (must name ``architecture``) to one file."""
    if "architecture" not in metadata:
        raise ValueError("metadata must name the 'architecture' (a learned optimizer name)")
    blob = {"metadata": json.dumps(metadata, sort_keys=True), "theta": theta}
    data = serialization.msgpack_serialize(serialization.to_state_dict(blob))
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(lopt, theta, metadata)`` of a shipped name or a file path."""
    from learnopt.learned.registry import get_learned_optimizer

    raw = serialization.msgpack_restore(_path(name).read_bytes())
    metadata = json.loads(raw["metadata"])
    lopt = get_learned_optimizer(metadata["architecture"])
    template = lopt.init(jax.random.PRNGKey(0))
    theta = serialization.from_state_dict(template, raw["theta"])
    return lopt, theta, metadata


def optimizer(name: str, num_steps: int) -> optax.GradientTransformationExtraArgs:
    """The pretrained optimizer as an optax transformation (pass ``loss=`` to update)."""
    lopt, theta, _ = load(name)
    return lopt.optimizer(theta, num_steps)


def export_run(
    run_dir: str | os.PathLike,
    name: str,
    command: str,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Ship the theta of a meta-training run as ``pretrained/NAME.msgpack``.

    The metadata records the architecture, the run's full config (task,
    estimator, truncation, outer optimizer), outer steps and wall time from
    its metrics, the machine it ran on, ``command`` (which reproduces it)
    and, if given, the evaluation it passed.
    """
    from learnopt.learned.registry import get_learned_optimizer
    from learnopt.meta.report import read_metrics
    from learnopt.meta.train import MetaTrainConfig, load_theta, machine_info

    run = Path(run_dir)
    config = MetaTrainConfig.from_json((run / "config.json").read_text())
    lopt = get_learned_optimizer(config.lopt)
    last = read_metrics(run)[-1]
    machine_path = run / "machine.json"
    metadata = {
        "architecture": config.lopt,
        "architecture_hyperparameters": {
            k: v for k, v in vars(lopt).items() if isinstance(v, int | float | str | tuple)
        },
        "num_meta_params": lopt.num_meta_params(),
        "task": config.task,
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
    path = HERE / f"{name}{SUFFIX}"
    save(path, load_theta(run, lopt), metadata)
    return path
