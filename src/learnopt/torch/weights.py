"""Reading learnopt weights files without JAX or flax.

A shipped pretrained optimizer (``src/learnopt/pretrained/*.msgpack``) is a ``learnopt.io``
checkpoint: one msgpack map ::

    {"format_version": 1, "config": "<JSON text: the metadata>", "state": <theta state dict>}

or, for files written before format versions (format 0), ``{"metadata": "<JSON>", "theta":
<state dict>}``. The state dict is flax's serialisation of the ``theta`` pytree: nested maps
with string keys whose leaves are msgpack extension objects. Extension type 1 is an ndarray
and type 3 a numpy scalar, both encoded as the msgpack triple ``(shape, dtype name, C-order
bytes)``; type 2 is a Python complex ``(real, imag)``. Arrays too large for one msgpack
object are stored as ``{"__msgpack_chunked_array__": True, "shape": {"0": ...}, "chunks":
{"0": flat array, ...}}``. This module decodes all of that with the ``msgpack`` package and
numpy alone, so ``learnopt.torch`` never imports JAX.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

#: Where the shipped pretrained optimizers live (the JAX side's ``learnopt.pretrained``).
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
SUFFIX = ".msgpack"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


class WeightsFileError(ValueError):
    """A weights file that is not a readable learnopt checkpoint (the message names it)."""


def _decode_array(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":  # the top 16 bits of a float32
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(name)).reshape(shape).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_array(data)
    if code == _EXT_NPSCALAR:
        return _decode_array(data)[()]
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    return msgpack.ExtType(code, data)


def _as_tuple(d: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(d[str(i)] for i in range(len(d)))


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if "__msgpack_chunked_array__" in tree:
            flat = np.concatenate(_as_tuple(tree["chunks"]))
            return flat.reshape(_as_tuple(tree["shape"]))
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_checkpoint(path: str | os.PathLike) -> tuple[int, dict[str, Any] | None, Any]:
    """``(format_version, config, state)`` of a ``learnopt.io`` checkpoint file.

    ``state`` is the raw state dict (nested dicts of numpy arrays); ``config`` is ``None``
    for format 0.
    """
    path = Path(path)
    try:
        raw = msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False,
                              strict_map_key=False)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as e:
        raise WeightsFileError(f"{path}: not a readable checkpoint (corrupt or cut short: "
                               f"{e})") from e
    if not isinstance(raw, dict):
        raise WeightsFileError(f"{path}: not a checkpoint (holds a {type(raw).__name__})")
    raw = _unchunk(raw)
    if "format_version" not in raw:
        return 0, None, raw
    if raw["format_version"] != 1 or set(raw) != {"format_version", "config", "state"}:
        raise WeightsFileError(f"{path}: unknown checkpoint format (version "
                               f"{raw['format_version']!r}, keys {sorted(raw)})")
    try:
        config = json.loads(raw["config"])
    except (TypeError, ValueError) as e:
        raise WeightsFileError(f"{path}: the checkpoint's config is not JSON ({e})") from e
    return 1, config, raw["state"]


def available() -> list[str]:
    """Names of the shipped pretrained optimizers."""
    return sorted(p.name[: -len(SUFFIX)] for p in PRETRAINED_DIR.glob(f"*{SUFFIX}"))


def pretrained_path(name: str | os.PathLike) -> Path:
    """The file of a shipped name, or ``name`` itself if it is a path to a ``.msgpack`` file."""
    name = os.fspath(name)
    if os.sep in name or name.endswith(SUFFIX):
        return Path(name)
    path = PRETRAINED_DIR / f"{name}{SUFFIX}"
    if not path.exists():
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: "
                         f"{', '.join(available())}")
    return path


def read_pretrained(name: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, theta)`` of a shipped name or a file; theta as nested dicts of float32
    numpy arrays. The same content as the JAX side's ``learnopt.pretrained.read``."""
    path = pretrained_path(name)
    version, config, state = read_checkpoint(path)
    if version == 0:
        if not isinstance(state, dict) or set(state) != {"metadata", "theta"}:
            raise WeightsFileError(f"{path}: not a pretrained optimizer file (keys "
                                   f"{sorted(state) if isinstance(state, dict) else state})")
        metadata, theta = json.loads(state["metadata"]), state["theta"]
    else:
        metadata, theta = config, state
    if not isinstance(metadata, dict) or "architecture" not in metadata:
        raise WeightsFileError(f"{path}: its metadata does not name the 'architecture'")
    return metadata, _float32_tree(theta)


def _float32_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _float32_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)
