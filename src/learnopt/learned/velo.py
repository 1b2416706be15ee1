"""VeLO: the hypernetwork learned optimizer of Metz et al. 2022.

Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv:2211.09760: §3.1 and Fig. 2 (architecture), App. B.1 (two-level hypernetwork), B.2
(accumulators), B.3 (per-tensor LSTM, its features, cross-tensor mixing), B.4 (weight bank,
per-parameter MLP, update), B.7 (costs). The recipe is the released ``HyperV2`` of
learned_optimization (github.com/google/learned_optimization).

Per tensor, an LSTM reads 28 features (training-fraction and loss-EMA features, accumulator
statistics, rank) mixed across tensors, and outputs a learning-rate scale ``c_lr`` and weights
``c_hyper`` that mix a bank of small per-parameter MLPs (30 -> 4 -> 4 -> 3) into that tensor's
MLP; the MLP reads 30 per-parameter accumulator features and outputs a direction ``d`` and a
magnitude ``m``, and the parameter moves by ``-c_lr d exp(0.001 m) 0.001 rms(p)``. ``Velo()`` is
the paper's size (LSTM 512, bank 256: 2,316,289 meta-parameters); ``Velo.small()`` (LSTM 16,
bank 8) meta-trains on a CPU. Where the paper and the released code disagree the code is
followed, except the ``var_rms`` feature (``var_rms="paper"``); ``mixing=``, ``var_rms=`` and
``init_scheme=`` (default ``"descent"``: an untrained VeLO already descends) select the
variants. The model step by step, the sizes and the initialisation are in docs/derivations.md
§3.6; the departures in docs/departures.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.learned import adafac_mlp, common, native
from learnopt.learned.base import LearnedOptimizer, MetaParams
from learnopt.step import declare_extra_args

PyTree = Any
Mixing = Literal["code", "paper"]
VarRms = Literal["paper", "code"]
InitScheme = Literal["descent", "released"]

#: Accumulator decays (App. B.2); fixed, not meta-learned.
MOMENTUM_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
RMS_DECAYS: tuple[float, ...] = (0.999,)
ADAFACTOR_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
#: Offsets ``s`` of the training-fraction features ``tanh(10 (t/T - s))`` (App. B.3).
FRACTION_OFFSETS: tuple[float, ...] = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
NUM_LOSS_TIMESCALES = 10
LOSS_RUNNING_MIN_INIT = 999999999999.0
RANK_ONE_HOT = 5
GRAD_CLIP = 1000.0
BANK_SCALE = 100.0
MLP_OUTPUTS = 3
#: Per-parameter MLP input channels, in order (the released code's).
MLP_FEATURE_NAMES: tuple[str, ...] = (
    "g", "clip_g", "p", "m_0.9", "m_0.99", "m_0.999", "rms",
    "m_0.9*rsqrt_rms", "m_0.99*rsqrt_rms", "m_0.999*rsqrt_rms", "rsqrt_rms",
    "fac_g_0.9", "fac_g_0.99", "fac_g_0.999", "g*rsqrt_rms",
    "row_0.9", "row_0.99", "row_0.999", "col_0.9", "col_0.99", "col_0.999",
    "rsqrt_row_0.9", "rsqrt_row_0.99", "rsqrt_row_0.999",
    "rsqrt_col_0.9", "rsqrt_col_0.99", "rsqrt_col_0.999",
    "fac_mom_0.9", "fac_mom_0.99", "fac_mom_0.999",
)
NUM_MLP_FEATURES = len(MLP_FEATURE_NAMES)  # 30
#: The feature the ``"descent"`` initialisation steers along: ``m_0.9 * rsqrt(rms + 1e-6)``.
DESCENT_FEATURE = MLP_FEATURE_NAMES.index("m_0.9*rsqrt_rms")  # 7

_MIXINGS = ("code", "paper")
_VAR_RMS = ("paper", "code")
_INIT_SCHEMES = ("descent", "released")
_HI = jax.lax.Precision.HIGHEST


def lstm_feature_names(var_rms: VarRms = "paper") -> tuple[str, ...]:
    """Names of the per-tensor LSTM inputs, in order (28, or 30 with ``var_rms="code"``)."""
    names = [f"fraction_{s}" for s in FRACTION_OFFSETS]
    names += [f"loss_{i}" for i in range(NUM_LOSS_TIMESCALES - 1)]
    names += ["mean_rms"] + [f"rank_{r}" for r in range(RANK_ONE_HOT)]
    names += [f"var_m_{d}" for d in MOMENTUM_DECAYS]
    names += [f"var_rms_{d}" for d in MOMENTUM_DECAYS] if var_rms == "code" else ["var_rms"]
    return tuple(names)


LSTM_FEATURE_NAMES = lstm_feature_names("paper")


# --------------------------------------------------------------------------------------------
# Loss accumulators and time features (App. B.2, B.3).


class LossBufferState(NamedTuple):
    """EMAs of the training loss at 10 timescales (not bias-corrected) and the running minima
    of their bias-corrected values."""

    means: jax.Array  # (10,)
    running_min: jax.Array  # (10,)


def loss_halflives(num_steps: jax.Array | int) -> jax.Array:
    """``logspace(1, log10(num_steps), 10)``: half-lives of the loss EMAs (released code)."""
    top = jnp.log10(jnp.asarray(num_steps, jnp.float32))
    return 10.0 ** jnp.linspace(1.0, top, NUM_LOSS_TIMESCALES)


def _one_minus_decay_pow(n: jax.Array, halflife: jax.Array) -> jax.Array:
    """``1 - decay^n`` with ``decay = exp(-1/halflife)``, computed as ``-expm1(-n/halflife)``."""
    return -jnp.expm1(-jnp.asarray(n, jnp.float32) / halflife)


def loss_buffer_init() -> LossBufferState:
    return LossBufferState(means=jnp.zeros((NUM_LOSS_TIMESCALES,), jnp.float32),
                           running_min=jnp.full((NUM_LOSS_TIMESCALES,), LOSS_RUNNING_MIN_INIT,
                                                jnp.float32))


def loss_buffer_update(buf: LossBufferState, loss: jax.Array, count: jax.Array,
                       num_steps: jax.Array) -> LossBufferState:
    """Add ``loss``, the ``count + 1``-th loss, after clipping it to ``2 |max corrected EMA|``."""
    hl = loss_halflives(num_steps)
    loss = jnp.asarray(loss, jnp.float32)
    finite = jnp.isfinite(loss)
    corrected = buf.means / _one_minus_decay_pow(count + 1, hl)
    approx_max = jnp.where(count == 0, jnp.where(finite, loss, 0.0), jnp.max(corrected))
    ceiling = 2.0 * jnp.abs(approx_max)
    loss = jnp.where(finite, jnp.minimum(ceiling, loss), ceiling)
    means = buf.means * jnp.exp(-1.0 / hl) + loss * (-jnp.expm1(-1.0 / hl))
    corrected = means / _one_minus_decay_pow(count + 1, hl)
    return LossBufferState(means=means, running_min=jnp.minimum(buf.running_min, corrected))


def loss_features(buf: LossBufferState, count: jax.Array, num_steps: jax.Array) -> jax.Array:
    """The 9 loss features after ``count`` losses: -1 falling, 0 flat, +1 diverging."""
    hl = loss_halflives(num_steps)
    corrected = buf.means / _one_minus_decay_pow(count, hl)
    lo = buf.running_min[:-1]
    den = jnp.maximum(1e-8, corrected[1:] - lo)
    feats = jnp.clip((corrected[:-1] - lo) / den - 1.0, -1.0, 1.0)
    return jnp.where(count <= 2, jnp.zeros_like(feats), feats)


def fraction_features(iteration: jax.Array, num_steps: jax.Array) -> jax.Array:
    """``tanh(10 (t / T - s))`` for the 9 offsets ``s``."""
    frac = jnp.asarray(iteration, jnp.float32) / jnp.asarray(num_steps, jnp.float32)
    return jnp.tanh(10.0 * (frac - jnp.asarray(FRACTION_OFFSETS, jnp.float32)))


def clip_log_abs(x: jax.Array, scale: float = 10.0) -> jax.Array:
    """``0.5 * clip(log(1e-8 + |scale x|), -5, 5)`` (App. B.3 with the code's x0.5)."""
    return 0.5 * jnp.clip(jnp.log(1e-8 + jnp.abs(x * scale)), -5.0, 5.0)


def rank_feature(shape: Sequence[int]) -> jax.Array:
    """``one_hot(number of dims of size > 1, 5)``; all zeros for 5 or more such dims."""
    n = int(np.sum(np.asarray(tuple(shape), np.int64) > 1))
    return jax.nn.one_hot(n, RANK_ONE_HOT, dtype=jnp.float32)


def tensor_statistics(p: jax.Array, m: jax.Array, rms: jax.Array,
                      var_rms: VarRms = "paper") -> jax.Array:
    """``[L(mean rms'), rank one-hot, L(var m'_k), L(var rms')]`` of one tensor.

    ``m`` / ``rms`` have a leading decay axis before the parameter's shape; both are divided by
    ``sqrt(max(1e-9, mean(p^2)))`` first. ``var_rms="code"`` centres rms' on the *momentum*
    means, giving one entry per momentum decay (the released code's broadcast). A tensor with
    no entries has the statistics of a zero tensor (means and variances 0), not NaN: the rows
    of all tensors are max-pooled together, so one NaN row would reach every tensor's update.
    """
    p = jnp.asarray(p, jnp.float32)

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(x) / max(x.size, 1)

    scale = jax.lax.rsqrt(jnp.maximum(1e-9, mean(jnp.square(p))))
    # One reduction per decay channel (XLA:CPU reduces a full array to a scalar faster than a
    # ``(k,) + shape`` block to ``(k,)``); the same values as reducing the blocks.
    ms = [m[k] * scale for k in range(m.shape[0])]
    rs = [rms[k] * scale for k in range(rms.shape[0])]
    mean_m = [mean(x) for x in ms]
    var_m = jnp.stack([mean(jnp.square(x - mu)) for x, mu in zip(ms, mean_m, strict=True)])
    mean_rms = [mean(x) for x in rs]
    if var_rms == "code":  # rms' centred on each momentum mean (broadcast over the decays)
        var_r = jnp.stack([mean(jnp.square(rs[k % len(rs)] - mu))
                           for k, mu in enumerate(mean_m)])
    else:
        var_r = jnp.stack([mean(jnp.square(x - mu)) for x, mu in zip(rs, mean_rms,
                                                                     strict=True)])
    return jnp.concatenate([clip_log_abs(jnp.stack(mean_rms)), rank_feature(p.shape),
                            clip_log_abs(var_m), clip_log_abs(var_r)])


# --------------------------------------------------------------------------------------------
# Per-parameter features (App. B.4).


def parameter_features(p: jax.Array, g: jax.Array, m: jax.Array, rms: jax.Array,
                       fac_g: jax.Array, v_row: jax.Array, v_col: jax.Array,
                       v_full: jax.Array, normalize: bool = True) -> jax.Array:
    """The 30 per-parameter features of a tensor of rank >= 1, shape ``p.shape + (30,)``.

    ``g`` is the clipped gradient and the accumulators already include it. With ``normalize``
    each channel is scaled to a unit second moment over the tensor's axes.
    """
    p = jnp.asarray(p, jnp.float32)
    g = jnp.asarray(g, jnp.float32)
    shape = p.shape
    if not shape:
        raise ValueError("parameter_features takes tensors of rank >= 1 (reshape scalars to "
                         "[1] first)")
    r = jax.lax.rsqrt(rms + 1e-6)
    gx = g[None]
    blocks = [gx, jnp.clip(gx, -0.1, 0.1), p[None], m, rms, m * r, r, fac_g, gx * r]
    moments = common.second_moment_features(m, v_row, v_col, v_full, shape, common.safe_rsqrt)
    x = common.decay_last(jnp.concatenate(blocks + moments, axis=0))
    if normalize:
        x = common.second_moment_normalize(x, axis=tuple(range(len(shape))))
    return x


def _per_parameter_mlp_concat(mlp, p, g, m, rms, fac_g, v_row, v_col, v_full):
    out = common.apply_mlp(mlp, parameter_features(p, g, m, rms, fac_g, v_row, v_col, v_full))
    return out[..., 0], out[..., 1]


@common.differentiated_as(_per_parameter_mlp_concat)
def _per_parameter_mlp(mlp, p, g, m, rms, fac_g, v_row, v_col, v_full):
    """``(d, m)`` of one tensor: the MLP on :func:`parameter_features`, without materialising
    the ``p.shape + (30,)`` feature array (:func:`common.channel_mlp`; the 12 row / column
    channels of a factored tensor stay low-rank). The same function as
    ``apply_mlp(mlp, parameter_features(...))``, which it evaluates as under autodiff."""
    r = jax.lax.rsqrt(rms + 1e-6)
    gx = g[None]
    chans = common.block_channels([gx, jnp.clip(gx, -0.1, 0.1), p[None], m, rms, m * r, r,
                                   fac_g, gx * r])
    chans += common.second_moment_channels(m, v_row, v_col, v_full, p.shape, common.safe_rsqrt)
    scales = jax.lax.rsqrt(common.NORMALIZER_EPS + common.channel_mean_squares(chans))
    out = common.channel_mlp(mlp, chans, scales)
    return out[0], out[1]


def feature_selector_mlp(sizes: Sequence[int], feature: int) -> dict[str, jax.Array]:
    """Weights of a per-parameter MLP whose direction output equals input ``feature``.

    ``d = relu(...relu(x_f)) - relu(...relu(-x_f)) = x_f``; every other output is 0. Used by the
    ``"descent"`` initialisation and by tests.
    """
    sizes = tuple(int(s) for s in sizes)
    n = len(sizes) - 1
    if not 0 <= feature < sizes[0]:
        raise ValueError(f"feature must lie in [0, {sizes[0]}); got {feature}")
    params = {}
    for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = np.zeros((fi, fo), np.float32)
        if n == 1:
            w[feature, 0] = 1.0
        elif i == 0:
            w[feature, 0], w[feature, 1] = 1.0, -1.0
        elif i == n - 1:
            w[0, 0], w[1, 0] = 1.0, -1.0
        else:
            w[0, 0], w[1, 1] = 1.0, 1.0
        params[f"w{i}"] = jnp.asarray(w)
        params[f"b{i}"] = jnp.zeros((fo,), jnp.float32)
    return params


def _xla_step(mlp, c_lr, p, g, m, rms, v_row, v_col, v_full, *, exp_mult: float,
              step_mult: float):
    """One tensor's ``(update, m, rms, v_row, v_col, v_full)`` from its accumulators before the
    step and its (clipped) gradient, by XLA: the accumulator updates (App. B.2), the
    per-parameter MLP ``mlp`` and ``-c_lr d exp(exp_mult m) step_mult rms(p)`` (App. B.4)."""
    decays = _decays()
    m = common.momentum_update(common.MomentumState(m), g, decays["momentum"]).m
    rms = common.rms_update(common.RMSState(rms), g, decays["rms"]).rms
    v_row, v_col, v_full, fac_g = common.factored_update_leaf(
        v_row, v_col, v_full, g, decays["adafactor"])
    shape, dtype = jnp.shape(p), jnp.asarray(p).dtype
    p = jnp.asarray(p, jnp.float32)
    p1, g1, m1, rms1, fac_g1, v_full1 = p, g, m, rms, fac_g, v_full
    if not shape:  # scalars are processed as shape [1], as in the released code
        p1, g1 = jnp.reshape(p, (1,)), jnp.reshape(g, (1,))
        m1, rms1, fac_g1, v_full1 = (x[:, None] for x in (m, rms, fac_g, v_full))
    direction, magnitude = _per_parameter_mlp(mlp, p1, g1, m1, rms1, fac_g1, v_row, v_col,
                                              v_full1)
    step = c_lr * direction * jnp.exp(exp_mult * magnitude) * step_mult * _param_scale(p)
    return jnp.reshape(-step, shape).astype(dtype), m, rms, v_row, v_col, v_full


def _decays() -> dict[str, jax.Array]:
    """The fixed accumulator decays (App. B.2) as arrays."""
    return {"momentum": jnp.asarray(MOMENTUM_DECAYS, jnp.float32),
            "rms": jnp.asarray(RMS_DECAYS, jnp.float32),
            "adafactor": jnp.asarray(ADAFACTOR_DECAYS, jnp.float32)}


def _param_scale(p: jax.Array) -> jax.Array:
    """``sqrt(mean(p^2) + 1e-9)``: the update is relative to the tensor's scale (App. B.4)."""
    return jnp.sqrt(jnp.mean(jnp.square(p)) + 1e-9)


@functools.cache
def _native_step(hidden_layers: int, exp_mult: float, step_mult: float):
    """:func:`_xla_step` by one call of the native CPU kernel (its VeLO feature set,
    :mod:`learnopt.learned.native`), the per-tensor ``c_lr * rms(p)`` folded into the step
    multiplier; differentiated, it evaluates as :func:`_xla_step` (the same function)."""
    reference = functools.partial(_xla_step, exp_mult=exp_mult, step_mult=step_mult)

    @common.differentiated_as(reference)
    def step(mlp, c_lr, p, g, m, rms, v_row, v_col, v_full):
        p32 = jnp.asarray(p, jnp.float32)
        last = f"{hidden_layers}"
        nn = {**mlp, "w" + last: mlp["w" + last][:, :2], "b" + last: mlp["b" + last][:2]}
        scales = jnp.stack([jnp.float32(exp_mult), step_mult * c_lr * _param_scale(p32)])
        u, *acc = adafac_mlp.kernel_step(
            nn, jnp.zeros((0,), jnp.float32), adafac_mlp.kernel_decays(_decays()), scales, p32,
            g, m, rms, v_row, v_col, v_full, hidden_layers=hidden_layers, features="velo")
        return (u.astype(jnp.asarray(p).dtype), *acc)

    return step


# --------------------------------------------------------------------------------------------
# Dense layer.


def _dense(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.matmul(x, params["w"], precision=_HI) + params["b"]


@functools.partial(jax.jit, static_argnums=1)
def _jitted_init(key: jax.Array, config: tuple[tuple[str, Any], ...]) -> MetaParams:
    return Velo(**dict(config))._init_impl(key)


class VeloState(NamedTuple):
    """Optimizer state of VeLO (the parameters are not part of it).

    ``lstm_hidden`` / ``lstm_cell`` have shape ``(num_tensors, lstm_hidden_size)``, one row per
    leaf of the parameter tree in ``jax.tree.leaves`` order.
    """

    momentum: common.MomentumState
    rms: common.RMSState
    factored: common.FactoredState
    lstm_hidden: jax.Array
    lstm_cell: jax.Array
    loss_buffer: LossBufferState
    iteration: jax.Array  # int32 scalar: updates done so far
    num_steps: jax.Array  # int32 scalar: the training horizon T


class Velo(LearnedOptimizer):
    """VeLO (``HyperV2`` in learned_optimization): a per-tensor LSTM hypernetwork that mixes a
    bank of per-parameter MLPs (arXiv:2211.09760, App. B).

    Args:
      lstm_hidden_size: LSTM width, also the width of the mixing layers (512 in VeLO).
      param_inits: number of per-parameter MLP weight sets in the bank (256 in VeLO).
      ff_hidden_size, ff_hidden_layers: the per-parameter MLP (4 and 2).
      mixing: ``"code"`` (default, ``F0(x) + max(relu(F1(x)))``) or ``"paper"``
        (``F0(x) + max(relu(F1(relu(F2(x)))))``).
      var_rms: ``"paper"`` (default; 28 LSTM inputs) or ``"code"`` (the released broadcast, 30).
      init_scheme: ``"descent"`` (default) or ``"released"``; see docs/departures.md (VeLO 8).
      exp_mult, step_mult: the two 0.001 constants of the update.
    """

    name = "velo"

    def __init__(
        self,
        lstm_hidden_size: int = 512,
        param_inits: int = 256,
        ff_hidden_size: int = 4,
        ff_hidden_layers: int = 2,
        mixing: Mixing = "code",
        var_rms: VarRms = "paper",
        init_scheme: InitScheme = "descent",
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
    ):
        for what, value, valid in (("mixing", mixing, _MIXINGS), ("var_rms", var_rms, _VAR_RMS),
                                   ("init_scheme", init_scheme, _INIT_SCHEMES)):
            if value not in valid:
                raise ValueError(f"{what} must be one of {valid}; got {value!r}")
        if lstm_hidden_size < 1 or param_inits < 1 or ff_hidden_size < 1 or ff_hidden_layers < 0:
            raise ValueError("need lstm_hidden_size, param_inits, ff_hidden_size >= 1 and "
                             f"ff_hidden_layers >= 0; got {lstm_hidden_size}, {param_inits}, "
                             f"{ff_hidden_size}, {ff_hidden_layers}")
        if init_scheme == "descent" and ff_hidden_layers > 0 and ff_hidden_size < 2:
            raise ValueError("init_scheme='descent' needs ff_hidden_size >= 2 (a +/- pair of "
                             f"hidden units); got {ff_hidden_size}")
        self.lstm_hidden_size = int(lstm_hidden_size)
        self.param_inits = int(param_inits)
        self.ff_hidden_size = int(ff_hidden_size)
        self.ff_hidden_layers = int(ff_hidden_layers)
        self.mixing = mixing
        self.var_rms = var_rms
        self.init_scheme = init_scheme
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        for sizes in self._kernel_sizes():  # loads while the caller builds tasks
            native.prefetch(native.kernel_module, *sizes)

    @classmethod
    def small(cls, **kwargs: Any) -> Velo:
        """A CPU-sized VeLO: LSTM 16, bank of 8 (4,929 meta-parameters + 32 initial state)."""
        return cls(**{"lstm_hidden_size": 16, "param_inits": 8, **kwargs})

    # ---------------------------------------------------------------------------------------
    @property
    def num_lstm_features(self) -> int:
        return len(lstm_feature_names(self.var_rms))

    @property
    def mlp_layer_sizes(self) -> tuple[int, ...]:
        return ((NUM_MLP_FEATURES,) + (self.ff_hidden_size,) * self.ff_hidden_layers
                + (MLP_OUTPUTS,))

    def _weight_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Shapes of every weight matrix (the biases have the last dim of their weight)."""
        h, f, k = self.lstm_hidden_size, self.num_lstm_features, self.param_inits
        sizes = self.mlp_layer_sizes
        return {
            "mix": {"f0": (f, h), "f1": (f if self.mixing == "code" else h, h), "f2": (f, h)},
            "lstm": {"w": (2 * h, 4 * h)},
            "controls": {"w": (h, k)},
            "step_size": {"w": (h, 1)},
            "bank": {f"w{i}": (k, fi, fo)
                     for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))},
        }

    def config(self) -> dict[str, Any]:
        """The constructor arguments (``Velo(**lopt.config())`` rebuilds this optimizer)."""
        return {"lstm_hidden_size": self.lstm_hidden_size, "param_inits": self.param_inits,
                "ff_hidden_size": self.ff_hidden_size, "ff_hidden_layers": self.ff_hidden_layers,
                "mixing": self.mixing, "var_rms": self.var_rms, "init_scheme": self.init_scheme,
                "exp_mult": self.exp_mult, "step_mult": self.step_mult}

    def init(self, key: jax.Array) -> MetaParams:
        """Initial theta; docs/departures.md (VeLO 8) explains the two ``init_scheme`` choices.

        Every weight is ``TruncatedNormal(1/sqrt(fan_in))`` cut at 2 std (Haiku's ``hk.Linear``
        default, used by the released code), all cut from one draw. Runs under ``jax.jit``
        (compiled once per configuration), as eager dispatch of the slicing is slow.
        """
        return _jitted_init(key, tuple(sorted(self.config().items())))

    def _init_impl(self, key: jax.Array) -> MetaParams:
        shapes = self._weight_shapes()
        flat = [(part, name, shape) for part, sub in shapes.items() for name, shape in sub.items()]
        sizes = [math.prod(s) for _, _, s in flat]
        draw = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        w = {part: {} for part in shapes}
        for (part, name, shape), lo, hi in zip(flat, offsets[:-1], offsets[1:], strict=True):
            w[part][name] = jnp.reshape(draw[int(lo):int(hi)], shape) / math.sqrt(shape[-2])

        def dense(x):
            return {"w": x, "b": jnp.zeros(x.shape[-1:], jnp.float32)}

        h, k = self.lstm_hidden_size, self.param_inits
        bank = {}
        for name, x in w["bank"].items():
            bank[name] = x
            bank["b" + name[1:]] = jnp.zeros((k, x.shape[-1]), jnp.float32)
        theta = {
            "lstm_init_state": {"hidden": jnp.zeros((h,), jnp.float32),
                                "cell": jnp.zeros((h,), jnp.float32)},
            "mix": {n: dense(x) for n, x in w["mix"].items()},
            "lstm": dense(w["lstm"]["w"]),
            "controls": dense(w["controls"]["w"]),
            "step_size": dense(w["step_size"]["w"]),
            "bank": bank,
        }
        if self.init_scheme == "descent":
            for head in ("controls", "step_size"):
                theta[head] = {"w": 0.1 * theta[head]["w"], "b": jnp.ones_like(theta[head]["b"])}
            sel = feature_selector_mlp(self.mlp_layer_sizes, DESCENT_FEATURE)
            theta["bank"] = {n: (x + sel[n]) / BANK_SCALE for n, x in theta["bank"].items()}
        return theta

    def parameter_counts(self) -> dict[str, int]:
        """Meta-parameters per part (from ``jax.eval_shape``; nothing is allocated)."""
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return {name: int(sum(math.prod(x.shape) for x in jax.tree.leaves(sub)))
                for name, sub in shapes.items()}

    # ---------------------------------------------------------------------------------------
    # The per-tensor network.

    def lstm_features(self, state: VeloState, params: PyTree,
                      loss: jax.Array) -> tuple[jax.Array, LossBufferState]:
        """The ``(num_tensors, F)`` LSTM inputs of the update that starts from ``state``.

        Uses the accumulators in ``state`` (before the new gradient), the current ``params``
        and the loss buffer after adding ``loss``, which is returned as well.
        """
        buf = loss_buffer_update(state.loss_buffer, loss, state.iteration, state.num_steps)
        shared = jnp.concatenate([fraction_features(state.iteration, state.num_steps),
                                  loss_features(buf, state.iteration + 1, state.num_steps)])
        treedef = jax.tree.structure(params)
        rows = [jnp.concatenate([shared, tensor_statistics(p, m, r, self.var_rms)])
                for p, m, r in zip(jax.tree.leaves(params),
                                   treedef.flatten_up_to(state.momentum.m),
                                   treedef.flatten_up_to(state.rms.rms), strict=True)]
        return jnp.stack(rows), buf

    def per_tensor(self, theta: MetaParams, features: jax.Array, hidden: jax.Array,
                   cell: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Mixing, one LSTM step and the heads: ``(c_hyper, c_lr, hidden, cell)``.

        ``features`` is ``(num_tensors, F)``; ``c_hyper`` is ``(num_tensors, param_inits)`` and
        ``c_lr`` is ``(num_tensors,)``.
        """
        mix = theta["mix"]
        if self.mixing == "code":
            pooled = jax.nn.relu(_dense(mix["f1"], features))
        else:
            pooled = jax.nn.relu(_dense(mix["f1"], jax.nn.relu(_dense(mix["f2"], features))))
        x = _dense(mix["f0"], features) + jnp.max(pooled, axis=0, keepdims=True)
        gates = _dense(theta["lstm"], jnp.concatenate([x, hidden], axis=-1))
        i, g, f, o = jnp.split(gates, 4, axis=-1)
        cell = jax.nn.sigmoid(f + 1.0) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
        c_hyper = _dense(theta["controls"], hidden)
        c_lr = _dense(theta["step_size"], hidden)[:, 0]
        return c_hyper, c_lr, hidden, cell

    def mixed_mlps(self, theta: MetaParams, c_hyper: jax.Array) -> dict[str, jax.Array]:
        """``100 * mean_k(c_hyper[:, k] * bank[k])``: one MLP per tensor (leading axis)."""
        scale = BANK_SCALE / self.param_inits
        return {n: scale * jnp.tensordot(c_hyper, w, axes=1, precision=_HI)
                for n, w in theta["bank"].items()}

    # ---------------------------------------------------------------------------------------
    def _kernel_sizes(self) -> list[tuple]:
        """The native kernels' sizes (:func:`native.kernel_module`, factored and not) where
        they are used: a per-parameter MLP with a hidden layer, a CPU backend; else none."""
        if self.ff_hidden_layers < 1 or jax.default_backend() != "cpu":
            return []
        sizes = (len(MOMENTUM_DECAYS), self.ff_hidden_size, self.ff_hidden_layers, 0)
        return [(*sizes, factored, "velo") for factored in (True, False)]

    def _native(self) -> bool:
        """Whether tensors are updated by the native CPU kernel: where :meth:`_kernel_sizes`
        allows and the kernels build (:func:`native.ready`)."""
        kernels = self._kernel_sizes()
        return bool(kernels) and all(native.ready(*sizes) for sizes in kernels)

    def optimizer(self, theta: MetaParams, num_steps: int | jax.Array
                  ) -> optax.GradientTransformationExtraArgs:
        if isinstance(num_steps, (int, np.integer)) and num_steps < 1:
            raise ValueError(f"velo needs num_steps >= 1 (the training horizon); got {num_steps}")
        km, kr, kf = len(MOMENTUM_DECAYS), len(RMS_DECAYS), len(ADAFACTOR_DECAYS)

        def init_fn(params: PyTree) -> VeloState:
            n = len(jax.tree.leaves(params))
            if n == 0:
                raise ValueError("velo needs at least one parameter tensor; got an empty tree")
            init_state = theta["lstm_init_state"]
            return VeloState(
                momentum=common.momentum_init(params, km),
                rms=common.rms_init(params, kr),
                factored=common.factored_init(params, kf),
                lstm_hidden=jnp.tile(init_state["hidden"][None], (n, 1)),
                lstm_cell=jnp.tile(init_state["cell"][None], (n, 1)),
                loss_buffer=loss_buffer_init(),
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update_fn(updates: PyTree, state: VeloState, params: PyTree = None, *,
                      loss: jax.Array | None = None, **extra_args: Any):
            del extra_args
            common.check_same_structure(updates, params, self.name)
            if loss is None:
                raise ValueError("velo needs the training loss: call "
                                 "update(grads, state, params, loss=loss)")
            if jnp.shape(loss) != ():
                raise ValueError(f"velo needs a scalar loss; got shape {jnp.shape(loss)}")
            n = len(jax.tree.leaves(params))
            if state.lstm_hidden.shape[0] != n:
                raise ValueError(f"velo state was built for {state.lstm_hidden.shape[0]} "
                                 f"tensors but params have {n}; call init(params) again")
            grads = jax.tree.map(
                lambda x: jnp.clip(jnp.asarray(x, jnp.float32), -GRAD_CLIP, GRAD_CLIP), updates)

            feats, buf = self.lstm_features(state, params, loss)
            c_hyper, c_lr, hidden, cell = self.per_tensor(theta, feats, state.lstm_hidden,
                                                          state.lstm_cell)
            mlps = self.mixed_mlps(theta, c_hyper)

            xla = functools.partial(_xla_step, exp_mult=self.exp_mult,
                                    step_mult=self.step_mult)
            fast = (_native_step(self.ff_hidden_layers, self.exp_mult, self.step_mult)
                    if self._native() else xla)
            treedef = jax.tree.structure(params)
            leaves = [treedef.flatten_up_to(t) for t in
                      (params, grads, state.momentum.m, state.rms.rms, state.factored.v_row,
                       state.factored.v_col, state.factored.v_full)]
            out = [(fast if jnp.size(args[0]) else xla)(  # an empty tensor: the XLA path
                       {k: w[i] for k, w in mlps.items()}, c_lr[i], *args)
                   for i, args in enumerate(zip(*leaves, strict=True))]
            unflat = [treedef.unflatten([o[j] for o in out]) for j in range(6)]
            new_state = VeloState(
                momentum=common.MomentumState(m=unflat[1]), rms=common.RMSState(rms=unflat[2]),
                factored=common.FactoredState(*unflat[3:]), lstm_hidden=hidden,
                lstm_cell=cell, loss_buffer=buf, iteration=state.iteration + 1,
                num_steps=state.num_steps)
            return unflat[0], new_state

        return declare_extra_args(
            optax.GradientTransformationExtraArgs(init_fn, update_fn), ("loss",)
        )
