"""The fixed benchmark suite of ``learnopt bench``: named tasks with step budgets.

In the spirit of VeLOdrome (Metz et al. 2022, VeLO, arXiv:2211.09760, §4.1 and App. F.2): a
fixed list of hand-designed tasks, each with a fixed training length, on which an optimizer is
compared with learning-rate-tuned baselines. VeLOdrome's 83 tasks train for 10K steps on an
accelerator; this suite is scaled down to run on a 2-core CPU:

* every task is a fixed-registry task (:func:`learnopt.tasks.fixed.registry.get_task`), either a
  canonical one (:mod:`learnopt.tasks.fixed.canonical`) or one made for the suite
  (:mod:`learnopt.tasks.fixed.bench`), on the offline data sets of ``learnopt data``;
* ``steps`` is chosen per task so that one Adam run of ``steps`` steps takes at most about 5 s
  on one core after compilation, about 90 s for the whole ``full`` suite and 15 s for
  ``quick`` (measured by ``benchmarks/bench_suite_time.py``, results in
  ``benchmarks/results/bench_suite_time.json``);
* the suite covers the kinds in :data:`KINDS`: the seven VeLOdrome-83 families (MLP, Conv,
  ResNet, auto-encoder, RNN LM, Transformer LM, ViT), VAEs (a VeLO meta-training family,
  App. C.3.4), flows (TaskSet's MAF and real NVP, arXiv:2009.11243, App. I.2.9-I.2.10), and
  quadratics and synthetic problems (Wichrowska et al. 2017, arXiv:1703.04813, §4.1).

The two tasks the project's earlier learned optimizers were meta-trained on
(``fmnist_mlp_8x8`` and ``ImageMLP_FashionMnist8_Relu32``) are left out, and a meta-training
mixture must not list any task of this suite (docs/benchmark.md).
"""

from __future__ import annotations

import dataclasses

from learnopt.tasks.base import Task

KINDS = (
    "mlp",
    "conv",
    "resnet",
    "autoencoder",
    "vae",
    "flow",
    "rnn_lm",
    "transformer_lm",
    "vit",
    "quadratic",
    "synthetic",
)

# Meta-training tasks of the project's earlier learned optimizers: never in the suite.
EXCLUDED = ("fmnist_mlp_8x8", "ImageMLP_FashionMnist8_Relu32")


@dataclasses.dataclass(frozen=True)
class BenchTask:
    """One task of the suite: a fixed-registry task name and its step budget."""

    name: str  # a fixed-registry task name: get_task(name) builds it
    steps: int  # step budget of the optimizer under test on this task
    kind: str  # one of KINDS
    why: str  # one line: what it tests / why it is in the suite

    def build(self) -> Task:
        from learnopt.tasks.fixed.registry import get_task

        return get_task(self.name)


_TASKS = (
    # -- MLPs ------------------------------------------------------------------------------
    BenchTask("ImageMLP_Digits8_Tanh64x64_bs32", 2000, "mlp",
              "small saturating (tanh) MLP on real handwritten digits at a small batch"),
    BenchTask("ImageMLP_Mnist1d_Gelu128x128_bs64", 2000, "mlp",
              "GELU MLP on 1-D signals: a non-image input distribution"),
    BenchTask("ImageMLP_FashionMnist14_Sigmoid32x32x32x32x32_bs256", 2000, "mlp",
              "deep narrow sigmoid MLP: vanishing gradients, large batch"),
    BenchTask("ImageMLP_FashionMnist16_Relu128x128x128_bs64", 2000, "mlp",
              "canonical 3-layer ReLU MLP (VeLOdrome Cifar10_128x128x128 at batch 64)"),
    BenchTask("ImageMLP_FashionMnist_Relu128x128", 2000, "mlp",
              "canonical 28x28 MLP (VeLOdrome FashionMnist_Relu128x128): the widest input layer"),
    BenchTask("ImageMLP_FashionMnist14_128x128_Dropout05_Relu_MSE", 2000, "mlp",
              "MSE loss and dropout noise: VeLO's best case (Cifar10_128x128_Dropout08_ReLU_MSE)"),
    # -- ConvNets ----------------------------------------------------------------------------
    BenchTask("Conv_FashionMnist8_16x32x32_bs64", 2000, "conv",
              "canonical small ConvNet (VeLOdrome Conv_*_32x64x64 scaled down)"),
    BenchTask("Conv_Digits8_16x16x16_Tanh_bs32", 2000, "conv",
              "tanh ConvNet on digits: convolution weight sharing with a saturating activation"),
    BenchTask("Conv_FashionMnist14_32x32x32_LeakyRelu_bs32", 2000, "conv",
              "two stride-2 convolutions, leaky ReLU, 14x14 inputs"),
    # -- ResNets -----------------------------------------------------------------------------
    BenchTask("Resnet_Digits8_8x8x16x16_Silu_bs32", 1000, "resnet",
              "pre-activation ResNet with batch statistics and SiLU: normalisation layers"),
    BenchTask("Resnet_FashionMnist14_8x16x16x32_Relu_bs32", 500, "resnet",
              "deeper-channel ResNet on 14x14 images (VeLOdrome Resnet_MultiRuntime_1 pattern)"),
    # -- auto-encoders -----------------------------------------------------------------------
    BenchTask("ImageMLPAE_FashionMnist_128x32x128_bs128", 1000, "autoencoder",
              "canonical MLP auto-encoder (VeLOdrome ImageMLPAE_FashionMnist_128x32x128_bs128)"),
    BenchTask("ImageMLPAE_Digits8_32x8x32_bs32", 2000, "autoencoder",
              "small bottleneck auto-encoder: regression loss without labels"),
    BenchTask("ImageMLPAE_FashionMnist14_64x16x64_bs64", 2000, "autoencoder",
              "mid-size auto-encoder on 14x14 images"),
    # -- VAEs --------------------------------------------------------------------------------
    BenchTask("VAE_FashionMnist14_128x16x128_bs64", 2000, "vae",
              "VeLO C.3.4 VAE: stochastic ELBO with reparameterised samples, large loss scale"),
    BenchTask("VAE_Digits8_32x4x32_Tanh_bs32", 2000, "vae",
              "small tanh VAE with a 4-d latent at a small batch"),
    # -- flows -------------------------------------------------------------------------------
    BenchTask("Flow_NVP_FashionMnist14_64x64_2bijectors_bs64", 2000, "flow",
              "real NVP density model: log-determinants, losses far below zero"),
    BenchTask("Flow_MAF_Digits8_128_3bijectors_bs32", 2000, "flow",
              "masked autoregressive flow: masked weights, clipped log-scales"),
    # -- RNN language models -----------------------------------------------------------------
    BenchTask("RNNLM_kjv_Patch32_GRU64_Embed32_bs32", 700, "rnn_lm",
              "GRU character LM: gated recurrence, softmax over the character vocabulary"),
    BenchTask("RNNLM_austen_Patch16_VanillaRNN128_Embed32_bs32", 1000, "rnn_lm",
              "vanilla tanh RNN LM: exploding/vanishing gradients through time"),
    BenchTask("RNNLM_shakespeare_Patch32_LSTM64_Embed32_bs16", 1000, "rnn_lm",
              "LSTM character LM (VeLOdrome RNNLM_*_LSTM128_Embed64 scaled down)"),
    # -- Transformer language models ---------------------------------------------------------
    BenchTask("TransformerLM_kjv_2heads_32width_1layer_seq16_bs16", 1000, "transformer_lm",
              "one-layer Transformer LM: attention, LayerNorm, embeddings"),
    BenchTask("TransformerLM_shakespeare_4heads_32width_2layers", 400, "transformer_lm",
              "canonical two-layer Transformer LM (VeLOdrome TransformerLM MultiRuntime_2)"),
    # -- ViTs --------------------------------------------------------------------------------
    BenchTask("VIT_FashionMnist8_patch2_32x2heads_2layers_bs32", 1000, "vit",
              "two-layer ViT on 16 patches: attention over an image"),
    BenchTask("VIT_Digits8_patch4_64x4heads_1layer_bs64", 1000, "vit",
              "wide shallow ViT on 4 patches (VeLOdrome VIT wideshallow, scaled down)"),
    # -- quadratics --------------------------------------------------------------------------
    BenchTask("Quadratic_d100_cond1e3", 2000, "quadratic",
              "ill-conditioned deterministic quadratic: curvature adaptation, exact optimum 0"),
    BenchTask("Quadratic_d1000_cond1e2_noise1", 2000, "quadratic",
              "noisy high-dimensional quadratic: step size under gradient noise"),
    # -- synthetic problems ------------------------------------------------------------------
    BenchTask("Synthetic_Rosenbrock_d10", 2000, "synthetic",
              "curved narrow valley with a huge initial loss: long-horizon progress"),
    BenchTask("Synthetic_LogisticRegression_d50_flip10_bs32", 2000, "synthetic",
              "convex stochastic problem with label noise (minimum above 0)"),
    BenchTask("Synthetic_SparseGradBowl_d100_cond1e2_zero90", 2000, "synthetic",
              "90% of gradient entries missing each step: accumulator behaviour"),
    BenchTask("Synthetic_RescaledBowl_d100_cond10_scales1e4", 2000, "synthetic",
              "per-parameter scales spanning 1e4: invariance to parameter scaling"),
)

_BY_NAME = {t.name: t for t in _TASKS}

SUITES: dict[str, tuple[str, ...]] = {
    "quick": (
        "ImageMLP_Digits8_Tanh64x64_bs32",
        "Conv_Digits8_16x16x16_Tanh_bs32",
        "VAE_Digits8_32x4x32_Tanh_bs32",
        "RNNLM_austen_Patch16_VanillaRNN128_Embed32_bs32",
        "Quadratic_d100_cond1e3",
        "Synthetic_Rosenbrock_d10",
    ),
    "full": tuple(t.name for t in _TASKS),
}


def suite(name: str) -> list[BenchTask]:
    """The tasks of suite ``name`` (``"quick"`` or ``"full"``), in suite order."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return [_BY_NAME[n] for n in SUITES[name]]


def bench_task(name: str) -> BenchTask:
    """The suite entry of task ``name``; an unknown name lists the valid ones."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown bench task {name!r}; valid names: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]
