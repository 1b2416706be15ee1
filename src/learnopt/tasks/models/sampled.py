"""Shared components and flax models of the sampled VeLO task families.

Metz et al. 2022, VeLO, arXiv:2211.09760. Shared components (App. C.2):

* **Initializers** (C.2.1): one initializer is drawn for all weight tensors of a network:
  (0) orthogonal, (1) uniform on ``+-sqrt(3 / fan_in)``, (2) normal with standard deviation
  ``sqrt(1 / fan_in)``; the result is multiplied by a scale drawn from U[0.5, 2.0].
  :func:`init_params` selects among them in-graph with ``lax.switch`` so that the index and
  the scale are *dynamic* config elements (arrays that vectorise under ``vmap``).
  ``fan_in`` is the product of all but the last axis of the tensor (a dense kernel's input
  width, a conv kernel's ``kh * kw * c_in``), as in the released code; for an embedding table
  that is the vocabulary size. Biases are zero and normalisation scales one. Families without
  a dynamic initializer (ResNet, Transformer, ViT) use the normal one at scale 1 (flax's
  default would be a truncated LeCun normal; the difference is the truncation).
* **Activations** (C.2.2): ReLU, ReLU6, SELU, tanh, sigmoid, SiLU, swish, GELU, leaky ReLU,
  cos, sin, selected in-graph by :func:`activation` (``lax.switch``; under ``vmap`` with a
  batched index XLA computes every branch and selects, which is what C.1's footnote 4 describes).
  SiLU and swish (beta = 1) coincide; both are kept because the paper lists both. Leaky ReLU
  uses slope 0.01 (the released code uses ``negative_slope=-0.5``; the paper gives none).

Models are small ``flax.linen`` modules. A module whose family has a dynamic activation takes
the activation index as a call argument, so one compiled program serves every activation
when the index is traced; a concrete index (a single task's own config) compiles only the
chosen activation (:func:`concrete`). Parameters are created by :func:`init_params` from the
shapes of the flax ``init``, not by flax's own initializers. Departures from the paper and
the released code are listed with each model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learnopt.tasks.models.conv import Conv

# --- C.2.1 initializers -------------------------------------------------------------------

INITIALIZERS = ("orthogonal", "uniform_sqrt3_fan_in", "normal_sqrt1_fan_in")
INIT_SCALE_RANGE = (0.5, 2.0)
POSITION_INIT_STD = 0.02
_ZERO_INIT = ("bias", "cls", "h0", "c0")


def concrete(x) -> int | float | bool | None:
    """The Python value of a concrete scalar (Python number, NumPy or JAX array outside a
    trace), or None for a tracer. Lets the single-task path specialise a dynamic choice at
    trace time (one activation or initializer compiled) while ``vmap`` over dynamic configs
    keeps the in-graph selection."""
    if isinstance(x, jax.core.Tracer):
        return None
    value = np.asarray(x)
    return value.item() if value.ndim == 0 else None


def _orthogonal(z: jax.Array, rows: int, cols: int) -> jax.Array:
    """A (rows, cols) matrix with orthonormal columns (or rows) from the normal draws ``z``."""
    m = z.reshape(max(rows, cols), min(rows, cols))
    q, r = jnp.linalg.qr(m)
    q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)
    return q if rows >= cols else q.T


def _weight(z, u, shape, index, scale):
    fan_in = math.prod(shape[:-1])
    branches = [
        lambda: _orthogonal(z, fan_in, shape[-1]).reshape(shape),
        lambda: ((2.0 * u - 1.0) * math.sqrt(3.0 / fan_in)).reshape(shape),
        lambda: (z * math.sqrt(1.0 / fan_in)).reshape(shape),
    ]
    i = concrete(index)
    if i is not None:
        w = branches[min(max(int(i), 0), len(branches) - 1)]()
    else:
        i = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(branches) - 1)
        w = jax.lax.switch(i, [lambda _, b=b: b() for b in branches], None)
    return w * jnp.asarray(scale, jnp.float32)


def init_params(shapes, key: jax.Array, index=None, scale=None):
    """Parameters for a pytree of shapes (e.g. ``jax.eval_shape`` of a flax ``init``).

    By leaf name: ``bias``, ``cls``, ``h0``, ``c0`` are zeros; ``scale`` ones; ``pos``
    N(0, 0.02^2); every other tensor of rank >= 2 (kernels, embeddings, recurrent matrices)
    comes from C.2.1 initializer ``index`` times ``scale`` with ``fan_in`` the product of all
    but its last axis (``index=None``: the normal initializer at scale 1, for the families
    without a dynamic initializer). ``index`` and ``scale`` may be traced (``vmap`` over
    dynamic configs). All leaves share one normal and one uniform draw of ``key``, sliced per
    leaf: two random-number programs instead of one per tensor, which keeps compile times
    short on CPU.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [math.prod(leaf.shape) for _, leaf in flat]
    total = max(1, sum(sizes))
    k_normal, k_uniform = jax.random.split(key)
    z_all = jax.random.normal(k_normal, (total,), jnp.float32)
    u_all = None
    if index is None:
        index, scale = 2, 1.0
    elif concrete(index) in (None, 1):
        u_all = jax.random.uniform(k_uniform, (total,), jnp.float32)
    out, offset = [], 0
    for (path, leaf), size in zip(flat, sizes, strict=True):
        name = str(getattr(path[-1], "key", path[-1]))
        z = z_all[offset : offset + size]
        u = None if u_all is None else u_all[offset : offset + size]
        offset += size
        if name in _ZERO_INIT or (leaf.ndim < 2 and name != "scale" and name != "pos"):
            value = jnp.zeros(leaf.shape, leaf.dtype)
        elif name == "scale":
            value = jnp.ones(leaf.shape, leaf.dtype)
        elif name == "pos":
            value = (z * POSITION_INIT_STD).reshape(leaf.shape)
        else:
            value = _weight(z, u, leaf.shape, index, scale)
        out.append(value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --- C.2.2 activations ----------------------------------------------------------------------


def _leaky_relu(x):
    return jax.nn.leaky_relu(x, 0.01)


ACTIVATIONS = (
    ("relu", jax.nn.relu),
    ("relu6", jax.nn.relu6),
    ("selu", jax.nn.selu),
    ("tanh", jnp.tanh),
    ("sigmoid", jax.nn.sigmoid),
    ("silu", jax.nn.silu),
    ("swish", lambda x: x * jax.nn.sigmoid(x)),
    ("gelu", jax.nn.gelu),
    ("leaky_relu", _leaky_relu),
    ("cos", jnp.cos),
    ("sin", jnp.sin),
)
ACTIVATION_NAMES = tuple(name for name, _ in ACTIVATIONS)


def activation(x: jax.Array, index) -> jax.Array:
    """Activation ``ACTIVATIONS[index]`` of ``x`` (C.2.2): chosen at trace time when ``index``
    is concrete, else in-graph with ``lax.switch`` (all branches computed under ``vmap``)."""
    i = concrete(index)
    if i is not None:
        return ACTIVATIONS[min(max(int(i), 0), len(ACTIVATIONS) - 1)][1](x)
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(ACTIVATIONS) - 1)
    return jax.lax.switch(index, [fn for _, fn in ACTIVATIONS], x)


def where(flag, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a if flag else b``, resolved at trace time for a concrete flag."""
    f = concrete(flag)
    if f is not None:
        return a if f else b
    return jnp.where(flag, a, b)


def dropout(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with a (possibly traced) ``rate`` in [0, 1); identity without a key
    or at a concrete rate of 0."""
    if key is None or concrete(rate) == 0:
        return x
    keep = 1.0 - jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 0.95)
    mask = jax.random.uniform(key, x.shape) < keep
    return jnp.where(mask, x / keep, 0.0)


# --- image models ---------------------------------------------------------------------------


class DynMLP(nn.Module):
    """Dense layers with a dynamic activation between them and a linear last layer."""

    sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, act: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.sizes):
            x = nn.Dense(width)(x)
            if i < len(self.sizes) - 1:
                x = activation(x, act)
        return x


class DynConvNet(nn.Module):
    """3x3 SAME convolutions with dynamic activation, a spatial mean and a linear head (C.3.2).

    With zero conv layers the head sees the per-channel image means, as in the released code.
    """

    channels: Sequence[int]
    strides: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, act: jax.Array) -> jax.Array:
        for c, s in zip(self.channels, self.strides, strict=True):
            x = activation(Conv(c, (3, 3), strides=(s, s), padding="SAME")(x), act)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class BatchStatNorm(nn.Module):
    """Batch normalisation with the current batch's statistics and a learned scale and bias.

    The released ResNet uses batch norm in training mode; keeping no running averages makes the
    task stateless (``loss(params, key, batch)``), at the cost of evaluation also using batch
    statistics.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.var(x, axes, keepdims=True)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class ResNet(nn.Module):
    """A small pre-activation ResNet (C.3.5): stem conv, optional 3x3/2 max pool, 4 stages of
    basic blocks (stage 1 at stride 1, stages 2-4 downsample by 2), a spatial mean and a
    linear head. Departures: the released code's optional initial conv stride (not in the
    paper) is fixed at 1; normalisation uses batch statistics (:class:`BatchStatNorm`)."""

    initial_channels: int
    initial_kernel: int
    max_pool: bool
    blocks_per_group: Sequence[int]
    channels_per_group: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, act: jax.Array) -> jax.Array:
        k = self.initial_kernel
        x = Conv(self.initial_channels, (k, k), padding="SAME")(x)
        if self.max_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for g, (blocks, width) in enumerate(
            zip(self.blocks_per_group, self.channels_per_group, strict=True)
        ):
            for b in range(blocks):
                stride = 2 if (g > 0 and b == 0) else 1
                h = activation(BatchStatNorm()(x), act)
                shortcut = x
                if stride != 1 or x.shape[-1] != width:
                    shortcut = Conv(width, (1, 1), strides=(stride, stride))(h)
                h = Conv(width, (3, 3), strides=(stride, stride), padding="SAME")(h)
                h = activation(BatchStatNorm()(h), act)
                h = Conv(width, (3, 3), padding="SAME")(h)
                x = shortcut + h
        x = activation(BatchStatNorm()(x), act)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


# --- auto-encoders --------------------------------------------------------------------------


def log_quantized_normal(x: jax.Array, mu: jax.Array, log_sigma: jax.Array, bin_size: float):
    """``log P(x)`` of a normal ``N(mu, sigma^2)`` quantised into bins of width ``bin_size``
    centred on ``x``: ``log(Phi(b) - Phi(a))`` with ``a, b = (x -+ bin/2 - mu) / sigma``.

    Computed on the lower tail (by the symmetry ``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``) with
    ``log_ndtr`` and ``log(-expm1(.))``; when the bin is narrow against sigma the midpoint rule
    ``log(bin / sigma) + log phi(mid)`` is used instead, which is accurate there and avoids
    float32 cancellation.
    """
    inv = jnp.exp(-log_sigma)
    a = (x - 0.5 * bin_size - mu) * inv
    b = (x + 0.5 * bin_size - mu) * inv
    flip = (a + b) > 0
    lo = jnp.where(flip, -b, a)
    hi = jnp.where(flip, -a, b)
    log_hi = jax.scipy.special.log_ndtr(hi)
    log_lo = jax.scipy.special.log_ndtr(lo)
    diff = jnp.minimum(log_lo - log_hi, -1e-7)
    exact = log_hi + jnp.log(-jnp.expm1(diff))
    mid = 0.5 * (a + b)
    narrow = jnp.log(bin_size) - log_sigma - 0.5 * mid**2 - 0.5 * math.log(2 * math.pi)
    return jnp.where((b - a) < 1e-2, narrow, exact)


class VAE(nn.Module):
    """MLP encoder to ``(mu, log sigma)`` of a diagonal normal posterior over ``latent`` dims,
    MLP decoder to a quantized-normal observation model per pixel (C.3.4).

    ``__call__`` returns the per-example ``log p(x | z)`` (one reparameterised sample) and the
    analytic ``KL(q(z|x) || N(0, I))``. Decoder outputs are clipped to [-10, 10] as in the
    released code. The released code estimates the KL by sampling; we use the closed form.
    """

    enc_sizes: Sequence[int]
    dec_sizes: Sequence[int]
    latent: int

    @nn.compact
    def __call__(self, x: jax.Array, act: jax.Array, key: jax.Array, bin_size: float):
        x = x.reshape((x.shape[0], -1))
        dim = x.shape[-1]
        enc = DynMLP((*self.enc_sizes, 2 * self.latent), name="encoder")(x, act)
        mu_z, log_sigma_z = jnp.split(enc, 2, axis=-1)
        log_sigma_z = jnp.clip(log_sigma_z, -10.0, 10.0)
        z = mu_z + jnp.exp(log_sigma_z) * jax.random.normal(key, mu_z.shape)
        dec = DynMLP((*self.dec_sizes, 2 * dim), name="decoder")(z, act)
        dec = jnp.clip(dec, -10.0, 10.0)
        mu_x, log_sigma_x = jnp.split(dec, 2, axis=-1)
        log_px = jnp.sum(log_quantized_normal(x, mu_x, log_sigma_x, bin_size), axis=-1)
        kl = 0.5 * jnp.sum(jnp.exp(2 * log_sigma_z) + mu_z**2 - 1.0 - 2 * log_sigma_z, axis=-1)
        return log_px, kl


# --- sequence models ------------------------------------------------------------------------

RNN_CELLS = ("vanilla", "lstm", "gru")
_GATES = {"vanilla": 1, "lstm": 4, "gru": 3}


class RNNLM(nn.Module):
    """Embedding, one recurrent layer (vanilla tanh RNN, LSTM or GRU) with learned initial
    state, and a linear layer onto the vocabulary (C.3.6; learned initial state as in the
    released code). The recurrence is a ``lax.scan`` over time."""

    cell: str
    vocab_size: int
    embed_size: int
    hidden_size: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.cell not in _GATES:
            raise ValueError(f"unknown cell {self.cell!r}; valid cells: {', '.join(RNN_CELLS)}")
        hsz, g = self.hidden_size, _GATES[self.cell]
        x = nn.Embed(self.vocab_size, self.embed_size)(tokens)
        lecun = nn.initializers.lecun_normal()
        wx = self.param("wx", lecun, (self.embed_size, g * hsz))
        wh = self.param("wh", lecun, (hsz, g * hsz))
        bias = self.param("bias", nn.initializers.zeros, (g * hsz,))
        h0 = jnp.broadcast_to(self.param("h0", nn.initializers.zeros, (hsz,)), (x.shape[0], hsz))
        c0 = jnp.zeros_like(h0)
        if self.cell == "lstm":
            c0 = jnp.broadcast_to(self.param("c0", nn.initializers.zeros, (hsz,)), h0.shape)
        xs = jnp.einsum("bte,eh->tbh", x, wx) + bias  # input projections for all steps at once
        cell = self.cell

        def step(carry, xw):
            h, c = carry
            if cell == "vanilla":
                h = jnp.tanh(xw + h @ wh)
            elif cell == "lstm":
                i, f, gg, o = jnp.split(xw + h @ wh, 4, axis=-1)
                c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
            else:  # GRU
                xr, xz, xn = jnp.split(xw, 3, axis=-1)
                hr, hz, hn = jnp.split(h @ wh, 3, axis=-1)
                r = jax.nn.sigmoid(xr + hr)
                z = jax.nn.sigmoid(xz + hz)
                h = (1 - z) * jnp.tanh(xn + r * hn) + z * h
            return (h, c), h

        _, hs = jax.lax.scan(step, (h0, c0), xs)
        return nn.Dense(self.vocab_size)(jnp.swapaxes(hs, 0, 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional mask and (dynamic-rate) attention dropout."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, mask=None, attn_dropout=0.0, key=None):
        b, t, _ = x.shape
        d = self.num_heads * self.head_dim
        qkv = nn.Dense(3 * d)(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        if mask is not None:
            logits = jnp.where(mask, logits, -1e9)
        probs = dropout(jax.nn.softmax(logits, axis=-1), attn_dropout, key)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(x.shape[-1])(out)


class TransformerLM(nn.Module):
    """Decoder-only pre-LayerNorm Transformer LM (C.3.7): token and learned position
    embeddings, ``num_layers`` blocks of causal self-attention and a GELU MLP of width
    ``4 d_model``, a final LayerNorm and an untied output layer. No dropout (the released code
    uses 0.1; the paper names none, and C.3.7 lists no dynamic config)."""

    vocab_size: int
    num_heads: int
    head_dim: int
    num_layers: int
    max_len: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        d = self.num_heads * self.head_dim
        t = tokens.shape[1]
        x = nn.Embed(self.vocab_size, d)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.max_len, d))[:t]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        for _ in range(self.num_layers):
            x = x + SelfAttention(self.num_heads, self.head_dim)(nn.LayerNorm()(x), mask)
            h = nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x)))
            x = x + nn.Dense(d)(h)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


class ViT(nn.Module):
    """Vision Transformer (C.3.8), after the ``vision_transformer`` package: a patch embedding
    (``patch x patch`` conv, stride ``patch``, VALID), a class token, learned position
    embeddings, pre-LN encoder blocks (self-attention, GELU MLP of width ``mlp_dim``) with
    dropout after the embeddings, on the attention probabilities (``attn_dropout``) and after
    each residual branch, a final LayerNorm and a linear head on the class token."""

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    patch: int
    num_classes: int

    @nn.compact
    def __call__(self, x, rate=0.0, attn_rate=0.0, key=None):
        d = self.num_heads * self.head_dim
        p = self.patch
        x = Conv(d, (p, p), strides=(p, p), padding="VALID")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, d)), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], d))
        keys = [None] * (1 + 3 * self.num_layers)
        if key is not None:
            keys = list(jax.random.split(key, 1 + 3 * self.num_layers))
        x = dropout(x, rate, keys[0])
        for i in range(self.num_layers):
            k_attn, k_a, k_m = keys[1 + 3 * i : 4 + 3 * i]
            h = SelfAttention(self.num_heads, self.head_dim)(
                nn.LayerNorm()(x), None, attn_rate, k_attn
            )
            x = x + dropout(h, rate, k_a)
            h = nn.Dense(self.mlp_dim)(nn.LayerNorm()(x))
            h = nn.Dense(d)(nn.gelu(h))
            x = x + dropout(h, rate, k_m)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x)[:, 0])


def count_params(shapes) -> int:
    """Total number of entries of a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
