"""Atomic on-disk caching of derived arrays and small JSON records.

Writers go to a temporary file in the destination directory and are moved into place with
``os.replace``, so a reader (another process, an interrupted run) sees either the old file,
the new file or nothing, never half a file. Readers treat an unreadable file as a miss.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from learnopt.io import atomic_open


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` (uncompressed .npz) atomically; returns the path."""
    path = Path(path)
    with atomic_open(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz file, or None if it is missing or unreadable (a cache miss)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_json(path: str | os.PathLike, record: Any) -> Path:
    """Write ``record`` as JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_open(path) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
    return path


def load_json(path: str | os.PathLike) -> Any | None:
    """The JSON content of ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
