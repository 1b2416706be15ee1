"""Sampled data sets of the TaskSet families, offline (Metz et al. 2020, "Tasks, stability,
architecture, and compute", arXiv:2009.11243, App. I.1.2-I.1.4).

App. I.1.2 samples image tasks uniformly over ten data sets, I.1.3 classifies IMDB
reviews, and I.1.4 models bytes or 8k subwords of eleven text sources. None of these but
MNIST / Fashion-MNIST can be had offline (``learnopt data`` lists what is), so a
config records the *paper's* data set name and :data:`DATASET_SUBSTITUTES` maps it to a
registry data set (``learnopt.tasks.data.registry``) when the task is built:

=================================  ================  =============================================
paper data set                     substitute        why
=================================  ================  =============================================
mnist                              ``digits``        real handwritten digits (8x8, upsampled)
fashion_mnist                      ``fashion_mnist`` the same data set
cifar10, cifar100                  ``fashion_mnist`` the largest installed natural-image set
food101_32x32, sun397_32x32        ``fashion_mnist`` (large natural-image sets)
imagenet_resized/32x32             ``fashion_mnist``
coil100_32x32                      ``digits``        small (7.2k images) -> the small set
deep_weeds_32x32                   ``mnist1d``       mid-sized, unusual domain
imagenet_resized/16x16             ``mnist1d``       the paper's smallest images
char LM ``*/bytes`` sources        a corpus, bytes   lm1b, imdb, amazon Books -> ``austen``;
                                                     wikipedia en, amazon Camera/Home -> ``kjv``;
                                                     wikipedia zh/ru/ja/hsb, amazon Video ->
                                                     ``shakespeare``
word LM ``*_subwords8k`` sources   the same corpus,  a word vocabulary of the corpus, words
                                   as words          ranked by frequency (an 8k-subword stand-in)
imdb_reviews/subwords8k (classif.) all 3 corpora     which corpus a window of words comes from
=================================  ================  =============================================

When the real files are installed, map the names back, e.g.
``substitutes={**DATASET_SUBSTITUTES, "mnist": "mnist", "cifar10": "cifar10"}``, or use
:func:`native_substitutes`, which does that for every paper data set whose files are present.

**Images** are float32 in [0, 1], ``(N, size, size, channels)``, at ``size`` = the paper data
set's size (28 for MNIST-like, 32 -> 28 for the 32x32 sets, 16 for ImageNet 16x16) clamped
to ``TaskSetLimits.max_image_size`` and snapped to the cached sizes 8/14/16/28
(``learnopt.tasks.data.resize``). MNIST-1D's standardised length-40 signals are min-max
scaled to [0, 1] (train min / max, test clipped), resampled to length ``size`` and repeated
along the rows. Substitutes have 10 classes (CIFAR-100 / ImageNet lose their class count).
The training set is split train / inner_valid / outer_valid = 80 / 10 / 10 % by a seeded
permutation (the test set stays apart); ``num_train`` keeps the first examples of the train
split. With ``just_train`` every split is the train split (I.1.2's 10 % "only train data").
Augmentation (crop, flips, colour for RGB), sampled 30 % of the time with the released
code's ranges (the paper shows the fields but not the distribution), is applied to every
split, as the released code does; a crop of ``c`` pixels makes the model input ``size - c``.

**Text.** Corpora are ``shakespeare``, ``kjv``, ``austen``. Bytes are UTF-8 bytes (ids
0..255). Words are lower-cased ``[a-z]+('[a-z]+)?``, digit runs and single punctuation
marks, numbered by decreasing frequency from 0. As in the released code, ids ``>= V - 1``
are clipped to ``V - 1`` for a vocabulary of size ``V``. Each corpus stream is cut into
contiguous parts train / inner_valid / outer_valid / test = 80 / 10 / 5 / 5 %, so no window
crosses two splits. A language-model example is a window of ``patch_length`` tokens (the
model predicts tokens 2..L from 1..L-1); ``num_train`` keeps the first ``num_train *
patch_length`` tokens of the train part. The classification stand-in for IMDB (I.1.3) labels
non-overlapping windows of ``patch_length`` words (numbers dropped) by corpus: 3 classes,
shared vocabulary over the three corpora, its 8185 most frequent words standing for the
8185 subword ids of imdb_reviews/subwords8k.

**Sizes** are clamped at build time by :class:`TaskSetLimits` (configs keep the paper's
sampled values; the built task records the effective ones). ``synthetic=True`` builds
uniform random data of the same shapes in memory (for tests and timing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.base import ArraySplit, Datasets, SequenceSplit, split_indices
from learnopt.tasks.families.taskset_parts import (
    bernoulli,
    choice,
    log_float,
    log_int,
)

# --- the paper's data sets and their substitutes -------------------------------------------

PAPER_IMAGE_DATASETS = (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "food101_32x32",
    "coil100_32x32",
    "deep_weeds_32x32",
    "sun397_32x32",
    "imagenet_resized/32x32",
    "imagenet_resized/16x16",
)
_TEXT_SOURCES = (
    "lm1b",
    "imdb_reviews",
    "tokenized_wikipedia/20190301.zh",
    "tokenized_wikipedia/20190301.ru",
    "tokenized_wikipedia/20190301.ja",
    "tokenized_wikipedia/20190301.hsb",
    "tokenized_wikipedia/20190301.en",
    "tokenized_amazon_reviews/Books_v1_02",
    "tokenized_amazon_reviews/Camera_v1_00",
    "tokenized_amazon_reviews/Home_v1_00",
    "tokenized_amazon_reviews/Video_v1_00",
)
_SOURCE_CORPUS = {
    "lm1b": "austen",
    "imdb_reviews": "austen",
    "tokenized_wikipedia/20190301.zh": "shakespeare",
    "tokenized_wikipedia/20190301.ru": "shakespeare",
    "tokenized_wikipedia/20190301.ja": "shakespeare",
    "tokenized_wikipedia/20190301.hsb": "shakespeare",
    "tokenized_wikipedia/20190301.en": "kjv",
    "tokenized_amazon_reviews/Books_v1_02": "austen",
    "tokenized_amazon_reviews/Camera_v1_00": "kjv",
    "tokenized_amazon_reviews/Home_v1_00": "kjv",
    "tokenized_amazon_reviews/Video_v1_00": "shakespeare",
}


def _byte_name(source: str) -> str:
    """The released code's data set name: ``lm1b/bytes``, ``..._v1_00_bytes``."""
    return f"{source}/bytes" if "/" not in source else f"{source}_bytes"


def _subword_name(source: str) -> str:
    return f"{source}/subwords8k" if "/" not in source else f"{source}_subwords8k"


PAPER_BYTE_DATASETS = tuple(_byte_name(s) for s in _TEXT_SOURCES)
PAPER_SUBWORD_DATASETS = tuple(_subword_name(s) for s in _TEXT_SOURCES)
PAPER_CLASSIFICATION_DATASET = "imdb_reviews/subwords8k"
TEXT_CORPORA = ("shakespeare", "kjv", "austen")
CLASSIFICATION_CORPORA = TEXT_CORPORA  # class i = windows of TEXT_CORPORA[i]
SUBWORD_VOCAB = 8185  # max_token of imdb_reviews/subwords8k in the released code

DATASET_SUBSTITUTES: dict[str, str] = {
    "mnist": "digits",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "fashion_mnist",
    "cifar100": "fashion_mnist",
    "food101_32x32": "fashion_mnist",
    "coil100_32x32": "digits",
    "deep_weeds_32x32": "mnist1d",
    "sun397_32x32": "fashion_mnist",
    "imagenet_resized/32x32": "fashion_mnist",
    "imagenet_resized/16x16": "mnist1d",
    **{_byte_name(s): _SOURCE_CORPUS[s] for s in _TEXT_SOURCES},
    **{_subword_name(s): _SOURCE_CORPUS[s] for s in _TEXT_SOURCES},
}
# The classification data set uses all three corpora; imdb_reviews/subwords8k above is the
# language-model use of that name.

# Paper data sets whose real files the registry can read when the user installs them.
NATIVE_DATASETS = {"mnist": "mnist", "cifar10": "cifar10"}

PAPER_IMAGE_SIZE = {name: 32 for name in PAPER_IMAGE_DATASETS}
PAPER_IMAGE_SIZE.update({"mnist": 28, "fashion_mnist": 28, "imagenet_resized/16x16": 16})
IMAGE_SIZES = (8, 14, 16, 28)  # what learnopt.tasks.data.resize caches
IMAGE_CHANNELS = {"fashion_mnist": 1, "digits": 1, "mnist1d": 1, "mnist": 1, "cifar10": 3}
NUM_CLASSES = 10


def native_substitutes() -> dict[str, str]:
    """:data:`DATASET_SUBSTITUTES` with every paper data set whose files are installed
    (MNIST via ``$LEARNOPT_MNIST_DIR``, CIFAR-10 via ``$LEARNOPT_CIFAR10_DIR``) mapped to
    itself."""
    from learnopt.tasks.data import registry

    out = dict(DATASET_SUBSTITUTES)
    for paper, name in NATIVE_DATASETS.items():
        if registry.is_present(name):
            out[paper] = name
    return out


# --- CPU limits -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSetLimits:
    """Documented CPU maxima applied when a sampled config is built into a task.

    Configs keep the paper's sampled values; a built task uses ``min(sampled, limit)`` and
    records the effective sizes in ``task.sizes``. ``None`` means no limit.

    * ``max_batch_size`` (paper: up to 512): 128.
    * ``max_image_size`` (paper: 28 / 32): 16, i.e. 256 pixels per channel.
    * ``max_patch_length`` (paper: up to 160 bytes / 256 subwords / 64 words): 64 tokens.
    * ``max_vocab_size`` (paper: word LM up to 30000, classification up to 8185): 2048,
      which keeps the softmax of a word language model CPU-sized.
    * ``max_train_examples``: no limit by default.
    """

    max_batch_size: int | None = 128
    max_image_size: int | None = 16
    max_patch_length: int | None = 64
    max_vocab_size: int | None = 2048
    max_train_examples: int | None = None

    @classmethod
    def paper(cls) -> TaskSetLimits:
        """No clamping beyond what the installed data allow (image size 28 at most)."""
        return cls(None, None, None, None, None)

    @classmethod
    def tiny(cls) -> TaskSetLimits:
        """Very small tasks (batch 4, 8x8 images, 9-token windows, 64 words) for tests."""
        return cls(4, 8, 9, 64, 256)


def _cap(value: int, limit: int | None) -> int:
    return value if limit is None else min(value, limit)


def _cap_opt(value: int | None, limit: int | None) -> int | None:
    if value is None:
        return limit
    return _cap(value, limit)


# --- image configs (I.1.2) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageAugmentationConfig:
    """Image augmentation fields of the released code (App. I.2.1 sample configs)."""

    crop_amount: int
    flip_left_right: bool
    flip_up_down: bool
    do_color_aug: bool
    brightness: float
    saturation: float
    hue: float
    contrast: float


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """A sampled image data set (I.1.2): the paper's name, batch size, optional training-set
    size, the just-train switch and optional augmentation."""

    dataset: str
    batch_size: int
    num_train: int | None
    just_train: bool
    augmentation: ImageAugmentationConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augmentation, dict):
            object.__setattr__(self, "augmentation", ImageAugmentationConfig(**self.augmentation))


def sample_augmentation(rng: np.random.Generator) -> ImageAugmentationConfig:
    """The released code's augmentation distribution (the paper gives none)."""
    return ImageAugmentationConfig(
        crop_amount=int(choice(rng, (0, 0, 0, 1, 2))),
        flip_left_right=bernoulli(rng, 0.5),
        flip_up_down=bernoulli(rng, 0.5),
        do_color_aug=bernoulli(rng, 0.5),
        brightness=log_float(rng, 0.001, 64.0 / 255.0),
        saturation=log_float(rng, 0.01, 1.0),
        hue=log_float(rng, 0.01, 0.5),
        contrast=log_float(rng, 0.01, 1.0),
    )


AUGMENT_PROBABILITY = 0.3
JUST_TRAIN_PROBABILITY = 0.1


def sample_image_data(rng: np.random.Generator) -> ImageDataConfig:
    """I.1.2: a data set uniformly from :data:`PAPER_IMAGE_DATASETS`; batch size log-uniform
    in [8, 512] (MNIST, Fashion-MNIST) or [8, 256] (the rest); training images log-uniform in
    [1000, 55000] (MNIST-like) or [1000, 50000] (CIFAR), all of them otherwise; just-train
    with probability 0.1."""
    name = choice(rng, PAPER_IMAGE_DATASETS)
    augmentation = sample_augmentation(rng) if bernoulli(rng, AUGMENT_PROBABILITY) else None
    if name in ("mnist", "fashion_mnist"):
        batch, num_train = log_int(rng, 8, 512), log_int(rng, 1000, 55000)
    elif name in ("cifar10", "cifar100"):
        batch, num_train = log_int(rng, 8, 256), log_int(rng, 1000, 50000)
    else:
        batch, num_train = log_int(rng, 8, 256), None
    return ImageDataConfig(
        name, batch, num_train, bernoulli(rng, JUST_TRAIN_PROBABILITY), augmentation
    )


def image_size_for(paper_dataset: str, limits: TaskSetLimits) -> int:
    """The image side used for ``paper_dataset``: its paper size clamped by the limits,
    snapped down to a cached size (8, 14, 16, 28)."""
    size = _cap(min(PAPER_IMAGE_SIZE[paper_dataset], 28), limits.max_image_size)
    snapped = [s for s in IMAGE_SIZES if s <= size]
    if not snapped:
        raise ValueError(f"max_image_size must be >= {IMAGE_SIZES[0]}, got {size}")
    return snapped[-1]


@functools.lru_cache(maxsize=4)
def image_arrays(name: str, size: int) -> dict[str, np.ndarray]:
    """Train / test images of registry image set ``name`` at ``size``, float32 in [0, 1],
    ``(N, size, size, C)``, with int32 labels (kept in memory per process)."""
    from learnopt.tasks.data import registry, resize

    data = registry.load(name)
    out = {
        "train_labels": np.asarray(data["train_labels"], np.int32),
        "test_labels": np.asarray(data["test_labels"], np.int32),
    }
    if name == "mnist1d":
        lo, hi = float(data["train_images"].min()), float(data["train_images"].max())
        m = resize.resize_matrix(data["train_images"].shape[1], size)
        for part in ("train", "test"):
            x = np.clip((np.asarray(data[f"{part}_images"], np.float64) - lo) / (hi - lo), 0, 1)
            x = np.clip(x @ m.T, 0.0, 1.0).astype(np.float32)
            out[f"{part}_images"] = np.repeat(x[:, None, :, None], size, axis=1)
        return out
    for part in ("train", "test"):
        images = np.asarray(data[f"{part}_images"])
        if images.shape[1] != size:
            x = resize.resized_images(name, images, size, split=part)
        else:
            x = images.astype(np.float32) / 255.0
        out[f"{part}_images"] = x if x.ndim == 4 else x[..., None]
    return out


def synthetic_image_arrays(
    size: int, channels: int, num_train: int, num_test: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Uniform random images and labels (10 classes) in memory."""
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", num_train), ("test", num_test)):
        out[f"{part}_images"] = rng.uniform(size=(n, size, size, channels)).astype(np.float32)
        out[f"{part}_labels"] = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return out


# --- augmentation ----------------------------------------------------------------------------


def _rgb_to_yiq(x: jax.Array) -> jax.Array:
    m = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    return x @ m.T


def _yiq_to_rgb(x: jax.Array) -> jax.Array:
    m = jnp.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
    return x @ m.T


def augment_images(
    key: jax.Array, images: jax.Array, aug: ImageAugmentationConfig
) -> jax.Array:
    """Apply ``aug`` to a batch ``(B, H, W, C)`` independently per image (jit-compatible).

    Random crop to ``H - c``; random left-right / up-down flips; for RGB images with
    ``do_color_aug``, random brightness (additive, ``+-brightness``), saturation (blend with
    grey by ``1 +- saturation``), hue (rotation of the YIQ chroma by ``+-hue`` turns) and
    contrast (``1 +- contrast`` about the image mean), in the order of tf.image.
    """
    b, h, w, ch = images.shape
    keys = jax.random.split(key, 7)
    c = aug.crop_amount
    if c:
        offs = jax.random.randint(keys[0], (b, 2), 0, c + 1)
        crop = jax.vmap(
            lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h - c, w - c, ch))
        )
        images = crop(images, offs)
    if aug.flip_left_right:
        flip = jax.random.bernoulli(keys[1], 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    if aug.flip_up_down:
        flip = jax.random.bernoulli(keys[2], 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, ::-1], images)
    if aug.do_color_aug and ch == 3:

        def u(k, lo, hi):
            return jax.random.uniform(k, (b, 1, 1, 1), minval=lo, maxval=hi)

        images = images + u(keys[3], -aug.brightness, aug.brightness)
        grey = jnp.mean(images, axis=-1, keepdims=True)
        s = u(keys[4], 1 - aug.saturation, 1 + aug.saturation)
        images = grey + s * (images - grey)
        angle = 2 * math.pi * u(keys[5], -aug.hue, aug.hue)[..., 0]
        yiq = _rgb_to_yiq(images)
        i_ = yiq[..., 1] * jnp.cos(angle) - yiq[..., 2] * jnp.sin(angle)
        q_ = yiq[..., 1] * jnp.sin(angle) + yiq[..., 2] * jnp.cos(angle)
        images = _yiq_to_rgb(jnp.stack([yiq[..., 0], i_, q_], axis=-1))
        mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
        images = mean + u(keys[6], 1 - aug.contrast, 1 + aug.contrast) * (images - mean)
    return images


class AugmentedSplit:
    """An image :class:`ArraySplit` whose batches pass through :func:`augment_images`."""

    def __init__(self, inner: ArraySplit, aug: ImageAugmentationConfig):
        self.inner, self.aug = inner, aug
        self.batch_size, self.num_examples = inner.batch_size, inner.num_examples
        self._augment = jax.jit(functools.partial(augment_images, aug=aug))

    def sample(self, key: jax.Array) -> dict[str, jax.Array]:
        k_batch, k_aug = jax.random.split(key)
        batch = dict(self.inner.sample(k_batch))
        batch["image"] = augment_images(k_aug, batch["image"], self.aug)
        return batch

    def iterator(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        key = jax.random.PRNGKey(seed)
        for i, batch in enumerate(self.inner.iterator(seed)):
            batch = dict(batch)
            batch["image"] = np.asarray(self._augment(jax.random.fold_in(key, i), batch["image"]))
            yield batch

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        out = dict(self.inner.abstract_batch())
        b, h, w, c = out["image"].shape
        k = self.aug.crop_amount
        out["image"] = jax.ShapeDtypeStruct((b, h - k, w - k, c), out["image"].dtype)
        return out

    def full(self) -> dict[str, np.ndarray]:
        """All examples, augmented once with a fixed key."""
        arrays = dict(self.inner.full())
        arrays["image"] = np.asarray(self._augment(jax.random.PRNGKey(0), arrays["image"]))
        return arrays


def image_datasets(
    cfg: ImageDataConfig,
    limits: TaskSetLimits,
    substitutes: Mapping[str, str] | None = None,
    synthetic: bool = False,
) -> tuple[Datasets, dict]:
    """The four splits of a sampled image data set, and the effective sizes.

    ``extra_info`` holds ``num_classes`` and ``image_shape`` (after any crop).
    """
    substitutes = DATASET_SUBSTITUTES if substitutes is None else substitutes
    if cfg.dataset not in PAPER_IMAGE_DATASETS:
        raise ValueError(
            f"unknown image data set {cfg.dataset!r}; valid: {', '.join(PAPER_IMAGE_DATASETS)}"
        )
    name = substitutes.get(cfg.dataset, DATASET_SUBSTITUTES[cfg.dataset])
    size = image_size_for(cfg.dataset, limits)
    if synthetic:
        n = max(64, 5 * _cap(cfg.batch_size, limits.max_batch_size))
        arrays = synthetic_image_arrays(size, IMAGE_CHANNELS.get(name, 1), n, n // 4)
    else:
        arrays = image_arrays(name, size)
    x, y = arrays["train_images"], arrays["train_labels"]
    tr, iv, ov = split_indices(len(x), (0.8, 0.1, 0.1), seed=0)
    num_train = _cap_opt(cfg.num_train, limits.max_train_examples)
    if num_train is not None:
        tr = tr[:num_train]
    batch = max(1, min(_cap(cfg.batch_size, limits.max_batch_size), len(tr)))

    def split(images, labels):
        s = ArraySplit({"image": images, "label": labels}, min(batch, len(labels)))
        return AugmentedSplit(s, cfg.augmentation) if cfg.augmentation else s

    train = split(x[tr], y[tr])
    if cfg.just_train:
        splits = (train, train, train, train)
    else:
        test = split(arrays["test_images"], arrays["test_labels"])
        splits = (train, split(x[iv], y[iv]), split(x[ov], y[ov]), test)
    crop = cfg.augmentation.crop_amount if cfg.augmentation else 0
    shape = (size - crop, size - crop, x.shape[-1])
    info = {"num_classes": NUM_CLASSES, "image_shape": shape}
    sizes = {
        "dataset": "synthetic" if synthetic else name,
        "image_size": size,
        "batch_size": batch,
        "num_train": len(tr),
        "input_shape": shape,
    }
    return Datasets(*splits, extra_info=info), sizes


# --- text configs (I.1.3, I.1.4) -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """A sampled text data set: the paper's name, window length, batch size, optional number
    of training examples and the just-train switch."""

    dataset: str
    patch_length: int
    batch_size: int
    num_train: int | None
    just_train: bool


def sample_byte_data(rng: np.random.Generator) -> TextDataConfig:
    """I.1.4 bytes: source uniform; patch log-uniform in [10, 160]; batch in [8, 512];
    training examples limited to log-uniform [1000, 50000] with probability 0.2;
    just-train with probability 0.1."""
    name = choice(rng, PAPER_BYTE_DATASETS)
    num_train = log_int(rng, 1000, 50000) if bernoulli(rng, 0.2) else None
    return TextDataConfig(
        name,
        log_int(rng, 10, 160),
        log_int(rng, 8, 512),
        num_train,
        bernoulli(rng, JUST_TRAIN_PROBABILITY),
    )


def sample_subword_data(rng: np.random.Generator) -> TextDataConfig:
    """I.1.4 subwords: as bytes, with patch length log-uniform in [10, 256]."""
    name = choice(rng, PAPER_SUBWORD_DATASETS)
    num_train = log_int(rng, 1000, 50000) if bernoulli(rng, 0.2) else None
    return TextDataConfig(
        name,
        log_int(rng, 10, 256),
        log_int(rng, 8, 512),
        num_train,
        bernoulli(rng, JUST_TRAIN_PROBABILITY),
    )


def sample_classification_data(rng: np.random.Generator) -> TextDataConfig:
    """I.1.3: slice length log-uniform in [8, 64]; batch in [8, 512]; training examples
    log-uniform in [1000, 55000]; just-train with probability 0.1. (The released code's bug
    makes every data set imdb_reviews/subwords8k; we record that name.)"""
    return TextDataConfig(
        PAPER_CLASSIFICATION_DATASET,
        log_int(rng, 8, 64),
        log_int(rng, 8, 512),
        log_int(rng, 1000, 55000),
        bernoulli(rng, JUST_TRAIN_PROBABILITY),
    )


_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words, digit runs and single punctuation marks of ``text``."""
    return _WORD_RE.findall(text.lower())


def rank_words(token_lists: list[list[str]]) -> dict[str, int]:
    """Word -> id, by decreasing total frequency (ties alphabetical), from 0."""
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(toks)
    return {w: i for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)))}


@functools.lru_cache(maxsize=3)
def corpus_word_ids(name: str) -> np.ndarray:
    """The words of corpus ``name`` as ids ranked by frequency within the corpus."""
    from learnopt.tasks.data import registry

    toks = words(registry.load(name))
    vocab = rank_words([toks])
    return np.fromiter((vocab[w] for w in toks), np.int32, count=len(toks))


@functools.lru_cache(maxsize=3)
def corpus_bytes(name: str) -> np.ndarray:
    from learnopt.tasks.data import registry, text

    return text.encode_bytes(registry.load(name))


@functools.lru_cache(maxsize=1)
def classification_word_ids() -> tuple[np.ndarray, ...]:
    """Per corpus of :data:`CLASSIFICATION_CORPORA`, its words (numbers dropped) as ids of one
    vocabulary ranked over the three corpora."""
    from learnopt.tasks.data import registry

    lists = [[w for w in words(registry.load(c)) if not w.isdigit()] for c in TEXT_CORPORA]
    vocab = rank_words(lists)
    return tuple(np.fromiter((vocab[w] for w in ws), np.int32, count=len(ws)) for ws in lists)


TEXT_SPLIT_BOUNDS = (0.0, 0.8, 0.9, 0.95, 1.0)


def _stream_parts(tokens: np.ndarray) -> list[np.ndarray]:
    n = len(tokens)
    cuts = [int(round(b * n)) for b in TEXT_SPLIT_BOUNDS]
    return [tokens[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _synthetic_stream(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def lm_datasets(
    cfg: TextDataConfig,
    vocab_size: int,
    tokenizer: str,
    limits: TaskSetLimits,
    substitutes: Mapping[str, str] | None = None,
    synthetic: bool = False,
) -> tuple[Datasets, dict]:
    """The four splits of a language-model data set (``tokenizer`` "bytes" or "words").

    ``vocab_size`` is the effective vocabulary; ids ``>= vocab_size - 1`` are clipped to
    ``vocab_size - 1``. ``extra_info`` holds ``vocab_size`` and ``seq_len`` (= patch - 1).
    """
    substitutes = DATASET_SUBSTITUTES if substitutes is None else substitutes
    valid = PAPER_BYTE_DATASETS if tokenizer == "bytes" else PAPER_SUBWORD_DATASETS
    if cfg.dataset not in valid:
        raise ValueError(f"unknown {tokenizer} data set {cfg.dataset!r}; valid: {', '.join(valid)}")
    corpus = substitutes.get(cfg.dataset, DATASET_SUBSTITUTES[cfg.dataset])
    patch = max(3, _cap(cfg.patch_length, limits.max_patch_length))
    batch = _cap(cfg.batch_size, limits.max_batch_size)
    if synthetic:
        tokens = _synthetic_stream(vocab_size, max(4000, 40 * patch))
    elif tokenizer == "bytes":
        tokens = corpus_bytes(corpus)
    else:
        tokens = corpus_word_ids(corpus)
    tokens = np.minimum(tokens, vocab_size - 1).astype(np.int32)
    parts = _stream_parts(tokens)
    num_train = _cap_opt(cfg.num_train, limits.max_train_examples)
    if num_train is not None:
        parts[0] = parts[0][: max(num_train * patch, patch + 2)]
    splits = [SequenceSplit(p, batch, patch - 1) for p in parts]
    if cfg.just_train:
        splits = [splits[0]] * 4
    info = {"vocab_size": vocab_size, "seq_len": patch - 1}
    sizes = {
        "dataset": "synthetic" if synthetic else corpus,
        "tokenizer": tokenizer,
        "patch_length": patch,
        "batch_size": batch,
        "vocab_size": vocab_size,
        "train_tokens": len(parts[0]),
    }
    return Datasets(*splits, extra_info=info), sizes


def classification_datasets(
    cfg: TextDataConfig,
    vocab_size: int,
    limits: TaskSetLimits,
    synthetic: bool = False,
) -> tuple[Datasets, dict]:
    """Corpus classification windows (see the module docstring) as four splits of
    ``{"tokens": int32[B, L], "label": int32[B]}``."""
    patch = _cap(cfg.patch_length, limits.max_patch_length)
    batch = _cap(cfg.batch_size, limits.max_batch_size)
    num_classes = len(CLASSIFICATION_CORPORA)
    if synthetic:
        streams = tuple(
            _synthetic_stream(vocab_size, max(2000, 20 * patch), seed=i) for i in range(num_classes)
        )
    else:
        streams = classification_word_ids()
    per_split: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(4)]
    for label, stream in enumerate(streams):
        stream = np.minimum(stream, vocab_size - 1).astype(np.int32)
        for i, part in enumerate(_stream_parts(stream)):
            n = len(part) // patch
            windows = part[: n * patch].reshape(n, patch)
            per_split[i].append((windows, np.full(n, label, np.int32)))
    arrays = []
    for i, pieces in enumerate(per_split):
        x = np.concatenate([p[0] for p in pieces])
        y = np.concatenate([p[1] for p in pieces])
        perm = np.random.default_rng(i).permutation(len(x))
        arrays.append((x[perm], y[perm]))
    num_train = _cap_opt(cfg.num_train, limits.max_train_examples)
    if num_train is not None:
        arrays[0] = (arrays[0][0][:num_train], arrays[0][1][:num_train])
    splits = [ArraySplit({"tokens": x, "label": y}, max(1, min(batch, len(y)))) for x, y in arrays]
    if cfg.just_train:
        splits = [splits[0]] * 4
    info = {"num_classes": num_classes, "seq_len": patch, "vocab_size": vocab_size}
    sizes = {
        "dataset": "synthetic" if synthetic else "+".join(CLASSIFICATION_CORPORA),
        "patch_length": patch,
        "batch_size": splits[0].batch_size,
        "vocab_size": vocab_size,
        "num_train": len(arrays[0][1]),
    }
    return Datasets(*splits, extra_info=info), sizes
