"""A reader for the python-pickle version of CIFAR-10 (``cifar-10-python.tar.gz``).

The extracted directory ``cifar-10-batches-py`` holds ``data_batch_1`` .. ``data_batch_5``
(10,000 images each) and ``test_batch``: each a pickled dict with ``b"data"``, a uint8
array (N, 3072) whose rows are the red, then green, then blue 32x32 planes, and
``b"labels"``, a list of N ints in 0..9. No package ships CIFAR-10, so this only reads a copy
the user already has (``$LEARNOPT_CIFAR10_DIR``). The files are pickles: only point this at
files from a source you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

CIFAR10_SUBDIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def cifar10_batches_dir(path: str | os.PathLike) -> Path:
    """``path`` itself if it holds the batch files, else ``path/cifar-10-batches-py``."""
    path = Path(path)
    if not (path / TEST_BATCH).is_file() and (path / CIFAR10_SUBDIR / TEST_BATCH).is_file():
        return path / CIFAR10_SUBDIR
    return path


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images uint8 (N, 32, 32, 3) (HWC) and labels uint8 (N,)."""
    path = Path(path)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data', b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{path}: labels out of range 0..255")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.uint8)


def cifar10_files(path: str | os.PathLike) -> dict[str, list[Path]]:
    """The batch files by split; FileNotFoundError naming the first missing one."""
    directory = cifar10_batches_dir(path)
    files = {
        "train": [directory / name for name in TRAIN_BATCHES],
        "test": [directory / TEST_BATCH],
    }
    for file in files["train"] + files["test"]:
        if not file.is_file():
            raise FileNotFoundError(
                f"no CIFAR-10 batch {file.name} in {directory} (expected {', '.join(TRAIN_BATCHES)}"
                f" and {TEST_BATCH}, the python version, in {CIFAR10_SUBDIR}/)"
            )
    return files


def load_cifar10_dir(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read CIFAR-10 from ``path`` (``cifar-10-batches-py`` or the directory containing it).

    Returns ``{"train_images": uint8 (50000, 32, 32, 3), "train_labels": uint8 (50000,),
    "test_images": uint8 (10000, 32, 32, 3), "test_labels"}``; the training batches are
    concatenated in order 1..5.
    """
    out = {}
    for split, files in cifar10_files(path).items():
        parts = [read_cifar_batch(file) for file in files]
        out[f"{split}_images"] = np.concatenate([images for images, _ in parts])
        out[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
    return out
