"""Offline datasets: loaders and the data registry.

Nothing here downloads: ``scripts/setup.sh`` (``make setup``) installs the data, and the
loaders only read it. Entry points:

* :func:`load` / :func:`describe` / :func:`format_table` (the registry, :mod:`.registry`);
* :func:`resized_images` (8/14/16/28-pixel float32 copies of image sets, cached on disk);
* :func:`char_vocab`, :func:`encode`, :func:`decode` (character-level tokens) and the
  byte-level fallback :func:`encode_bytes`, :func:`decode_bytes`;
* the file readers :func:`load_mnist_dir` (IDX) and :func:`load_cifar10_dir` (pickles);
* :func:`data_dir`, :func:`cache_dir`, :func:`fashion_mnist_dir` (locations, see :mod:`.paths`).

Heavy optional imports (scikit-learn, mnist1d, rdata) happen inside the loaders.
"""

from learnopt.tasks.data.cifar import load_cifar10_dir
from learnopt.tasks.data.idx import IdxFormatError, load_mnist_dir, read_idx, write_idx
from learnopt.tasks.data.paths import cache_dir, data_dir, fashion_mnist_dir
from learnopt.tasks.data.registry import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetRow,
    describe,
    format_table,
    is_present,
    load,
    names,
)
from learnopt.tasks.data.resize import SIZES, resized_images
from learnopt.tasks.data.text import (
    char_vocab,
    decode,
    decode_bytes,
    encode,
    encode_bytes,
)

__all__ = [
    "DATASETS",
    "SIZES",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetRow",
    "IdxFormatError",
    "cache_dir",
    "char_vocab",
    "data_dir",
    "decode",
    "decode_bytes",
    "describe",
    "encode",
    "encode_bytes",
    "fashion_mnist_dir",
    "format_table",
    "is_present",
    "load",
    "load_cifar10_dir",
    "load_mnist_dir",
    "names",
    "read_idx",
    "resized_images",
    "write_idx",
]
