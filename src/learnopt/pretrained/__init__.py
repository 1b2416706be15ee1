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
