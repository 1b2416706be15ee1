"""Data for the sampled VeLO task families, with offline substitutes for the paper's data sets.

VeLO (Metz et al. 2022, VeLO, arXiv:2211.09760) App. C.3 samples image tasks uniformly over
MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 and 16x16 ImageNet, and language tasks over LM1B and
English Wikipedia, each as bytes or as a 32K-token vocabulary truncated to a sampled size. None
of CIFAR-100, ImageNet, LM1B or Wikipedia can be installed offline (``learnopt data`` lists what
is), and MNIST / CIFAR-10 only when the user supplies the files. A config therefore records both
the paper's name (``paper_dataset``) and the registry data set actually used (``dataset``), and
:data:`DATASET_SUBSTITUTES` is the default mapping:

=====================  ============================  ==========================================
paper data set         substitute                    why
=====================  ============================  ==========================================
mnist                  ``digits`` (8x8, resized)     real handwritten digits, 10 classes
fashion_mnist          ``fashion_mnist``             the same data set
cifar10                ``fashion_mnist``             the hardest installed natural-image set
cifar100               ``mnist1d`` (as an image)     a third, different 10-class distribution
imagenet16             ``mnist1d`` (as an image)     (no 100- or 1000-class set is installable)
lm1b_bytes             ``shakespeare`` as bytes      byte-level LM, vocabulary 256
lm1b_32k               ``kjv`` as words              a word vocabulary truncated like the 32K one
wikipedia_en_bytes     ``austen`` as bytes           byte-level LM on modern-ish prose
wikipedia_en_32k       ``austen`` as words           word vocabulary, truncated
=====================  ============================  ==========================================

Pass another mapping to a family (``substitutes=``) to use, e.g., ``{"cifar10": "cifar10"}``
when the CIFAR-10 files are present.

Images are float32 in [0, 1] of shape ``(N, size, size, channels)`` at any ``size``: each axis
is resized by :func:`learnopt.tasks.data.resize.resize_matrix` (area averaging down, bilinear
up). MNIST-1D's standardised length-40 signals are min-max scaled to [0, 1] (train-set min
and max, test clipped), resampled to length ``size`` and repeated along the rows, giving a
``size x size`` image that varies only along its width.

Text ``bytes`` are the UTF-8 bytes (vocabulary 256). ``words`` are lower-cased words and
single punctuation marks, numbered by decreasing frequency from 1 (0 is reserved, as the
released code reserves it for padding); ids ``>= vocab_size`` are folded to
``1 + id % (vocab_size - 1)``, the released code's modulo truncation of its 32K vocabulary
(it compares with ``>`` and so lets id ``vocab_size`` through; we use ``>=``).

``synthetic_*`` build random in-memory data of the same shapes, for tests and for timing
(step time does not depend on the values).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import numpy as np

from learnopt.tasks.base import ArraySplit, Datasets, split_indices
from learnopt.tasks.language import text_datasets as _text_datasets

PAPER_IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet16")
PAPER_TEXT_DATASETS = ("lm1b_32k", "lm1b_bytes", "wikipedia_en_32k", "wikipedia_en_bytes")

DATASET_SUBSTITUTES: dict[str, str] = {
    "mnist": "digits",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "fashion_mnist",
    "cifar100": "mnist1d",
    "imagenet16": "mnist1d",
    "lm1b_bytes": "shakespeare",
    "lm1b_32k": "kjv",
    "wikipedia_en_bytes": "austen",
    "wikipedia_en_32k": "austen",
}

# (channels, number of classes) of each registry image set.
IMAGE_INFO: dict[str, tuple[int, int]] = {
    "fashion_mnist": (1, 10),
    "digits": (1, 10),
    "mnist1d": (1, 10),
    "mnist": (1, 10),
    "cifar10": (3, 10),
}
TEXT_CORPORA = ("shakespeare", "kjv", "austen")
BYTE_VOCAB = 256


def text_tokenizer(paper_dataset: str) -> str:
    """``"bytes"`` or ``"words"``: the tokenisation a paper text data set name implies."""
    if paper_dataset not in PAPER_TEXT_DATASETS:
        raise ValueError(
            f"unknown text data set {paper_dataset!r}; valid: {', '.join(PAPER_TEXT_DATASETS)}"
        )
    return "bytes" if paper_dataset.endswith("_bytes") else "words"


def _resize_axis_images(images: np.ndarray, size: int) -> np.ndarray:
    from learnopt.tasks.data.resize import resize_matrix

    rows = resize_matrix(images.shape[1], size)
    cols = resize_matrix(images.shape[2], size)
    out = np.empty((images.shape[0], size, size, *images.shape[3:]), np.float32)
    for start in range(0, len(images), 4096):
        x = images[start : start + 4096].astype(np.float64)
        x = np.einsum("oh,nhw...->now...", rows, x, optimize=True)
        x = np.einsum("pw,now...->nop...", cols, x, optimize=True)
        out[start : start + 4096] = np.clip(x, 0.0, 1.0)
    return out


@functools.lru_cache(maxsize=2)
def image_arrays(name: str, size: int) -> dict[str, np.ndarray]:
    """``{"train_images", "train_labels", "test_images", "test_labels"}`` of registry image
    set ``name`` at ``size x size``, float32 in [0, 1], channel axis last (cached in memory)."""
    from learnopt.tasks.data import registry

    if name not in IMAGE_INFO:
        raise ValueError(f"unknown image data set {name!r}; valid: {', '.join(IMAGE_INFO)}")
    data = registry.load(name)
    out = {"train_labels": data["train_labels"], "test_labels": data["test_labels"]}
    if name == "mnist1d":
        from learnopt.tasks.data.resize import resize_matrix

        lo, hi = float(data["train_images"].min()), float(data["train_images"].max())
        m = resize_matrix(data["train_images"].shape[1], size)
        for part in ("train", "test"):
            x = np.clip((data[f"{part}_images"].astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
            x = np.clip(x @ m.T, 0.0, 1.0).astype(np.float32)
            out[f"{part}_images"] = np.repeat(x[:, None, :, None], size, axis=1)
        return out
    for part in ("train", "test"):
        images = np.asarray(data[f"{part}_images"])
        x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
        x = _resize_axis_images(x, size)
        out[f"{part}_images"] = x if x.ndim == 4 else x[..., None]
    return out


def _split(images: np.ndarray, labels: np.ndarray, batch_size: int) -> ArraySplit:
    if len(images) < batch_size:  # a small set's validation split: repeat its examples
        reps = -(-batch_size // len(images))
        images, labels = np.concatenate([images] * reps), np.concatenate([labels] * reps)
    return ArraySplit({"image": images, "label": np.asarray(labels, np.int32)}, batch_size)


def split_image_datasets(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    batch_size: int,
    num_classes: int,
) -> Datasets:
    """train / inner_valid / outer_valid = 80 / 10 / 10 % of the training set by a seeded
    permutation (as :func:`learnopt.tasks.image.image_datasets`), test = the test set. A split
    with fewer examples than ``batch_size`` (e.g. 8x8 digits' 144-image validation splits at
    batch 512) has its examples repeated up to one batch."""
    tr, iv, ov = split_indices(len(train_images), (0.8, 0.1, 0.1), seed=0)
    splits = [_split(train_images[i], train_labels[i], batch_size) for i in (tr, iv, ov)]
    test = _split(test_images, test_labels, batch_size)
    info = {"num_classes": num_classes, "image_shape": tuple(train_images.shape[1:])}
    return Datasets(*splits, test, extra_info=info)


def image_datasets(name: str, size: int, batch_size: int) -> Datasets:
    """The four splits of registry image set ``name`` at ``size x size`` (see module doc)."""
    d = image_arrays(name, size)
    return split_image_datasets(
        d["train_images"],
        d["train_labels"],
        d["test_images"],
        d["test_labels"],
        batch_size,
        IMAGE_INFO[name][1],
    )


def synthetic_image_datasets(
    size: int, channels: int, num_classes: int, batch_size: int, seed: int = 0
) -> Datasets:
    """Uniform random images and labels of the given shapes, held in memory."""
    rng = np.random.default_rng(seed)

    def part(m):
        x = rng.uniform(size=(m, size, size, channels)).astype(np.float32)
        y = rng.integers(0, num_classes, size=m).astype(np.int32)
        return x, y

    (x, y), (xt, yt) = part(max(64, 2 * batch_size)), part(max(16, batch_size))
    return split_image_datasets(x, y, xt, yt, batch_size, num_classes)


_WORD_RE = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


@functools.lru_cache(maxsize=3)
def _corpus_words(name: str) -> np.ndarray:
    from learnopt.tasks.data import registry

    words = _WORD_RE.findall(registry.load(name).lower())
    counts = Counter(words)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    ids = {w: i + 1 for i, w in enumerate(ranked)}
    return np.fromiter((ids[w] for w in words), np.int32, count=len(words))


@functools.lru_cache(maxsize=3)
def _corpus_bytes(name: str) -> np.ndarray:
    from learnopt.tasks.data import registry, text

    return text.encode_bytes(registry.load(name))


def truncate_vocab(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Fold ids ``>= vocab_size`` into ``[1, vocab_size)`` by ``1 + id % (vocab_size - 1)``."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    tokens = np.asarray(tokens, np.int32)
    return np.where(tokens >= vocab_size, 1 + tokens % (vocab_size - 1), tokens).astype(np.int32)


def text_tokens(name: str, tokenizer: str, vocab_size: int) -> np.ndarray:
    """Token stream of corpus ``name`` under ``tokenizer`` ("bytes" or "words")."""
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(TEXT_CORPORA)}")
    if tokenizer == "bytes":
        return _corpus_bytes(name)
    if tokenizer == "words":
        return truncate_vocab(_corpus_words(name), vocab_size)
    raise ValueError(f"tokenizer must be 'bytes' or 'words', got {tokenizer!r}")


def text_datasets(
    name: str, tokenizer: str, vocab_size: int, batch_size: int, seq_len: int
) -> Datasets:
    """Four contiguous splits (``learnopt.tasks.language.text_datasets``) of a corpus."""
    return _text_datasets(text_tokens(name, tokenizer, vocab_size), vocab_size, batch_size, seq_len)


def synthetic_text_datasets(
    vocab_size: int, batch_size: int, seq_len: int, seed: int = 0
) -> Datasets:
    """A uniform random token stream, long enough for every split to hold a window."""
    n = 40 * (seq_len + 2) + 20 * batch_size
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=n).astype(np.int32)
    return _text_datasets(tokens, vocab_size, batch_size, seq_len)
