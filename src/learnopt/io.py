"""Files: atomic writes, versioned checkpoints and a description of the machine.

**Atomic writes.** :func:`atomic_open` (and :func:`atomic_write_bytes`,
:func:`atomic_write_text`, :func:`atomic_write_json` on top of it) writes to a temporary
file in the destination directory, flushes and fsyncs it, then moves it into place with
``os.replace``. A reader (another process, a run resumed after a kill) sees the old file,
the new file or nothing, never half a file; a failed write leaves no temporary file behind.

**Strict JSON.** Python's ``json`` writes NaN and infinities as the bare words ``NaN`` and
``Infinity``, which are not JSON (RFC 8259) and which strict readers (``jq``, JavaScript,
``json.loads(..., parse_constant=...)``) refuse. :func:`finite_json` replaces every
non-finite float by ``null`` and says where it did; :func:`dumps_json` and
:func:`atomic_write_json` write only strictly valid JSON.

**Checkpoints.** :func:`save_checkpoint` writes one msgpack file (``flax.serialization``)
holding a pytree ``state``, the ``config`` that produced it (a JSON object) and a format
version::

    {"format_version": 1, "config": "<JSON text>", "state": <state dict of the pytree>}

:func:`load_checkpoint` reads it back, restored onto a ``template`` pytree when one is
given. Files written before format versions existed (a bare msgpack'd pytree, the format of
meta-training checkpoints and the first shipped pretrained optimizers) read as format
version 0, with no config. A file that is not msgpack, is cut short, has an unknown format
version or does not match the template raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

# The version save_checkpoint writes. load_checkpoint reads it and format 0, a bare msgpack'd
# pytree without config (files written before format versions).
CHECKPOINT_FORMAT_VERSION = 1


# --- atomic writes --------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` atomically on a clean exit.

    The temporary file lives in ``path``'s directory (created if missing), so the final
    ``os.replace`` is a rename within one file system. ``mode`` sets the permissions
    (``tempfile`` would leave 0600). If the block raises, ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Write ``obj`` as strict JSON (with a final newline) to ``path`` atomically; returns
    the path. Non-finite floats are written as ``null`` (:func:`finite_json`)."""
    return atomic_write_text(path, dumps_json(obj, indent=indent, sort_keys=sort_keys) + "\n")


# --- strict JSON ----------------------------------------------------------------------------


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, and where.

    Walks dicts, lists and tuples; numpy scalars and 0-d arrays become Python numbers. The
    second value lists the replaced entries as paths: ``"meta_loss"``, ``"a.b"``,
    ``"curve[3]"`` (empty if every number was finite).
    """
    import numpy as np

    if isinstance(obj, np.generic | np.ndarray) and np.ndim(obj) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [where or "value"])
    if isinstance(obj, Mapping):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = finite_json(v, f"{where}.{k}" if where else str(k))
            bad += b
        return out, bad
    if isinstance(obj, list | tuple):
        out, bad = [], []
        for i, v in enumerate(obj):
            value, b = finite_json(v, f"{where}[{i}]")
            out.append(value)
            bad += b
        return out, bad
    return obj, []


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` with non-finite floats as ``null``: always strict JSON."""
    return json.dumps(finite_json(obj)[0], allow_nan=False, **kwargs)


# --- checkpoints ----------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: corrupt, unknown format version, wrong shape.

    The message names the file; ``reason`` is the message without the advice on what to do
    (``fix``) that may follow it.
    """

    def __init__(self, reason: str, fix: str | None = None):
        super().__init__(reason if fix is None else f"{reason}; {fix}")
        self.reason = reason


# What to do about an unreadable checkpoint file (the end of CheckpointError's message).
_FIX = ("replace it with a good copy, or delete it: a meta-training run then resumes from its "
        "previous checkpoint_<step>.msgpack, or starts over if it has none")


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    ``state`` is restored onto the template if one was given, else it is the raw state
    dict (nested dicts of numpy arrays and scalars). ``config`` is the saved JSON object
    (``None`` for format version 0).
    """

    state: Any
    config: dict[str, Any] | None
    format_version: int


def checkpoint_bytes(state: Any, config: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_checkpoint` writes (deterministic for equal inputs)."""
    from flax import serialization

    blob = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": json.dumps(dict(config) if config is not None else None, sort_keys=True),
        "state": serialization.to_state_dict(state),
    }
    return serialization.msgpack_serialize(blob)


def save_checkpoint(
    path: str | os.PathLike, state: Any, config: Mapping[str, Any] | None = None
) -> Path:
    """Write the pytree ``state`` and its ``config`` (JSON-ready) to ``path`` atomically."""
    return atomic_write_bytes(path, checkpoint_bytes(state, config))


def load_checkpoint(path: str | os.PathLike, template: Any = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (or a format-0 file).

    With ``template`` (a pytree of the saved structure, e.g. a fresh initial state) the
    state comes back with the template's containers (NamedTuples, dataclasses).
    Raises ``FileNotFoundError`` if ``path`` is missing and :class:`CheckpointError`
    naming ``path`` if it is unreadable, of an unknown format version, or does not match
    ``template``.
    """
    from flax import serialization

    path = Path(path)
    data = path.read_bytes()
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, ...
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt or cut short: {e})", _FIX
        ) from e
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint (holds a {type(raw).__name__}, not a mapping)", _FIX
        )
    if "format_version" in raw:
        version = raw["format_version"]
        if type(version) is not int or version != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unknown checkpoint format version {version!r}; this version of "
                f"learnopt reads format {CHECKPOINT_FORMAT_VERSION} (and unversioned files)"
            )
        if set(raw) != {"format_version", "config", "state"}:
            raise CheckpointError(
                f"{path}: checkpoint format {version} needs keys format_version, config, "
                f"state; found {', '.join(sorted(raw))}"
            )
        try:
            config = json.loads(raw["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the checkpoint's config is not JSON ({e})") from e
        state = raw["state"]
    else:
        state, config, version = raw, None, 0
    if template is not None:
        state = restore_state(template, state, source=str(path))
    return Checkpoint(state, config, version)


def restore_state(template: Any, state_dict: Any, source: str = "checkpoint") -> Any:
    """``state_dict`` (as saved) onto ``template``'s structure, checking every leaf's shape.

    ``template`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``).
    Raises :class:`CheckpointError` starting with ``source`` (a file name) on a mismatch.
    """
    import jax
    import numpy as np
    from flax import serialization

    try:
        state = serialization.from_state_dict(template, state_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: the checkpoint does not match the expected "
                              f"structure ({e})") from e
    want = jax.tree_util.tree_leaves_with_path(template)
    got = jax.tree_util.tree_leaves(state)
    if len(want) != len(got):
        raise CheckpointError(f"{source}: the checkpoint has {len(got)} arrays where "
                              f"{len(want)} are expected")
    def shape(x: Any) -> tuple[int, ...]:
        return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)

    for (where, a), b in zip(want, got, strict=True):
        if shape(a) != shape(b):
            raise CheckpointError(
                f"{source}: {jax.tree_util.keystr(where)} has shape {shape(b)} in the "
                f"checkpoint, expected {shape(a)}"
            )
    return state


# --- the machine ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where a result was measured: OS, processor, core count, Python, JAX and its devices."""
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
