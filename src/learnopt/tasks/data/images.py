"""Image data sets that come with Python packages: sklearn's 8x8 digits and MNIST-1D.

Both return the same dict as the file loaders, ``{"train_images", "train_labels",
"test_images", "test_labels"}``, with uint8 labels.

* **digits** (``sklearn.datasets.load_digits``, bundled with scikit-learn, offline): 1797
  real 8x8 handwritten digits with pixel values 0..16. They are converted to **uint8 0..255**
  (``round(v * 255 / 16)``), like every other image set here, so that
  :func:`learnopt.tasks.data.resize.resized_images` and ``/ 255`` normalisation treat all
  image sets alike. sklearn has no train/test split; we use a fixed seeded permutation
  (seed 0): 1437 train, 360 test (20%).
* **mnist1d** (package ``mnist1d``): generated locally with
  ``make_dataset(get_dataset_args())``, never ``get_dataset`` (which downloads a pickle).
  Images are float32 signals of length 40, standardised over the data set (mean 0, std 1, not
  in [0, 1]); 4000 train and 1000 test by default. Generation takes a couple of seconds, so
  the result is cached as ``cache_dir()/mnist1d_seed{seed}_n{num_samples}.npz``.
"""

from __future__ import annotations

import importlib.metadata
import random
from pathlib import Path

import numpy as np

import learnopt.tasks.data.cache as cache
import learnopt.tasks.data.paths as paths

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
MNIST1D_DEFAULT_SEED = 42  # the seed of mnist1d's get_dataset_args()
MNIST1D_DEFAULT_NUM_SAMPLES = 5000
IMAGE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def load_digits() -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits as uint8 0..255: train (1437, 8, 8), test (360, 8, 8)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = np.clip(images, 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target).astype(np.uint8)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    test, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
    }


def mnist1d_cache_path(
    seed: int = MNIST1D_DEFAULT_SEED, num_samples: int = MNIST1D_DEFAULT_NUM_SAMPLES
) -> Path:
    """Where :func:`load_mnist1d` caches a generated data set."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return paths.cache_dir() / f"mnist1d_seed{seed}_n{num_samples}_v{version}.npz"


def generate_mnist1d(
    seed: int = MNIST1D_DEFAULT_SEED, num_samples: int = MNIST1D_DEFAULT_NUM_SAMPLES
) -> dict[str, np.ndarray]:
    """Generate MNIST-1D locally (no cache). Leaves the global ``random``/``np.random`` state
    as it found it (``make_dataset`` reseeds both)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(seed)
    args.num_samples = int(num_samples)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "train_images": np.asarray(data["x"], dtype=np.float32),
        "train_labels": np.asarray(data["y"]).astype(np.uint8),
        "test_images": np.asarray(data["x_test"], dtype=np.float32),
        "test_labels": np.asarray(data["y_test"]).astype(np.uint8),
    }


def load_mnist1d(
    seed: int = MNIST1D_DEFAULT_SEED,
    num_samples: int = MNIST1D_DEFAULT_NUM_SAMPLES,
    *,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """MNIST-1D, from the cache if generated before: train (4000, 40), test (1000, 40) float32
    by default. Other seeds give other (equally valid) draws of the data set."""
    path = mnist1d_cache_path(seed, num_samples)
    if use_cache:
        cached = cache.load_npz(path)
        if cached is not None and set(cached) == set(IMAGE_KEYS):
            return cached
    data = generate_mnist1d(seed, num_samples)
    if use_cache:
        cache.save_npz(path, data)
    return data
