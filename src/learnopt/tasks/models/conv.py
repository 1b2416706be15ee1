"""A 2-D convolution that stays fast on XLA:CPU inside ``lax.scan``, ``vmap`` and ``grad``.

Why (measured by ``benchmarks/conv_cpu.py``, results in ``benchmarks/results/conv_cpu.json``,
jax/jaxlib 0.10.2, 2 CPU cores): XLA:CPU runs a convolution fast (YNNPACK/Eigen) only in the
canonical form NHWC input, HWIO kernel, NHWC output. Its ``convolution-canonicalization`` pass
rewrites other forms with explicit transposes, but not inside control flow (the bodies of
``while`` loops, i.e. ``lax.scan``/``fori_loop``, and of ``lax.cond`` branches), where a
non-canonical convolution is left to the generic loop emitter. JAX's gradient of
``lax.conv_general_dilated`` is non-canonical: the kernel gradient has dimension numbers
``f01b_i01o->01bf`` and the input gradient uses the kernel as ``01oi``. So flax ``nn.Conv``
trains at the expected speed when each step is its own ``jit`` call and ~50x slower when steps
run inside ``lax.scan`` (how the training and meta-training loops here run). For
``models.ConvNet`` on 16x16x1 images, batch 128, one SGD step took 41 ms as a jitted call and
2217 ms per step inside ``lax.scan``; the 8x8x64->64 layer's kernel gradient alone took
1396 ms per iteration in the scan against 17 ms jitted. The XLA:CPU flags of this jaxlib that
touch convolutions (oneDNN, XNNPACK off, oneDNN custom calls, the legacy runtime) did not
change this (2112-2212 ms).

What: :func:`conv2d` computes exactly ``lax.conv_general_dilated(x, w, strides, padding,
dimension_numbers=("NHWC", "HWIO", "NHWC"))`` (what ``nn.Conv`` computes) with a
``jax.custom_vjp`` whose gradients are themselves canonical convolutions, made canonical by
transposing the operands instead of permuting dimension numbers:

* input gradient: the output gradient, dilated by the stride (``lhs_dilation``), convolved with
  the spatially flipped kernel with its in/out axes swapped (the transposed convolution);
* kernel gradient: the input with channels as the batch axis and examples as the contracted
  feature axis, convolved with the output gradient (dilated by the stride, ``rhs_dilation``)
  as the kernel; the result is transposed back to HWIO.

The three maps (forward, input gradient, kernel gradient) are bilinear and each one's
transpose is expressed by the other two, so every one of them carries a ``custom_vjp`` in
terms of the others: gradients of gradients (truncated backprop through training) stay
canonical too. Each also carries a ``jax.custom_batching.custom_vmap`` rule, because JAX's
batching rule for a convolution with batched kernels (``vmap`` over tasks) makes a grouped,
non-canonical convolution: when only the image-like operand is batched the batch axis is
folded into the example axis (one convolution); otherwise the convolutions run one after the
other under ``lax.map``. Results equal ``nn.Conv``'s to float32 rounding (the same XLA
convolutions; the benchmark measured differences of 0.0). Measured (network step above,
reference and this module timed in alternation): jitted call 42 vs 44 ms (equal within noise);
inside ``lax.scan`` 2119 vs 42 ms (50x); inside ``lax.scan`` under ``vmap`` over 2 tasks
4766 vs 96 ms (50x). An im2col formulation (strided slices + one matmul) was the runner-up:
58 ms in the scan and 148 ms under ``vmap``, but 1.3-2.7x slower than ``nn.Conv`` as a jitted
call (across runs). Limitation: ``custom_vjp`` functions do not support forward-mode
differentiation (``jax.jvp``/``jax.linearize``/``jacfwd``); nothing in this project applies it
to task losses.

:class:`Conv` is a drop-in for the ``flax.linen.Conv`` features used here: same parameter
names, shapes and default initialisers (``kernel`` of shape ``(kh, kw, cin, cout)`` from
LeCun normal, ``bias`` of shape ``(cout,)`` from zeros), integer or tuple kernel size and
strides, padding ``"SAME"``, ``"VALID"``, an int or explicit ``(low, high)`` pairs,
``use_bias``, ``kernel_init``/``bias_init``, and inputs with any number of leading batch axes
(or none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def resolve_padding(padding, in_hw: Sequence[int], kernel_hw: Sequence[int], strides) -> Pads:
    """Explicit ``((top, bottom), (left, right))`` padding, as ``lax`` resolves ``"SAME"``
    (extra row/column at the end) and ``"VALID"``; an int pads every side by that much."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            geom = zip(in_hw, kernel_hw, strides, strict=True)
            return tuple(_same_pads(n, k, s) for n, k, s in geom)
        raise NotImplementedError(f"padding {padding!r}: only 'SAME', 'VALID' or explicit pads")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != 2:
        raise ValueError(f"padding needs two spatial entries, got {padding!r}")
    return pads


def _conv(lhs, rhs, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1), strides=(1, 1)):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=DIMENSION_NUMBERS,
    )


def _with_vmap(op: Callable, fold_first: bool) -> Callable:
    """``op(a, b)`` with a ``custom_vmap`` rule that keeps its convolutions canonical."""
    op_v = jax.custom_batching.custom_vmap(op)

    @op_v.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_b, b_b = in_batched
        if fold_first and a_b and not b_b:  # fold the vmapped axis into the example axis
            out = op_v(a.reshape(-1, *a.shape[2:]), b)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        a = a if a_b else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_b else jnp.broadcast_to(b, (axis_size, *b.shape))
        return lax.map(lambda ab: op_v(*ab), (a, b)), True

    return op_v


@functools.lru_cache(maxsize=256)
def _ops(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int],
         pads: Pads):
    """The forward map and its two gradient maps for one geometry, each a ``custom_vjp``
    (in terms of the others) around a ``custom_vmap`` of one canonical convolution."""
    out_hw = tuple(
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads, strict=True)
    )
    geom = list(zip(kernel_hw, in_hw, out_hw, strides, pads, strict=True))
    # Input gradient: a stride-dilated convolution; its padding gives back the input size.
    pads_dx = tuple((k - 1 - lo, n + lo - (m - 1) * s - 1) for k, n, m, s, (lo, _) in geom)
    # Kernel gradient: the input window each kernel offset sees; when the last rows/columns of
    # the input are never used (negative high padding) they are cropped instead.
    pads_dw = tuple((lo, k + (m - 1) * s - n - lo) for k, n, m, s, (lo, _) in geom)
    crop = tuple(n + min(hi, 0) for n, (_, hi) in zip(in_hw, pads_dw, strict=True))
    pads_dw = tuple((lo, max(hi, 0)) for lo, hi in pads_dw)

    def fwd_impl(x, w):
        return _conv(x, w, pads, strides=strides)

    def dx_impl(dy, w):
        w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        return _conv(dy, w_t, pads_dx, lhs_dilation=strides)

    def dw_impl(x, dy):
        x = x[:, : crop[0], : crop[1], :]
        dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pads_dw,
                   rhs_dilation=strides)
        return dw.transpose(1, 2, 0, 3)

    fwd = jax.custom_vjp(_with_vmap(fwd_impl, fold_first=True))
    dx = jax.custom_vjp(_with_vmap(dx_impl, fold_first=True))
    dw = jax.custom_vjp(_with_vmap(dw_impl, fold_first=False))
    # <fwd(x, w), g> = <x, dx(g, w)> = <w, dw(x, g)>: each map's transpose is another map.
    fwd.defvjp(lambda x, w: (fwd(x, w), (x, w)), lambda r, g: (dx(g, r[1]), dw(r[0], g)))
    dx.defvjp(lambda dy, w: (dx(dy, w), (dy, w)), lambda r, g: (fwd(g, r[1]), dw(g, r[0])))
    dw.defvjp(lambda x, dy: (dw(x, dy), (x, dy)), lambda r, g: (dx(r[1], g), fwd(r[0], g)))
    return fwd


def conv2d(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding="SAME") -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` for ``x`` of shape ``(N, H, W, cin)`` and ``kernel`` of shape
    ``(kh, kw, cin, cout)``, with gradients and batching rules that stay canonical on XLA:CPU
    (module docstring)."""
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    kernel_hw = tuple(kernel.shape[:2])
    in_hw = tuple(x.shape[1:3])
    pads = resolve_padding(padding, in_hw, kernel_hw, strides)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    return _ops(in_hw, kernel_hw, strides, pads)(x, kernel)


class Conv(nn.Module):
    """Drop-in for ``flax.linen.Conv`` (2-D, NHWC) computed by :func:`conv2d`.

    Same parameters as ``nn.Conv``: ``kernel`` ``(kh, kw, cin, cout)`` (default LeCun normal)
    and ``bias`` ``(cout,)`` (default zeros), so parameter trees, counts and initial values
    match ``nn.Conv`` under the same key and module name.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence = "SAME"
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ks = self.kernel_size
        ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
        if len(ks) != 2:
            raise NotImplementedError(f"only 2-D convolutions, got kernel_size {ks}")
        kernel = self.param(
            "kernel", self.kernel_init, (*ks, x.shape[-1], self.features), self.param_dtype
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        lead = x.shape[:-3]
        y = conv2d(x.reshape(-1, *x.shape[-3:]), kernel, self.strides, self.padding)
        y = y.reshape(*lead, *y.shape[1:])
        return y if bias is None else y + bias
