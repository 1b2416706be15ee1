"""The sampled task families of VeLO (Metz et al. 2022, VeLO, arXiv:2211.09760, App. C.3, §3.2),
split into static and dynamic configs (App. C.1).

Eight families, with the exact ranges of App. C.3:

====================  =================  =====================================================
family (``name``)     paper section      dynamic config (vectorisable)
====================  =================  =====================================================
``mlp``               C.3.1              initializer, init scale, activation
``conv``              C.3.2              initializer, init scale, activation
``mlp_ae``            C.3.3              initializer, init scale, activation, log loss,
                                         centre data, constrain output
``mlp_vae``           C.3.4              initializer, init scale, activation, centre data,
                                         per-dimension loss
``resnet``            C.3.5              activation
``rnn_lm``            C.3.6              initializer, init scale
``transformer_lm``    C.3.7              (none)
``vit``               C.3.8              dropout rate, attention dropout rate
====================  =================  =====================================================

A ninth family, ``lopt`` (C.3.9, training a learned optimizer as a task), lives in
:mod:`learnopt.tasks.families.lopt` (its inner task is drawn from ``mlp``; its dynamic config
is that task's). :mod:`learnopt.tasks.families.registry` lists all nine as ``velo_<name>``.

**Static and dynamic configs** (C.1, "Task vectorization"). ``family.sample(key)`` returns a
frozen dataclass ``XConfig(static=XStatic(...), dynamic=XDynamic(...))``. The static part holds
everything that changes the compiled program (shapes, layer counts, batch size, data set);
the dynamic part holds scalars that enter the program as arrays (initializer index and scale,
activation index, loss options, dropout rates), so tasks that share a static config run as one
``vmap``: ``task.init_dynamic(dyn, key)``, ``task.loss_dynamic(dyn, params, key, batch)`` and
``task.normalizer_dynamic(dyn, loss)`` take the dynamic config as a pytree of arrays, and
:func:`stack_dynamic` stacks several for ``vmap``. ``task.init`` / ``task.loss`` /
``task.normalizer`` are the same functions at the task's own dynamic config. Departure: C.3.8
lists ViT dropout among the static elements; a rate does not change the program, so we make it
dynamic (a rate of 0 is "no dropout", drawn with probability 0.3 as in the paper).

Sampling draws from a NumPy generator seeded with the key's bits (``sample_static`` and
``sample_dynamic`` use separate streams), so it is deterministic in the key, costs no device
work, and the static part of ``sample(key)`` equals ``sample_static(key)``. "Log uniform"
integers are ``floor(exp(U(log lo, log(hi + 1))))``, so both ends are reachable.

**Sizes.** ``size="paper"`` uses the paper's ranges. ``size="cpu"`` (default) caps them so that
a training step takes at most a few tens of milliseconds on this 2-core CPU (measured range per
family: ``benchmarks/results/time_model.json``); ``size="tiny"`` is for tests.
The ranges are the ``RANGES`` class attribute of each family (``{size: {field: (lo, hi)}}``);
the CPU caps that differ from the paper are:

* mlp, mlp_ae, mlp_vae: batch <= 256 (paper 512).
* conv: hidden <= 32 (64), image <= 16 (32), batch <= 64 (512).
* resnet: max blocks per group <= 2 (10), base width <= 16 (256), initial channels <= 16
  (64), image <= 16 (64), batch <= 32 (256).
* rnn_lm: RNN size <= 128 (256), embedding <= 64 (256), batch <= 32 (512), sequence <= 64
  (512), truncated vocabulary <= 1000 (10K).
* transformer_lm: head dim 8-16 (8-128), heads 2-8 (8-128), layers <= 2 (8), batch <= 16
  (512), sequence <= 32 (512), vocabulary <= 1000 (10K).
* vit: layers <= 4 (16), heads <= 4 (16), head dim <= 16 (64 / 32), MLP dim <= 128 (512),
  image <= 16 (64), batch <= 32 (256).

Validity (C.4's classifier predicts which configs run at all): we make every sampled config
valid by construction instead. Conv stride-2 layers are ``min(num_stride2, num_layers)``; ViT
patch sizes are drawn from those of {2, 4, 8, 12, 16} not larger than the image.

**Data.** Paper data sets are replaced by installable ones
(:mod:`learnopt.tasks.families.velo_data`, ``DATASET_SUBSTITUTES``); ``data="synthetic"`` gives
random in-memory data of the same shapes (tests, timing).

**Normalizers** (App. D.4: per-family hand-designed maps of the loss into about
[-10, 10], used for monitoring; the released code's ``normalizer`` of each parametric family):

* classification (mlp, conv, resnet) and language models (rnn_lm, transformer_lm), with
  ``C`` classes or vocabulary size: ``m = ln(2C)``; NaN/inf -> ``m``;
  ``(clip(loss, 0, m) - ln(C / 5)) * 10 / ln C``.
* vit: NaN/inf -> 10, ``clip(loss, 0, 10)`` (the released ViT task).
* mlp_ae: the log of the MSE (the loss itself under log loss); NaN/inf -> 1;
  ``clip(., -12, 1) * 0.5 + 9.5``. Departure: the code adds 10, giving [4, 10.5], just
  outside D.4's [-10, 10]; we add 9.5, giving [3.5, 10].
* mlp_vae: the per-dimension negative ELBO (the loss divided by the number of pixels unless it
  already is per-dimension); NaN/inf -> 10; ``clip(., 0, 10)``.

Other departures are listed with each family and in :mod:`learnopt.tasks.models.sampled`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.tasks.base import Datasets, Task, TaskFamily
from learnopt.tasks.families import velo_data as fd
from learnopt.tasks.models import sampled as fm

SIZES = ("paper", "cpu", "tiny")
DATA_MODES = ("registry", "synthetic")
RESNET_WIDTH_PATTERNS = ((1, 1, 1, 1), (1, 2, 4, 8), (1, 2, 2, 4), (1, 2, 2, 2), (1, 2, 4, 4))
RESNET_KERNELS = (3, 5, 7)
VIT_PATCHES = (2, 4, 8, 12, 16)
VIT_DROPOUT_PROB = 0.7
VIT_DROPOUT_MAX = 0.8

# --- sampling helpers -----------------------------------------------------------------------


def numpy_rng(key: jax.Array, stream: int = 0) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX key (raw ``uint32[2]`` or typed)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    bits = np.asarray(key, dtype=np.uint32).ravel().tolist()
    return np.random.default_rng([*bits, stream])


def log_uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi] whose log is uniform: ``floor(exp(U(log lo, log(hi + 1))))``."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got {lo}, {hi}")
    return int(min(hi, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer uniform in [lo, hi] (inclusive)."""
    return int(rng.integers(lo, hi + 1))


def choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(0, len(options)))]


# --- dynamic configs (pytrees of scalars) ---------------------------------------------------


@flax.struct.dataclass
class InitActDynamic:
    """C.2.1 initializer (index into ``family_models.INITIALIZERS``) and scale, C.2.2 activation
    (index into ``family_models.ACTIVATION_NAMES``)."""

    init_index: int = 0
    init_scale: float = 1.0
    activation: int = 0


@flax.struct.dataclass
class AEDynamic:
    """C.3.3: initializer, activation, log loss, centre data to [-1, 1], constrain output."""

    init_index: int = 0
    init_scale: float = 1.0
    activation: int = 0
    log_loss: bool = False
    center_data: bool = False
    constrain_output: bool = False


@flax.struct.dataclass
class VAEDynamic:
    """C.3.4: initializer, activation, centre data, per-dimension (vs summed) loss."""

    init_index: int = 0
    init_scale: float = 1.0
    activation: int = 0
    center_data: bool = False
    per_dim_loss: bool = False


@flax.struct.dataclass
class ActDynamic:
    """C.3.5: the activation only."""

    activation: int = 0


@flax.struct.dataclass
class InitDynamic:
    """C.3.6: the initializer only."""

    init_index: int = 0
    init_scale: float = 1.0


@flax.struct.dataclass
class NoDynamic:
    """C.3.7: no dynamic config."""


@flax.struct.dataclass
class DropoutDynamic:
    """C.3.8 dropout rates (static in the paper; dynamic here, see the module docstring)."""

    dropout: float = 0.0
    attention_dropout: float = 0.0


def sample_init_act(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "init_index": uniform_int(rng, 0, len(fm.INITIALIZERS) - 1),
        "init_scale": float(rng.uniform(*fm.INIT_SCALE_RANGE)),
        "activation": uniform_int(rng, 0, len(fm.ACTIVATIONS) - 1),
    }


def as_arrays(dynamic: Any) -> Any:
    """The dynamic config as a pytree of JAX arrays (int32, float32, bool)."""
    return jax.tree_util.tree_map(jnp.asarray, dynamic)


def stack_dynamic(dynamics: Sequence[Any]) -> Any:
    """Stack dynamic configs of one type along a new leading axis, for ``vmap``."""
    if not dynamics:
        raise ValueError("need at least one dynamic config")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *dynamics)


def stack_configs(configs: Sequence[FamilyConfig]) -> Any:
    """The dynamic parts of configs that share one static part, stacked for ``vmap``."""
    if not configs:
        raise ValueError("need at least one config")
    if len({c.static for c in configs}) != 1:
        raise ValueError("configs must share their static part to be vectorised together")
    return stack_dynamic([c.dynamic for c in configs])


# --- static configs -------------------------------------------------------------------------


def _dense_costs(dims: Sequence[int]) -> tuple[float, float, float]:
    """(forward MAC-FLOPs, output floats, parameters) per example of a stack of dense layers."""
    flops = sum(2.0 * a * b for a, b in zip(dims[:-1], dims[1:], strict=False))
    acts = float(sum(dims[1:]))
    params = float(sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=False)))
    return flops, acts, params


def _features(fwd_flops, acts, params, batch, layers, inputs) -> dict[str, float]:
    """The cost features of a training step used by ``learnopt.tasks.timing``: training FLOPs
    (3x forward, per step), activation floats per step, parameters, batch size, sequential depth
    and input floats per step."""
    return {
        "flops": 3.0 * fwd_flops * batch,
        "activations": float(acts) * batch,
        "params": float(params),
        "batch": float(batch),
        "layers": float(layers),
        "inputs": float(inputs) * batch,
    }


@dataclasses.dataclass(frozen=True)
class ImageStatic:
    """Fields shared by the image families: the paper's data set name, the registry data set
    used for it, the image side length and the batch size."""

    paper_dataset: str = "fashion_mnist"
    dataset: str = "fashion_mnist"
    image_size: int = 8
    batch_size: int = 32

    @property
    def channels(self) -> int:
        return fd.IMAGE_INFO[self.dataset][0]

    @property
    def num_classes(self) -> int:
        return fd.IMAGE_INFO[self.dataset][1]

    @property
    def input_dim(self) -> int:
        return self.image_size * self.image_size * self.channels


@dataclasses.dataclass(frozen=True)
class MLPStatic(ImageStatic):
    """C.3.1 static config."""

    hidden_size: int = 32
    num_layers: int = 1

    def cost_features(self) -> dict[str, float]:
        dims = [self.input_dim, *[self.hidden_size] * self.num_layers, self.num_classes]
        f, a, p = _dense_costs(dims)
        return _features(f, a, p, self.batch_size, self.num_layers + 1, self.input_dim)


@dataclasses.dataclass(frozen=True)
class ConvStatic(ImageStatic):
    """C.3.2 static config (3x3 SAME convolutions; the first ``num_stride2`` have stride 2)."""

    hidden_size: int = 16
    num_layers: int = 2
    num_stride2: int = 1

    @property
    def strides(self) -> tuple[int, ...]:
        n2 = min(self.num_stride2, self.num_layers)
        return (2,) * n2 + (1,) * (self.num_layers - n2)

    def cost_features(self) -> dict[str, float]:
        s, c_in = self.image_size, self.channels
        flops = acts = params = 0.0
        for stride in self.strides:
            s = -(-s // stride)
            flops += 2.0 * s * s * 9 * c_in * self.hidden_size
            acts += s * s * self.hidden_size
            params += 9 * c_in * self.hidden_size + self.hidden_size
            c_in = self.hidden_size
        flops += 2.0 * c_in * self.num_classes
        params += c_in * self.num_classes + self.num_classes
        return _features(flops, acts, params, self.batch_size, self.num_layers + 1, self.input_dim)


@dataclasses.dataclass(frozen=True)
class AEStatic(ImageStatic):
    """C.3.3 static config."""

    hidden_size: int = 32
    num_layers: int = 1

    def cost_features(self) -> dict[str, float]:
        dims = [self.input_dim, *[self.hidden_size] * self.num_layers, self.input_dim]
        f, a, p = _dense_costs(dims)
        return _features(f, a, p, self.batch_size, self.num_layers + 1, self.input_dim)


@dataclasses.dataclass(frozen=True)
class VAEStatic(ImageStatic):
    """C.3.4 static config."""

    enc_hidden_size: int = 32
    dec_hidden_size: int = 32
    enc_layers: int = 1
    dec_layers: int = 1
    latent_size: int = 8

    def cost_features(self) -> dict[str, float]:
        d = self.input_dim
        enc = [d, *[self.enc_hidden_size] * self.enc_layers, 2 * self.latent_size]
        dec = [self.latent_size, *[self.dec_hidden_size] * self.dec_layers, 2 * d]
        f1, a1, p1 = _dense_costs(enc)
        f2, a2, p2 = _dense_costs(dec)
        # The quantized-normal likelihood costs a few dozen flops per pixel (two log_ndtr).
        f = f1 + f2 + 60.0 * d
        layers = self.enc_layers + self.dec_layers + 2
        return _features(f, a1 + a2 + 4 * d, p1 + p2, self.batch_size, layers, d)


@dataclasses.dataclass(frozen=True)
class ResNetStatic(ImageStatic):
    """C.3.5 static config."""

    blocks_per_group: tuple[int, ...] = (1, 1, 1, 1)
    width_pattern: tuple[int, ...] = (1, 1, 1, 1)
    base_width: int = 8
    initial_kernel: int = 3
    initial_channels: int = 8
    max_pool: bool = False

    @property
    def channels_per_group(self) -> tuple[int, ...]:
        return tuple(self.base_width * p for p in self.width_pattern)

    def cost_features(self) -> dict[str, float]:
        s, k = self.image_size, self.initial_kernel
        c = self.initial_channels
        flops = 2.0 * s * s * k * k * self.channels * c
        acts = float(s * s * c)
        params = float(k * k * self.channels * c + c)
        layers = 1
        if self.max_pool:
            s = -(-s // 2)
        for g, (blocks, w) in enumerate(
            zip(self.blocks_per_group, self.channels_per_group, strict=True)
        ):
            for b in range(blocks):
                stride = 2 if (g > 0 and b == 0) else 1
                s_out = -(-s // stride)
                flops += 2.0 * s_out * s_out * 9 * (c * w + w * w)
                params += 9 * (c * w + w * w) + 2 * w + 2 * c
                acts += 4.0 * s_out * s_out * w + 2.0 * s * s * c
                if stride != 1 or c != w:
                    flops += 2.0 * s_out * s_out * c * w
                    params += c * w + w
                s, c = s_out, w
                layers += 2
        flops += 2.0 * c * self.num_classes
        params += c * self.num_classes + self.num_classes
        return _features(flops, acts, params, self.batch_size, layers + 1, self.input_dim)


@dataclasses.dataclass(frozen=True)
class TextStatic:
    """Fields shared by the language-model families: paper data set, substitute corpus,
    tokenizer (``bytes`` or ``words``), vocabulary size (256 for bytes, the sampled truncation
    for words), batch size and sequence length."""

    paper_dataset: str = "lm1b_bytes"
    dataset: str = "shakespeare"
    tokenizer: str = "bytes"
    vocab_size: int = 256
    batch_size: int = 8
    seq_len: int = 16


@dataclasses.dataclass(frozen=True)
class RNNStatic(TextStatic):
    """C.3.6 static config."""

    cell: str = "lstm"
    rnn_size: int = 32
    embed_size: int = 16

    def cost_features(self) -> dict[str, float]:
        g = {"vanilla": 1, "lstm": 4, "gru": 3}[self.cell]
        h, e, v, t = self.rnn_size, self.embed_size, self.vocab_size, self.seq_len
        flops = t * (2.0 * g * (e + h) * h + 2.0 * h * v + 10.0 * g * h)
        acts = t * (e + g * h + h + v)
        params = v * e + g * (e + h + 1) * h + (2 if g == 4 else 1) * h + h * v + v
        return _features(flops, acts, params, self.batch_size, t + 2, t)


@dataclasses.dataclass(frozen=True)
class TransformerStatic(TextStatic):
    """C.3.7 static config (``d_model = num_heads * head_dim``)."""

    head_dim: int = 8
    num_heads: int = 2
    num_layers: int = 1

    @property
    def d_model(self) -> int:
        return self.num_heads * self.head_dim

    def cost_features(self) -> dict[str, float]:
        d, t, v, n = self.d_model, self.seq_len, self.vocab_size, self.num_layers
        per_layer = 2.0 * t * (3 * d * d + d * d + 8 * d * d) + 4.0 * t * t * d
        flops = n * per_layer + 2.0 * t * d * v
        acts = n * (t * 10 * d + 2 * self.num_heads * t * t) + t * v
        params = v * d + t * d + n * (12 * d * d + 13 * d) + d * v + v + 2 * d
        return _features(flops, acts, params, self.batch_size, 4 * n + 2, t)


@dataclasses.dataclass(frozen=True)
class ViTStatic(ImageStatic):
    """C.3.8 static config (``hidden = num_heads * head_dim``)."""

    num_layers: int = 1
    num_heads: int = 2
    head_dim: int = 8
    mlp_dim: int = 32
    patch_size: int = 2

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def cost_features(self) -> dict[str, float]:
        d, n, m, p = self.hidden, self.num_tokens, self.mlp_dim, self.patch_size
        flops = 2.0 * (n - 1) * p * p * self.channels * d
        flops += self.num_layers * (2.0 * n * 4 * d * d + 4.0 * n * n * d + 4.0 * n * d * m)
        flops += 2.0 * d * self.num_classes
        acts = self.num_layers * (n * (8 * d + m) + 2 * self.num_heads * n * n)
        params = p * p * self.channels * d + n * d + self.num_layers * (4 * d * d + 2 * d * m)
        params += d * self.num_classes
        return _features(flops, acts, params, self.batch_size, 4 * self.num_layers + 2, n)


# --- configs (static + dynamic) -------------------------------------------------------------


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """A sampled task: ``static`` (recompiles) and ``dynamic`` (vectorises) parts (C.1).

    Plain dicts given for either part (as :func:`learnopt.tasks.base.config_from_dict` passes
    them after a JSON round trip) are converted to the declared dataclasses.
    """

    static: Any
    dynamic: Any
    family: ClassVar[str] = ""

    def __post_init__(self):
        for name in ("static", "dynamic"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                cls = typing.get_type_hints(type(self))[name]
                fields = {k: _tuplify(v) for k, v in value.items()}
                object.__setattr__(self, name, cls(**fields))


@dataclasses.dataclass(frozen=True)
class MLPConfig(FamilyConfig):
    static: MLPStatic
    dynamic: InitActDynamic
    family: ClassVar[str] = "mlp"


@dataclasses.dataclass(frozen=True)
class ConvConfig(FamilyConfig):
    static: ConvStatic
    dynamic: InitActDynamic
    family: ClassVar[str] = "conv"


@dataclasses.dataclass(frozen=True)
class AEConfig(FamilyConfig):
    static: AEStatic
    dynamic: AEDynamic
    family: ClassVar[str] = "mlp_ae"


@dataclasses.dataclass(frozen=True)
class VAEConfig(FamilyConfig):
    static: VAEStatic
    dynamic: VAEDynamic
    family: ClassVar[str] = "mlp_vae"


@dataclasses.dataclass(frozen=True)
class ResNetConfig(FamilyConfig):
    static: ResNetStatic
    dynamic: ActDynamic
    family: ClassVar[str] = "resnet"


@dataclasses.dataclass(frozen=True)
class RNNConfig(FamilyConfig):
    static: RNNStatic
    dynamic: InitDynamic
    family: ClassVar[str] = "rnn_lm"


@dataclasses.dataclass(frozen=True)
class TransformerConfig(FamilyConfig):
    static: TransformerStatic
    dynamic: NoDynamic
    family: ClassVar[str] = "transformer_lm"


@dataclasses.dataclass(frozen=True)
class ViTConfig(FamilyConfig):
    static: ViTStatic
    dynamic: DropoutDynamic
    family: ClassVar[str] = "vit"


CONFIG_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        MLPConfig,
        ConvConfig,
        AEConfig,
        VAEConfig,
        ResNetConfig,
        RNNConfig,
        TransformerConfig,
        ViTConfig,
    )
}


# --- normalizers (App. D.4) -----------------------------------------------------------------


def classification_normalizer(loss: jax.Array, num_classes: int) -> jax.Array:
    """``(clip(loss, 0, ln 2C) - ln(C/5)) * 10 / ln C`` with NaN/inf mapped to ``ln 2C``."""
    top = math.log(2 * num_classes)
    loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=top, posinf=top, neginf=top)
    return (jnp.clip(loss, 0.0, top) - math.log(num_classes / 5)) * 10.0 / math.log(num_classes)


# --- tasks ----------------------------------------------------------------------------------


class SampledTask(Task):
    """A task built from a :class:`FamilyConfig`.

    The ``*_dynamic`` methods take the dynamic config explicitly, either as arrays (one
    config, or with a leading batch axis under ``vmap``; see :func:`stack_dynamic`) or as the
    config's own Python scalars; ``init`` / ``loss`` / ``normalizer`` call them with the task's
    own dynamic config, which specialises each dynamic choice at trace time (one activation
    and one initializer compiled instead of all). Both give the same numbers.
    ``datasets`` are built on first use.
    """

    model: nn.Module
    uses_initializer: bool = True  # the dynamic config holds a C.2.1 initializer

    def __init__(self, config: FamilyConfig, data: str = "registry"):
        if data not in DATA_MODES:
            raise ValueError(f"data must be one of {DATA_MODES}, got {data!r}")
        self.config = config
        self.static = config.static
        self.data = data
        self.name = f"{config.family}_{_describe(config.static)}"

    @functools.cached_property
    def datasets(self) -> Datasets:  # type: ignore[override]
        return self._make_datasets()

    def _make_datasets(self) -> Datasets:
        raise NotImplementedError

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one training batch, known from the static config alone."""
        raise NotImplementedError

    def dynamic_arrays(self) -> Any:
        """The task's dynamic config as arrays (what ``vmap`` callers stack)."""
        return as_arrays(self.config.dynamic)

    def init(self, key: jax.Array):
        return self.init_dynamic(self.config.dynamic, key)

    def loss(self, params, key, batch) -> jax.Array:
        return self.loss_dynamic(self.config.dynamic, params, key, batch)

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return self.normalizer_dynamic(self.config.dynamic, loss)

    def _flax_init(self, key: jax.Array):
        """flax ``init`` of the model (used only for its shapes)."""
        raise NotImplementedError

    @functools.cached_property
    def param_shapes(self):
        return jax.eval_shape(self._flax_init, jax.random.PRNGKey(0))

    def init_dynamic(self, dyn: Any, key: jax.Array):
        if self.uses_initializer:
            return fm.init_params(self.param_shapes, key, dyn.init_index, dyn.init_scale)
        return fm.init_params(self.param_shapes, key)

    def loss_dynamic(self, dyn: Any, params, key: jax.Array, batch) -> jax.Array:
        raise NotImplementedError

    def normalizer_dynamic(self, dyn: Any, loss: jax.Array) -> jax.Array:
        raise NotImplementedError

    def num_params(self) -> int:
        return fm.count_params(self.param_shapes)


def _describe(static: Any) -> str:
    parts = [getattr(static, "dataset", "")]
    for f in dataclasses.fields(static):
        if f.name in ("paper_dataset", "dataset", "tokenizer"):
            continue
        v = getattr(static, f.name)
        v = "x".join(map(str, v)) if isinstance(v, tuple) else v
        parts.append(f"{f.name}{v}")
    return "_".join(str(p) for p in parts)


class _ImageTask(SampledTask):
    static: ImageStatic

    def _make_datasets(self) -> Datasets:
        s = self.static
        if self.data == "synthetic":
            return fd.synthetic_image_datasets(
                s.image_size, s.channels, s.num_classes, s.batch_size
            )
        return fd.image_datasets(s.dataset, s.image_size, s.batch_size)

    def abstract_batch(self):
        s = self.static
        return {
            "image": jax.ShapeDtypeStruct(
                (s.batch_size, s.image_size, s.image_size, s.channels), jnp.float32
            ),
            "label": jax.ShapeDtypeStruct((s.batch_size,), jnp.int32),
        }

    def _dummy(self) -> jax.Array:
        s = self.static
        return jnp.zeros((1, s.image_size, s.image_size, s.channels), jnp.float32)


class _ClassifierTask(_ImageTask):
    """Softmax cross-entropy of a model on images; the D.4 classification normalizer."""

    def _args(self, dyn, key) -> tuple:
        return (dyn.activation,)

    def _flax_init(self, key):
        return self.model.init(key, self._dummy(), *self._args(self.config.dynamic, None))["params"]

    def logits(self, dyn, params, images, key=None):
        return self.model.apply({"params": params}, images, *self._args(dyn, key))

    def loss_dynamic(self, dyn, params, key, batch):
        logits = self.logits(dyn, params, batch["image"], key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def normalizer_dynamic(self, dyn, loss):
        return classification_normalizer(loss, self.static.num_classes)

    def metrics(self, params, batch):
        logits = self.logits(self.config.dynamic, params, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


class MLPTask(_ClassifierTask):
    """C.3.1: an MLP classifier on flattened images."""

    def __init__(self, config: MLPConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.DynMLP((*[s.hidden_size] * s.num_layers, s.num_classes))


class ConvTask(_ClassifierTask):
    """C.3.2: a ConvNet classifier."""

    def __init__(self, config: ConvConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.DynConvNet((s.hidden_size,) * s.num_layers, s.strides, s.num_classes)


class ResNetTask(_ClassifierTask):
    """C.3.5: a small ResNet classifier (dynamic activation; fixed normal initializer)."""

    uses_initializer = False

    def __init__(self, config: ResNetConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.ResNet(
            s.initial_channels,
            s.initial_kernel,
            s.max_pool,
            s.blocks_per_group,
            s.channels_per_group,
            s.num_classes,
        )


class ViTTask(_ClassifierTask):
    """C.3.8: a Vision Transformer classifier with dynamic dropout rates; ``loss`` applies
    dropout with its key (``key=None`` turns it off), ``metrics`` runs without dropout."""

    uses_initializer = False

    def __init__(self, config: ViTConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.ViT(
            s.num_layers, s.num_heads, s.head_dim, s.mlp_dim, s.patch_size, s.num_classes
        )

    def _args(self, dyn, key):
        return (dyn.dropout, dyn.attention_dropout, key)

    def normalizer_dynamic(self, dyn, loss):
        loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=10.0, posinf=10.0, neginf=10.0)
        return jnp.clip(loss, 0.0, 10.0)


def _center(images, center):
    return fm.where(center, 2.0 * images - 1.0, images)


class AETask(_ImageTask):
    """C.3.3: an MLP auto-encoder trained with mean squared error.

    Following the released code: with ``center_data`` the images are mapped to [-1, 1]; with
    ``constrain_output`` the output goes through tanh (centred data) or sigmoid (data in
    [0, 1]), otherwise it is the last linear layer's; the per-example MSE is averaged over the
    batch, after a ``log(mse + 1e-8)`` under ``log_loss``.
    """

    def __init__(self, config: AEConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.DynMLP((*[s.hidden_size] * s.num_layers, s.input_dim))

    def _flax_init(self, key):
        return self.model.init(key, self._dummy(), 0)["params"]

    def loss_dynamic(self, dyn, params, key, batch):
        del key
        x = _center(batch["image"], dyn.center_data)
        x = x.reshape((x.shape[0], -1))
        pred = self.model.apply({"params": params}, x, dyn.activation)
        squashed = fm.where(dyn.center_data, jnp.tanh(pred), jax.nn.sigmoid(pred))
        pred = fm.where(dyn.constrain_output, squashed, pred)
        mse = jnp.mean(jnp.square(pred - x), axis=1)
        per_example = fm.where(dyn.log_loss, jnp.log(mse + 1e-8), mse)
        return jnp.mean(per_example)

    def normalizer_dynamic(self, dyn, loss):
        loss = jnp.asarray(loss, jnp.float32)
        out = fm.where(dyn.log_loss, loss, jnp.log(jnp.maximum(loss, 0.0) + 1e-8))
        out = jnp.nan_to_num(out, nan=1.0, posinf=1.0, neginf=1.0)
        return jnp.clip(out, -12.0, 1.0) * 0.5 + 9.5


class VAETask(_ImageTask):
    """C.3.4: an MLP VAE with a quantized normal observation model, trained on the negative
    ELBO (one reparameterised sample per example, drawn with the loss's key; ``key=None``
    uses ``PRNGKey(0)``).

    The quantisation bin is one grey level: 1/255 of the data range (2/255 for centred data).
    With ``per_dim_loss`` the per-example negative ELBO is divided by the number of pixels.
    """

    def __init__(self, config: VAEConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.VAE(
            (s.enc_hidden_size,) * s.enc_layers, (s.dec_hidden_size,) * s.dec_layers, s.latent_size
        )

    def _flax_init(self, key):
        return self.model.init(key, self._dummy(), 0, key, 1.0 / 255.0)["params"]

    def loss_dynamic(self, dyn, params, key, batch):
        if key is None:
            key = jax.random.PRNGKey(0)
        x = _center(batch["image"], dyn.center_data)
        bin_size = fm.where(dyn.center_data, 2.0 / 255.0, 1.0 / 255.0)
        log_px, kl = self.model.apply({"params": params}, x, dyn.activation, key, bin_size)
        neg_elbo = kl - log_px
        neg_elbo = fm.where(dyn.per_dim_loss, neg_elbo / self.static.input_dim, neg_elbo)
        return jnp.mean(neg_elbo)

    def normalizer_dynamic(self, dyn, loss):
        loss = jnp.asarray(loss, jnp.float32)
        out = fm.where(dyn.per_dim_loss, loss, loss / self.static.input_dim)
        out = jnp.nan_to_num(out, nan=10.0, posinf=10.0, neginf=10.0)
        return jnp.clip(out, 0.0, 10.0)


class _LMTask(SampledTask):
    """Mean next-token cross-entropy; the D.4 normalizer with ``C`` = vocabulary size."""

    static: TextStatic

    def _make_datasets(self) -> Datasets:
        s = self.static
        if self.data == "synthetic":
            return fd.synthetic_text_datasets(s.vocab_size, s.batch_size, s.seq_len)
        return fd.text_datasets(s.dataset, s.tokenizer, s.vocab_size, s.batch_size, s.seq_len)

    def abstract_batch(self):
        s = self.static
        return {"tokens": jax.ShapeDtypeStruct((s.batch_size, s.seq_len + 1), jnp.int32)}

    def _flax_init(self, key):
        return self.model.init(key, jnp.zeros((1, self.static.seq_len), jnp.int32))["params"]

    def loss_dynamic(self, dyn, params, key, batch):
        del dyn, key
        tokens = batch["tokens"]
        logits = self.model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def normalizer_dynamic(self, dyn, loss):
        return classification_normalizer(loss, self.static.vocab_size)

    def metrics(self, params, batch):
        tokens = batch["tokens"]
        logits = self.model.apply({"params": params}, tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens[:, 1:])}


class RNNTask(_LMTask):
    """C.3.6: an RNN language model (C.2.1 initializer on every weight matrix)."""

    def __init__(self, config: RNNConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.RNNLM(s.cell, s.vocab_size, s.embed_size, s.rnn_size)


class TransformerTask(_LMTask):
    """C.3.7: a decoder-only Transformer language model (no dynamic config)."""

    uses_initializer = False

    def __init__(self, config: TransformerConfig, data: str = "registry"):
        super().__init__(config, data)
        s = config.static
        self.model = fm.TransformerLM(
            s.vocab_size, s.num_heads, s.head_dim, s.num_layers, s.seq_len
        )


# --- families -------------------------------------------------------------------------------


class SampledFamily(TaskFamily):
    """A C.3 family: ``sample(key)`` -> config, ``task(config)`` -> :class:`SampledTask`.

    Args:
      size: ``"cpu"`` (default), ``"paper"`` or ``"tiny"``: which ``RANGES`` preset to sample.
      data: ``"registry"`` (installed data sets, via ``substitutes``) or ``"synthetic"``.
      substitutes: paper data set name -> registry name (default ``DATASET_SUBSTITUTES``).
    """

    name: str = "sampled"
    config_type: type = FamilyConfig
    task_type: type = SampledTask
    RANGES: ClassVar[dict[str, dict[str, tuple[int, int]]]] = {}
    PAPER_DATASETS: ClassVar[tuple[str, ...]] = fd.PAPER_IMAGE_DATASETS

    def __init__(
        self,
        size: str = "cpu",
        data: str = "registry",
        substitutes: Mapping[str, str] | None = None,
    ):
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        if data not in DATA_MODES:
            raise ValueError(f"data must be one of {DATA_MODES}, got {data!r}")
        self.size = size
        self.data = data
        self.substitutes = dict(fd.DATASET_SUBSTITUTES if substitutes is None else substitutes)
        missing = [d for d in self.PAPER_DATASETS if d not in self.substitutes]
        if missing:
            raise ValueError(f"substitutes has no entry for {', '.join(missing)}")

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return self.RANGES[self.size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size!r}, data={self.data!r})"

    # sampling
    def sample(self, key: jax.Array) -> FamilyConfig:
        return self.config_type(self.sample_static(key), self.sample_dynamic(key))

    def sample_static(self, key: jax.Array) -> Any:
        return self._sample_static(numpy_rng(key, 0), self.ranges)

    def sample_dynamic(self, key: jax.Array) -> Any:
        return self._sample_dynamic(numpy_rng(key, 1))

    def _sample_static(self, rng: np.random.Generator, r: Mapping[str, tuple[int, int]]) -> Any:
        raise NotImplementedError

    def _sample_dynamic(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def _dataset(self, rng: np.random.Generator) -> dict[str, str]:
        paper = choice(rng, self.PAPER_DATASETS)
        return {"paper_dataset": paper, "dataset": self.substitutes[paper]}

    # tasks
    def task(self, config: FamilyConfig, data: str | None = None) -> SampledTask:
        """The task of ``config``; ``data`` overrides the family's data mode."""
        if not isinstance(config, self.config_type):
            raise TypeError(
                f"{type(self).__name__} builds {self.config_type.__name__}, "
                f"got {type(config).__name__}"
            )
        return self.task_type(config, data or self.data)

    # validity
    def check(self, config: FamilyConfig) -> None:
        """Raise ValueError naming the first field of ``config`` outside this family's ranges."""
        if not isinstance(config, self.config_type):
            raise ValueError(f"expected {self.config_type.__name__}, got {type(config).__name__}")
        s = config.static
        for field, (lo, hi) in self._ranges_to_check(config).items():
            if not hasattr(s, field):
                continue
            value = getattr(s, field)
            values = value if isinstance(value, tuple) else (value,)
            if not all(lo <= v <= hi for v in values):
                raise ValueError(f"{field}={value} outside [{lo}, {hi}]")
        if hasattr(s, "paper_dataset"):
            if s.paper_dataset not in self.PAPER_DATASETS:
                raise ValueError(f"paper_dataset {s.paper_dataset!r} not in {self.PAPER_DATASETS}")
        self._check_extra(config)
        _check_dynamic(config.dynamic)

    def _ranges_to_check(self, config: FamilyConfig) -> Mapping[str, tuple[int, int]]:
        return self.ranges

    def _check_extra(self, config: FamilyConfig) -> None:
        pass


def _check_dynamic(dyn: Any) -> None:
    bounds = {
        "init_index": (0, len(fm.INITIALIZERS) - 1),
        "init_scale": fm.INIT_SCALE_RANGE,
        "activation": (0, len(fm.ACTIVATIONS) - 1),
        "dropout": (0.0, VIT_DROPOUT_MAX),
        "attention_dropout": (0.0, VIT_DROPOUT_MAX),
    }
    for f in dataclasses.fields(dyn):
        value = getattr(dyn, f.name)
        if f.name in bounds:
            lo, hi = bounds[f.name]
            if not lo <= value <= hi:
                raise ValueError(f"dynamic {f.name}={value} outside [{lo}, {hi}]")
        elif not isinstance(value, bool | np.bool_):
            raise ValueError(f"dynamic {f.name}={value!r} should be a bool")


def image_check(config: FamilyConfig) -> None:
    """Raise ValueError unless the config's data set is a known image set."""
    s = config.static
    if s.dataset not in fd.IMAGE_INFO:
        raise ValueError(f"dataset {s.dataset!r} is not a known image set")


class MLPFamily(SampledFamily):
    """C.3.1 MLP classifiers (hidden size log-uniform 8-128, 0-4 layers, image 4-32 log,
    batch 4-512 log, 5 data sets; dynamic: initializer, activation)."""

    name = "mlp"
    config_type = MLPConfig
    task_type = MLPTask
    RANGES = {
        "paper": {"hidden_size": (8, 128), "num_layers": (0, 4), "image_size": (4, 32),
                  "batch_size": (4, 512)},
        "cpu": {"hidden_size": (8, 128), "num_layers": (0, 4), "image_size": (4, 32),
                "batch_size": (4, 256)},
        "tiny": {"hidden_size": (2, 4), "num_layers": (0, 2), "image_size": (4, 5),
                 "batch_size": (2, 4)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return MLPStatic(
            hidden_size=log_uniform_int(rng, *r["hidden_size"]),
            num_layers=uniform_int(rng, *r["num_layers"]),
            image_size=log_uniform_int(rng, *r["image_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            **self._dataset(rng),
        )

    def _sample_dynamic(self, rng):
        return InitActDynamic(**sample_init_act(rng))

    def _check_extra(self, config):
        image_check(config)


class ConvFamily(SampledFamily):
    """C.3.2 ConvNet classifiers (hidden log-uniform 4-64, 0-3 layers, 0-2 stride-2 layers,
    image 4-32 log, batch 4-512 log, 5 data sets; dynamic: initializer, activation)."""

    name = "conv"
    config_type = ConvConfig
    task_type = ConvTask
    RANGES = {
        "paper": {"hidden_size": (4, 64), "num_layers": (0, 3), "num_stride2": (0, 2),
                  "image_size": (4, 32), "batch_size": (4, 512)},
        "cpu": {"hidden_size": (4, 32), "num_layers": (0, 3), "num_stride2": (0, 2),
                "image_size": (4, 16), "batch_size": (4, 64)},
        "tiny": {"hidden_size": (2, 3), "num_layers": (0, 2), "num_stride2": (0, 2),
                 "image_size": (4, 5), "batch_size": (2, 3)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return ConvStatic(
            hidden_size=log_uniform_int(rng, *r["hidden_size"]),
            num_layers=uniform_int(rng, *r["num_layers"]),
            num_stride2=uniform_int(rng, *r["num_stride2"]),
            image_size=log_uniform_int(rng, *r["image_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            **self._dataset(rng),
        )

    def _sample_dynamic(self, rng):
        return InitActDynamic(**sample_init_act(rng))

    def _check_extra(self, config):
        image_check(config)


class AEFamily(SampledFamily):
    """C.3.3 MLP auto-encoders. The paper says the layer count is "log uniform, between 0 and
    4, inclusive", which cannot include 0; like the released code we draw it uniformly."""

    name = "mlp_ae"
    config_type = AEConfig
    task_type = AETask
    RANGES = {
        "paper": {"hidden_size": (8, 128), "num_layers": (0, 4), "image_size": (4, 32),
                  "batch_size": (4, 512)},
        "cpu": {"hidden_size": (8, 128), "num_layers": (0, 4), "image_size": (4, 32),
                "batch_size": (4, 256)},
        "tiny": {"hidden_size": (2, 4), "num_layers": (0, 2), "image_size": (4, 5),
                 "batch_size": (2, 4)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return AEStatic(
            hidden_size=log_uniform_int(rng, *r["hidden_size"]),
            num_layers=uniform_int(rng, *r["num_layers"]),
            image_size=log_uniform_int(rng, *r["image_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            **self._dataset(rng),
        )

    def _sample_dynamic(self, rng):
        return AEDynamic(
            **sample_init_act(rng),
            log_loss=bool(rng.integers(0, 2)),
            center_data=bool(rng.integers(0, 2)),
            constrain_output=bool(rng.integers(0, 2)),
        )

    def _check_extra(self, config):
        image_check(config)


class VAEFamily(SampledFamily):
    """C.3.4 MLP VAEs (encoder/decoder hidden 4-128 log, 0-4 layers each, latent 2-128 log,
    image 4-32 log, batch 4-512 log; dynamic: initializer, activation, centre, per-dim loss)."""

    name = "mlp_vae"
    config_type = VAEConfig
    task_type = VAETask
    RANGES = {
        "paper": {"enc_hidden_size": (4, 128), "dec_hidden_size": (4, 128),
                  "enc_layers": (0, 4), "dec_layers": (0, 4), "latent_size": (2, 128),
                  "image_size": (4, 32), "batch_size": (4, 512)},
        "cpu": {"enc_hidden_size": (4, 128), "dec_hidden_size": (4, 128),
                "enc_layers": (0, 4), "dec_layers": (0, 4), "latent_size": (2, 128),
                "image_size": (4, 32), "batch_size": (4, 256)},
        "tiny": {"enc_hidden_size": (2, 4), "dec_hidden_size": (2, 4), "enc_layers": (0, 1),
                 "dec_layers": (0, 1), "latent_size": (2, 3), "image_size": (4, 5),
                 "batch_size": (2, 3)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return VAEStatic(
            enc_hidden_size=log_uniform_int(rng, *r["enc_hidden_size"]),
            dec_hidden_size=log_uniform_int(rng, *r["dec_hidden_size"]),
            enc_layers=uniform_int(rng, *r["enc_layers"]),
            dec_layers=uniform_int(rng, *r["dec_layers"]),
            latent_size=log_uniform_int(rng, *r["latent_size"]),
            image_size=log_uniform_int(rng, *r["image_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            **self._dataset(rng),
        )

    def _sample_dynamic(self, rng):
        return VAEDynamic(
            **sample_init_act(rng),
            center_data=bool(rng.integers(0, 2)),
            per_dim_loss=bool(rng.integers(0, 2)),
        )

    def _check_extra(self, config):
        image_check(config)


class ResNetFamily(SampledFamily):
    """C.3.5 ResNets: the maximum blocks per group is log-uniform in 1-10 and each of the 4
    groups gets a count uniform in [1, max] (the paper's wording; the code draws it
    log-uniformly); width pattern from 5; base width 8-256 log; stem kernel 3/5/7; stem
    channels 8-64 log; max pool or not; image 8-64 log; batch 4-256 log. Dynamic: activation."""

    name = "resnet"
    config_type = ResNetConfig
    task_type = ResNetTask
    RANGES = {
        "paper": {"max_blocks": (1, 10), "base_width": (8, 256), "initial_channels": (8, 64),
                  "image_size": (8, 64), "batch_size": (4, 256)},
        "cpu": {"max_blocks": (1, 2), "base_width": (8, 16), "initial_channels": (8, 16),
                "image_size": (8, 16), "batch_size": (4, 32)},
        "tiny": {"max_blocks": (1, 1), "base_width": (2, 2), "initial_channels": (2, 2),
                 "image_size": (8, 8), "batch_size": (2, 2)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        max_blocks = log_uniform_int(rng, *r["max_blocks"])
        return ResNetStatic(
            blocks_per_group=tuple(uniform_int(rng, 1, max_blocks) for _ in range(4)),
            width_pattern=choice(rng, RESNET_WIDTH_PATTERNS),
            base_width=log_uniform_int(rng, *r["base_width"]),
            initial_kernel=choice(rng, RESNET_KERNELS),
            initial_channels=log_uniform_int(rng, *r["initial_channels"]),
            max_pool=bool(rng.integers(0, 2)),
            image_size=log_uniform_int(rng, *r["image_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            **self._dataset(rng),
        )

    def _sample_dynamic(self, rng):
        return ActDynamic(activation=uniform_int(rng, 0, len(fm.ACTIVATIONS) - 1))

    def _check_extra(self, config):
        image_check(config)
        s = config.static
        lo, hi = self.ranges["max_blocks"]
        if len(s.blocks_per_group) != 4 or not all(lo <= b <= hi for b in s.blocks_per_group):
            raise ValueError(
                f"blocks_per_group={s.blocks_per_group}: need 4 counts in [{lo}, {hi}]"
            )
        if tuple(s.width_pattern) not in RESNET_WIDTH_PATTERNS:
            raise ValueError(f"width_pattern {s.width_pattern} not in {RESNET_WIDTH_PATTERNS}")
        if s.initial_kernel not in RESNET_KERNELS:
            raise ValueError(f"initial_kernel {s.initial_kernel} not in {RESNET_KERNELS}")


class _TextFamily(SampledFamily):
    PAPER_DATASETS = fd.PAPER_TEXT_DATASETS

    def _text_fields(self, rng, r) -> dict[str, Any]:
        paper = choice(rng, self.PAPER_DATASETS)
        tokenizer = fd.text_tokenizer(paper)
        vocab = log_uniform_int(rng, *r["vocab_size"])  # drawn always, used for words only
        return {
            "paper_dataset": paper,
            "dataset": self.substitutes[paper],
            "tokenizer": tokenizer,
            "vocab_size": fd.BYTE_VOCAB if tokenizer == "bytes" else vocab,
        }

    def _check_extra(self, config):
        s = config.static
        if s.dataset not in fd.TEXT_CORPORA:
            raise ValueError(f"dataset {s.dataset!r} is not a known corpus")
        if s.tokenizer != fd.text_tokenizer(s.paper_dataset):
            raise ValueError(f"tokenizer {s.tokenizer!r} does not match {s.paper_dataset!r}")
        lo, hi = self.ranges["vocab_size"]
        ok = s.vocab_size == fd.BYTE_VOCAB if s.tokenizer == "bytes" else lo <= s.vocab_size <= hi
        if not ok:
            raise ValueError(f"vocab_size {s.vocab_size} invalid for tokenizer {s.tokenizer!r}")

    def _ranges_to_check(self, config):
        # A byte-level config has vocabulary 256, outside the truncation range.
        return {k: v for k, v in self.ranges.items() if k != "vocab_size"}


class RNNFamily(_TextFamily):
    """C.3.6 RNN language models (RNN size and embedding 8-256 log, batch 4-512 log, sequence
    4-512 log, cell vanilla/LSTM/GRU, 4 data sets, vocabulary truncated to 100-10K log for
    the word-level sets; dynamic: initializer)."""

    name = "rnn_lm"
    config_type = RNNConfig
    task_type = RNNTask
    RANGES = {
        "paper": {"rnn_size": (8, 256), "embed_size": (8, 256), "batch_size": (4, 512),
                  "seq_len": (4, 512), "vocab_size": (100, 10_000)},
        "cpu": {"rnn_size": (8, 128), "embed_size": (8, 64), "batch_size": (4, 32),
                "seq_len": (4, 64), "vocab_size": (100, 1000)},
        "tiny": {"rnn_size": (2, 4), "embed_size": (2, 3), "batch_size": (2, 3),
                 "seq_len": (3, 5), "vocab_size": (5, 8)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return RNNStatic(
            rnn_size=log_uniform_int(rng, *r["rnn_size"]),
            embed_size=log_uniform_int(rng, *r["embed_size"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            seq_len=log_uniform_int(rng, *r["seq_len"]),
            cell=choice(rng, fm.RNN_CELLS),
            **self._text_fields(rng, r),
        )

    def _sample_dynamic(self, rng):
        return InitDynamic(
            init_index=uniform_int(rng, 0, len(fm.INITIALIZERS) - 1),
            init_scale=float(rng.uniform(*fm.INIT_SCALE_RANGE)),
        )

    def _check_extra(self, config):
        super()._check_extra(config)
        if config.static.cell not in fm.RNN_CELLS:
            raise ValueError(f"cell {config.static.cell!r} not in {fm.RNN_CELLS}")


class TransformerFamily(_TextFamily):
    """C.3.7 Transformer language models (head dim 8-128 log, heads 8-128 log, layers 1-8 log,
    batch 4-512 log, sequence 4-512 log, data sets and vocabulary as C.3.6; no dynamic)."""

    name = "transformer_lm"
    config_type = TransformerConfig
    task_type = TransformerTask
    RANGES = {
        "paper": {"head_dim": (8, 128), "num_heads": (8, 128), "num_layers": (1, 8),
                  "batch_size": (4, 512), "seq_len": (4, 512), "vocab_size": (100, 10_000)},
        "cpu": {"head_dim": (8, 16), "num_heads": (2, 8), "num_layers": (1, 2),
                "batch_size": (4, 16), "seq_len": (4, 32), "vocab_size": (100, 1000)},
        "tiny": {"head_dim": (2, 2), "num_heads": (1, 2), "num_layers": (1, 1),
                 "batch_size": (2, 2), "seq_len": (3, 4), "vocab_size": (5, 8)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        return TransformerStatic(
            head_dim=log_uniform_int(rng, *r["head_dim"]),
            num_heads=log_uniform_int(rng, *r["num_heads"]),
            num_layers=log_uniform_int(rng, *r["num_layers"]),
            batch_size=log_uniform_int(rng, *r["batch_size"]),
            seq_len=log_uniform_int(rng, *r["seq_len"]),
            **self._text_fields(rng, r),
        )

    def _sample_dynamic(self, rng):
        del rng
        return NoDynamic()


class ViTFamily(SampledFamily):
    """C.3.8 Vision Transformers (layers 1-16 log, heads 1-16 log, head dim uniform 8-64 with
    fewer than 4 heads else 8-32, MLP dim 32-512 log, image 4-64 log, batch 4-256 log, patch
    from {2, 4, 8, 12, 16} (those <= the image size), dropout with probability 0.7 at a rate
    uniform in [0, 0.8] and attention dropout uniform in [0, 0.8]; the paper says "on a log
    scale", which cannot reach 0, and the released code draws it uniformly, as we do)."""

    name = "vit"
    config_type = ViTConfig
    task_type = ViTTask
    RANGES = {
        "paper": {"num_layers": (1, 16), "num_heads": (1, 16), "head_dim_few": (8, 64),
                  "head_dim_many": (8, 32), "mlp_dim": (32, 512), "image_size": (4, 64),
                  "batch_size": (4, 256)},
        "cpu": {"num_layers": (1, 4), "num_heads": (1, 4), "head_dim_few": (8, 16),
                "head_dim_many": (8, 16), "mlp_dim": (32, 128), "image_size": (4, 16),
                "batch_size": (4, 32)},
        "tiny": {"num_layers": (1, 1), "num_heads": (1, 2), "head_dim_few": (2, 2),
                 "head_dim_many": (2, 2), "mlp_dim": (2, 4), "image_size": (4, 4),
                 "batch_size": (2, 2)},
    }  # fmt: skip

    def _sample_static(self, rng, r):
        layers = log_uniform_int(rng, *r["num_layers"])
        heads = log_uniform_int(rng, *r["num_heads"])
        head_dim = uniform_int(rng, *r["head_dim_few" if heads < 4 else "head_dim_many"])
        mlp_dim = log_uniform_int(rng, *r["mlp_dim"])
        image = log_uniform_int(rng, *r["image_size"])
        batch = log_uniform_int(rng, *r["batch_size"])
        dataset = self._dataset(rng)
        patch = choice(rng, [p for p in VIT_PATCHES if p <= image])
        return ViTStatic(
            num_layers=layers,
            num_heads=heads,
            head_dim=head_dim,
            mlp_dim=mlp_dim,
            image_size=image,
            batch_size=batch,
            patch_size=patch,
            **dataset,
        )

    def _sample_dynamic(self, rng):
        use = rng.uniform() < VIT_DROPOUT_PROB
        rate = float(rng.uniform(0.0, VIT_DROPOUT_MAX))
        attn = float(rng.uniform(0.0, VIT_DROPOUT_MAX))
        return DropoutDynamic(dropout=rate if use else 0.0, attention_dropout=attn if use else 0.0)

    def _check_extra(self, config):
        image_check(config)
        s = config.static
        key = "head_dim_few" if s.num_heads < 4 else "head_dim_many"
        lo, hi = self.ranges[key]
        if not lo <= s.head_dim <= hi:
            raise ValueError(f"head_dim {s.head_dim} outside [{lo}, {hi}] for {s.num_heads} heads")
        if s.patch_size not in VIT_PATCHES or s.patch_size > s.image_size:
            raise ValueError(f"patch_size {s.patch_size} invalid for image size {s.image_size}")


# The eight families of this module, in App. C.3 order. The ninth, ``lopt`` (C.3.9), is in
# :mod:`learnopt.tasks.families.lopt`; :mod:`learnopt.tasks.families.registry` lists all nine.
FAMILY_CLASSES: tuple[type[SampledFamily], ...] = (
    MLPFamily,
    ConvFamily,
    AEFamily,
    VAEFamily,
    ResNetFamily,
    RNNFamily,
    TransformerFamily,
    ViTFamily,
)
# §C.5: families allowed below / at-or-above a maximum step time of 1e-4 s (LOpt: not here).
SMALL_BUDGET_FAMILIES = ("mlp", "conv", "mlp_ae", "mlp_vae", "vit")
LARGE_BUDGET_FAMILIES = (*SMALL_BUDGET_FAMILIES, "rnn_lm", "transformer_lm", "resnet")


def family_of(config: FamilyConfig) -> str:
    """The family name of a config."""
    if not isinstance(config, FamilyConfig) or not config.family:
        raise TypeError(f"not a sampled-family config: {type(config).__name__}")
    return config.family
