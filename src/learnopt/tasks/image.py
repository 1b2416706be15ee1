"""Image classification tasks (Metz et al. 2022, "Practical tradeoffs", arXiv:2203.11860,
App. B; the splits of Metz et al. 2020, "Tasks, stability, architecture, and compute",
arXiv:2009.11243, §3.2).

Images are scaled to [0, 1]. The original training set is split into
train[0:80%], inner_valid[80:90%] and outer_valid[90:100%] by a seeded
permutation; the original test set is the test split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.tasks.base import ArraySplit, Datasets, Task, clip_normalizer, split_indices


def image_datasets(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    batch_size: int,
    split_seed: int = 0,
) -> Datasets:
    """Four splits from a train/test pair of float images in [0, 1] and int labels."""
    tr, iv, ov = split_indices(len(train_images), (0.8, 0.1, 0.1), seed=split_seed)
    labels = np.asarray(train_labels, np.int32)

    def split(idx):
        return ArraySplit({"image": train_images[idx], "label": labels[idx]}, batch_size)

    num_classes = int(max(labels.max(), np.max(test_labels)) + 1)
    test = ArraySplit(
        {"image": test_images, "label": np.asarray(test_labels, np.int32)},
        min(batch_size, len(test_images)),
    )
    return Datasets(
        train=split(tr),
        inner_valid=split(iv),
        outer_valid=split(ov),
        test=test,
        extra_info={"num_classes": num_classes, "image_shape": tuple(train_images.shape[1:])},
    )


def load_image_datasets(name: str, size: int | None, batch_size: int) -> Datasets:
    """Datasets for a registered image dataset, resized to ``size`` (cached on disk)."""
    from learnopt.tasks.data import registry, resize

    data = registry.load(name)
    out = {}
    for part in ("train", "test"):
        images = data[f"{part}_images"]
        if size is not None and images.shape[1] != size:
            out[part] = resize.resized_images(f"{name}_{part}", images, size)
        else:
            out[part] = np.asarray(images, np.float32) / 255.0
    return image_datasets(
        out["train"], data["train_labels"], out["test"], data["test_labels"], batch_size
    )


class ImageClassificationTask(Task):
    """Softmax cross-entropy of a flax model on a labelled image dataset.

    The normalizer clips the loss to ``[0, 1.5 ln C]`` after mapping NaN/inf to
    that maximum: the released code's choice for the tasks of Metz et al. 2022 (arXiv:2203.11860;
    its App. D.1 says "clipped at the initialization value", ln C).
    """

    def __init__(self, name: str, model: nn.Module, datasets: Datasets):
        self.name = name
        self.model = model
        self.datasets = datasets
        self.num_classes = int(datasets.extra_info["num_classes"])
        self._image_shape = tuple(datasets.extra_info["image_shape"])
        self._normalize = clip_normalizer(1.5 * math.log(self.num_classes))

    def init(self, key: jax.Array):
        dummy = jnp.zeros((1, *self._image_shape), jnp.float32)
        return self.model.init(key, dummy)["params"]

    def logits(self, params, images: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, images)

    def loss(self, params, key, batch: Mapping[str, jax.Array]) -> jax.Array:
        del key
        logits = self.logits(params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return self._normalize(loss)

    def metrics(self, params, batch) -> dict[str, jax.Array]:
        logits = self.logits(params, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
