"""Fixed tasks made for the ``learnopt bench`` suite (:mod:`learnopt.bench.suite`).

VeLOdrome (Metz et al. 2022, VeLO, arXiv:2211.09760, §4.1 and App. F.2) is a set of
hand-designed canonical tasks from the families ImageMLP, ImageMLPAE, Conv, ResNet, RNNLM,
TransformerLM and ViT. :mod:`.canonical` names one or a few per family; the tasks here widen
that to a suite that varies activation, depth, width, batch size and data set, and add the
kinds VeLOdrome leaves out but the meta-training distributions of VeLO (App. C.3: VAEs) and
TaskSet (Metz et al. 2020, arXiv:2009.11243, App. I.2.8-I.2.10: LOSG quadratics and synthetic
problems, MAF and real NVP flows) contain.

Every task is small enough that one Adam run of its suite budget takes at most a few seconds on
one CPU core (measured: ``benchmarks/bench_suite_time.py``). Each is built from an existing
model or task class:

* image classifiers, auto-encoders and VAEs: the VeLO family tasks of
  :mod:`learnopt.tasks.families.velo` at fixed static and dynamic configs (C.2.1 initializer
  ``normal_sqrt1_fan_in`` at scale 1, a C.2.2 activation, data from
  :mod:`learnopt.tasks.families.velo_data`), or :mod:`.canonical`'s ReLU auto-encoder;
* MNIST-1D: the length-40 signals as they are (the velo families would repeat them into a
  square image), with :class:`~learnopt.tasks.image.ImageClassificationTask`;
* flows: :class:`learnopt.tasks.models.flows.Flow` in TaskSet's
  :class:`~learnopt.tasks.families.taskset.FlowTask`;
* language models: :class:`learnopt.tasks.models.sampled.RNNLM` and ``TransformerLM`` on a
  character vocabulary, as the canonical LM tasks;
* quadratics and synthetic problems: :mod:`learnopt.tasks.families.synthetic`
  (Wichrowska et al. 2017, arXiv:1703.04813, §4.1) at fixed configs.

The one new model is :class:`DropoutMLP`, for the MSE-with-dropout MLP that VeLO reports as its
best case (``ImageMLP_Cifar10_128x128_Dropout08_ReLU_MSE``, §4.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.base import SPLIT_NAMES, ArraySplit, Datasets, Task, clip_normalizer
from learnopt.tasks.image import ImageClassificationTask, image_datasets, load_image_datasets
from learnopt.tasks.models import sampled as fm

NORMAL_INIT = fm.INITIALIZERS.index("normal_sqrt1_fan_in")


def act(name: str) -> int:
    """The C.2.2 activation index of ``name``."""
    return fm.ACTIVATION_NAMES.index(name)


def _named(name: str, make: Callable[[], Task]) -> Callable[[], Task]:
    def build() -> Task:
        task = make()
        task.name = name
        return task

    return build


def channel_last(ds: Datasets) -> Datasets:
    """Greyscale image splits ``(N, H, W)`` as ``(N, H, W, 1)`` (what the velo models take)."""

    def split(s: ArraySplit) -> ArraySplit:
        return ArraySplit({"image": s.arrays["image"][..., None], "label": s.arrays["label"]},
                          s.batch_size)

    info = {**ds.extra_info, "image_shape": (*ds.extra_info["image_shape"], 1)}
    return Datasets(*(split(ds.split(n)) for n in SPLIT_NAMES), extra_info=info)


def _disk_cached_images(make: Callable[[], Task]) -> Callable[[], Task]:
    """A velo image task whose data come from :func:`load_image_datasets` (resized images
    cached on disk) instead of ``velo_data`` (resized in memory in every process). Same
    resizing (area averaging), the same 80/10/10 split (seed 0): equal images to 1 ulp."""

    def build() -> Task:
        task = make()
        s = task.static
        task.datasets = channel_last(load_image_datasets(s.dataset, s.image_size, s.batch_size))
        return task

    return build


# --- image classifiers (VeLO C.3.1, C.3.2, C.3.5, C.3.8 at fixed configs) -------------------


def velo_mlp(dataset, size, hidden, layers, activation, batch):
    from learnopt.tasks.families import velo as F

    static = F.MLPStatic(paper_dataset=dataset, dataset=dataset, image_size=size,
                         batch_size=batch, hidden_size=hidden, num_layers=layers)
    dyn = F.InitActDynamic(init_index=NORMAL_INIT, init_scale=1.0, activation=act(activation))
    return _disk_cached_images(lambda: F.MLPTask(F.MLPConfig(static, dyn)))


def velo_conv(dataset, size, hidden, layers, stride2, activation, batch):
    from learnopt.tasks.families import velo as F

    static = F.ConvStatic(paper_dataset=dataset, dataset=dataset, image_size=size,
                          batch_size=batch, hidden_size=hidden, num_layers=layers,
                          num_stride2=stride2)
    dyn = F.InitActDynamic(init_index=NORMAL_INIT, init_scale=1.0, activation=act(activation))
    return _disk_cached_images(lambda: F.ConvTask(F.ConvConfig(static, dyn)))


def velo_resnet(dataset, size, base_width, pattern, activation, batch, initial_channels=8):
    from learnopt.tasks.families import velo as F

    static = F.ResNetStatic(paper_dataset=dataset, dataset=dataset, image_size=size,
                            batch_size=batch, blocks_per_group=(1,) * len(pattern),
                            width_pattern=tuple(pattern), base_width=base_width,
                            initial_kernel=3, initial_channels=initial_channels,
                            max_pool=False)
    dyn = F.ActDynamic(activation=act(activation))
    return _disk_cached_images(lambda: F.ResNetTask(F.ResNetConfig(static, dyn)))


def velo_vit(dataset, size, patch, heads, head_dim, layers, mlp_dim, batch):
    from learnopt.tasks.families import velo as F

    static = F.ViTStatic(paper_dataset=dataset, dataset=dataset, image_size=size,
                         batch_size=batch, num_layers=layers, num_heads=heads,
                         head_dim=head_dim, mlp_dim=mlp_dim, patch_size=patch)
    return _disk_cached_images(lambda: F.ViTTask(F.ViTConfig(static, F.DropoutDynamic(0.0, 0.0))))


class WithActivation(nn.Module):
    """Calls a dynamic-activation model (``DynMLP``) with a fixed activation index."""

    inner: nn.Module
    activation: int

    def __call__(self, x):
        return self.inner(x, self.activation)


def mnist1d_mlp(hidden: Sequence[int], activation: str, batch: int):
    """An MLP on MNIST-1D's standardised length-40 signals (4000 train, 1000 test)."""

    def build() -> Task:
        from learnopt.tasks.data import registry

        d = registry.load("mnist1d")
        ds = image_datasets(np.asarray(d["train_images"], np.float32), d["train_labels"],
                            np.asarray(d["test_images"], np.float32), d["test_labels"], batch)
        model = WithActivation(fm.DynMLP((*hidden, ds.extra_info["num_classes"])), act(activation))
        return ImageClassificationTask("mnist1d_mlp", model, ds)

    return build


class DropoutMLP(nn.Module):
    """ReLU MLP with inverted dropout after every hidden layer (off without a key)."""

    hidden_sizes: Sequence[int]
    num_outputs: int
    rate: float

    @nn.compact
    def __call__(self, x, key=None):
        x = x.reshape((x.shape[0], -1))
        keys = [None] * len(self.hidden_sizes)
        if key is not None:
            keys = list(jax.random.split(key, len(self.hidden_sizes)))
        for width, k in zip(self.hidden_sizes, keys, strict=True):
            x = fm.dropout(nn.relu(nn.Dense(width)(x)), self.rate, k)
        return nn.Dense(self.num_outputs)(x)


class MSEClassificationTask(ImageClassificationTask):
    """Mean squared error between the network's outputs and one-hot labels, with dropout in
    training (VeLOdrome's ``ImageMLP_*_Dropout*_ReLU_MSE``). The normalizer clips at 1.0,
    ten times the error of predicting all zeros (0.1 for 10 classes)."""

    def __init__(self, name, model, datasets):
        super().__init__(name, model, datasets)
        self._normalize = clip_normalizer(1.0)

    def loss(self, params, key, batch):
        out = self.model.apply({"params": params}, batch["image"], key)
        target = jax.nn.one_hot(batch["label"], self.num_classes)
        return jnp.mean(jnp.square(out - target))

    def metrics(self, params, batch):
        out = self.logits(params, batch["image"])
        target = jax.nn.one_hot(batch["label"], self.num_classes)
        return {
            "loss": jnp.mean(jnp.square(out - target)),
            "accuracy": jnp.mean(jnp.argmax(out, -1) == batch["label"]),
        }


def mse_dropout_mlp(size: int, hidden: Sequence[int], rate: float, batch: int):
    def build() -> Task:
        ds = load_image_datasets("fashion_mnist", size, batch)
        model = DropoutMLP(tuple(hidden), ds.extra_info["num_classes"], rate)
        return MSEClassificationTask("mse_dropout_mlp", model, ds)

    return build


# --- auto-encoders, VAEs, flows -------------------------------------------------------------


def relu_autoencoder(dataset: str, size: int, hidden: Sequence[int], batch: int):
    """:mod:`.canonical`'s ReLU MLP auto-encoder (MSE) on any registry image set."""

    def build() -> Task:
        from learnopt.tasks.fixed.canonical import AutoencoderTask, MLPAutoencoder

        ds = load_image_datasets(dataset, size, batch)
        return AutoencoderTask("autoencoder", MLPAutoencoder(tuple(hidden)), ds)

    return build


def velo_vae(dataset, size, enc, latent, dec, activation, batch):
    """VeLO C.3.4's MLP VAE (quantized normal likelihood, per-image negative ELBO)."""
    from learnopt.tasks.families import velo as F

    static = F.VAEStatic(paper_dataset=dataset, dataset=dataset, image_size=size,
                         batch_size=batch, enc_hidden_size=enc, dec_hidden_size=dec,
                         enc_layers=1, dec_layers=1, latent_size=latent)
    dyn = F.VAEDynamic(init_index=NORMAL_INIT, init_scale=1.0, activation=act(activation),
                       center_data=False, per_dim_loss=False)
    return _disk_cached_images(lambda: F.VAETask(F.VAEConfig(static, dyn)))


def flow(kind: str, dataset: str, size: int, hidden: Sequence[int], bijectors: int, batch: int):
    """A TaskSet MAF / real NVP flow (App. I.2.9 / I.2.10) with ReLU networks and flax's LeCun
    normal initializer, on flattened images in [0, 1]."""

    def build() -> Task:
        from learnopt.tasks.families.taskset import FlowTask
        from learnopt.tasks.models.flows import Flow

        ds = load_image_datasets(dataset, size, batch)
        model = Flow(kind, tuple(hidden), bijectors, jax.nn.relu)
        return FlowTask("flow", model, ds, None, {})

    return build


# --- language models (character level, as the canonical LM tasks) ---------------------------


def rnn_lm(corpus: str, cell: str, hidden: int, embed: int, seq_len: int, batch: int):
    def build() -> Task:
        from learnopt.tasks.fixed.canonical import text_task

        make = lambda vocab, _: fm.RNNLM(cell, vocab, embed, hidden)
        return text_task("rnn_lm", make, batch=batch, seq_len=seq_len, corpus=corpus)()

    return build


def transformer_lm(corpus: str, heads: int, head_dim: int, layers: int, seq_len: int, batch: int):
    def build() -> Task:
        from learnopt.tasks.fixed.canonical import text_task

        make = lambda vocab, t: fm.TransformerLM(vocab, heads, head_dim, layers, t)
        return text_task("transformer_lm", make, batch=batch, seq_len=seq_len, corpus=corpus)()

    return build


# --- quadratics and synthetic problems (Wichrowska et al. 2017, §4.1) -----------------------


def synthetic(*problems, transform: str = "none", seed: int = 0, **transform_args):
    def build() -> Task:
        from learnopt.tasks.families import synthetic as S

        config = S.SyntheticConfig(tuple(S.ProblemConfig(**p) for p in problems),
                                   transform=transform, seed=seed, **transform_args)
        return S.build_task(config)

    return build


# name -> (one-line description, builder). Registered by :mod:`learnopt.tasks.fixed.registry`.
BENCH = {
    # ImageMLP
    "ImageMLP_Digits8_Tanh64x64_bs32": (
        "sklearn 8x8 digits, MLP 64x64, tanh, batch 32",
        velo_mlp("digits", 8, 64, 2, "tanh", 32),
    ),
    "ImageMLP_Mnist1d_Gelu128x128_bs64": (
        "MNIST-1D length-40 signals, MLP 128x128, GELU, batch 64",
        mnist1d_mlp((128, 128), "gelu", 64),
    ),
    "ImageMLP_FashionMnist14_Sigmoid32x32x32x32x32_bs256": (
        "14x14 Fashion-MNIST, deep narrow MLP 5x32, sigmoid, batch 256",
        velo_mlp("fashion_mnist", 14, 32, 5, "sigmoid", 256),
    ),
    "ImageMLP_FashionMnist14_128x128_Dropout05_Relu_MSE": (
        "14x14 Fashion-MNIST, MLP 128x128, ReLU, dropout 0.5, MSE on one-hot labels, batch 128",
        mse_dropout_mlp(14, (128, 128), 0.5, 128),
    ),
    # Conv
    "Conv_Digits8_16x16x16_Tanh_bs32": (
        "sklearn 8x8 digits, ConvNet 16s2-16-16, tanh, batch 32",
        velo_conv("digits", 8, 16, 3, 1, "tanh", 32),
    ),
    "Conv_FashionMnist14_32x32x32_LeakyRelu_bs32": (
        "14x14 Fashion-MNIST, ConvNet 32s2-32s2-32, leaky ReLU, batch 32",
        velo_conv("fashion_mnist", 14, 32, 3, 2, "leaky_relu", 32),
    ),
    # ResNet
    "Resnet_Digits8_8x8x16x16_Silu_bs32": (
        "sklearn 8x8 digits, pre-activation ResNet channels (8,8,16,16), SiLU, batch 32",
        velo_resnet("digits", 8, 8, (1, 1, 2, 2), "silu", 32),
    ),
    "Resnet_FashionMnist14_8x16x16x32_Relu_bs32": (
        "14x14 Fashion-MNIST, pre-activation ResNet channels (8,16,16,32), ReLU, batch 32",
        velo_resnet("fashion_mnist", 14, 8, (1, 2, 2, 4), "relu", 32),
    ),
    # ImageMLPAE
    "ImageMLPAE_Digits8_32x8x32_bs32": (
        "sklearn 8x8 digits auto-encoder 32-8-32, ReLU, MSE, batch 32",
        relu_autoencoder("digits", 8, (32, 8, 32), 32),
    ),
    "ImageMLPAE_FashionMnist14_64x16x64_bs64": (
        "14x14 Fashion-MNIST auto-encoder 64-16-64, ReLU, MSE, batch 64",
        relu_autoencoder("fashion_mnist", 14, (64, 16, 64), 64),
    ),
    # VAE
    "VAE_FashionMnist14_128x16x128_bs64": (
        "14x14 Fashion-MNIST VAE, encoder 128, latent 16, decoder 128, ReLU, batch 64",
        velo_vae("fashion_mnist", 14, 128, 16, 128, "relu", 64),
    ),
    "VAE_Digits8_32x4x32_Tanh_bs32": (
        "sklearn 8x8 digits VAE, encoder 32, latent 4, decoder 32, tanh, batch 32",
        velo_vae("digits", 8, 32, 4, 32, "tanh", 32),
    ),
    # Flows
    "Flow_NVP_FashionMnist14_64x64_2bijectors_bs64": (
        "14x14 Fashion-MNIST real NVP, 2 coupling layers of ReLU 64x64 nets, batch 64",
        flow("nvp", "fashion_mnist", 14, (64, 64), 2, 64),
    ),
    "Flow_MAF_Digits8_128_3bijectors_bs32": (
        "sklearn 8x8 digits MAF, 3 MADE bijectors of ReLU 128 units, batch 32",
        flow("maf", "digits", 8, (128,), 3, 32),
    ),
    # RNNLM
    "RNNLM_kjv_Patch32_GRU64_Embed32_bs32": (
        "King James Bible characters, GRU 64, embedding 32, sequence 32, batch 32",
        rnn_lm("kjv", "gru", 64, 32, 32, 32),
    ),
    "RNNLM_austen_Patch16_VanillaRNN128_Embed32_bs32": (
        "Jane Austen characters, vanilla tanh RNN 128, embedding 32, sequence 16, batch 32",
        rnn_lm("austen", "vanilla", 128, 32, 16, 32),
    ),
    "RNNLM_shakespeare_Patch32_LSTM64_Embed32_bs16": (
        "Shakespeare characters, LSTM 64, embedding 32, sequence 32, batch 16",
        rnn_lm("shakespeare", "lstm", 64, 32, 32, 16),
    ),
    # TransformerLM
    "TransformerLM_kjv_2heads_32width_1layer_seq16_bs16": (
        "King James Bible characters, Transformer 2 heads x d_model 32 x 1 layer, seq 16, batch 16",
        transformer_lm("kjv", 2, 16, 1, 16, 16),
    ),
    # ViT
    "VIT_FashionMnist8_patch2_32x2heads_2layers_bs32": (
        "8x8 Fashion-MNIST, ViT patch 2, width 32, 2 heads, 2 layers, MLP 64, batch 32",
        velo_vit("fashion_mnist", 8, 2, 2, 16, 2, 64, 32),
    ),
    "VIT_Digits8_patch4_64x4heads_1layer_bs64": (
        "sklearn 8x8 digits, ViT patch 4, width 64, 4 heads, 1 layer, MLP 128, batch 64",
        velo_vit("digits", 8, 4, 4, 16, 1, 128, 64),
    ),
    # Quadratics
    "Quadratic_d100_cond1e3": (
        "0.5 (x-x*)^T H (x-x*), 100 dims, random rotation, Hessian condition number 1e3",
        synthetic({"problem": "quadratic_bowl", "dim": 100, "condition": 1e3, "seed": 1}),
    ),
    "Quadratic_d1000_cond1e2_noise1": (
        "0.5 (x-x*)^T H (x-x*), 1000 dims, condition 1e2, N(0, 1) gradient noise",
        synthetic({"problem": "quadratic_bowl", "dim": 1000, "condition": 1e2,
                   "noise_std": 1.0, "seed": 2}),
    ),
    # Synthetic problems
    "Synthetic_Rosenbrock_d10": (
        "Rosenbrock's banana valley in 10 dims, init uniform in [-5, 10]^10",
        synthetic({"problem": "test_function", "dim": 10, "function": "rosenbrock"}),
    ),
    "Synthetic_LogisticRegression_d50_flip10_bs32": (
        "logistic regression, 50 Gaussian features, random teacher, 10% flipped labels, batch 32",
        synthetic({"problem": "logistic_regression", "dim": 50, "num_examples": 2000,
                   "batch_size": 32, "label_flip": 0.1, "seed": 3}),
    ),
    "Synthetic_SparseGradBowl_d100_cond1e2_zero90": (
        "quadratic bowl (100 dims, condition 1e2) with 90% of gradient entries zeroed per step",
        synthetic({"problem": "quadratic_bowl", "dim": 100, "condition": 1e2, "seed": 4},
                  transform="sparse", zero_prob=0.9, seed=4),
    ),
    "Synthetic_RescaledBowl_d100_cond10_scales1e4": (
        "quadratic bowl (100 dims, condition 10), parameters rescaled log-uniformly in 1e-2..1e2",
        synthetic({"problem": "quadratic_bowl", "dim": 100, "condition": 10.0, "seed": 5},
                  transform="rescale", scale_range=(1e-2, 1e2), seed=5),
    ),
}


def entries() -> dict[str, tuple[str, Callable[[], Task]]]:
    """``name -> (description, builder)``; every builder sets the task's ``name``."""
    return {name: (desc, _named(name, build)) for name, (desc, build) in BENCH.items()}
