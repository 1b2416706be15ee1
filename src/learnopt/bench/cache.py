"""Baseline training curves cached on disk, so a second benchmark run reuses them.

VeLO's speedup metric (Metz et al. 2022, VeLO, arXiv:2211.09760, §4.1.2, App. F.1) needs
every task's learning-rate-tuned Adam baseline, many learning rates by several seeds, run
longer than the optimizer under test. Those runs cost more than the evaluation itself and
do not change between evaluations, so each (task, optimizer, hyperparameters, steps, seed)
run is stored once.

**Layout.** One file per run, ``<root>/<task>/<digest>.npz`` (the task name made safe for a
path), written atomically. It holds ``curve``, the float32 per-step training loss of the
run (NaN and inf kept), and ``meta``, a JSON string ``{"key": <key fields>, "extra": ...}``
so that every file says what it is. ``digest`` is the sha256 of the key fields as
canonical JSON (sorted keys, floats by ``repr`` so ``1e-3`` and ``0.001`` agree, numpy
scalars as Python numbers), including :data:`CACHE_VERSION`.

**Lookup.** :meth:`BaselineCache.get` searches ``root``, then each ``read_only`` directory
(e.g. a cache committed in a repository); it never writes to the latter. A file that
cannot be read, or whose key fields or curve length do not match, is a miss with a
:class:`CacheWarning` naming it, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from learnopt.io import atomic_write_bytes

CACHE_VERSION = 1


class CacheWarning(UserWarning):
    """A cache file was unreadable or did not match its key; it was treated as a miss."""


@dataclasses.dataclass
class CachedRun:
    """One cached run: its float32 per-step training loss and JSON ``extra`` data."""

    curve: np.ndarray
    extra: dict[str, Any]


def _plain(obj: Any) -> Any:
    """``obj`` as plain JSON types; numpy scalars and arrays become Python numbers/lists."""
    if isinstance(obj, np.ndarray):
        return [_plain(x) for x in obj.tolist()] if obj.ndim else _plain(obj.item())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        # str gives the shortest decimal of the value's own precision: float32(1e-3) -> 0.001
        return float(str(obj))
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    raise TypeError(f"cannot use a {type(obj).__name__} in a cache key or extra: {obj!r}")


def _canonical(obj: Any) -> str:
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))


def _safe_name(task: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", task).lstrip(".")
    return name or "_"


class BaselineCache:
    """Per-run baseline curves under ``root``, falling back on ``read_only`` directories.

    ``hits`` and ``misses`` count the results of :meth:`get`. ``root`` is created on the
    first :meth:`put`.
    """

    def __init__(
        self, root: str | os.PathLike, read_only: Sequence[str | os.PathLike] = ()
    ) -> None:
        self.root = Path(root)
        self.read_only = [Path(d) for d in read_only]
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _fields(task, optimizer, hparams, steps, seed, fingerprint) -> dict[str, Any]:
        return _plain(
            {
                "version": CACHE_VERSION,
                "task": task,
                "optimizer": optimizer,
                "hparams": dict(hparams),
                "steps": int(steps),
                "seed": int(seed),
                "fingerprint": fingerprint,
            }
        )

    def key(
        self,
        task: str,
        optimizer: str,
        hparams: Mapping[str, Any],
        steps: int,
        seed: int,
        fingerprint: str = "",
    ) -> str:
        """The hex sha256 digest naming this run's file."""
        fields = self._fields(task, optimizer, hparams, steps, seed, fingerprint)
        return hashlib.sha256(_canonical(fields).encode("utf-8")).hexdigest()

    def path(
        self,
        task: str,
        optimizer: str,
        hparams: Mapping[str, Any],
        steps: int,
        seed: int,
        fingerprint: str = "",
        root: str | os.PathLike | None = None,
    ) -> Path:
        """Where this run's file lives under ``root`` (default: the writable root)."""
        digest = self.key(task, optimizer, hparams, steps, seed, fingerprint)
        return Path(self.root if root is None else root) / _safe_name(task) / f"{digest}.npz"

    def get(
        self,
        task: str,
        optimizer: str,
        hparams: Mapping[str, Any],
        steps: int,
        seed: int,
        fingerprint: str = "",
    ) -> CachedRun | None:
        """The cached run, from ``root`` or else a ``read_only`` directory; None on a miss."""
        fields = self._fields(task, optimizer, hparams, steps, seed, fingerprint)
        for directory in [self.root, *self.read_only]:
            file = self.path(task, optimizer, hparams, steps, seed, fingerprint, directory)
            if not file.is_file():
                continue
            run = self._load(file, fields)
            if run is not None:
                self.hits += 1
                return run
        self.misses += 1
        return None

    @staticmethod
    def _load(file: Path, fields: dict[str, Any]) -> CachedRun | None:
        try:
            with np.load(file, allow_pickle=False) as data:
                curve = np.asarray(data["curve"], dtype=np.float32)
                meta = json.loads(str(data["meta"]))
            problem = None
            if _canonical(meta["key"]) != _canonical(fields):
                problem = f"key fields {meta['key']} do not match {fields}"
            elif curve.shape != (fields["steps"],):
                problem = f"curve shape {curve.shape} is not ({fields['steps']},)"
            extra = meta.get("extra") or {}
            if problem is None and not isinstance(extra, dict):
                problem = f"extra is a {type(extra).__name__}, not a JSON object"
        except Exception as e:  # a cache must never crash a benchmark
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is not None:
            warnings.warn(f"ignoring cache file {file}: {problem}", CacheWarning, stacklevel=3)
            return None
        return CachedRun(curve=curve, extra=extra)

    def put(
        self,
        task: str,
        optimizer: str,
        hparams: Mapping[str, Any],
        steps: int,
        seed: int,
        curve: np.ndarray,
        extra: Mapping[str, Any] | None = None,
        fingerprint: str = "",
    ) -> Path:
        """Store one run's per-step loss ``curve`` (length ``steps``) in ``root``."""
        curve = np.asarray(curve, dtype=np.float32)
        if curve.shape != (int(steps),):
            raise ValueError(f"curve must have shape ({steps},), got {curve.shape}")
        fields = self._fields(task, optimizer, hparams, steps, seed, fingerprint)
        meta = json.dumps({"key": fields, "extra": _plain(dict(extra or {}))}, sort_keys=True)
        buf = io.BytesIO()
        np.savez(buf, curve=curve, meta=np.array(meta))
        file = self.path(task, optimizer, hparams, steps, seed, fingerprint)
        return atomic_write_bytes(file, buf.getvalue())
