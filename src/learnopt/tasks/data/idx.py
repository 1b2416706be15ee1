"""A reader (and writer) for the IDX format of MNIST, Fashion-MNIST and friends.

An IDX file is a 4-byte magic number ``00 00 TT NN`` (``TT`` the element type, ``NN`` the
number of dimensions), then ``NN`` big-endian uint32 sizes, then the elements in C order,
big-endian. Files may be gzip-compressed; that is detected from the content, not the name.

:func:`load_mnist_dir` reads the four standard files of a directory: the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or a user's own MNIST copy.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import IO

import numpy as np

# IDX element type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# split -> (images file, labels file), without the optional .gz suffix.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IdxFormatError(ValueError):
    """A file is not a well-formed IDX file."""


def _open(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == _GZIP_MAGIC else open(path, "rb")


def _read_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = f.read(4)
    if len(magic) < 4:
        raise IdxFormatError(f"{path}: file too short for an IDX header ({len(magic)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000TTNN with type TT in "
            f"{{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} and NN >= 1 dimensions); "
            "is this an IDX file?"
        )
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise IdxFormatError(f"{path}: file ends inside the IDX header ({ndim} dimensions)")
    return IDX_DTYPES[code], struct.unpack(f">{ndim}I", dims)


def idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """The element dtype (native byte order) and shape of an IDX file, reading only its header."""
    path = Path(path)
    with _open(path) as f:
        dtype, shape = _read_header(f, path)
    return dtype.newbyteorder("="), shape


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (raw or gzip), in native byte order.

    Raises :class:`IdxFormatError` for a bad magic number, a truncated file or trailing bytes.
    """
    path = Path(path)
    with _open(path) as f:
        dtype, shape = _read_header(f, path)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = f.read(expected + 1)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: IDX data {what}: header says shape {shape} of {dtype} ({expected} bytes)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX has no element type for dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    code = codes[native]
    payload = (
        struct.pack(">HBB", 0, code, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    )
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path:
    """``directory/stem`` or ``directory/stem.gz`` (also the ``train-images.idx3-ubyte``
    spelling some mirrors use); FileNotFoundError naming the candidates otherwise."""
    directory = Path(directory)
    alt = stem.replace("-idx", ".idx")
    candidates = [directory / name for name in (stem, stem + ".gz", alt, alt + ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no IDX file {stem}[.gz] in {directory} (looked for: "
        f"{', '.join(c.name for c in candidates[:2])})"
    )


def mnist_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The four files of an MNIST-format directory by key (``train_images``, ...)."""
    files = {}
    for split, (images, labels) in MNIST_FILES.items():
        files[f"{split}_images"] = find_idx_file(directory, images)
        files[f"{split}_labels"] = find_idx_file(directory, labels)
    return files


def load_mnist_dir(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an MNIST-format directory: the four standard files, each raw or ``.gz``.

    Returns ``{"train_images": uint8 (N, H, W), "train_labels": uint8 (N,), "test_images",
    "test_labels"}`` (28x28 for MNIST and Fashion-MNIST).
    """
    files = mnist_files(path)
    out = {key: read_idx(file) for key, file in files.items()}
    for split in MNIST_FILES:
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxFormatError(
                f"{files[f'{split}_images']}: expected uint8 images (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise IdxFormatError(
                f"{files[f'{split}_labels']}: expected uint8 labels (N,), "
                f"got {labels.dtype} {labels.shape}"
            )
        if len(images) != len(labels):
            raise IdxFormatError(
                f"{path}: {split} has {len(images)} images but {len(labels)} labels"
            )
    return out
