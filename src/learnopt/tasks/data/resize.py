"""Resizing image sets to 8x8, 14x14, 16x16 or 28x28, cached on disk.

Each spatial axis is resized by a linear map (a matrix applied along that axis, computed in
float64, in chunks of images):

* **downsampling** (the usual case, e.g. 28 -> 14, 8, 16): exact **area averaging**. Output
  pixel ``i`` averages the input interval ``[i * s, (i + 1) * s)`` with ``s = in / out``,
  each input pixel weighted by its overlap, so 28 -> 14 gives exactly the 2x2 block means and
  a constant image stays constant. Unlike ``jax.image.resize``'s antialiased triangle
  kernel, no neighbouring block leaks in.
* **upsampling** (e.g. the 8x8 digits to 16 or 28): **bilinear** with half-pixel centres and
  clamped edges (what ``jax.image.resize(..., "linear")`` does for upsampling).

Inputs are uint8 (N, H, W) or (N, H, W, C) images, divided by 255; floating inputs are taken
to be in [0, 1] already. The output is float32 in [0, 1], (N, size, size[, C]).

Results are cached as ``cache_dir()/resized_{name}_{split}_{size}px_{digest}.npz`` (written
atomically: temp file, then ``os.replace``), where ``digest`` is a hash of the input shape,
dtype and bytes, so two different arrays can never share a cache entry even under the same
name and split. A later call with the same images reads the file instead of resizing.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

import learnopt.tasks.data.cache as cache
import learnopt.tasks.data.paths as paths

SIZES = (8, 14, 16, 28)
_CHUNK = 4096


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix resizing one axis: area averaging when shrinking (or
    equal), bilinear with half-pixel centres when enlarging. Each row sums to 1."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    m = np.zeros((n_out, n_in), np.float64)
    if n_out <= n_in:
        scale = n_in / n_out
        edges = np.arange(n_out + 1) * scale
        for i in range(n_out):
            lo, hi = edges[i], edges[i + 1]
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                m[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    else:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        j0 = np.floor(src).astype(int)
        j1 = np.minimum(j0 + 1, n_in - 1)
        frac = src - j0
        np.add.at(m, (np.arange(n_out), j0), 1 - frac)
        np.add.at(m, (np.arange(n_out), j1), frac)
    return m


def _check(images: np.ndarray, size: int) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, H, W[, C]) images to (N, size, size[, C]) float32 in [0, 1] (no caching)."""
    images = np.asarray(images)
    _check(images, size)
    scale = 1 / 255 if images.dtype == np.uint8 else 1.0
    rows = resize_matrix(images.shape[1], size)
    cols = resize_matrix(images.shape[2], size)
    out = np.empty((images.shape[0], size, size, *images.shape[3:]), np.float32)
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].astype(np.float64) * scale
        x = np.einsum("oh,nhw...->now...", rows, x, optimize=True)
        x = np.einsum("pw,now...->nop...", cols, x, optimize=True)
        out[start : start + _CHUNK] = np.clip(x, 0.0, 1.0)
    return out


def _digest(images: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{images.shape}|{images.dtype.str}|".encode())
    h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    return h.hexdigest()


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", part) or "-"


def resized_cache_path(name: str, images: np.ndarray, size: int, split: str | None = None) -> Path:
    """The cache file :func:`resized_images` uses for these arguments."""
    split_part = _safe(split) if split else "all"
    filename = f"resized_{_safe(name)}_{split_part}_{size}px_{_digest(np.asarray(images))}.npz"
    return paths.cache_dir() / filename


def resized_images(
    name: str,
    images: np.ndarray,
    size: int,
    split: str | None = None,
    *,
    use_cache: bool = True,
) -> np.ndarray:
    """``images`` of data set ``name`` (split ``split``) resized to ``size`` x ``size``.

    Returns float32 in [0, 1] of shape (N, size, size[, C]), read from the on-disk cache when
    this exact input was resized before, else computed and cached. ``size`` must be one of
    8, 14, 16, 28 (ValueError otherwise).
    """
    images = np.asarray(images)
    _check(images, size)
    if not use_cache:
        return resize_images(images, size)
    path = resized_cache_path(name, images, size, split)
    cached = cache.load_npz(path)
    expected = (images.shape[0], size, size, *images.shape[3:])
    if cached is not None and "images" in cached and cached["images"].shape == expected:
        return cached["images"]
    out = resize_images(images, size)
    cache.save_npz(path, {"images": out})
    return out
