"""``rnn_fc_lopt`` / "LSTM_FF": per-tensor LSTM + per-parameter MLP (seed 000 §3.3, App. C).

Paper: Metz, Maheswaranathan, Freeman, Sun, Poole, Sohl-Dickstein, "Training more effective
learned optimizers" (2020), seed ``shared/seeds/000_b4aa691aef50f445.txt`` §3.3 (optimizer
architecture, Fig. 1) and App. C (C.1 state and inputs, C.2.1 rolling features, C.2.2 LossAccum,
C.2.3 RollingGradClip, C.3 the update, C.4 ThetaMod). It is the ``rnn_fc_lopt`` baseline of
seed 004 (``shared/seeds/004_aa8a7462e59e5e47.txt`` §4). Inventory:
``shared/spec/three-papers.md`` [A] A.1 and ``shared/spec/tradeoffs.md`` §1.5 (the released
``RNNMLPLOpt``), with the paper's inconsistencies resolved as listed below.

One step, in order (App. C.3)::

    1. train LossAccum <- loss; valid LossAccum <- valid_loss (when given, see below)
       train_feat = weight(train, loss); valid_feat = weight(train, corrected_mean(valid))
    2. RollingGradClip: g <- clip(g, +-clip_mult * snd / (1 - alpha^t)), then
       snd <- alpha snd + (1 - alpha) sqrt(1e-8 + mean_tensors(mean(g^2))), t <- t + 1
    3. m_k <- d_k m_k + (1 - d_k) g,  rms_k <- d_k rms_k + (1 - d_k) g^2,
       d = (0.5, 0.9, 0.99, 0.999, 0.9999) (fixed; 10 floats of state per parameter)
    4. per tensor i, 52 LSTM inputs = [16 tensor features, train_feat, valid_feat,
       from_lstm (18, shared by all tensors), from_mlp[i] (16)] -> LSTM(64), batched over tensors
    5. from_lstm' = mean_i Linear18(lstm_out_i)    (message passing between tensors)
       ff_in_i    = Linear17(lstm_out_i)           (down to tensor i's parameters)
    6. per parameter, 54 MLP inputs -> MLP 54 -> 32 -> 32 -> 18 (ReLU):
       update = -0.001 * out[0] * exp(0.001 * out[1]);  from_mlp'[i] = mean_params(out[2:])

LossAccum (decay d; mean = var = 0, updates = 0 at init)::

    mean' = d mean + (1 - d) loss;  var' = d var + (1 - d) (mean' - loss)^2;  updates' += 1
    c = 1 / (1 - d^updates + 1e-8);  corrected_mean = mean c
    weight(state, x) = clip((x - mean c) * rsqrt(var c + 1e-8), -5, 5)

The 16 per-tensor features (``L(x) = clip(log(1e-8 + |x|), -5, 5)``, no 0.5 factor; means of
``m`` and ``rms`` over all entries *and* decays; ``var(x) = mean((x - mean x)^2)``)::

     0 L(mean m)   1 sign(mean m)   2 L(var m)     3 L(mean rms)  4 sign(mean rms)  5 L(var rms)
     6 L(mean p)   7 sign(mean p)   8 L(var p)     9 L(||p||)    10 L(||g||)
    11 is_scalar (+1 for rank 0, else -1)   12-15 log(shape_j) - 1, shape padded to rank 4

The 54 per-parameter MLP inputs: 23 features, each normalised over the tensor's entries
(``x * rsqrt(1e-5 + mean(x^2))``, one channel at a time): ``g, p, log(|p| + 1e-8), m_k (5),
rms_k (5), rsqrt(rms_k + 1e-6) (5), m_k * rsqrt(rms_k + 1e-6) (5)``; then, not normalised,
``sin(t / (x pi))`` for x in (1, 3, 10, ..., 1e5) (11), ``log(num_tensors) - 1``,
``log(||p|| + 1e-8)``, ``log(numel)``, and ``ff_in_i`` (17). ``g`` is the clipped gradient and
``t`` the iteration before this step.

Meta-parameters (defaults): MLP (54*32 + 32) + (32*32 + 32) + (32*18 + 18) = 3,410; LSTM
(52 + 64) * 256 + 256 = 29,952; projections (64*17 + 17) + (64*18 + 18) = 2,275; initial
LSTM state (h, c) 128 + initial from_lstm 18 + initial from_mlp 16 = 162; learned clipping 2:
35,801 (35,799 with ``learn_clip=False``, the spec §1.5 count).

Validation loss. ``update(grads, state, params, *, loss, valid_loss=None)``: ``valid_loss`` is
the loss at ``params`` on a batch of the task's *inner-validation* split. The meta-objective of
seed 000 (§3.1, App. C.1) is computed on the outer-validation split, so a meta-training unroll
that uses this optimizer must pass ``valid_loss`` computed on ``task.datasets.inner_valid``
(never ``outer_valid``); the paper passes it every 10th step. When ``valid_loss`` is ``None`` or
not finite the validation LossAccum is not updated: its statistics are held at their last value
(as in App. C.3, which carries ``valid_loss_accum`` over unchanged) and the validation feature
re-normalises that held mean by the *current* training-loss statistics each step. Before any
validation loss arrives the held mean is 0. A traced loop can pass ``jnp.nan`` on steps without
one. A non-finite training ``loss`` likewise leaves the training LossAccum unchanged (its
feature is computed from the accumulator's corrected mean, i.e. ~0), so a diverging inner run
does not poison the optimizer state.

Choices where the paper, the released code and this implementation differ:

1. Momentum decays: 5 (0.5, 0.9, 0.99, 0.999, 0.9999) as in App. C.2.1's prose and the code;
   the App. C.3 listing's 4 decays is the inconsistency. Fixed, not learned.
2. LossAccum decays: train 0.95, valid 0.9 as in App. C.3 (its rationale: the validation loss
   arrives less often); the released code swaps them. Both are constructor arguments.
3. RollingGradClip: the paper outer-learns ``alpha`` and ``clip_mult`` ("log scale"); the code
   fixes them. Here (``learn_clip=True``) they are offsets in log space,
   ``alpha = 1 - (1 - 0.99) exp(theta_a)`` (clipped to [0, 1 - 1e-6]) and
   ``clip_mult = 10 exp(theta_c)``, both 0 at init. Initial state ``t = 1``,
   ``snd = 1 - alpha`` (the code's reading of "initialised to 1": the bias-corrected average
   starts at 1, so the first clip is at ``clip_mult``).
4. Normalised MLP features: the paper clips the normaliser's output without giving the value;
   the code does not clip. Default: no clip (``feature_clip=None``); a float clips to +-value.
5. Time features ``sin(t / (x pi))`` as in the code; the paper's listing computes
   ``sin(x t / pi)`` (with a misplaced ``return``).
6. "Parameter values from the nearest 100 steps in the past" (App. C.1 state, C.4 prose) is
   never used in the paper's listings nor in the code: omitted.
7. Validation loss arrives with a training step (above) rather than as a separate
   validation-only call; a training step never increments anything for it.
8. Shape features for rank > 4 tensors: the leading dims are merged into one (product kept) so
   that 4 remain; lower ranks are padded with 1s at the end.
9. Norms use ``sqrt(max(sum x^2, 1e-30))`` so meta-gradients stay finite at zero tensors
   (zero-initialised biases); means over empty tensors are 0.
10. Initialisation: MLP, LSTM and projections ``TruncatedNormal(1/sqrt(fan_in))`` (cut at 2
    std), zero biases, forget-gate bias +1 (Haiku); initial LSTM state zeros; initial
    ``from_lstm`` / ``from_mlp`` ``TruncatedNormal(1/sqrt(size))`` (the code: VarianceScaling).
11. Feature order: the fixed orders written above (the code concatenated dictionaries in
    sorted-key order, whose names the spec does not give).
12. Interface: an optax ``GradientTransformationExtraArgs`` returning updates to add
    (``learned/base.py``); parameters are passed to ``update``. Accumulators are float32;
    updates are cast to the parameter dtype. ``num_steps`` is stored and unused. Per-tensor
    state is stacked ``[num_tensors, ...]`` in ``jax.tree.leaves(params)`` order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.learned import common
from learnopt.learned.base import LearnedOptimizer, MetaParams
from learnopt.learned.nn_adam import (
    LSTMState,
    clip_log_abs,
    lstm_init,
    lstm_step,
    safe_mean,
)
from learnopt.step import declare_extra_args

#: Fixed accumulator decays (seed 000 App. C.2.1; spec §1.5).
RNN_MLP_DECAYS: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
#: Timescales of the sinusoidal step embedding (seed 000 App. C.4).
SIN_TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5)
#: Per-tensor statistics fed to the LSTM, besides the 2 loss features and the messages.
NUM_TENSOR_STATS = 16
_ALPHA_MAX = 1.0 - 1e-6


# -------------------------------------------------------------------------------------------
# LossAccum (App. C.2.2).


class LossAccumState(NamedTuple):
    """Rolling mean and variance of a loss (no bias correction stored)."""

    mean: jax.Array
    var: jax.Array
    updates: jax.Array  # int32


def loss_accum_init() -> LossAccumState:
    return LossAccumState(mean=jnp.zeros([], jnp.float32), var=jnp.zeros([], jnp.float32),
                          updates=jnp.zeros([], jnp.int32))


def loss_accum_update(state: LossAccumState, loss: jax.Array, decay: float) -> LossAccumState:
    """``mean' = d mean + (1-d) loss``, ``var' = d var + (1-d) (mean' - loss)^2``; a non-finite
    ``loss`` leaves the state unchanged."""
    loss = jnp.asarray(loss, jnp.float32)
    ok = jnp.isfinite(loss)
    x = jnp.where(ok, loss, 0.0)
    mean = decay * state.mean + (1.0 - decay) * x
    var = decay * state.var + (1.0 - decay) * jnp.square(mean - x)
    return LossAccumState(mean=jnp.where(ok, mean, state.mean),
                          var=jnp.where(ok, var, state.var),
                          updates=state.updates + ok.astype(jnp.int32))


def _correction(state: LossAccumState, decay: float) -> jax.Array:
    """``1 / (1 - decay^updates + 1e-8)``.

    ``1 - decay^u`` is computed as ``-expm1(u log decay)``: written as ``1 - pow + 1e-8``, XLA
    reassociates it to ``(1 + 1e-8) - pow = 1 - pow`` under jit, which is 0 at ``u = 0``.
    """
    u = state.updates.astype(jnp.float32)
    return 1.0 / (-jnp.expm1(u * math.log(decay)) + 1e-8)


def loss_accum_corrected_mean(state: LossAccumState, decay: float) -> jax.Array:
    """``mean / (1 - decay^updates + 1e-8)``."""
    return state.mean * _correction(state, decay)


def loss_accum_weight(state: LossAccumState, loss: jax.Array, decay: float) -> jax.Array:
    """``clip((loss - corrected mean) * rsqrt(corrected var + 1e-8), -5, 5)``."""
    c = _correction(state, decay)
    return jnp.clip((loss - state.mean * c) * jax.lax.rsqrt(state.var * c + 1e-8), -5.0, 5.0)


# -------------------------------------------------------------------------------------------
# RollingGradClip (App. C.2.3).


class RollingClipState(NamedTuple):
    t: jax.Array  # int32, starts at 1
    snd: jax.Array  # EMA of the RMS gradient, starts at 1 - alpha


def rolling_clip_init(alpha: jax.Array) -> RollingClipState:
    return RollingClipState(t=jnp.ones([], jnp.int32),
                            snd=(1.0 - jnp.asarray(alpha, jnp.float32)))


def rolling_clip_amount(state: RollingClipState, alpha: jax.Array,
                        clip_mult: jax.Array) -> jax.Array:
    """``clip_mult * snd / (1 - alpha^t)``."""
    return clip_mult * state.snd / (1.0 - jnp.power(alpha, state.t.astype(jnp.float32)))


def rolling_clip_update(state: RollingClipState, grads: Sequence[jax.Array], alpha: jax.Array,
                        clip_mult: jax.Array) -> tuple[RollingClipState, list[jax.Array]]:
    """Clip every tensor of ``grads`` at the current amount, then update the running RMS with
    ``sqrt(1e-8 + mean over tensors of mean(g_clipped^2))``."""
    amount = rolling_clip_amount(state, alpha, clip_mult)
    clipped = [jnp.clip(jnp.asarray(g, jnp.float32), -amount, amount) for g in grads]
    ms = jnp.stack([safe_mean(jnp.square(g)) for g in clipped])
    new = jnp.sqrt(1e-8 + jnp.mean(ms))
    snd = alpha * state.snd + (1.0 - alpha) * new
    return RollingClipState(t=state.t + 1, snd=snd), clipped


# -------------------------------------------------------------------------------------------
# Features.


def _safe_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x)), 1e-30))


def shape_features(shape: Sequence[int]) -> np.ndarray:
    """``log(shape_j) - 1`` of the shape padded (or merged, rank > 4) to rank 4."""
    shape = [int(s) for s in shape]
    if len(shape) > 4:
        shape = [math.prod(shape[: len(shape) - 3])] + shape[-3:]
    shape = shape + [1] * (4 - len(shape))
    return np.log(np.maximum(np.asarray(shape, np.float64), 1.0)).astype(np.float32) - 1.0


def tensor_features(p: jax.Array, g: jax.Array, m: jax.Array, rms: jax.Array) -> jax.Array:
    """The 16 per-tensor statistics (module docstring), shape ``(16,)``.

    ``g`` is the clipped gradient; ``m`` / ``rms`` the updated accumulators ``p.shape + (K,)``.
    """
    p, g = jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)

    def stats(x):
        mean = safe_mean(x)
        return [clip_log_abs(mean), jnp.sign(mean), clip_log_abs(safe_mean(jnp.square(x - mean)))]

    feats = stats(m) + stats(rms) + stats(p) + [
        clip_log_abs(_safe_norm(p)), clip_log_abs(_safe_norm(g)),
        jnp.asarray(1.0 if jnp.ndim(p) == 0 else -1.0)]
    return jnp.concatenate([jnp.stack(feats), jnp.asarray(shape_features(jnp.shape(p)))])


def sin_time_features(iteration: jax.Array | int,
                      timescales: Sequence[float] = SIN_TIME_SCALES) -> jax.Array:
    """``sin(t / (x pi))`` for each timescale ``x``."""
    t = jnp.asarray(iteration, jnp.float32)
    return jnp.sin(t / (jnp.asarray(timescales, jnp.float32) * math.pi))


def parameter_features(p: jax.Array, g: jax.Array, m: jax.Array, rms: jax.Array,
                       iteration: jax.Array, num_tensors: int, ff_in: jax.Array,
                       feature_clip: float | None = None) -> jax.Array:
    """The per-parameter MLP inputs of one tensor, shape ``p.shape + (54,)`` with 5 decays and
    a 17-wide ``ff_in`` (module docstring for the order)."""
    p, g = jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
    shape = jnp.shape(p)
    r = jax.lax.rsqrt(rms + 1e-6)
    raw = jnp.concatenate([g[..., None], p[..., None], jnp.log(jnp.abs(p) + 1e-8)[..., None],
                           m, rms, r, m * r], axis=-1)
    x = common.second_moment_normalize(raw, axis=tuple(range(len(shape))))
    if feature_clip is not None:
        x = jnp.clip(x, -feature_clip, feature_clip)
    size = max(int(math.prod(shape)), 1)
    tiled = jnp.concatenate([
        sin_time_features(iteration),
        jnp.asarray([math.log(num_tensors) - 1.0], jnp.float32),
        jnp.log(_safe_norm(p) + 1e-8)[None],
        jnp.asarray([math.log(size)], jnp.float32),
        jnp.asarray(ff_in, jnp.float32)])
    return jnp.concatenate([x, jnp.broadcast_to(tiled, shape + tiled.shape)], axis=-1)


# -------------------------------------------------------------------------------------------


class RnnFcLOptState(NamedTuple):
    """Optimizer state of ``rnn_fc_lopt`` (the parameters are not part of it)."""

    momentum: common.MomentumState  # [..., 5] per parameter
    rms: common.RMSState  # [..., 5] per parameter
    lstm: LSTMState  # [T, lstm_hidden_size] each
    from_lstm: jax.Array  # [from_lstm_size], shared by all tensors
    from_mlp: jax.Array  # [T, from_mlp_size]
    train_loss: LossAccumState
    valid_loss: LossAccumState
    clip: RollingClipState
    iteration: jax.Array  # int32 scalar
    num_steps: jax.Array  # int32 scalar (stored, unused)


class RnnFcLOpt(LearnedOptimizer):
    """The hierarchical LSTM_FF learned optimizer of seed 000 (``rnn_fc_lopt`` in seed 004).

    Args:
      lstm_hidden_size, from_mlp_size, from_lstm_size, lstm_to_ff: seed 000 App. C.4 (64, 16,
        18, 17).
      mlp_hidden: hidden layer widths of the per-parameter MLP ((32, 32), the code's).
      step_multiplier, magnitude_rate: ``step = step_multiplier * d * exp(magnitude_rate * m)``
        (0.001, 0.001).
      decays: the fixed momentum / rms decays.
      train_loss_decay, valid_loss_decay: LossAccum decays (0.95, 0.9; App. C.3).
      clip_alpha, clip_mult: RollingGradClip at init (0.99, 10).
      learn_clip: meta-learn ``clip_alpha`` and ``clip_mult`` (paper) or keep them fixed (code).
      feature_clip: clip of the normalised per-parameter features (None: no clip, as the code).
    """

    name = "rnn_fc_lopt"

    def __init__(
        self,
        lstm_hidden_size: int = 64,
        from_mlp_size: int = 16,
        from_lstm_size: int = 18,
        lstm_to_ff: int = 17,
        mlp_hidden: Sequence[int] = (32, 32),
        step_multiplier: float = 0.001,
        magnitude_rate: float = 0.001,
        decays: Sequence[float] = RNN_MLP_DECAYS,
        train_loss_decay: float = 0.95,
        valid_loss_decay: float = 0.9,
        clip_alpha: float = 0.99,
        clip_mult: float = 10.0,
        learn_clip: bool = True,
        feature_clip: float | None = None,
    ):
        for what, d in [("decays", x) for x in decays] + [("clip_alpha", clip_alpha)]:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"{what} must lie in [0, 1); got {d!r}")
        for what, d in (("train_loss_decay", train_loss_decay),
                        ("valid_loss_decay", valid_loss_decay)):
            if not 0.0 < d < 1.0:
                raise ValueError(f"{what} must lie in (0, 1); got {d!r}")
        if not decays:
            raise ValueError("decays must hold at least one decay")
        if min(lstm_hidden_size, from_mlp_size, from_lstm_size, lstm_to_ff) < 1:
            raise ValueError("lstm_hidden_size, from_mlp_size, from_lstm_size and lstm_to_ff "
                             "must be >= 1")
        if not clip_mult > 0:
            raise ValueError(f"clip_mult must be > 0; got {clip_mult!r}")
        if feature_clip is not None and not feature_clip > 0:
            raise ValueError(f"feature_clip must be None or > 0; got {feature_clip!r}")
        self.lstm_hidden_size = lstm_hidden_size
        self.from_mlp_size = from_mlp_size
        self.from_lstm_size = from_lstm_size
        self.lstm_to_ff = lstm_to_ff
        self.mlp_hidden = tuple(int(h) for h in mlp_hidden)
        self.step_multiplier = step_multiplier
        self.magnitude_rate = magnitude_rate
        self.decays = tuple(float(d) for d in decays)
        self.train_loss_decay = float(train_loss_decay)
        self.valid_loss_decay = float(valid_loss_decay)
        self.clip_alpha = float(clip_alpha)
        self.clip_mult = float(clip_mult)
        self.learn_clip = learn_clip
        self.feature_clip = feature_clip

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``RnnFcLOpt(**lopt.config())`` rebuilds it)."""
        return {"lstm_hidden_size": self.lstm_hidden_size, "from_mlp_size": self.from_mlp_size,
                "from_lstm_size": self.from_lstm_size, "lstm_to_ff": self.lstm_to_ff,
                "mlp_hidden": list(self.mlp_hidden), "step_multiplier": self.step_multiplier,
                "magnitude_rate": self.magnitude_rate, "decays": list(self.decays),
                "train_loss_decay": self.train_loss_decay,
                "valid_loss_decay": self.valid_loss_decay, "clip_alpha": self.clip_alpha,
                "clip_mult": self.clip_mult, "learn_clip": self.learn_clip,
                "feature_clip": self.feature_clip}

    # ---------------------------------------------------------------------------------------
    @property
    def num_lstm_inputs(self) -> int:
        """16 tensor statistics + 2 loss features + from_lstm + from_mlp (52 by default)."""
        return NUM_TENSOR_STATS + 2 + self.from_lstm_size + self.from_mlp_size

    @property
    def num_normalized_features(self) -> int:
        """g, p, log|p| and 4 features per decay (23 with 5 decays)."""
        return 3 + 4 * len(self.decays)

    @property
    def num_mlp_inputs(self) -> int:
        """Normalised + 11 time + 3 tensor-level + lstm_to_ff (54 by default)."""
        return self.num_normalized_features + len(SIN_TIME_SCALES) + 3 + self.lstm_to_ff

    @property
    def mlp_sizes(self) -> tuple[int, ...]:
        return (self.num_mlp_inputs,) + self.mlp_hidden + (2 + self.from_mlp_size,)

    def init(self, key: jax.Array) -> MetaParams:
        k = jax.random.split(key, 6)
        h = self.lstm_hidden_size

        def vec(key, n):
            return jax.random.truncated_normal(key, -2.0, 2.0, (n,), jnp.float32) / math.sqrt(n)

        theta = {
            "mlp": common.init_mlp(k[0], self.mlp_sizes),
            "lstm": lstm_init(k[1], self.num_lstm_inputs, h),
            "rnn_to_ff": common.init_mlp(k[2], (h, self.lstm_to_ff)),
            "rnn_to_in": common.init_mlp(k[3], (h, self.from_lstm_size)),
            "initial_state": {"h": jnp.zeros((h,), jnp.float32),
                              "c": jnp.zeros((h,), jnp.float32)},
            "initial_from_lstm": vec(k[4], self.from_lstm_size),
            "initial_from_mlp": vec(k[5], self.from_mlp_size),
        }
        if self.learn_clip:
            theta["clip"] = {"log_one_minus_alpha": jnp.zeros([], jnp.float32),
                             "log_mult": jnp.zeros([], jnp.float32)}
        return theta

    def clip_params(self, theta: MetaParams) -> tuple[jax.Array, jax.Array]:
        """``(alpha, clip_mult)`` of the rolling gradient clip that ``theta`` encodes."""
        alpha = jnp.float32(self.clip_alpha)
        mult = jnp.float32(self.clip_mult)
        if self.learn_clip:
            alpha = jnp.clip(1.0 - (1.0 - alpha) * jnp.exp(theta["clip"]["log_one_minus_alpha"]),
                             0.0, _ALPHA_MAX)
            mult = mult * jnp.exp(theta["clip"]["log_mult"])
        return alpha, mult

    # ---------------------------------------------------------------------------------------
    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        alpha, clip_mult = self.clip_params(theta)
        decays = jnp.asarray(self.decays, jnp.float32)
        k = len(self.decays)
        h0, c0 = theta["initial_state"]["h"], theta["initial_state"]["c"]

        def init_fn(params: Any) -> RnnFcLOptState:
            n = len(jax.tree.leaves(params))
            if n == 0:
                raise ValueError(f"{self.name}: params has no array leaves")
            return RnnFcLOptState(
                momentum=common.momentum_init(params, k),
                rms=common.rms_init(params, k),
                lstm=LSTMState(h=jnp.broadcast_to(h0, (n,) + h0.shape),
                               c=jnp.broadcast_to(c0, (n,) + c0.shape)),
                from_lstm=jnp.asarray(theta["initial_from_lstm"]),
                from_mlp=jnp.broadcast_to(theta["initial_from_mlp"], (n, self.from_mlp_size)),
                train_loss=loss_accum_init(),
                valid_loss=loss_accum_init(),
                clip=rolling_clip_init(alpha),
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update_fn(updates: Any, state: RnnFcLOptState, params: Any = None, *,
                      loss: jax.Array | None = None, valid_loss: jax.Array | None = None,
                      **extra_args: Any):
            del extra_args
            common.check_same_structure(updates, params, self.name)
            if loss is None:
                raise ValueError(f"{self.name} needs the training loss: call "
                                 "update(grads, state, params, loss=loss[, valid_loss=...]).")
            treedef = jax.tree.structure(params)
            n = treedef.num_leaves

            # 1. loss statistics and features
            loss = jnp.asarray(loss, jnp.float32)
            train = loss_accum_update(state.train_loss, loss, self.train_loss_decay)
            valid = state.valid_loss
            if valid_loss is not None:
                valid = loss_accum_update(valid, valid_loss, self.valid_loss_decay)
            safe_loss = jnp.where(jnp.isfinite(loss), loss,
                                  loss_accum_corrected_mean(train, self.train_loss_decay))
            train_feat = loss_accum_weight(train, safe_loss, self.train_loss_decay)
            valid_feat = loss_accum_weight(
                train, loss_accum_corrected_mean(valid, self.valid_loss_decay),
                self.train_loss_decay)

            # 2-3. dynamic clipping, accumulators
            clip_state, gs = rolling_clip_update(state.clip, treedef.flatten_up_to(updates),
                                                 alpha, clip_mult)
            clipped = treedef.unflatten(gs)
            mom = common.momentum_update(state.momentum, clipped, decays)
            rms = common.rms_update(state.rms, clipped, decays)
            ps = treedef.flatten_up_to(params)
            ms = treedef.flatten_up_to(mom.m)
            rs = treedef.flatten_up_to(rms.rms)

            # 4. per-tensor LSTM
            stats = jnp.stack([tensor_features(p, g, m, r)
                               for p, g, m, r in zip(ps, gs, ms, rs, strict=True)])
            glob = jnp.concatenate([jnp.stack([train_feat, valid_feat]), state.from_lstm])
            lstm_in = jnp.concatenate(
                [stats, jnp.broadcast_to(glob, (n,) + glob.shape), state.from_mlp], axis=1)
            out, lstm_state = lstm_step(theta["lstm"], lstm_in, state.lstm)

            # 5. messages: across tensors and down to the parameters
            from_lstm = jnp.mean(common.apply_mlp(theta["rnn_to_in"], out), axis=0)
            ff_in = common.apply_mlp(theta["rnn_to_ff"], out)

            # 6. per-parameter MLP
            steps, from_mlp = [], []
            for i, (p, g, m, r) in enumerate(zip(ps, gs, ms, rs, strict=True)):
                x = parameter_features(p, g, m, r, state.iteration, n, ff_in[i],
                                       self.feature_clip)
                o = common.apply_mlp(theta["mlp"], x)
                d, mag = o[..., 0], o[..., 1]
                step = d * jnp.exp(mag * self.magnitude_rate) * self.step_multiplier
                steps.append((-step).astype(jnp.asarray(p).dtype))
                axes = tuple(range(jnp.ndim(p)))
                from_mlp.append(jnp.mean(o[..., 2:], axis=axes) if jnp.size(p)
                                else jnp.zeros((self.from_mlp_size,), jnp.float32))

            new_state = RnnFcLOptState(
                momentum=mom, rms=rms, lstm=lstm_state, from_lstm=from_lstm,
                from_mlp=jnp.stack(from_mlp), train_loss=train, valid_loss=valid,
                clip=clip_state, iteration=state.iteration + 1, num_steps=state.num_steps)
            return treedef.unflatten(steps), new_state

        return declare_extra_args(
            optax.GradientTransformationExtraArgs(init_fn, update_fn), ("loss", "valid_loss")
        )
