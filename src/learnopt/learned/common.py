"""Shared pieces of per-parameter learned optimizers: accumulators, normalisation, time features.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860: §2.1 (accumulators, AdaFactor-style factored statistics), §4.2
(multi-timescale accumulators), App. A (feature normalisation, time features), as in the
released code of learned_optimization (github.com/google/learned_optimization).

Pure functions over pytrees. Accumulators for ``K`` decays live in one array per tensor with a
leading decay axis (momentum of a tensor of shape ``S`` has shape ``(K,) + S``), so each decay's
accumulator is contiguous: XLA:CPU vectorises the per-parameter MLPs over it, where a trailing
decay axis made every channel a strided slice (the small_fc_lopt update of a 784x128 tensor
took 1.5x as long). The decays are traced arrays, so they can be meta-learned. No bias
correction. Factored statistics use the two largest dims (stable tie-break) and work on tensors
of any rank, conv kernels included. Time features are the released code's ``tanh(t / x - 1)``.
The equations are in docs/derivations.md (§2), the departures from the paper and code in
docs/departures.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: Timescales of the 11 tanh time features (Tradeoffs 2022, arXiv:2203.11860, App. A).
TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)

#: The layout of the inner runs' states, recorded in checkpoints that hold them (meta-training
#: and population runs): 0 = accumulators ``S + (K,)`` (learnopt before 2026-12-03), 1 =
#: accumulators ``(K,) + S``, 2 = as 1, with PES's antithetic members stacked in one state of
#: leading axes ``[2, pairs, tasks]`` (``PESState.members``; from 2026-12-04).
ACCUMULATOR_LAYOUT = 2

#: Floors and epsilons of the released code (learned_optimization).
GRAD_SQ_EPS = 1e-30
SAFE_RSQRT_FLOOR = 1e-9
NORMALIZER_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Decay parameterisation: meta-learned decays live in log(1 - beta) / 10 coordinates.


def decay_to_param(decay: jax.Array | float) -> jax.Array:
    """``log(1 - decay) / 10``: the log(1 - beta) coordinates meta-learned decays live in."""
    return jnp.log(1.0 - jnp.asarray(decay, jnp.float32)) / 10.0


def param_to_decay(param: jax.Array | float) -> jax.Array:
    """Inverse of :func:`decay_to_param`: ``1 - exp(10 * param)``."""
    return 1.0 - jnp.exp(10.0 * jnp.asarray(param, jnp.float32))


def offset_decays(initial: Sequence[float], offset: jax.Array) -> jax.Array:
    """Decays ``1 - (1 - initial) * exp(10 * offset)``; ``offset = 0`` gives ``initial``."""
    return param_to_decay(decay_to_param(jnp.asarray(initial, jnp.float32)) + offset)


def _check_decays(decays: jax.Array, what: str) -> jax.Array:
    decays = jnp.asarray(decays, jnp.float32)
    if decays.ndim != 1:
        raise ValueError(f"{what} decays must be a 1-D array (one per timescale); got shape "
                         f"{decays.shape}")
    return decays


# --------------------------------------------------------------------------------------------
# Momentum and second-moment accumulators.


class MomentumState(NamedTuple):
    """Momenta at ``K`` decays: each leaf has shape ``(K,) + `` the parameter's shape."""

    m: PyTree


class RMSState(NamedTuple):
    """Second moments (EMA of g^2) at ``K`` decays: leaves of shape ``(K,) + `` the parameter's."""

    rms: PyTree


def _zeros_with_decay_axis(params: PyTree, num_decays: int) -> PyTree:
    return jax.tree.map(lambda p: jnp.zeros((num_decays,) + jnp.shape(p), jnp.float32), params)


def decay_column(decays: jax.Array, ndim: int) -> jax.Array:
    """``decays`` shaped ``(K,) + (1,) * ndim``: broadcastable against ``(K,) + S``."""
    return jnp.reshape(decays, decays.shape + (1,) * ndim)


def decay_last(x: jax.Array) -> jax.Array:
    """A ``(K,) + S`` accumulator as ``S + (K,)`` (the feature layout of the matmul paths)."""
    return jnp.moveaxis(x, 0, -1)


def momentum_init(params: PyTree, num_decays: int) -> MomentumState:
    """Zero momenta, one per decay."""
    return MomentumState(m=_zeros_with_decay_axis(params, num_decays))


def momentum_update(state: MomentumState, grads: PyTree, decays: jax.Array) -> MomentumState:
    """``m_k <- b_k m_k + (1 - b_k) g`` for every decay ``b_k`` (not clipped, as in the code)."""
    b = _check_decays(decays, "momentum")

    def one(m, g):
        bk = decay_column(b, jnp.ndim(g))
        return bk * m + (1.0 - bk) * jnp.asarray(g, jnp.float32)[None]

    return MomentumState(m=jax.tree.map(one, state.m, grads))


def rms_init(params: PyTree, num_decays: int) -> RMSState:
    """Zero second moments, one per decay."""
    return RMSState(rms=_zeros_with_decay_axis(params, num_decays))


def rms_update(state: RMSState, grads: PyTree, decays: jax.Array) -> RMSState:
    """``rms_k <- c_k rms_k + (1 - c_k) g^2`` with ``c_k`` clipped to [0, 1]."""
    c = jnp.clip(_check_decays(decays, "rms"), 0.0, 1.0)

    def one(v, g):
        ck = decay_column(c, jnp.ndim(g))
        g = jnp.asarray(g, jnp.float32)[None]
        return ck * v + (1.0 - ck) * (g * g)

    return RMSState(rms=jax.tree.map(one, state.rms, grads))


# --------------------------------------------------------------------------------------------
# AdaFactor-style factored second moments.


def differentiated_as(reference: Callable) -> Callable[[Callable], Callable]:
    """Decorator: the decorated function computes what ``reference`` computes, and under
    autodiff (a ``custom_jvp`` rule) evaluates as ``reference``. For fast forward paths (an
    elementwise expansion, a native kernel) whose own derivative is slower to compile or does
    not exist."""

    def wrap(fn: Callable) -> Callable:
        fast = jax.custom_jvp(fn)
        fast.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
        return fast

    return wrap


def safe_rsqrt(x: jax.Array) -> jax.Array:
    """``rsqrt(max(x, 1e-9))``."""
    return jax.lax.rsqrt(jnp.maximum(x, SAFE_RSQRT_FLOOR))


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """``(d1, d0)``: the 2nd-largest and largest dims of a rank >= 2 shape, else ``None``.

    Ties are broken by a stable sort: among equal sizes the later axis counts as larger.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])


class FactoredState(NamedTuple):
    """AdaFactor accumulators at ``K`` decays; each field has the parameters' tree structure.

    For a rank >= 2 tensor of shape ``S`` with ``(d1, d0) = factored_dims(S)``: ``v_row`` has
    shape ``(K,)`` plus ``S`` without axis ``d0``, ``v_col`` has ``(K,)`` plus ``S`` without
    ``d1``, and ``v_full`` is an empty ``(K, 0)`` placeholder. For rank < 2, ``v_full`` has
    shape ``(K,) + S`` and ``v_row`` / ``v_col`` are the placeholders.
    """

    v_row: PyTree
    v_col: PyTree
    v_full: PyTree


def factored_state_shapes(
    shape: Sequence[int], num_decays: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(v_row, v_col, v_full)`` for one tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    k = (num_decays,)
    dims = factored_dims(shape)
    if dims is None:
        return k + (0,), k + (0,), k + shape
    d1, d0 = dims
    row = tuple(s for i, s in enumerate(shape) if i != d0)
    col = tuple(s for i, s in enumerate(shape) if i != d1)
    return k + row, k + col, k + (0,)


def factored_init(params: PyTree, num_decays: int) -> FactoredState:
    """Zero factored accumulators (see :class:`FactoredState` for the shapes)."""

    def shapes(p):
        return factored_state_shapes(jnp.shape(p), num_decays)

    def zeros(i):
        return jax.tree.map(lambda p: jnp.zeros(shapes(p)[i], jnp.float32), params)

    return FactoredState(v_row=zeros(0), v_col=zeros(1), v_full=zeros(2))


def factored_preconditioners(
    v_row: jax.Array, v_col: jax.Array, shape: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """Row and column factors of a rank >= 2 tensor, broadcastable to ``(K,) + shape``.

    ``row = rsqrt(v_row / mean(v_row over the d1 axis))`` expanded at ``d0``, and
    ``col = rsqrt(v_col)`` expanded at ``d1``, so ``row * col ~ rsqrt(E[g^2])`` elementwise.
    """
    dims = factored_dims(shape)
    if dims is None:
        raise ValueError(f"tensor of shape {tuple(shape)} is not factored (rank < 2)")
    d1, d0 = dims
    # v_row lacks axis d0, so d1 moves down by one when it came after d0; +1: the decay axis.
    d1_in_row = (d1 - 1 if d1 > d0 else d1) + 1
    row_mean = jnp.mean(v_row, axis=d1_in_row, keepdims=True)
    row = safe_rsqrt(v_row / (row_mean + SAFE_RSQRT_FLOOR))
    col = safe_rsqrt(v_col)
    return jnp.expand_dims(row, d0 + 1), jnp.expand_dims(col, d1 + 1)


def factored_tiles(
    v_row: jax.Array, v_col: jax.Array, shape: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """``v_row`` and ``v_col`` broadcast back to the full ``(K,) + shape``."""
    dims = factored_dims(shape)
    if dims is None:
        raise ValueError(f"tensor of shape {tuple(shape)} is not factored (rank < 2)")
    d1, d0 = dims
    full = v_row.shape[:1] + tuple(shape)
    return (jnp.broadcast_to(jnp.expand_dims(v_row, d0 + 1), full),
            jnp.broadcast_to(jnp.expand_dims(v_col, d1 + 1), full))


def second_moment_features(
    m: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v_full: jax.Array,
    shape: Sequence[int],
    full_rsqrt: Callable[[jax.Array], jax.Array],
) -> list[jax.Array]:
    """The five Adafactor features of one tensor, each broadcast to ``(K,) + shape``: the row
    and column second moments, their inverse square roots, and the momentum ``m`` times the
    factored preconditioner. A tensor of rank < 2 has no factors: its full second moment
    ``v_full`` stands in for both, and ``full_rsqrt(v_full)`` preconditions its momentum
    (the architectures differ there; see their modules)."""
    if factored_dims(shape) is not None:
        row, col = factored_tiles(v_row, v_col, shape)
        rrow, rcol = factored_tiles(jax.lax.rsqrt(v_row + 1e-8), jax.lax.rsqrt(v_col + 1e-8), shape)
        row_f, col_f = factored_preconditioners(v_row, v_col, shape)
        return [row, col, rrow, rcol, m * row_f * col_f]
    rsqrt = jax.lax.rsqrt(v_full + 1e-8)
    return [v_full, v_full, rsqrt, rsqrt, m * full_rsqrt(v_full)]


def factored_update_leaf(
    v_row: jax.Array, v_col: jax.Array, v_full: jax.Array, g: jax.Array, decays: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One tensor's factored update: ``(v_row, v_col, v_full, fac_g)``.

    ``fac_g`` is the AdaFactor-preconditioned gradient, shape ``(K,) + g.shape``.
    """
    a = jnp.clip(_check_decays(decays, "adafactor"), 0.0, 1.0)
    g = jnp.asarray(g, jnp.float32)
    g2 = g * g + GRAD_SQ_EPS
    dims = factored_dims(g.shape)
    if dims is None:
        ak = decay_column(a, g.ndim)
        v_full = ak * v_full + (1.0 - ak) * g2[None]
        return v_row, v_col, v_full, g[None] * safe_rsqrt(v_full + SAFE_RSQRT_FLOOR)
    d1, d0 = dims
    ak = decay_column(a, g.ndim - 1)
    v_row = ak * v_row + (1.0 - ak) * jnp.mean(g2, axis=d0)[None]
    v_col = ak * v_col + (1.0 - ak) * jnp.mean(g2, axis=d1)[None]
    row, col = factored_preconditioners(v_row, v_col, g.shape)
    return v_row, v_col, v_full, g[None] * row * col


def factored_update(
    state: FactoredState, grads: PyTree, decays: jax.Array
) -> tuple[FactoredState, PyTree]:
    """Update every tensor's factored accumulators; also return the preconditioned gradients."""
    treedef = jax.tree.structure(grads)
    g_leaves = treedef.flatten_up_to(grads)
    rows = treedef.flatten_up_to(state.v_row)
    cols = treedef.flatten_up_to(state.v_col)
    fulls = treedef.flatten_up_to(state.v_full)
    out = [factored_update_leaf(r, c, f, g, decays)
           for r, c, f, g in zip(rows, cols, fulls, g_leaves, strict=True)]
    new = FactoredState(*(treedef.unflatten([o[i] for o in out]) for i in range(3)))
    return new, treedef.unflatten([o[3] for o in out])


# --------------------------------------------------------------------------------------------
# Feature normalisation and time features.


def second_moment_normalize(x: jax.Array, axis: int | Sequence[int] | None = None,
                            eps: float = NORMALIZER_EPS) -> jax.Array:
    """``x * rsqrt(eps + mean(x^2, axis))``; the mean keeps dims so it broadcasts back.

    For per-tensor features laid out as ``shape + (F,)`` pass ``axis=tuple(range(len(shape)))``
    (all tensor axes, each feature channel separately); ``axis=None`` normalises over all axes.
    """
    return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axis, keepdims=True))


def tanh_time_features(iteration: jax.Array | int, timescales: Sequence[float] = TIME_SCALES,
                       shift: float = 1.0) -> jax.Array:
    """``tanh(t / x - shift)`` for each timescale ``x``: shape ``(len(timescales),)``."""
    t = jnp.asarray(iteration, jnp.float32)
    return jnp.tanh(t / jnp.asarray(timescales, jnp.float32) - shift)


# --------------------------------------------------------------------------------------------
# Small MLP helpers and sizes.


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> dict[str, jax.Array]:
    """Weights ``w{i}`` (fan_in, fan_out) and biases ``b{i}`` of an MLP with layer ``sizes``.

    Weights are ``TruncatedNormal(stddev=1/sqrt(fan_in))`` cut at two standard deviations (Haiku's
    default for ``hk.Linear``, used by the released code); biases are zero. One compiled program
    per ``sizes`` (the same values as op by op, which compiled a sampler per layer: about half a
    second more of a cold start).
    """
    return _init_mlp(key, tuple(int(n) for n in sizes))


@functools.partial(jax.jit, static_argnums=1)
def _init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, jax.Array]:
    params: dict[str, jax.Array] = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.truncated_normal(keys[i], -2.0, 2.0, (fan_in, fan_out), jnp.float32)
        params[f"w{i}"] = w / math.sqrt(fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def mlp_num_layers(params: dict[str, jax.Array]) -> int:
    return sum(1 for k in params if k.startswith("w"))


def apply_mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """ReLU MLP over the trailing axis of ``x`` (no activation after the last layer)."""
    n = mlp_num_layers(params)
    for i in range(n):
        x = jnp.matmul(x, params[f"w{i}"], precision=jax.lax.Precision.HIGHEST) + params[f"b{i}"]
        if i != n - 1:
            x = jax.nn.relu(x)
    return x


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of the array leaves of ``tree`` (works on ``jax.eval_shape`` output too)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def check_same_structure(grads: PyTree, params: PyTree, who: str) -> None:
    """Raise a ValueError naming both structures when grads and params do not match."""
    if params is None:
        raise ValueError(f"{who} needs the current parameters: call "
                         "update(grads, state, params, loss=...) with params.")
    gs, ps = jax.tree.structure(grads), jax.tree.structure(params)
    if gs != ps:
        raise ValueError(f"{who}: gradients and parameters have different tree structures: "
                         f"{gs} vs {ps}")


# --------------------------------------------------------------------------------------------
# Fused per-parameter MLPs: features, normalisation and MLP without materialised feature stacks.
#
# A channel is ``(x, axis)``: ``x`` is one feature of a tensor of shape ``S``, either full-shape
# (``axis is None``) or constant along ``axis`` and stored without it (the AdaFactor row and
# column statistics). The per-parameter MLPs of small_fc_lopt and VeLO normalise each channel
# by a per-tensor scalar and apply small dense layers; as sums of arrays times scalars XLA:CPU
# fuses that into a few loops over the tensor, where a concatenated ``S + (F,)`` feature array
# and thin matmuls are memory-bound (docs/derivations.md §3.1).

Channel = tuple[jax.Array, int | None]

def channel_mean_squares(chans: Sequence[Channel]) -> jax.Array:
    """``mean(x^2)`` of each channel over the full tensor, shape ``(len(chans),)``.

    A low-rank channel's mean over the tensor equals the mean over its stored entries. One
    reduction per channel: XLA:CPU reduces a full array to a scalar faster than an
    ``S + (k,)`` block to ``(k,)``.
    """
    return jnp.stack([jnp.mean(jnp.square(x)) for x, _ in chans])


def _entries(w: jax.Array) -> list:
    """The entries of a 1-D or 2-D array as shape-``(1,)`` arrays (nested lists for 2-D), cut
    by one ``split``: indexing entry by entry made tracing the elementwise MLPs slow."""
    flat = jax.lax.split(jnp.reshape(w, (-1,)), (1,) * w.size)
    if w.ndim == 1:
        return list(flat)
    cols = w.shape[1]
    return [list(flat[r * cols:(r + 1) * cols]) for r in range(w.shape[0])]


def _times(x: jax.Array, s: jax.Array) -> jax.Array:
    """``x * s`` for a shape-``(1,)`` ``s`` (two primitives, no jnp dispatch)."""
    return jax.lax.mul(x, jax.lax.broadcast_in_dim(s, x.shape, (x.ndim - 1,)))


def channel_mlp(nn: dict[str, jax.Array], chans: Sequence[Channel], scales: jax.Array,
                bias: jax.Array | None = None) -> list[jax.Array]:
    """``apply_mlp(nn, stack(x_v * scales[v]))`` with the channels broadcast to the tensor's
    shape; returns the outputs as a list of full-shape arrays (one per output unit).

    ``nn["w0"]`` may have more rows than channels (inputs that are the same for every
    parameter, e.g. time features): pass their contribution as ``bias`` (it replaces
    ``nn["b0"]``). The normalisers are folded into the first layer's weights in one small op;
    low-rank channels are summed on their small arrays and broadcast once per hidden unit.
    """
    nf = len(chans)
    w0 = nn["w0"]
    w_in = _entries(scales[:, None] * w0[:nf])
    b0 = _entries(nn["b0"] if bias is None else bias)
    hidden: list[jax.Array] = []
    for o in range(w0.shape[1]):
        acc = None
        low: dict[int, jax.Array] = {}
        for v, (x, axis) in enumerate(chans):
            term = _times(x, w_in[v][o])
            if axis is None:
                acc = term if acc is None else jax.lax.add(acc, term)
            else:
                low[axis] = term if axis not in low else jax.lax.add(low[axis], term)
        for axis, term in low.items():
            term = jnp.expand_dims(term, axis)
            acc = term if acc is None else acc + term
        hidden.append(acc + b0[o])
    for i in range(1, mlp_num_layers(nn)):
        hidden = [jnp.maximum(h, 0.0) for h in hidden]  # ReLU
        w, b = _entries(nn[f"w{i}"]), _entries(nn[f"b{i}"])
        nxt = []
        for o in range(len(b)):
            acc = _times(hidden[0], w[0][o])
            for v in range(1, len(hidden)):
                acc = jax.lax.add(acc, _times(hidden[v], w[v][o]))
            nxt.append(acc + b[o])
        hidden = nxt
    return hidden


def second_moment_channels(
    m: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v_full: jax.Array,
    shape: Sequence[int],
    full_rsqrt: Callable[[jax.Array], jax.Array],
) -> list[Channel]:
    """The channels of :func:`second_moment_features` (same order, same values), with the
    row / column statistics of a factored tensor kept low-rank."""
    dims = factored_dims(shape)

    def split(x, axis=None):
        return [(x[k], axis) for k in range(x.shape[0])]

    if dims is None:
        rsqrt = jax.lax.rsqrt(v_full + 1e-8)
        return (split(v_full) + split(v_full) + split(rsqrt) + split(rsqrt)
                + split(m * full_rsqrt(v_full)))
    d1, d0 = dims
    row_f, col_f = factored_preconditioners(v_row, v_col, shape)
    return (split(v_row, d0) + split(v_col, d1) + split(jax.lax.rsqrt(v_row + 1e-8), d0)
            + split(jax.lax.rsqrt(v_col + 1e-8), d1) + split(m * row_f * col_f))


def block_channels(blocks: Sequence[jax.Array]) -> list[Channel]:
    """Full-shape channels of ``(k,) + shape`` feature blocks, in order."""
    return [(b[k], None) for b in blocks for k in range(b.shape[0])]
