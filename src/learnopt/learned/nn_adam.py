"""``nn_adam``: a per-tensor LSTM that sets Adam's hyperparameters.

Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers", arXiv:2203.11860, §2.2 ("Hyperparameter controllers") and App. C; the released
``NNAdam`` of learned_optimization (github.com/google/learned_optimization).

Once per step, 19 statistics of each parameter tensor go through one 32-unit LSTM (shared
weights, one state per tensor); a zero-initialised linear layer maps its output to that tensor's
learning rate, beta1, beta2 and eps in log-scaled coordinates, which then drive Adam
elementwise. Defaults: the paper's absolute outputs (``output_mode="absolute"``) and Adam with
exact bias correction for time-varying betas (``step_rule="adam"``), so a zero output layer is
exactly ``optax.adam``; the released code's rules are options. 6,856 meta-parameters. The
decoding, the features and the bias-correction derivation are in docs/derivations.md §3.4; the
departures in docs/departures.md.

The LSTM helpers (:func:`lstm_init`, :func:`lstm_step`) are shared with ``rnn_mlp.py``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.learned import common
from learnopt.learned.base import LearnedOptimizer, MetaParams
from learnopt.learned.velo import FRACTION_OFFSETS, fraction_features

OutputMode = Literal["absolute", "increment"]
StepRule = Literal["adam", "released"]
_MODES = ("absolute", "increment")
_RULES = ("adam", "released")

#: Number of per-tensor input features of nn_adam (without the progress features).
NUM_FEATURES = 19
#: Number of progress features (``progress_features=True``): VeLO's training-fraction features.
NUM_PROGRESS_FEATURES = len(FRACTION_OFFSETS)
#: Bounds of the scaled hyperparameters (lr, beta1, beta2, eps) (the released code's).
X_LOW = (0.1 * math.log(1e-8), -1.0, -1.0, 0.1 * math.log(1e-11))
X_HIGH = (0.1 * math.log(1e3), 0.0, 0.0, 0.1 * math.log(1e4))


# -------------------------------------------------------------------------------------------
# A plain LSTM cell (shared with rnn_mlp.py).


class LSTMState(NamedTuple):
    """Hidden and cell state, each ``[batch, hidden]``."""

    h: jax.Array
    c: jax.Array


def lstm_init(key: jax.Array, input_size: int, hidden_size: int) -> dict[str, jax.Array]:
    """``w``: ``(input_size + hidden_size, 4 hidden_size)``, ``TruncatedNormal(1/sqrt(fan_in))``
    cut at 2 standard deviations; ``b``: zeros. Gate order in the columns: i, g, f, o."""
    fan_in = input_size + hidden_size
    w = jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, 4 * hidden_size), jnp.float32)
    return {"w": w / math.sqrt(fan_in), "b": jnp.zeros((4 * hidden_size,), jnp.float32)}


def lstm_num_params(input_size: int, hidden_size: int) -> int:
    return (input_size + hidden_size) * 4 * hidden_size + 4 * hidden_size


def lstm_step(params: dict[str, jax.Array], x: jax.Array,
              state: LSTMState) -> tuple[jax.Array, LSTMState]:
    """One LSTM step on a batch ``x: [batch, input]``; returns ``(h_new, state_new)``.

    ``c' = sigmoid(f + 1) c + sigmoid(i) tanh(g)``, ``h' = sigmoid(o) tanh(c')``.
    """
    z = jnp.matmul(jnp.concatenate([x, state.h], axis=-1), params["w"],
                   precision=jax.lax.Precision.HIGHEST) + params["b"]
    i, g, f, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * state.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, LSTMState(h=h, c=c)


# -------------------------------------------------------------------------------------------
# Small numerical helpers.


def safe_mean(x: jax.Array) -> jax.Array:
    """Mean over all entries; 0 for an empty array (instead of NaN)."""
    return jnp.sum(x) / max(int(math.prod(jnp.shape(x))), 1)


def clip_log_abs(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """``scale * clip(log(1e-8 + |x|), -5, 5)``."""
    return scale * jnp.clip(jnp.log(1e-8 + jnp.abs(x)), -5.0, 5.0)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of inf (same value)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


# -------------------------------------------------------------------------------------------
# Hyperparameter encoding.


def encode_hparams(learning_rate: float, beta1: float, beta2: float,
                   epsilon: float) -> jax.Array:
    """Scaled hyperparameters ``[0.1 log lr, 0.1 log(1-b1), 0.1 log(1-b2), 0.1 log eps]``."""
    for name, v, lo, hi in (("learning_rate", learning_rate, 1e-8, 1e3),
                            ("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0),
                            ("epsilon", epsilon, 1e-11, 1e4)):
        if not lo <= v <= hi or (name.startswith("beta") and v == 1.0):
            raise ValueError(f"{name} must lie in [{lo}, {hi}{')' if hi == 1.0 else ']'}; "
                             f"got {v!r}")
    return jnp.asarray([0.1 * math.log(learning_rate), 0.1 * math.log1p(-beta1),
                        0.1 * math.log1p(-beta2), 0.1 * math.log(epsilon)], jnp.float32)


def clip_hparams(x: jax.Array) -> jax.Array:
    """Clip scaled hyperparameters ``[..., 4]`` to their ranges."""
    return jnp.clip(x, jnp.asarray(X_LOW, jnp.float32), jnp.asarray(X_HIGH, jnp.float32))


def decode_hparams(x: jax.Array) -> dict[str, jax.Array]:
    """Scaled ``[..., 4]`` -> ``learning_rate``, ``beta1``, ``beta2``, ``epsilon`` and
    ``one_minus_beta1`` / ``one_minus_beta2`` (computed directly, not as ``1 - beta``)."""
    e = jnp.exp(10.0 * clip_hparams(x))
    return {"learning_rate": e[..., 0], "one_minus_beta1": e[..., 1],
            "one_minus_beta2": e[..., 2], "epsilon": e[..., 3],
            "beta1": 1.0 - e[..., 1], "beta2": 1.0 - e[..., 2]}


# -------------------------------------------------------------------------------------------
# Per-tensor features.


def tensor_features(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
                    hparams: jax.Array) -> jax.Array:
    """The 19 features of one tensor (docs/derivations.md §3.4): shape ``(19,)``.

    ``m`` and ``v`` are Adam's accumulators (parameter-shaped) *before* this step's update,
    ``hparams`` the previous step's scaled hyperparameters ``(4,)``.
    """
    p, g, m, v = (jnp.asarray(a, jnp.float32) for a in (p, g, m, v))

    def stats(x):
        mean = safe_mean(x)
        return [clip_log_abs(mean, 0.5), jnp.sign(mean),
                clip_log_abs(safe_mean(jnp.square(x - mean)), 0.5)]

    rank = jnp.ndim(p)
    feats = (stats(m) + stats(v) + stats(p) + stats(g)
             + [clip_log_abs(safe_mean(jnp.abs(g)), 0.5),
                jnp.asarray(1.0 if rank == 0 else -1.0),
                jnp.asarray(1.0 if rank == 1 else -1.0)])
    scaled = 0.2 * jnp.clip(hparams, -5.0, 5.0)
    return jnp.concatenate([jnp.stack(feats).astype(jnp.float32), scaled])


# -------------------------------------------------------------------------------------------


class NNAdamState(NamedTuple):
    """Optimizer state of ``nn_adam`` (the parameters are not part of it).

    Per-tensor arrays have a leading axis over the parameter tensors in
    ``jax.tree.leaves(params)`` order.
    """

    mu: Any  # first moments, like the parameters (float32)
    nu: Any  # second moments, like the parameters (float32)
    hparams: jax.Array  # [T, 4] scaled hyperparameters of the last step (initial ones at first)
    debias: jax.Array  # [T, 2] bias corrections c1, c2 = 1 - prod(beta)
    lstm: LSTMState  # [T, lstm_size] each
    iteration: jax.Array  # int32 scalar
    num_steps: jax.Array  # int32 scalar (read by the progress features only)


class NNAdam(LearnedOptimizer):
    """LSTM hyperparameter controller for Adam, ``nn_adam`` of Metz et al. 2022 (``NNAdam`` in
    learned_optimization).

    Args:
      lstm_size: LSTM hidden units (32 in the paper).
      initial_learning_rate, initial_beta1, initial_beta2, initial_epsilon: the hyperparameters
        the initial meta-parameters encode (the code's 1e-4, 0.9, 0.999, 1e-8).
      output_scale: multiplier on the output layer (0.01).
      output_mode: ``"absolute"`` (default, paper) or ``"increment"`` (released code).
      step_rule: ``"adam"`` (default, Adam with bias correction) or ``"released"``.
      grad_clip: gradients are clipped to ``[-grad_clip, grad_clip]`` first (1000).
      progress_features: also feed the LSTM the fraction of training done, as VeLO's 9
        features ``tanh(10 (t / num_steps - s))`` (Metz et al. 2022, VeLO, arXiv:2211.09760,
        App. B.3), so that it can set the hyperparameters by training progress (a learned
        schedule). Off in the paper's nn_adam (docs/departures.md).
    """

    name = "nn_adam"

    def __init__(
        self,
        lstm_size: int = 32,
        initial_learning_rate: float = 1e-4,
        initial_beta1: float = 0.9,
        initial_beta2: float = 0.999,
        initial_epsilon: float = 1e-8,
        output_scale: float = 0.01,
        output_mode: OutputMode = "absolute",
        step_rule: StepRule = "adam",
        grad_clip: float = 1000.0,
        progress_features: bool = False,
    ):
        if output_mode not in _MODES:
            raise ValueError(f"output_mode must be one of {_MODES}; got {output_mode!r}")
        if step_rule not in _RULES:
            raise ValueError(f"step_rule must be one of {_RULES}; got {step_rule!r}")
        if lstm_size < 1:
            raise ValueError(f"lstm_size must be >= 1; got {lstm_size}")
        if not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0; got {grad_clip}")
        self.initial_hparams = encode_hparams(initial_learning_rate, initial_beta1,
                                              initial_beta2, initial_epsilon)
        self.lstm_size = lstm_size
        self.output_scale = output_scale
        self.output_mode = output_mode
        self.step_rule = step_rule
        self.grad_clip = grad_clip
        self.initial_learning_rate = initial_learning_rate
        self.initial_beta1 = initial_beta1
        self.initial_beta2 = initial_beta2
        self.initial_epsilon = initial_epsilon
        self.progress_features = bool(progress_features)

    @property
    def num_features(self) -> int:
        """The LSTM's inputs per tensor: 19, and 9 more with ``progress_features``."""
        return NUM_FEATURES + (NUM_PROGRESS_FEATURES if self.progress_features else 0)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``NNAdam(**lopt.config())`` rebuilds it)."""
        return {"lstm_size": self.lstm_size, "initial_learning_rate": self.initial_learning_rate,
                "initial_beta1": self.initial_beta1, "initial_beta2": self.initial_beta2,
                "initial_epsilon": self.initial_epsilon, "output_scale": self.output_scale,
                "output_mode": self.output_mode, "step_rule": self.step_rule,
                "grad_clip": self.grad_clip, "progress_features": self.progress_features}

    def init(self, key: jax.Array) -> MetaParams:
        h = self.lstm_size
        return {
            "lstm": lstm_init(key, self.num_features, h),
            "out": {"w": jnp.zeros((h, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)},
            "initial_hparams": jnp.asarray(self.initial_hparams),
            "initial_state": {"h": jnp.zeros((h,), jnp.float32),
                              "c": jnp.zeros((h,), jnp.float32)},
        }

    @staticmethod
    def hyperparameters(state: NNAdamState) -> dict[str, jax.Array]:
        """Each tensor's hyperparameters used at the last step, ``[T]`` arrays in leaf order."""
        return decode_hparams(state.hparams)

    # ---------------------------------------------------------------------------------------
    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        h0, c0 = theta["initial_state"]["h"], theta["initial_state"]["c"]

        def init_fn(params: Any) -> NNAdamState:
            n = len(jax.tree.leaves(params))
            if n == 0:
                raise ValueError(f"{self.name}: params has no array leaves")
            zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
            return NNAdamState(
                mu=zeros, nu=zeros,
                hparams=jnp.broadcast_to(theta["initial_hparams"], (n, 4)),
                debias=jnp.zeros((n, 2), jnp.float32),
                lstm=LSTMState(h=jnp.broadcast_to(h0, (n,) + h0.shape),
                               c=jnp.broadcast_to(c0, (n,) + c0.shape)),
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update_fn(updates: Any, state: NNAdamState, params: Any = None, *,
                      loss: jax.Array | None = None, **extra_args: Any):
            del loss, extra_args  # nn_adam has no loss feature
            common.check_same_structure(updates, params, self.name)
            treedef = jax.tree.structure(params)
            ps = treedef.flatten_up_to(params)
            gs = [jnp.clip(jnp.asarray(g, jnp.float32), -self.grad_clip, self.grad_clip)
                  for g in treedef.flatten_up_to(updates)]
            ms = treedef.flatten_up_to(state.mu)
            vs = treedef.flatten_up_to(state.nu)

            feats = jnp.stack([tensor_features(p, g, m, v, state.hparams[i])
                               for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs,
                                                                    strict=True))])
            if self.progress_features:  # the same for every tensor
                progress = fraction_features(state.iteration, state.num_steps)
                feats = jnp.concatenate(
                    [feats, jnp.broadcast_to(progress, (feats.shape[0],) + progress.shape)], 1)
            out, lstm_state = lstm_step(theta["lstm"], feats, state.lstm)
            delta = self.output_scale * (
                jnp.matmul(out, theta["out"]["w"], precision=jax.lax.Precision.HIGHEST)
                + theta["out"]["b"])
            base = state.hparams if self.output_mode == "increment" else theta["initial_hparams"]
            x = clip_hparams(base + delta)
            hp = decode_hparams(x)
            b1, b2 = hp["beta1"], hp["beta2"]
            e1, e2 = hp["one_minus_beta1"], hp["one_minus_beta2"]
            debias = jnp.stack([b1 * state.debias[:, 0] + e1, b2 * state.debias[:, 1] + e2], 1)

            new_ps, new_ms, new_vs = [], [], []
            for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs, strict=True)):
                m = e1[i] * g + b1[i] * m
                v = e2[i] * jnp.square(g) + b2[i] * v
                lr, eps = hp["learning_rate"][i], hp["epsilon"][i]
                if self.step_rule == "adam":
                    u = (m / debias[i, 0]) / (safe_sqrt(v / debias[i, 1]) + eps)
                    step = -lr * u
                else:
                    step = -(lr * (1.0 + eps)) * m / (eps + jnp.sqrt(v + 1e-10))
                new_ps.append(step.astype(jnp.asarray(p).dtype))
                new_ms.append(m)
                new_vs.append(v)

            new_state = NNAdamState(
                mu=treedef.unflatten(new_ms), nu=treedef.unflatten(new_vs), hparams=x,
                debias=debias, lstm=lstm_state, iteration=state.iteration + 1,
                num_steps=state.num_steps)
            return treedef.unflatten(new_ps), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
