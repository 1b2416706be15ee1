"""A reader for R lazy-load databases (``Rdata.rdb`` + ``Rdata.rdx``) without R.

R packages store their data sets as a lazy-load DB: the ``.rdx`` index is a serialized R
list (``variables``: name -> (offset, length) into the ``.rdb``; ``references``;
``compressed``). The file is gzip-compressed R serialization, as ``saveRDS`` writes it; the
4-byte big-endian length + zlib framing of ``.rdb`` records is accepted too. Each ``.rdb``
record at those offsets is a 4-byte big-endian uncompressed length followed by a zlib stream
(or, for ``compress = 2/3`` DBs, a type byte ``'0'``/``'1'``/``'2'``/``'Z'`` then raw, zlib,
bzip2 or xz data). Both decode with the ``rdata`` package (``rdata.parser.parse_data``, then
``rdata.conversion.convert``), imported lazily.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Any


class RLazyLoadError(ValueError):
    """A file is not a readable R lazy-load database."""


def _unserialize(payload: bytes) -> Any:
    import rdata

    parsed = rdata.parser.parse_data(payload, extension=".rds")
    return rdata.conversion.convert(parsed)


def _decompress_record(record: bytes, where: str) -> bytes:
    if len(record) < 5:
        raise RLazyLoadError(f"{where}: record of {len(record)} bytes is too short")
    (length,) = struct.unpack(">I", record[:4])
    kind, rest = record[4:5], record[5:]
    try:
        if kind == b"Z":
            body = lzma.decompress(rest)
        elif kind == b"2":
            body = bz2.decompress(rest)
        elif kind == b"1":
            body = zlib.decompress(rest)
        elif kind == b"0":
            body = rest
        else:
            body = zlib.decompress(record[4:])
    except (zlib.error, lzma.LZMAError, OSError) as e:
        raise RLazyLoadError(f"{where}: cannot decompress record: {e}") from e
    if len(body) != length:
        raise RLazyLoadError(
            f"{where}: record decompresses to {len(body)} bytes, header says {length}"
        )
    return body


def read_rdx(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """The index of a lazy-load DB: variable name -> (offset, length) in the ``.rdb``."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        payload = gzip.decompress(raw)
    elif raw[:2] in (b"X\n", b"A\n", b"B\n"):
        payload = raw
    else:
        payload = _decompress_record(raw, str(path))
    index = _unserialize(payload)
    try:
        variables = index["variables"]
        return {str(name): (int(v[0]), int(v[1])) for name, v in variables.items()}
    except (KeyError, TypeError, IndexError) as e:
        raise RLazyLoadError(f"{path}: no 'variables' index in this .rdx ({e!r})") from e


def read_lazyload_db(stem: str | os.PathLike, names: list[str] | None = None) -> dict[str, Any]:
    """Decode the variables of the lazy-load DB ``stem.rdb`` / ``stem.rdx``.

    ``stem`` is e.g. ``.../janeaustenr/data/Rdata``; ``names`` restricts which variables are
    decoded (all by default). Values are what ``rdata.conversion.convert`` returns (a numpy
    array for an R vector).
    """
    stem = Path(stem)
    rdb, rdx = stem.with_name(stem.name + ".rdb"), stem.with_name(stem.name + ".rdx")
    index = read_rdx(rdx)
    if names is not None:
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise KeyError(f"{rdx}: no variables {unknown}; has {sorted(index)}")
        index = {name: index[name] for name in names}
    out = {}
    with open(rdb, "rb") as f:
        for name, (offset, length) in index.items():
            f.seek(offset)
            record = f.read(length)
            if len(record) != length:
                raise RLazyLoadError(f"{rdb}: record {name!r} runs past the end of the file")
            out[name] = _unserialize(_decompress_record(record, f"{rdb}[{name}]"))
    return out
