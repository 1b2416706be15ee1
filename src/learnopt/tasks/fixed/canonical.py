"""Canonical fixed tasks in the spirit of VeLOdrome (Metz et al. 2022, VeLO, arXiv:2211.09760,
§4.1, App. F.2).

VeLOdrome is a set of hand-designed "canonical" tasks from the families
ImageMLP, ImageMLPAE, Conv, ResNet, RNNLM, TransformerLM and ViT, each trained
for 10K steps (§4.1), plus LOpt tasks (meta-training a
learned optimizer, outside VeLOdrome-83), of which two are here. This module names one or a few
tasks per family, sized so that 10K steps of Adam take minutes on 2 CPU cores,
on the offline data of this project. Names follow VeLOdrome's pattern with
the substituted dataset in the name:

* CIFAR-10 / ImageNet / MNIST images -> Fashion-MNIST (resized to 8, 16 or
  28 pixels), as the data registry cannot install the originals;
* LM1B / Wikipedia text -> the Shakespeare corpus, character level.

The sizes are VeLOdrome's where they fit (``ImageMLP_FashionMnist8_Relu32``,
``ImageMLP_FashionMnist_Relu128x128``, ``ImageMLPAE_FashionMnist_128x32x128``,
``Conv_*_32x64x64``, ``RNNLM_*_LSTM128_Embed64``, ``TransformerLM``
MultiRuntime_2's 4 heads x d_model 32 x 2 layers) and smaller otherwise
(ResNet MultiRuntime_0's channels (8, 16, 16, 16) at 16x16; a ViT at 16x16 with
patch 4 instead of ImageNet64 with patch 16).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from learnopt.tasks.base import Task, clip_normalizer
from learnopt.tasks.image import ImageClassificationTask, load_image_datasets
from learnopt.tasks.language import LanguageModelTask, load_text_datasets
from learnopt.tasks.models import sampled as family_models
from learnopt.tasks.models import standard as models


class WithChannel(nn.Module):
    """Adds a trailing channel axis to greyscale images, then applies ``inner``."""

    inner: nn.Module

    def __call__(self, x):
        return self.inner(x[..., None] if x.ndim == 3 else x)


class ReluResNet(nn.Module):
    """The sampled-family ResNet with ReLU, for greyscale images."""

    channels: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x[..., None] if x.ndim == 3 else x
        relu = family_models.ACTIVATION_NAMES.index("relu")
        net = family_models.ResNet(
            initial_channels=self.channels[0],
            initial_kernel=3,
            max_pool=False,
            blocks_per_group=(1,) * len(self.channels),
            channels_per_group=self.channels,
            num_classes=self.num_classes,
        )
        return net(x, relu)


class MLPAutoencoder(nn.Module):
    hidden_sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        shape = x.shape
        h = x.reshape((shape[0], -1))
        for w in self.hidden_sizes:
            h = nn.relu(nn.Dense(w)(h))
        return nn.Dense(math.prod(shape[1:]))(h).reshape(shape)


class AutoencoderTask(Task):
    """Mean squared reconstruction error of images in [0, 1] (VeLOdrome's ImageMLPAE).

    The normalizer clips at 1.5x the error of predicting 0.5 everywhere (the
    scale of an untrained network's output), mapping NaN/inf to that maximum.
    """

    def __init__(self, name: str, model: nn.Module, datasets):
        self.name, self.model, self.datasets = name, model, datasets
        self._shape = tuple(datasets.extra_info["image_shape"])
        self._normalize = clip_normalizer(1.5 * 0.25)

    def init(self, key):
        return self.model.init(key, jnp.zeros((1, *self._shape)))["params"]

    def loss(self, params, key, batch):
        del key
        recon = self.model.apply({"params": params}, batch["image"])
        return jnp.mean((recon - batch["image"]) ** 2)

    def normalizer(self, loss):
        return self._normalize(loss)


def _image(name, size, model_fn, batch=128):
    def build() -> Task:
        ds = load_image_datasets("fashion_mnist", size, batch)
        return ImageClassificationTask(name, model_fn(ds.extra_info["num_classes"]), ds)

    return build


def _autoencoder(name, size, hidden, batch=128):
    def build() -> Task:
        return AutoencoderTask(
            name, MLPAutoencoder(hidden), load_image_datasets("fashion_mnist", size, batch)
        )

    return build


def text_task(name, model_fn, batch=32, seq_len=32, corpus="shakespeare"):
    """A language-model task on a character corpus: ``build()`` loads the data and the model."""
    def build() -> Task:
        ds = load_text_datasets(corpus, batch, seq_len)
        return LanguageModelTask(name, model_fn(ds.extra_info["vocab_size"], seq_len), ds)

    return build


def _transformer(vocab, seq_len):
    return family_models.TransformerLM(
        vocab_size=vocab, num_heads=4, head_dim=8, num_layers=2, max_len=seq_len
    )


def _lopt(name, architecture, num_steps):
    """Meta-training ``architecture`` (default sizes) for ``num_steps`` inner steps of the 8x8
    Fashion-MNIST ReLU-32 MLP at batch 128, as one task (VeLO App. C.3.9; VeLOdrome's
    ``LOpt_*`` tasks)."""

    def build() -> Task:
        from learnopt.tasks.families import lopt as L
        from learnopt.tasks.families import velo as F

        inner = F.MLPStatic(paper_dataset="fashion_mnist", dataset="fashion_mnist",
                            image_size=8, batch_size=128, hidden_size=32, num_layers=1)
        lopt = {"hidden_size": 0, "hidden_layers": 0, "exp_mult": 0.0, "step_mult": 0.0}
        if architecture in L.MLP_ARCHITECTURES:
            lopt = {"hidden_size": 4, "hidden_layers": 2, "exp_mult": 1e-3, "step_mult": 1e-3}
        static = L.LOptStatic(inner=inner, architecture=architecture, num_steps=num_steps,
                              outer_batch_size=1, **lopt)
        dynamic = F.InitActDynamic(
            init_index=family_models.INITIALIZERS.index("normal_sqrt1_fan_in"),
            init_scale=1.0,
            activation=family_models.ACTIVATION_NAMES.index("relu"),
        )
        task = L.LOptTask(L.LOptConfig(static, dynamic))
        task.name = name
        return task

    return build


# name -> (one-line description, builder). Listed, with the other named tasks, by
# :mod:`learnopt.tasks.fixed.registry` (``get_task``, ``canonical_names``).
CANONICAL = {
    "ImageMLP_FashionMnist8_Relu32": (
        "8x8 Fashion-MNIST, MLP 32, ReLU, batch 128",
        _image("ImageMLP_FashionMnist8_Relu32", 8, lambda c: models.MLP((32,), c)),
    ),
    "ImageMLP_FashionMnist_Relu128x128": (
        "28x28 Fashion-MNIST, MLP 128x128, ReLU, batch 128",
        _image("ImageMLP_FashionMnist_Relu128x128", 28, lambda c: models.MLP((128, 128), c)),
    ),
    "ImageMLP_FashionMnist16_Relu128x128x128_bs64": (
        "16x16 Fashion-MNIST (for CIFAR-10), MLP 128x128x128, batch 64",
        _image(
            "ImageMLP_FashionMnist16_Relu128x128x128_bs64",
            16,
            lambda c: models.MLP((128, 128, 128), c),
            batch=64,
        ),
    ),
    "ImageMLPAE_FashionMnist_128x32x128_bs128": (
        "28x28 Fashion-MNIST auto-encoder 128-32-128, MSE, batch 128",
        _autoencoder("ImageMLPAE_FashionMnist_128x32x128_bs128", 28, (128, 32, 128)),
    ),
    "Conv_FashionMnist16_32x64x64": (
        "16x16 Fashion-MNIST (for Cifar10_16), ConvNet 32s2-64-64, batch 128",
        _image("Conv_FashionMnist16_32x64x64", 16, lambda c: models.ConvNet(num_outputs=c)),
    ),
    "Conv_FashionMnist8_16x32x32_bs64": (
        "8x8 Fashion-MNIST, ConvNet 16s2-32-32, batch 64",
        _image(
            "Conv_FashionMnist8_16x32x32_bs64",
            8,
            lambda c: models.ConvNet(channels=(16, 32, 32), num_outputs=c),
            batch=64,
        ),
    ),
    "Resnet_FashionMnist16_8x16x16x16_bs64": (
        "16x16 Fashion-MNIST, ResNet channels (8,16,16,16) (MultiRuntime_0), batch 64",
        _image(
            "Resnet_FashionMnist16_8x16x16x16_bs64",
            16,
            lambda c: ReluResNet((8, 16, 16, 16), c),
            batch=64,
        ),
    ),
    "VIT_FashionMnist16_patch4_64x4heads_3layers": (
        "16x16 Fashion-MNIST, ViT patch 4, width 64, 4 heads, 3 layers, MLP 128, batch 128",
        _image(
            "VIT_FashionMnist16_patch4_64x4heads_3layers",
            16,
            lambda c: WithChannel(
                family_models.ViT(
                    num_layers=3, num_heads=4, head_dim=16, mlp_dim=128, patch=4, num_classes=c
                )
            ),
        ),
    ),
    "RNNLM_shakespeare_Patch32_LSTM128_Embed64": (
        "Shakespeare characters, LSTM 128, embedding 64, sequence 32, batch 32",
        text_task(
            "RNNLM_shakespeare_Patch32_LSTM128_Embed64",
            lambda v, _: models.CharLSTM(v, embed_size=64, hidden_size=128),
        ),
    ),
    "TransformerLM_shakespeare_4heads_32width_2layers": (
        "Shakespeare characters, Transformer 4 heads x d_model 32 x 2 layers, seq 32, batch 32",
        text_task("TransformerLM_shakespeare_4heads_32width_2layers", _transformer),
    ),
    "LOpt_SmallFcLOpt_FashionMnist8_Relu32_20steps": (
        "meta-objective of small_fc_lopt: 20 steps of ImageMLP_FashionMnist8_Relu32",
        _lopt("LOpt_SmallFcLOpt_FashionMnist8_Relu32_20steps", "small_fc_lopt", 20),
    ),
    "LOpt_LearnableAdam_FashionMnist8_Relu32_50steps": (
        "meta-objective of Adam's hyperparameters: 50 steps of ImageMLP_FashionMnist8_Relu32",
        _lopt("LOpt_LearnableAdam_FashionMnist8_Relu32_50steps", "learnable_adam", 50),
    ),
}

