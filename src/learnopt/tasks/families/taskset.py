"""The sampled TaskSet task families of Metz et al. 2020, "Tasks, stability, architecture, and
compute", arXiv:2009.11243, App. I.2.

The paper ("Training more effective learned optimizers") meta-trains on TaskSet-style
families (Metz et al. 2020, TaskSet, arXiv:2002.11887), each a distribution over configs
(App. I.2):

=============================  ============================================================
family (registry: taskset_*)   what a config samples (App. I section)
=============================  ============================================================
``mlp``                        1-6 hidden layers of log[16, 128] units on a sampled image
                               data set; activation, initializer, centring (I.2.1)
``mlp_ae``                     2-7 layers (1-6 hidden of log[16, 128]) back to the input;
                               output tanh 2 : sigmoid 1 : linear_center 1 : linear 1; l2 2 :
                               l1 1; mean or sum over dimensions (I.2.2)
``mlp_vae``                    encoder / decoder 1-3 layers of log[32, 128]; latent
                               log[32, 128]; quantised-normal likelihood; ELBO (I.2.3)
``conv_pooling``               1-5 3x3 conv layers of log[8, 64] channels, strides all 2,
                               1,2,... or 2,1,...; SAME / VALID per layer; bias 1/2; mean,
                               max or squared-mean pooling; linear head (I.2.4)
``conv_fc``                    the same convs, flattened, then 0-4 hidden layers of
                               log[32, 128] (I.2.5)
``char_rnn_language_model``    bytes; embedding log[8, 128] (normal, std 1); vocabulary 256
                               (80 %) or log[100, 256]; sampled RNN core; trainable or zero
                               initial state (I.2.6)
``word_rnn_language_model``    as above with vocabulary log[1000, 30000] (I.2.7)
``rnn_text_classification``    vocabulary log[100, 10000]; embedding log[8, 128]; RNN core;
                               readout last / mean / max (I.2.12)
``losg_tasks``                 the LOSG problems and transformations (I.2.8), see
                               :mod:`learnopt.tasks.families.synthetic`
``maf``, ``nvp``               1-4 bijectors of 1 or 2 layers of log[16, 128]; MAF / real NVP
                               on flattened images (I.2.9, I.2.10), see
                               :mod:`learnopt.tasks.models.flows`
=============================  ============================================================

Shared components (activations, initializers, RNN cores; I.1.1) live in
:mod:`learnopt.tasks.families.taskset_parts`, data sampling (I.1.2-I.1.4) in
:mod:`learnopt.tasks.families.taskset_data`. Where the paper's text is silent or garbled we
follow the released TaskSet code; every such place, and every departure, is noted at its
definition.

Data sets. The paper's image and text data sets cannot be installed here (CIFAR, ImageNet,
LM1B, Wikipedia, Amazon, IMDB). Configs record the paper's name; :data:`DATASET_SUBSTITUTES`
maps it to an installed registry data set when the task is built:

* images: mnist, coil100 -> ``digits``; fashion_mnist, cifar10, cifar100, food101, sun397,
  imagenet32 -> ``fashion_mnist``; deep_weeds, imagenet16 -> ``mnist1d`` (as images).
* byte / subword language modelling: each of the eleven sources -> ``austen``, ``kjv`` or
  ``shakespeare``, as UTF-8 bytes or as frequency-ranked words (the subword stand-in).
* IMDB sentiment -> which of the three corpora a window of words comes from (3 classes).

Pass ``substitutes=native_substitutes()`` to use MNIST / CIFAR-10 files where the user has
installed them (the registry's real loaders). See :mod:`learnopt.tasks.families.taskset_data`.

CPU sizes. Configs keep the paper's sampled values; :class:`TaskSetLimits` clamps batch size
(128), image side (16), window length (64) and vocabulary (2048) when a task is built, and
``task.sizes`` records what was used. ``TaskSetLimits.paper()`` turns the clamps off;
``TaskSetLimits.tiny()`` and ``synthetic=True`` give seconds-sized tasks on random data.

Normalizers (TaskSet normalises by baseline runs we do not have; each family maps its loss to
a comparable, clipped scale, NaN / inf to the maximum):

* classification (mlp, conv_*, rnn_text_classification) and language models: ``clip(loss,
  0, 1.5 ln C)`` for ``C`` classes / vocabulary (a uniform predictor scores ``ln C``), as the
  fixed tasks of :mod:`learnopt.tasks.image` / :mod:`learnopt.tasks.language`;
* mlp_ae: per-dimension distance over the distance of the range's midpoint to its end
  (``0.25`` l2 / ``0.5`` l1 for [0, 1] targets, ``1`` for [-1, 1]), clipped to [0, 1.5];
* mlp_vae: nats per dimension, clipped to [0, 1.5 ln 256] (ln 256: a uniform 8-bit pixel);
* maf / nvp: nats per dimension minus the entropy of the N(0, 0.01^2) dequantisation noise
  (a lower bound of the expected loss), clipped to 1.5 x that of the identity flow at x = 1;
* losg_tasks: the loss over its value at initialisation, clipped to [0, 1.5].

Usage::

    family = registry.get_family("taskset_mlp")  # learnopt.tasks.families.registry
    config = family.sample(jax.random.PRNGKey(0))
    task = family.task(config)
    params = task.init(jax.random.PRNGKey(1))
    loss = task.loss(params, key, task.datasets.train.sample(key))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.tasks.base import (
    Datasets,
    Task,
    TaskFamily,
    clip_normalizer,
    config_from_dict,
    config_to_dict,
)
from learnopt.tasks.families.synthetic import LOSGConfig, LOSGFamily, LOSGTask
from learnopt.tasks.families.taskset_data import (
    DATASET_SUBSTITUTES,
    SUBWORD_VOCAB,
    ImageDataConfig,
    TaskSetLimits,
    TextDataConfig,
    classification_datasets,
    image_datasets,
    lm_datasets,
    native_substitutes,
    sample_byte_data,
    sample_classification_data,
    sample_image_data,
    sample_subword_data,
)
from learnopt.tasks.families.taskset_parts import (
    InitConfig,
    NestedConfig,
    RNNCoreConfig,
    SampledRNN,
    activation_fn,
    bernoulli,
    choice,
    key_rng,
    log_int,
    make_initializer,
    sample_activation,
    sample_initializer,
    sample_rnn_core,
    uniform_int,
    weighted_choice,
)
from learnopt.tasks.image import ImageClassificationTask
from learnopt.tasks.language import LanguageModelTask
from learnopt.tasks.models.conv import Conv
from learnopt.tasks.models.flows import Flow

__all__ = [
    "CONFIG_TYPES",
    "DATASET_SUBSTITUTES",
    "FAMILY_CLASSES",
    "TaskSetLimits",
    "native_substitutes",
    "taskset_config_from_dict",
    "taskset_config_to_dict",
]

# --- configs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSetMLPConfig(NestedConfig):
    """I.2.1: hidden sizes, activation, initializer, image data, centring to [-1, 1]."""

    hidden_sizes: tuple[int, ...]
    activation: str
    w_init: InitConfig
    data: ImageDataConfig
    center_data: bool


@dataclasses.dataclass(frozen=True)
class MLPAEConfig(NestedConfig):
    """I.2.2: hidden sizes (the output layer, back to the input size, is not listed)."""

    hidden_sizes: tuple[int, ...]
    activation: str
    w_init: InitConfig
    data: ImageDataConfig
    output_type: str
    loss_type: str
    reduction: str


@dataclasses.dataclass(frozen=True)
class MLPVAEConfig(NestedConfig):
    """I.2.3: encoder / decoder hidden sizes and the latent dimension."""

    enc_hidden_sizes: tuple[int, ...]
    dec_hidden_sizes: tuple[int, ...]
    latent_dim: int
    activation: str
    w_init: InitConfig
    data: ImageDataConfig


@dataclasses.dataclass(frozen=True)
class ConvPoolingConfig(NestedConfig):
    """I.2.4: per-layer strides, channels and paddings; bias; spatial pooling."""

    strides: tuple[int, ...]
    channels: tuple[int, ...]
    paddings: tuple[str, ...]
    activation: str
    w_init: InitConfig
    use_bias: bool
    pool_type: str
    data: ImageDataConfig
    center_data: bool


@dataclasses.dataclass(frozen=True)
class ConvFCConfig(NestedConfig):
    """I.2.5: the conv part of :class:`ConvPoolingConfig`, then fully connected layers."""

    strides: tuple[int, ...]
    channels: tuple[int, ...]
    paddings: tuple[str, ...]
    fc_hidden_sizes: tuple[int, ...]
    activation: str
    w_init: InitConfig
    use_bias: bool
    data: ImageDataConfig
    center_data: bool


@dataclasses.dataclass(frozen=True)
class CharRNNLMConfig(NestedConfig):
    """I.2.6: embedding size, output initializer, vocabulary, RNN core, initial state."""

    embed_dim: int
    w_init: InitConfig
    vocab_size: int
    core: RNNCoreConfig
    trainable_init: bool
    data: TextDataConfig


@dataclasses.dataclass(frozen=True)
class WordRNNLMConfig(NestedConfig):
    """I.2.7: as :class:`CharRNNLMConfig` on words."""

    embed_dim: int
    w_init: InitConfig
    vocab_size: int
    core: RNNCoreConfig
    trainable_init: bool
    data: TextDataConfig


@dataclasses.dataclass(frozen=True)
class RNNTextClassificationConfig(NestedConfig):
    """I.2.12: as the language models, plus the readout (last, mean or max over time)."""

    embed_dim: int
    w_init: InitConfig
    vocab_size: int
    core: RNNCoreConfig
    trainable_init: bool
    readout: str
    data: TextDataConfig


@dataclasses.dataclass(frozen=True)
class MAFConfig(NestedConfig):
    """I.2.9: hidden sizes shared by every bijector, number of bijectors."""

    hidden_sizes: tuple[int, ...]
    num_bijectors: int
    activation: str
    w_init: InitConfig
    data: ImageDataConfig


@dataclasses.dataclass(frozen=True)
class NVPConfig(NestedConfig):
    """I.2.10: as :class:`MAFConfig`."""

    hidden_sizes: tuple[int, ...]
    num_bijectors: int
    activation: str
    w_init: InitConfig
    data: ImageDataConfig


CONFIG_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        TaskSetMLPConfig,
        MLPAEConfig,
        MLPVAEConfig,
        ConvPoolingConfig,
        ConvFCConfig,
        CharRNNLMConfig,
        WordRNNLMConfig,
        RNNTextClassificationConfig,
        LOSGConfig,
        MAFConfig,
        NVPConfig,
    )
}


def taskset_config_to_dict(config: Any) -> dict:
    """``config_to_dict`` (JSON-ready, tagged with the type name)."""
    return config_to_dict(config)


def taskset_config_from_dict(data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`taskset_config_to_dict` for every TaskSet config type."""
    return config_from_dict(data, CONFIG_TYPES)


def config_digest(config: Any) -> str:
    """A short stable hash of a config (used in task names)."""
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


# --- models ----------------------------------------------------------------------------------


def _center(x: jax.Array, center: bool) -> jax.Array:
    return x * 2.0 - 1.0 if center else x


class MLPClassifier(nn.Module):
    hidden_sizes: Sequence[int]
    activation: str
    w_init: InitConfig
    num_classes: int
    center_data: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act, init = activation_fn(self.activation), make_initializer(self.w_init)
        x = _center(x.reshape((x.shape[0], -1)), self.center_data)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=init)(x))
        return nn.Dense(self.num_classes, kernel_init=init)(x)


def effective_paddings(
    size: int, strides: Sequence[int], paddings: Sequence[str], kernel: int = 3
) -> tuple[tuple[str, ...], int]:
    """Paddings actually used, and the final spatial size, for a ``size`` x ``size`` input.

    Departure (CPU image sizes): a VALID layer whose input is smaller than the kernel would
    leave nothing; it is run with SAME padding instead.
    """
    out = []
    for s, p in zip(strides, paddings, strict=True):
        if p == "VALID" and size < kernel:
            p = "SAME"
        out.append(p)
        size = -(-size // s) if p == "SAME" else (size - kernel) // s + 1
    return tuple(out), size


class TaskSetConvNet(nn.Module):
    """3x3 convolutions (all followed by the activation), then pooling + linear
    (``pool_type`` set) or flatten + MLP (``pool_type=None``)."""

    channels: Sequence[int]
    strides: Sequence[int]
    paddings: Sequence[str]
    activation: str
    w_init: InitConfig
    use_bias: bool
    num_classes: int
    pool_type: str | None = None
    fc_hidden_sizes: Sequence[int] = ()
    center_data: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act, init = activation_fn(self.activation), make_initializer(self.w_init)
        x = _center(x, self.center_data)
        for c, s, p in zip(self.channels, self.strides, self.paddings, strict=True):
            conv = Conv(c, (3, 3), (s, s), padding=p, use_bias=self.use_bias, kernel_init=init)
            x = act(conv(x))
        if self.pool_type == "mean":
            x = jnp.mean(x, axis=(1, 2))
        elif self.pool_type == "max":
            x = jnp.max(x, axis=(1, 2))
        elif self.pool_type == "squared_mean":
            x = jnp.mean(x**2, axis=(1, 2))
        elif self.pool_type is None:
            x = x.reshape((x.shape[0], -1))
            for width in self.fc_hidden_sizes:
                x = act(nn.Dense(width, kernel_init=init)(x))
        else:
            raise ValueError(f"unknown pool_type {self.pool_type!r}")
        return nn.Dense(self.num_classes, kernel_init=init)(x)


class TaskSetMLPAutoencoder(nn.Module):
    hidden_sizes: Sequence[int]
    activation: str
    w_init: InitConfig
    output_type: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act, init = activation_fn(self.activation), make_initializer(self.w_init)
        h = x
        for width in self.hidden_sizes:
            h = act(nn.Dense(width, kernel_init=init)(h))
        out = nn.Dense(x.shape[-1], kernel_init=init)(h)
        if self.output_type == "tanh":
            return jnp.tanh(out)
        if self.output_type == "sigmoid":
            return jax.nn.sigmoid(out)
        if self.output_type in ("linear", "linear_center"):
            return out
        raise ValueError(f"unknown output_type {self.output_type!r}")


class MLPVAE(nn.Module):
    """Returns ``(log p(x | z), KL(q(z | x) || N(0, I)))`` per example (App. I.2.3).

    As in the released code, the decoder's ``[mu, log sigma]`` is clipped to [-10, 10] and
    the likelihood is a normal density at ``x + U(-bin/2, bin/2)`` times the bin width 1/255
    (the "quantised normal"). Departure: the encoder's log sigma is also clipped to [-10, 10],
    so that sampled initializers of scale up to 10 do not overflow ``exp`` in the KL term.
    """

    enc_hidden_sizes: Sequence[int]
    dec_hidden_sizes: Sequence[int]
    latent_dim: int
    activation: str
    w_init: InitConfig
    bin_size: float = 1.0 / 255.0

    @nn.compact
    def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        act, init = activation_fn(self.activation), make_initializer(self.w_init)
        h = x
        for width in self.enc_hidden_sizes:
            h = act(nn.Dense(width, kernel_init=init)(h))
        q = nn.Dense(2 * self.latent_dim, kernel_init=init)(h)
        mu_q, log_sigma_q = q[:, : self.latent_dim], q[:, self.latent_dim :]
        log_sigma_q = jnp.clip(log_sigma_q, -10.0, 10.0)  # departure: overflow guard
        k_z, k_u = jax.random.split(key)
        z = mu_q + jnp.exp(log_sigma_q) * jax.random.normal(k_z, mu_q.shape)
        kl = jnp.sum(0.5 * (mu_q**2 + jnp.exp(2 * log_sigma_q) - 1.0) - log_sigma_q, axis=-1)
        h = z
        for width in self.dec_hidden_sizes:
            h = act(nn.Dense(width, kernel_init=init)(h))
        p = jnp.clip(nn.Dense(2 * x.shape[-1], kernel_init=init)(h), -10.0, 10.0)
        mu_p, log_sigma_p = p[:, : x.shape[-1]], p[:, x.shape[-1] :]
        noisy = x + jax.random.uniform(k_u, x.shape, minval=-0.5, maxval=0.5) * self.bin_size
        log_px = (
            -0.5 * ((noisy - mu_p) * jnp.exp(-log_sigma_p)) ** 2
            - log_sigma_p
            - 0.5 * math.log(2 * math.pi)
            + math.log(self.bin_size)
        )
        return jnp.sum(log_px, axis=-1), kl


class RNNLanguageModel(nn.Module):
    vocab_size: int
    embed_dim: int
    w_init: InitConfig
    core: RNNCoreConfig
    trainable_init: bool

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.minimum(tokens, self.vocab_size - 1)
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.initializers.normal(1.0))(
            tokens
        )
        x = SampledRNN(self.core, self.trainable_init)(x)
        return nn.Dense(self.vocab_size, kernel_init=make_initializer(self.w_init))(x)


class RNNClassifier(nn.Module):
    vocab_size: int
    embed_dim: int
    w_init: InitConfig
    core: RNNCoreConfig
    trainable_init: bool
    readout: str
    num_classes: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.minimum(tokens, self.vocab_size - 1)
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.initializers.normal(1.0))(
            tokens
        )
        y = SampledRNN(self.core, self.trainable_init)(x)
        if self.readout == "last":
            y = y[:, -1]
        elif self.readout == "mean":
            y = jnp.mean(y, axis=1)
        elif self.readout == "max":
            y = jnp.max(y, axis=1)
        else:
            raise ValueError(f"unknown readout {self.readout!r}")
        return nn.Dense(self.num_classes, kernel_init=make_initializer(self.w_init))(y)


# --- tasks ------------------------------------------------------------------------------------


class TaskSetImageClassificationTask(ImageClassificationTask):
    """:class:`~learnopt.tasks.image.ImageClassificationTask` with its config and sizes."""

    def __init__(self, name: str, model: nn.Module, datasets: Datasets, config: Any, sizes: dict):
        super().__init__(name, model, datasets)
        self.config, self.sizes = config, sizes


class TaskSetLanguageModelTask(LanguageModelTask):
    """:class:`~learnopt.tasks.language.LanguageModelTask` with its config and sizes."""

    def __init__(self, name: str, model: nn.Module, datasets: Datasets, config: Any, sizes: dict):
        super().__init__(name, model, datasets)
        self.config, self.sizes = config, sizes


class _FlatImageTask(Task):
    """Common parts of the tasks on flattened images (autoencoder, VAE, flows)."""

    def __init__(self, name: str, model: nn.Module, datasets: Datasets, config: Any, sizes: dict):
        self.name, self.model, self.datasets = name, model, datasets
        self.config, self.sizes = config, sizes
        self.dim = int(np.prod(datasets.extra_info["image_shape"]))

    def _flat(self, batch: Any) -> jax.Array:
        x = batch["image"]
        return x.reshape((x.shape[0], -1))


class TaskSetAutoencoderTask(_FlatImageTask):
    """App. I.2.2: reconstruction distance, reduced per example then averaged."""

    def init(self, key: jax.Array) -> Any:
        return self.model.init(key, jnp.zeros((1, self.dim)))["params"]

    def loss(self, params: Any, key: jax.Array, batch: Any) -> jax.Array:
        del key
        cfg: MLPAEConfig = self.config
        x = _center(self._flat(batch), cfg.output_type in ("tanh", "linear_center"))
        out = self.model.apply({"params": params}, x)
        diff = out - x
        dist = diff**2 if cfg.loss_type == "l2" else jnp.abs(diff)
        per_example = jnp.mean(dist, -1) if cfg.reduction == "mean" else jnp.sum(dist, -1)
        return jnp.mean(per_example)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        cfg: MLPAEConfig = self.config
        per_dim = loss / self.dim if cfg.reduction == "sum" else loss
        centered = cfg.output_type in ("tanh", "linear_center")
        ref = 1.0 if centered else (0.25 if cfg.loss_type == "l2" else 0.5)
        r = jnp.nan_to_num(per_dim / ref, nan=1.5, posinf=1.5)
        return jnp.clip(r, 0.0, 1.5)


class TaskSetVAETask(_FlatImageTask):
    """App. I.2.3: negative ELBO in nats per image, averaged over the batch."""

    def init(self, key: jax.Array) -> Any:
        k_init, k_sample = jax.random.split(key)
        return self.model.init(k_init, jnp.zeros((1, self.dim)), k_sample)["params"]

    def loss(self, params: Any, key: jax.Array, batch: Any) -> jax.Array:
        log_px, kl = self.model.apply({"params": params}, self._flat(batch), key)
        return -jnp.mean(log_px - kl)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        top = 1.5 * math.log(256.0)
        return jnp.clip(jnp.nan_to_num(loss / self.dim, nan=top, posinf=top), 0.0, top)

    def metrics(self, params: Any, batch: Any) -> dict[str, jax.Array]:
        log_px, kl = self.model.apply({"params": params}, self._flat(batch), jax.random.PRNGKey(0))
        return {"loss": -jnp.mean(log_px - kl), "log_p_x": jnp.mean(log_px), "kl": jnp.mean(kl)}


FLOW_NOISE_STD = 0.01
# Per-dimension differential entropy of the N(0, 0.01^2) dequantisation noise: a lower bound
# of the expected per-dimension loss (adding independent noise cannot lower entropy).
FLOW_NOISE_ENTROPY = 0.5 * math.log(2 * math.pi * math.e * FLOW_NOISE_STD**2)
# Per-dimension loss of the identity flow (standard normal) at x = 1, the largest on [0, 1].
FLOW_IDENTITY_MAX = 0.5 * math.log(2 * math.pi) + 0.5


class FlowTask(_FlatImageTask):
    """App. I.2.9 / I.2.10: ``-mean log p(x + N(0, 0.01^2))`` in nats per image."""

    def init(self, key: jax.Array) -> Any:
        return self.model.init(key, jnp.zeros((1, self.dim)))["params"]

    def log_prob(self, params: Any, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x)

    def loss(self, params: Any, key: jax.Array, batch: Any) -> jax.Array:
        x = self._flat(batch)
        x = x + FLOW_NOISE_STD * jax.random.normal(key, x.shape)
        return -jnp.mean(self.log_prob(params, x))

    def normalizer(self, loss: jax.Array) -> jax.Array:
        top = 1.5 * (FLOW_IDENTITY_MAX - FLOW_NOISE_ENTROPY)
        r = jnp.nan_to_num(loss / self.dim - FLOW_NOISE_ENTROPY, nan=top, posinf=top)
        return jnp.clip(r, 0.0, top)


class TextClassificationTask(Task):
    """App. I.2.12: softmax cross-entropy of an RNN classifier on token windows."""

    def __init__(self, name: str, model: nn.Module, datasets: Datasets, config: Any, sizes: dict):
        self.name, self.model, self.datasets = name, model, datasets
        self.config, self.sizes = config, sizes
        self.num_classes = int(datasets.extra_info["num_classes"])
        self.seq_len = int(datasets.extra_info["seq_len"])
        self._normalize = clip_normalizer(1.5 * math.log(self.num_classes))

    def init(self, key: jax.Array) -> Any:
        return self.model.init(key, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def loss(self, params: Any, key: jax.Array, batch: Any) -> jax.Array:
        del key
        logits = self.model.apply({"params": params}, batch["tokens"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return self._normalize(loss)

    def metrics(self, params: Any, batch: Any) -> dict[str, jax.Array]:
        logits = self.model.apply({"params": params}, batch["tokens"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


# --- families ---------------------------------------------------------------------------------


class TaskSetFamily(TaskFamily):
    """Base of the sampled TaskSet families.

    ``limits`` clamps sizes at build time, ``substitutes`` maps the paper's data set names to
    registry data sets (default :data:`DATASET_SUBSTITUTES`), and ``synthetic=True`` builds
    random in-memory data of the same shapes instead of loading data sets.
    """

    key: str = "family"

    def __init__(
        self,
        limits: TaskSetLimits | None = None,
        substitutes: Mapping[str, str] | None = None,
        synthetic: bool = False,
    ):
        self.limits = TaskSetLimits() if limits is None else limits
        self.substitutes = dict(DATASET_SUBSTITUTES if substitutes is None else substitutes)
        self.synthetic = synthetic
        self.name = f"taskset_{self.key}"

    def sample(self, key: jax.Array) -> Any:
        """A config drawn from the paper's distribution, deterministic in ``key``."""
        return self._sample(key_rng(key, self.key))

    def _sample(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def task(self, config: Any) -> Task:
        if not isinstance(config, self.config_type):
            raise TypeError(
                f"{self.name} builds {self.config_type.__name__}, got {type(config).__name__}"
            )
        return self._build(config, f"{self.name}_{config_digest(config)}")

    def _build(self, config: Any, name: str) -> Task:
        raise NotImplementedError

    def _images(self, data: ImageDataConfig) -> tuple[Datasets, dict]:
        return image_datasets(data, self.limits, self.substitutes, self.synthetic)


def _sizes_log(rng: np.random.Generator, n: int, low: int, high: int) -> tuple[int, ...]:
    return tuple(log_int(rng, low, high) for _ in range(n))


class TaskSetMLPFamily(TaskSetFamily):
    """App. I.2.1. ``center_data`` (50 %) appears in the paper's sample configs only; its
    probability is the released code's."""

    key, config_type = "mlp", TaskSetMLPConfig

    def _sample(self, rng):
        n = uniform_int(rng, 1, 6)
        return TaskSetMLPConfig(
            hidden_sizes=_sizes_log(rng, n, 16, 128),
            activation=sample_activation(rng),
            w_init=sample_initializer(rng),
            data=sample_image_data(rng),
            center_data=bernoulli(rng, 0.5),
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        model = MLPClassifier(
            config.hidden_sizes,
            config.activation,
            config.w_init,
            datasets.extra_info["num_classes"],
            config.center_data,
        )
        return TaskSetImageClassificationTask(name, model, datasets, config, sizes)


AE_OUTPUT_WEIGHTS = {"tanh": 2, "sigmoid": 1, "linear_center": 1, "linear": 1}
# The paper's distance weights are garbled ("tanh:2"); the released code draws l2 : l1 = 2 : 1.
AE_LOSS_WEIGHTS = {"l2": 2, "l1": 1}


class MLPAEFamily(TaskSetFamily):
    """App. I.2.2. Layers uniform in [2, 7] count the output layer, so 1-6 hidden layers of
    log[16, 128] units (the released code: [1, 6] hidden of log[32, 128]; we follow the
    paper). Output weights are the paper's (the code gives sigmoid weight 2)."""

    key, config_type = "mlp_ae", MLPAEConfig

    def _sample(self, rng):
        n_layers = uniform_int(rng, 2, 7)
        return MLPAEConfig(
            hidden_sizes=_sizes_log(rng, n_layers - 1, 16, 128),
            activation=sample_activation(rng),
            w_init=sample_initializer(rng),
            data=sample_image_data(rng),
            output_type=weighted_choice(rng, AE_OUTPUT_WEIGHTS),
            loss_type=weighted_choice(rng, AE_LOSS_WEIGHTS),
            reduction=choice(rng, ("mean", "sum")),
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        model = TaskSetMLPAutoencoder(
            config.hidden_sizes, config.activation, config.w_init, config.output_type
        )
        return TaskSetAutoencoderTask(name, model, datasets, config, sizes)


class MLPVAEFamily(TaskSetFamily):
    """App. I.2.3. The latent dimension is sampled separately, log[32, 128], as the paper
    says (the released code uses the last encoder width and 1-4 encoder layers)."""

    key, config_type = "mlp_vae", MLPVAEConfig

    def _sample(self, rng):
        n_enc = uniform_int(rng, 1, 3)
        enc = _sizes_log(rng, n_enc, 32, 128)
        n_dec = uniform_int(rng, 1, 3)
        dec = _sizes_log(rng, n_dec, 32, 128)
        return MLPVAEConfig(
            enc_hidden_sizes=enc,
            dec_hidden_sizes=dec,
            latent_dim=log_int(rng, 32, 128),
            activation=sample_activation(rng),
            w_init=sample_initializer(rng),
            data=sample_image_data(rng),
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        model = MLPVAE(
            config.enc_hidden_sizes,
            config.dec_hidden_sizes,
            config.latent_dim,
            config.activation,
            config.w_init,
        )
        return TaskSetVAETask(name, model, datasets, config, sizes)


STRIDE_PATTERNS = ("all_two", "one_two", "two_one")
POOL_TYPES = ("mean", "max", "squared_mean")


def _sample_conv(rng: np.random.Generator) -> dict:
    """The conv part shared by I.2.4 and I.2.5 (the released code's order of draws)."""
    n = uniform_int(rng, 1, 5)
    pattern = choice(rng, STRIDE_PATTERNS)
    base = {"all_two": (2,), "one_two": (1, 2), "two_one": (2, 1)}[pattern]
    strides = tuple((base * 5)[:n])
    channels = _sizes_log(rng, n, 8, 64)
    return {"strides": strides, "channels": channels}


def _sample_paddings(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    return tuple(choice(rng, ("SAME", "VALID")) for _ in range(n))


class ConvPoolingFamily(TaskSetFamily):
    """App. I.2.4 (3x3 kernels as in the released code; see :func:`effective_paddings`)."""

    key, config_type = "conv_pooling", ConvPoolingConfig

    def _sample(self, rng):
        conv = _sample_conv(rng)
        return ConvPoolingConfig(
            **conv,
            activation=sample_activation(rng),
            w_init=sample_initializer(rng),
            paddings=_sample_paddings(rng, len(conv["strides"])),
            pool_type=choice(rng, POOL_TYPES),
            use_bias=bernoulli(rng, 0.5),
            data=sample_image_data(rng),
            center_data=bernoulli(rng, 0.5),
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        paddings, _ = effective_paddings(
            datasets.extra_info["image_shape"][0], config.strides, config.paddings
        )
        sizes = {**sizes, "paddings": paddings}
        model = TaskSetConvNet(
            config.channels,
            config.strides,
            paddings,
            config.activation,
            config.w_init,
            config.use_bias,
            datasets.extra_info["num_classes"],
            pool_type=config.pool_type,
            center_data=config.center_data,
        )
        return TaskSetImageClassificationTask(name, model, datasets, config, sizes)


class ConvFCFamily(TaskSetFamily):
    """App. I.2.5: the I.2.4 conv part, flattened, then 0-4 hidden layers of log[32, 128]
    units and a linear head."""

    key, config_type = "conv_fc", ConvFCConfig

    def _sample(self, rng):
        conv = _sample_conv(rng)
        paddings = _sample_paddings(rng, len(conv["strides"]))
        n_fc = uniform_int(rng, 0, 4)
        return ConvFCConfig(
            **conv,
            paddings=paddings,
            fc_hidden_sizes=_sizes_log(rng, n_fc, 32, 128),
            activation=sample_activation(rng),
            w_init=sample_initializer(rng),
            use_bias=bernoulli(rng, 0.5),
            data=sample_image_data(rng),
            center_data=bernoulli(rng, 0.5),
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        paddings, final = effective_paddings(
            datasets.extra_info["image_shape"][0], config.strides, config.paddings
        )
        sizes = {**sizes, "paddings": paddings, "flat_features": final**2 * config.channels[-1]}
        model = TaskSetConvNet(
            config.channels,
            config.strides,
            paddings,
            config.activation,
            config.w_init,
            config.use_bias,
            datasets.extra_info["num_classes"],
            pool_type=None,
            fc_hidden_sizes=config.fc_hidden_sizes,
            center_data=config.center_data,
        )
        return TaskSetImageClassificationTask(name, model, datasets, config, sizes)


def _vocab(sampled: int, limit: int | None) -> int:
    return sampled if limit is None else min(sampled, limit)


class CharRNNLMFamily(TaskSetFamily):
    """App. I.2.6 on bytes (ids clipped to ``vocab_size - 1``; the byte vocabulary is
    never clamped by ``max_vocab_size``)."""

    key, config_type = "char_rnn_language_model", CharRNNLMConfig

    def _sample(self, rng):
        embed = log_int(rng, 8, 128)
        w_init = sample_initializer(rng)
        vocab = 256 if bernoulli(rng, 0.8) else log_int(rng, 100, 256)
        return CharRNNLMConfig(
            embed_dim=embed,
            w_init=w_init,
            vocab_size=vocab,
            core=sample_rnn_core(rng),
            trainable_init=bernoulli(rng, 0.5),
            data=sample_byte_data(rng),
        )

    def _build(self, config, name):
        datasets, sizes = lm_datasets(
            config.data, config.vocab_size, "bytes", self.limits, self.substitutes, self.synthetic
        )
        model = RNNLanguageModel(
            config.vocab_size, config.embed_dim, config.w_init, config.core, config.trainable_init
        )
        return TaskSetLanguageModelTask(name, model, datasets, config, sizes)


class WordRNNLMFamily(TaskSetFamily):
    """App. I.2.7 on frequency-ranked words; vocabulary ``min(sampled, max_vocab_size)``."""

    key, config_type = "word_rnn_language_model", WordRNNLMConfig

    def _sample(self, rng):
        embed = log_int(rng, 8, 128)
        w_init = sample_initializer(rng)
        vocab = log_int(rng, 1000, 30000)
        return WordRNNLMConfig(
            embed_dim=embed,
            w_init=w_init,
            vocab_size=vocab,
            core=sample_rnn_core(rng),
            trainable_init=bernoulli(rng, 0.5),
            data=sample_subword_data(rng),
        )

    def _build(self, config, name):
        vocab = _vocab(config.vocab_size, self.limits.max_vocab_size)
        datasets, sizes = lm_datasets(
            config.data, vocab, "words", self.limits, self.substitutes, self.synthetic
        )
        model = RNNLanguageModel(
            vocab, config.embed_dim, config.w_init, config.core, config.trainable_init
        )
        return TaskSetLanguageModelTask(name, model, datasets, config, sizes)


READOUTS = ("last", "mean", "max")


class RNNTextClassificationFamily(TaskSetFamily):
    """App. I.2.12. The vocabulary is ``min(sampled, 8185, max_vocab_size)`` (8185: the
    subword vocabulary the released code trims, ``max_token``). The embedding is normal with
    std 1, as for the language models (the paper does not say). The data are the corpus
    classification stand-in for IMDB (:mod:`learnopt.tasks.families.taskset_data`)."""

    key, config_type = "rnn_text_classification", RNNTextClassificationConfig

    def _sample(self, rng):
        embed = log_int(rng, 8, 128)
        w_init = sample_initializer(rng)
        data = sample_classification_data(rng)
        vocab = log_int(rng, 100, 10000)
        return RNNTextClassificationConfig(
            embed_dim=embed,
            w_init=w_init,
            vocab_size=vocab,
            core=sample_rnn_core(rng),
            trainable_init=bernoulli(rng, 0.5),
            readout=choice(rng, READOUTS),
            data=data,
        )

    def _build(self, config, name):
        vocab = _vocab(min(config.vocab_size, SUBWORD_VOCAB), self.limits.max_vocab_size)
        datasets, sizes = classification_datasets(config.data, vocab, self.limits, self.synthetic)
        model = RNNClassifier(
            vocab,
            config.embed_dim,
            config.w_init,
            config.core,
            config.trainable_init,
            config.readout,
            datasets.extra_info["num_classes"],
        )
        return TextClassificationTask(name, model, datasets, config, sizes)


class _FlowFamily(TaskSetFamily):
    flow_kind = "maf"

    def _sample(self, rng):
        activation = sample_activation(rng)
        w_init = sample_initializer(rng)
        data = sample_image_data(rng)
        n_layers = uniform_int(rng, 1, 2)
        hidden = _sizes_log(rng, n_layers, 16, 128)
        return self.config_type(
            hidden_sizes=hidden,
            num_bijectors=uniform_int(rng, 1, 4),
            activation=activation,
            w_init=w_init,
            data=data,
        )

    def _build(self, config, name):
        datasets, sizes = self._images(config.data)
        model = Flow(
            self.flow_kind,
            config.hidden_sizes,
            config.num_bijectors,
            activation_fn(config.activation),
            make_initializer(config.w_init),
        )
        return FlowTask(name, model, datasets, config, sizes)


class MAFFamily(_FlowFamily):
    """App. I.2.9 (see :mod:`learnopt.tasks.models.flows`)."""

    key, config_type, flow_kind = "maf", MAFConfig, "maf"


class NVPFamily(_FlowFamily):
    """App. I.2.10 (see :mod:`learnopt.tasks.models.flows`)."""

    key, config_type, flow_kind = "nvp", NVPConfig, "nvp"


class TaskSetLOSGFamily(LOSGFamily):
    """App. I.2.8 (:mod:`learnopt.tasks.families.synthetic`); takes (and ignores) the data
    options of the other families so that every family is built the same way."""

    key = "losg_tasks"

    def __init__(
        self,
        limits: TaskSetLimits | None = None,
        substitutes: Mapping[str, str] | None = None,
        synthetic: bool = False,
    ):
        del limits, substitutes, synthetic
        self.name = f"taskset_{self.key}"

    def task(self, config: LOSGConfig) -> LOSGTask:
        if not isinstance(config, LOSGConfig):
            raise TypeError(f"{self.name} builds LOSGConfig, got {type(config).__name__}")
        task = LOSGTask(config)
        task.name = f"{self.name}_{config_digest(config)}"
        return task


# The eleven families of App. I.2; :mod:`learnopt.tasks.families.registry` lists them as
# ``taskset_<key>``.
FAMILY_CLASSES: tuple[type[TaskFamily], ...] = (
    TaskSetMLPFamily,
    MLPAEFamily,
    MLPVAEFamily,
    ConvPoolingFamily,
    ConvFCFamily,
    CharRNNLMFamily,
    WordRNNLMFamily,
    RNNTextClassificationFamily,
    TaskSetLOSGFamily,
    MAFFamily,
    NVPFamily,
)
