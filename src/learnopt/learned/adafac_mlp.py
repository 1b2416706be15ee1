"""``small_fc_lopt``: the tiny per-parameter MLP learned optimizer with AdaFactor features.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.2, App. A and §4.2 / Fig. 3b; the released ``AdafacMLPLOpt``
of learned_optimization (github.com/google/learned_optimization).

Per tensor: momentum (3 decays), rms (1) and AdaFactor (3) accumulators give 28 features, each
normalised over the tensor, plus 11 time features (39 inputs); a ReLU MLP 39 -> 4 -> 4 -> 2
outputs a direction ``d`` and magnitude ``m`` and the parameter moves by
``-d * exp(0.001 m) * 0.001``. The 7 decays are meta-learned as offsets in log(1 - beta) space:
190 MLP weights + 7 = 197 meta-parameters. Two compute paths give the same function:
``"elementwise"`` (default, sums of full-shape arrays, fast on CPU) and ``"concat"`` (matmuls).
Features, the elementwise derivation and timings: docs/derivations.md §3.1; departures from the
paper and the released code: docs/departures.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.learned import common, native
from learnopt.learned.base import LearnedOptimizer, MetaParams

ComputePath = Literal["concat", "elementwise"]
_PATHS = ("concat", "elementwise")


# -------------------------------------------------------------------------------------------
# The two compute paths: per-tensor feature blocks (each ``(k,) + shape``, the accumulators'
# decay-major layout) -> (d, m).


def mlp_concat(nn: dict[str, jax.Array], blocks: Sequence[jax.Array],
               time: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Matmul path: concatenate (features last), normalise, append tiled time features, MLP."""
    shape = blocks[0].shape[1:]
    x = common.decay_last(jnp.concatenate(blocks, axis=0))
    x = common.second_moment_normalize(x, axis=tuple(range(len(shape))))
    x = jnp.concatenate([x, jnp.broadcast_to(time, shape + time.shape)], axis=-1)
    out = common.apply_mlp(nn, x)
    return out[..., 0], out[..., 1]


# Differentiated, the path evaluates as the matmul path (values agree to ~1e-7), so the
# elementwise forward is dead code in a meta-gradient and XLA compiles the smaller graph.
@common.differentiated_as(mlp_concat)
def mlp_elementwise(nn: dict[str, jax.Array], blocks: Sequence[jax.Array],
                    time: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Elementwise path: each hidden unit is a sum of full-shape arrays times scalars.

    The per-tensor normaliser of feature ``v`` is a scalar, folded into the weight; the time
    features are folded into the first-layer bias. Under autodiff (a ``custom_jvp`` rule) it
    evaluates as :func:`mlp_concat`, the same function: differentiating the unrolled scalar
    graph made XLA compile a meta-gradient 2-6x slower on CPU.
    """
    chans = common.block_channels(blocks)
    scales = jax.lax.rsqrt(common.NORMALIZER_EPS + common.channel_mean_squares(chans))
    nf = len(chans)
    bias = nn["b0"] + jnp.dot(time, nn["w0"][nf:], precision=jax.lax.Precision.HIGHEST)
    d, m = common.channel_mlp(nn, chans, scales, bias)
    return d, m


def _leaf_concat(nn, time, p, g, m, rms, fac_g, v_row, v_col, v_full):
    blocks = _feature_blocks(p, g, m, rms, fac_g, v_row, v_col, v_full)
    return mlp_concat(nn, blocks, time)


@common.differentiated_as(_leaf_concat)  # as mlp_elementwise
def _leaf_elementwise(nn, time, p, g, m, rms, fac_g, v_row, v_col, v_full):
    """``(d, m)`` of one tensor (rank >= 1) by the elementwise path, from the accumulators.

    The same function as ``mlp_concat`` on :func:`_feature_blocks`, computed without
    materialising the 28 features: the row / column statistics of a factored tensor (12 of the
    28 channels) are constant along one axis, so their normalisers and their first-layer
    contributions are computed on the small ``v_row`` / ``v_col`` arrays and broadcast once per
    hidden unit (:func:`common.channel_mlp`).
    """
    r = jax.lax.rsqrt(rms + 1e-6)
    chans = common.block_channels([g[None], p[None], m, rms, m * r, r, fac_g])
    chans += common.second_moment_channels(m, v_row, v_col, v_full, p.shape,
                                           lambda v: (v + 1e-6) ** -0.5)
    scales = jax.lax.rsqrt(common.NORMALIZER_EPS + common.channel_mean_squares(chans))
    nf = len(chans)
    bias = nn["b0"] + jnp.dot(time, nn["w0"][nf:], precision=jax.lax.Precision.HIGHEST)
    d, mag = common.channel_mlp(nn, chans, scales, bias)
    return d, mag


def kernel_decays(decays: dict[str, jax.Array]) -> jax.Array:
    """The native kernel's decays: momentum (not clipped), rms and AdaFactor (clipped)."""
    return jnp.concatenate([decays["momentum"], jnp.clip(decays["rms"], 0.0, 1.0),
                            jnp.clip(decays["adafactor"], 0.0, 1.0)])


def _to_kernel(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    return jnp.reshape(jnp.transpose(x, perm), (1, x.shape[0], -1))


def _from_kernel(x: jax.Array, like: jax.Array, perm: Sequence[int]) -> jax.Array:
    moved = tuple(like.shape[i] for i in perm)
    return jnp.transpose(jnp.reshape(x[0], moved), native.inverse(perm))


def _leaf_step(nn, time, p, g, m, rms, fac_g, v_row, v_col, v_full, *, compute: str,
               exp_mult: float, step_mult: float) -> jax.Array:
    """The update of one tensor from its new accumulators, by the XLA ``compute`` path."""
    orig_shape, orig_dtype = jnp.shape(p), jnp.asarray(p).dtype
    p, g = jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
    if not orig_shape:  # scalars are processed as shape [1], as in the released code
        p, g = jnp.reshape(p, (1,)), jnp.reshape(g, (1,))
        m, rms, fac_g, v_full = (x[:, None] for x in (m, rms, fac_g, v_full))
    # No size cut-off to the matmul path for small tensors: under vmap (meta-training's
    # tasks and perturbations) a small tensor is a large batched one, and the matmul path
    # made PES on the 8x8 MLP 2.3x slower (benchmarks/meta_throughput.py).
    leaf = _leaf_elementwise if compute == "elementwise" else _leaf_concat
    d, mag = leaf(nn, time, p, g, m, rms, fac_g, v_row, v_col, v_full)
    step = d * jnp.exp(mag * exp_mult) * step_mult
    return jnp.reshape(-step, orig_shape).astype(orig_dtype)


def _xla_step(nn, time, decays, p, g, m, rms, v_row, v_col, v_full, *, compute: str,
              exp_mult: float, step_mult: float):
    """One tensor's ``(update, m, rms, v_row, v_col, v_full)`` from its accumulators before
    the step, by XLA: the accumulator updates of :mod:`common`, then :func:`_leaf_step`."""
    m = common.momentum_update(common.MomentumState(m), g, decays["momentum"]).m
    rms = common.rms_update(common.RMSState(rms), g, decays["rms"]).rms
    v_row, v_col, v_full, fac_g = common.factored_update_leaf(v_row, v_col, v_full, g,
                                                              decays["adafactor"])
    update = _leaf_step(nn, time, p, g, m, rms, fac_g, v_row, v_col, v_full, compute=compute,
                        exp_mult=exp_mult, step_mult=step_mult)
    return update, m, rms, v_row, v_col, v_full


def kernel_step(nn, time, decays, scales, p, g, m, rms, v_row, v_col, v_full, *,
                hidden_layers: int, features: str = "small_fc_lopt"):
    """One tensor's ``(update, m, rms, v_row, v_col, v_full)`` by one call of the native CPU
    kernel (:mod:`learnopt.learned.native`): the accumulators before the step in, after it
    out. ``decays`` is the kernel's decay vector (:func:`kernel_decays`), ``scales`` the
    ``(exp_mult, step_mult)`` of the step (traced values may be given), ``nn`` an MLP with two
    outputs and ``features`` the kernel's :data:`native.FEATURE_SETS` entry. Not
    differentiable: callers wrap it in a ``custom_jvp`` with their XLA path."""
    k, h = m.shape[0], nn["w0"].shape[1]
    mlp = native.mlp_inputs(nn, hidden_layers, jnp.stack,
                            lambda shape: jnp.zeros(shape, jnp.float32))
    arrays = {**{n: x[None] for n, x in mlp.items()}, "decays": decays[None],
              "time": time[None]}

    def consts(row_lacks_a: bool) -> jax.Array:
        tail = jnp.asarray([common.NORMALIZER_EPS, float(row_lacks_a)], jnp.float32)
        return jnp.concatenate([jnp.asarray(scales, jnp.float32), tail])[None]

    def call(dims, factored):
        return native.xla_call(k, h, hidden_layers, time.shape[0], dims, arrays,
                               factored=factored, features=features, in_place=in_place)

    # The accumulators are updated in place and passed in their own shapes where their memory
    # is already the kernel's layout, so that XLA does not copy them (native.batched_call).
    in_place = ("m", "rms")
    if p.ndim < 2:  # one run over the flat tensor; v_full stands in for the factors
        n = p.size  # > 0: empty tensors take the XLA path
        in_place += ("va",)
        arrays.update(p=jnp.reshape(p, (1, n)), g=jnp.reshape(g, (1, n)), m=m, rms=rms,
                      va=v_full, vc=jnp.zeros((1, k, 1), jnp.float32), consts=consts(False))
        out = call((1, 1, 1, n), False)
        return (jnp.reshape(out["update"], p.shape), out["m_out"], out["rms_out"], v_row,
                v_col, out["va_out"])
    d1, d0 = common.factored_dims(p.shape)
    lay = native.layout(p.shape, d1, d0)
    own = lay.perm_full == tuple(range(p.ndim + 1))  # the kernel's layout as it is

    def to_kernel(x):
        return x if own else _to_kernel(x, lay.perm_full)

    def from_kernel(x, like):
        return x if own else _from_kernel(x, like, lay.perm_full)

    va, vc = (v_row, v_col) if lay.row_lacks_a else (v_col, v_row)
    arrays.update(
        p=_to_kernel(p[None], lay.perm_full)[:, 0],
        g=_to_kernel(g[None], lay.perm_full)[:, 0],
        m=to_kernel(m), rms=to_kernel(rms),
        va=_to_kernel(va, lay.perm_lack_a), vc=jnp.reshape(vc, (1, k, -1)),
        consts=consts(lay.row_lacks_a))
    out = call(lay.dims, True)
    va = _from_kernel(out["va_out"], va, lay.perm_lack_a)
    vc = jnp.reshape(out["vc_out"][0], vc.shape)
    v_row, v_col = (va, vc) if lay.row_lacks_a else (vc, va)
    return (_from_kernel(out["update"], p[None], lay.perm_full)[0],
            from_kernel(out["m_out"], m), from_kernel(out["rms_out"], rms), v_row, v_col,
            v_full)


@functools.cache
def _native_leaf(hidden_layers: int, exp_mult: float, step_mult: float):
    """``leaf(nn, time, decays, p, g, m, rms, v_row, v_col, v_full) -> (update, m, rms, v_row,
    v_col, v_full)`` of one tensor by the native CPU kernel (:func:`kernel_step`).
    Differentiated, it evaluates as the XLA matmul path (the same function)."""
    reference = functools.partial(_xla_step, compute="concat", exp_mult=exp_mult,
                                  step_mult=step_mult)

    @common.differentiated_as(reference)
    def leaf(nn, time, decays, p, g, m, rms, v_row, v_col, v_full):
        return kernel_step(nn, time, kernel_decays(decays), [exp_mult, step_mult], p, g, m,
                           rms, v_row, v_col, v_full, hidden_layers=hidden_layers)

    return leaf


def _feature_blocks(p, g, m, rms, fac_g, v_row, v_col, v_full) -> list[jax.Array]:
    """The 28 features of one tensor (rank >= 1), as blocks of shape ``(k,) + p.shape``."""
    r = jax.lax.rsqrt(rms + 1e-6)
    blocks = [g[None], p[None], m, rms, m * r, r, fac_g]
    return blocks + common.second_moment_features(
        m, v_row, v_col, v_full, p.shape, lambda v: (v + 1e-6) ** -0.5
    )


class SmallFcLOptState(NamedTuple):
    """Optimizer state of ``small_fc_lopt`` (the parameters are not part of it)."""

    momentum: common.MomentumState
    rms: common.RMSState
    factored: common.FactoredState
    iteration: jax.Array  # int32 scalar, steps taken so far
    num_steps: jax.Array  # int32 scalar, the training horizon (stored, unused)


class SmallFcLOpt(LearnedOptimizer):
    """The 197-parameter ``small_fc_lopt`` (``AdafacMLPLOpt`` in learned_optimization).

    Args:
      hidden_size: width of each hidden layer (4 in the paper).
      hidden_layers: number of hidden layers (2 in the paper).
      exp_mult, step_mult: ``step = d * exp(exp_mult * m) * step_mult`` (both 0.001).
      initial_momentum_decays, initial_rms_decays, initial_adafactor_decays: decays at
        ``theta = init``; momentum and AdaFactor need the same count (they are paired in
        ``fac_mom``) and there is exactly one rms decay.
      compute: ``"elementwise"`` (default) or ``"concat"``; see the module docstring.
    """

    name = "small_fc_lopt"

    def __init__(
        self,
        hidden_size: int = 4,
        hidden_layers: int = 2,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        initial_momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        initial_rms_decays: Sequence[float] = (0.999,),
        initial_adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
        compute: ComputePath = "elementwise",
    ):
        if compute not in _PATHS:
            raise ValueError(f"compute must be one of {_PATHS}; got {compute!r}")
        if hidden_size < 1 or hidden_layers < 0:
            raise ValueError(f"need hidden_size >= 1 and hidden_layers >= 0; got {hidden_size}, "
                             f"{hidden_layers}")
        if len(initial_rms_decays) != 1:
            raise ValueError("small_fc_lopt takes exactly one rms decay (it scales every "
                             f"momentum); got {tuple(initial_rms_decays)}")
        if len(initial_momentum_decays) != len(initial_adafactor_decays):
            raise ValueError("momentum and AdaFactor decays must have the same count (fac_mom "
                             f"pairs them); got {tuple(initial_momentum_decays)} and "
                             f"{tuple(initial_adafactor_decays)}")
        for what, ds in (("momentum", initial_momentum_decays), ("rms", initial_rms_decays),
                         ("adafactor", initial_adafactor_decays)):
            if not all(0.0 <= d < 1.0 for d in ds):
                raise ValueError(f"initial {what} decays must lie in [0, 1); got {tuple(ds)}")
        self.hidden_size = hidden_size
        self.hidden_layers = hidden_layers
        self.exp_mult = exp_mult
        self.step_mult = step_mult
        self.initial_momentum_decays = tuple(float(d) for d in initial_momentum_decays)
        self.initial_rms_decays = tuple(float(d) for d in initial_rms_decays)
        self.initial_adafactor_decays = tuple(float(d) for d in initial_adafactor_decays)
        self.compute = compute
        for factored in (True, False):  # loads while the caller builds tasks (native.prefetch)
            if (sizes := self._kernel_sizes(factored)) is not None:
                native.prefetch(native.kernel_module, *sizes)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``SmallFcLOpt(**lopt.config())`` rebuilds it)."""
        return {"hidden_size": self.hidden_size, "hidden_layers": self.hidden_layers,
                "exp_mult": self.exp_mult, "step_mult": self.step_mult,
                "initial_momentum_decays": list(self.initial_momentum_decays),
                "initial_rms_decays": list(self.initial_rms_decays),
                "initial_adafactor_decays": list(self.initial_adafactor_decays),
                "compute": self.compute}

    # ---------------------------------------------------------------------------------------
    @property
    def num_tensor_features(self) -> int:
        """Normalised per-parameter features (28 with the defaults)."""
        km, kf = len(self.initial_momentum_decays), len(self.initial_adafactor_decays)
        return 2 + km + 1 + km + 1 + kf + 4 * kf + km

    @property
    def num_inputs(self) -> int:
        """MLP input width: tensor features plus time features (39 with the defaults)."""
        return self.num_tensor_features + len(common.TIME_SCALES)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.num_inputs,) + (self.hidden_size,) * self.hidden_layers + (2,)

    def init(self, key: jax.Array) -> MetaParams:
        return {
            "momentum_decays": jnp.zeros((len(self.initial_momentum_decays),), jnp.float32),
            "rms_decays": jnp.zeros((len(self.initial_rms_decays),), jnp.float32),
            "adafactor_decays": jnp.zeros((len(self.initial_adafactor_decays),), jnp.float32),
            "nn": common.init_mlp(key, self.layer_sizes),
        }

    def decays(self, theta: MetaParams) -> dict[str, jax.Array]:
        """The accumulator decays ``theta`` encodes."""
        return {
            "momentum": common.offset_decays(self.initial_momentum_decays,
                                             theta["momentum_decays"]),
            "rms": common.offset_decays(self.initial_rms_decays, theta["rms_decays"]),
            "adafactor": common.offset_decays(self.initial_adafactor_decays,
                                              theta["adafactor_decays"]),
        }

    # ---------------------------------------------------------------------------------------
    def _blocks(self, p, g, m, rms, fac_g, v_row, v_col, v_full) -> list[jax.Array]:
        """The 28 features of one tensor, as blocks of shape ``(k,) + p.shape``."""
        return _feature_blocks(jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32),
                               m, rms, fac_g, v_row, v_col, v_full)

    def _kernel_sizes(self, factored: bool) -> tuple | None:
        """The native kernel's sizes (:func:`native.kernel_module`) for tensors of rank >= 2
        (``factored``) or < 2, where it is used: the elementwise path, at least one hidden
        layer, a CPU backend (elsewhere XLA fuses the elementwise path well); else ``None``."""
        if (self.compute != "elementwise" or self.hidden_layers < 1
                or jax.default_backend() != "cpu"):
            return None
        return (len(self.initial_momentum_decays), self.hidden_size, self.hidden_layers,
                len(common.TIME_SCALES), factored)

    def _native(self, shape) -> bool:
        """Whether a tensor of ``shape`` is updated by the native CPU kernel: where
        :meth:`_kernel_sizes` allows, the tensor has entries (an empty one takes the XLA path)
        and its kernel builds (:func:`native.ready`)."""
        sizes = self._kernel_sizes(len(shape) >= 2)
        return sizes is not None and math.prod(shape) > 0 and native.ready(*sizes)

    # ---------------------------------------------------------------------------------------
    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        decays = self.decays(theta)
        nn = theta["nn"]
        km, kr, kf = (len(self.initial_momentum_decays), len(self.initial_rms_decays),
                      len(self.initial_adafactor_decays))

        def init_fn(params: Any) -> SmallFcLOptState:
            return SmallFcLOptState(
                momentum=common.momentum_init(params, km),
                rms=common.rms_init(params, kr),
                factored=common.factored_init(params, kf),
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update_fn(updates: Any, state: SmallFcLOptState, params: Any = None, *,
                      loss: jax.Array | None = None, **extra_args: Any):
            del loss, extra_args  # small_fc_lopt has no loss feature
            grads = updates
            common.check_same_structure(grads, params, self.name)
            time = common.tanh_time_features(state.iteration)
            treedef = jax.tree.structure(grads)
            leaves = zip(*(treedef.flatten_up_to(t) for t in (
                params, grads, state.momentum.m, state.rms.rms, state.factored.v_row,
                state.factored.v_col, state.factored.v_full)), strict=True)
            out: dict[str, list] = {n: [] for n in ("u", "m", "rms", "v_row", "v_col", "v_full")}
            for p, g, m, r, vr, vc, vf in leaves:
                if self._native(jnp.shape(p)):  # the kernel updates the accumulators too
                    leaf = _native_leaf(self.hidden_layers, self.exp_mult, self.step_mult)
                    u, m, r, vr, vc, vf = leaf(nn, time, decays, jnp.asarray(p, jnp.float32),
                                               jnp.asarray(g, jnp.float32), m, r, vr, vc, vf)
                    u = u.astype(jnp.asarray(p).dtype)
                else:
                    u, m, r, vr, vc, vf = _xla_step(
                        nn, time, decays, p, g, m, r, vr, vc, vf, compute=self.compute,
                        exp_mult=self.exp_mult, step_mult=self.step_mult)
                for name, x in zip(out, (u, m, r, vr, vc, vf), strict=True):
                    out[name].append(x)
            new_state = SmallFcLOptState(
                momentum=common.MomentumState(m=treedef.unflatten(out["m"])),
                rms=common.RMSState(rms=treedef.unflatten(out["rms"])),
                factored=common.FactoredState(v_row=treedef.unflatten(out["v_row"]),
                                              v_col=treedef.unflatten(out["v_col"]),
                                              v_full=treedef.unflatten(out["v_full"])),
                iteration=state.iteration + 1, num_steps=state.num_steps)
            return treedef.unflatten(out["u"]), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
