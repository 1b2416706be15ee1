"""``rnn_fc_lopt`` / "LSTM_FF": per-tensor LSTM + per-parameter MLP.

Metz et al. 2020, "Tasks, stability, architecture, and compute: Training more effective learned
optimizers, and using them to train themselves", arXiv:2009.11243, §3.3 (Fig. 1) and App. C
(C.1 state and inputs, C.2 rolling features, LossAccum and RollingGradClip, C.3 the update, C.4
sizes). It is the ``rnn_fc_lopt`` baseline of Metz et al. 2022, "Practical tradeoffs",
arXiv:2203.11860, §4, and the released ``RNNMLPLOpt`` of learned_optimization
(github.com/google/learned_optimization).

Per step: loss features from two LossAccums (training loss, and ``valid_loss`` on the
inner-validation split when given), rolling gradient clipping, 5 fixed momentum / rms decays, a
64-unit LSTM over 16 statistics of each tensor with messages between tensors, and a per-parameter
MLP 54 -> 32 -> 32 -> 18 whose first two outputs give ``-0.001 * d * exp(0.001 m)``:
35,801 meta-parameters with the learned clipping. The step, features and counts are in
docs/derivations.md §3.3; where the paper, the released code and this module differ, and why, in
docs/departures.md.
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

#: Fixed accumulator decays (arXiv:2009.11243, App. C.2.1; the released code's).
RNN_MLP_DECAYS: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
#: Timescales of the sinusoidal step embedding (arXiv:2009.11243, App. C.4).
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
    """The 16 per-tensor statistics (docs/derivations.md §3.3), shape ``(16,)``.

    ``g`` is the clipped gradient; ``m`` / ``rms`` the updated accumulators ``(K,) + p.shape``.
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
    a 17-wide ``ff_in`` (order: docs/derivations.md §3.3)."""
    p, g = jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
    shape = jnp.shape(p)
    r = jax.lax.rsqrt(rms + 1e-6)
    raw = jnp.concatenate([g[..., None], p[..., None], jnp.log(jnp.abs(p) + 1e-8)[..., None],
                           *map(common.decay_last, (m, rms, r, m * r))], axis=-1)
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
    """The LSTM_FF learned optimizer of Metz et al. 2020 (``rnn_fc_lopt``, ``RNNMLPLOpt``).

    Args:
      lstm_hidden_size, from_mlp_size, from_lstm_size, lstm_to_ff: App. C.4 (64, 16,
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
