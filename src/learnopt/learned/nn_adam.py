"""``nn_adam``: a per-tensor LSTM that sets Adam's hyperparameters (seed 004 §2.2, App. C).

Paper: Metz, Freeman, Harrison, Maheswaranathan, Sohl-Dickstein, "Practical tradeoffs between
memory, compute, and performance in learned optimizers" (2022), seed
``shared/seeds/004_aa8a7462e59e5e47.txt`` §2.2 ("Hyperparameter controllers") and App. C
("nn_adam architecture", C.1 per-tensor features). The constants follow
``shared/spec/tradeoffs.md`` §1.3 (the released ``NNAdam`` at the commit App. C links) with the
discrepancies of §7.6 resolved as listed below.

For every parameter tensor, once per step, 19 features (below) are stacked into a
``[num_tensors, 19]`` batch and fed to one 32-unit LSTM (shared weights, one state per tensor).
A linear layer maps its output to 4 numbers in a *scaled space*, one per Adam hyperparameter of
that tensor::

    x_lr   = 0.1 log(lr)          lr   = exp(10 x),  x clipped so lr   in [1e-8, 1e3]
    x_b1   = 0.1 log(1 - beta1)   beta = 1 - exp(10 x), x clipped to [-1, 0] (1 - beta in
    x_b2   = 0.1 log(1 - beta2)                          [e^-10, 1])
    x_eps  = 0.1 log(eps)         eps  = exp(10 x),  x clipped so eps  in [1e-11, 1e4]

``x = base + output_scale * (W h + b)`` with ``output_scale = 0.01`` and ``W``, ``b`` zero at
initialisation; ``base`` is the meta-learned ``initial_hparams`` (``output_mode="absolute"``,
the default) or the previous step's ``x`` (``output_mode="increment"``, the released code).
The decoded hyperparameters then drive Adam for that tensor, elementwise::

    g    = clip(g, -1000, 1000)
    m   <- beta1 m + (1 - beta1) g            v <- beta2 v + (1 - beta2) g^2
    c1  <- beta1 c1 + (1 - beta1)             c2 <- beta2 c2 + (1 - beta2)   (c1 = c2 = 0 at init)
    step_rule="adam":     update = -lr * (m / c1) / (sqrt(v / c2) + eps)
    step_rule="released": update = -lr * (1 + eps) * m / (eps + sqrt(v + 1e-10))

``c1``, ``c2`` (two scalars per tensor) are the exact bias corrections for time-varying betas:
the same EMA applied to a stream of ones, i.e. ``1 - prod(beta)``, which is ``1 - beta^t`` when
beta is constant. So with the output layer zeroed and ``initial_hparams`` (or the output bias)
decoding to ``(lr, 0.9, 0.999, 1e-8)`` an update is ``optax.adam(lr)``'s up to float32 rounding
(tested; ``|g| <= 1000``).

The 19 per-tensor features, in this order (``T(x) = 0.5 clip(log(1e-8 + |x|), -5, 5)``,
``var(x) = mean((x - mean x)^2)``, means over all entries of the tensor)::

     0 T(mean m)    1 sign(mean m)   2 T(var m)        m, v: Adam's accumulators before
     3 T(mean v)    4 sign(mean v)   5 T(var v)              this step's update
     6 T(mean p)    7 sign(mean p)   8 T(var p)
     9 T(mean g)   10 sign(mean g)  11 T(var g)   12 T(mean |g|)
    13 is_scalar (+1 for rank 0, else -1)   14 is_bias (+1 for rank 1, else -1)
    15-18 the previous step's x (lr, beta1, beta2, eps), each 0.2 clip(x, -5, 5)

Meta-parameters (defaults): LSTM (19 + 32) * 128 + 128 = 6,656; output layer 32 * 4 + 4 = 132;
``initial_hparams`` 4; the LSTM's initial (h, c), shared by all tensors, 64: 6,856 in total
(spec §1.3).

Choices and departures (paper, released code, here):

1. Features: App. C.1 lists 12; the released code uses 19 (adds var of v, is_scalar, is_bias and
   the 4 current hyperparameters). We use the code's 19 in the fixed order above (the code
   sorted them by dictionary key; names are not in the spec, so meta-parameters are not
   interchangeable with it anyway). "Variance squared" in App. C.1 is read as the variance
   ``mean((x - mean x)^2)``, as in the code. ``is_bias`` is read as "rank 1".
2. Output decoding: the paper says the LSTM *outputs* the four hyperparameters; the released
   code adds ``0.01 * Linear(h)`` to the previous step's values (increments). The default here is
   the paper's (``output_mode="absolute"``): ``x = initial_hparams + 0.01 * Linear(h)``, which
   keeps the controller from drifting and makes "zero output layer = plain Adam" exact at every
   step. ``output_mode="increment"`` gives the code's rule. Both clip ``x`` to the ranges above
   (the code clips by a decode-encode round trip; the result is the same).
3. Step: the paper says "the Adam update equations"; the code drops bias correction and uses
   ``lr (1 + eps) m / (eps + sqrt(v + 1e-10))`` (so a large eps turns preconditioning off
   without the step blowing up). The default ``step_rule="adam"`` is the paper's Adam with bias
   correction generalised to time-varying betas (``c1``, ``c2`` above: 2 extra floats per
   *tensor*, not per parameter); ``step_rule="released"`` is the code's rule.
4. Order within a step: features are computed from the accumulators *before* this step's update
   plus the current gradient, parameter and previous hyperparameters; the LSTM's output sets all
   four hyperparameters used in *this* step (the code updated ``m``, ``v`` with the previous
   step's betas, then computed features, then took lr and eps from the new output).
5. ``sqrt(v / c2)`` has a zero derivative where ``v = 0`` (the true limit, since such entries had
   only zero gradients) so meta-gradients stay finite when some gradient entries are exactly 0;
   the value is unchanged.
6. LSTM: the usual cell with gates ``[i, g, f, o] = [x, h] W + b``, forget-gate bias +1 (as in
   Haiku's ``hk.LSTM``, which the code used), weights ``TruncatedNormal(1/sqrt(fan_in))``, zero
   biases; trainable initial state initialised to zeros. The output layer is zero-initialised as
   in the code; initial hyperparameters (lr 1e-4, 0.9, 0.999, 1e-8) are the code's.
7. Interface: an optax ``GradientTransformationExtraArgs`` (``learned/base.py``) returning
   updates to add; parameters are passed to ``update``. Accumulators are float32; updates are
   cast to the parameter dtype. ``loss`` is accepted and unused (nn_adam has no loss feature).
   ``num_steps`` is stored in the state and unused, as in the code. Means over empty tensors
   are taken as 0.

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

OutputMode = Literal["absolute", "increment"]
StepRule = Literal["adam", "released"]
_MODES = ("absolute", "increment")
_RULES = ("adam", "released")

#: Number of per-tensor input features of nn_adam.
NUM_FEATURES = 19
#: Bounds of the scaled hyperparameters (lr, beta1, beta2, eps) (spec §1.3).
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
    """The 19 features of one tensor (module docstring): shape ``(19,)``.

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
    num_steps: jax.Array  # int32 scalar (stored, unused)


class NNAdam(LearnedOptimizer):
    """LSTM hyperparameter controller for Adam, ``nn_adam`` of seed 004 (``NNAdam`` in
    learned_optimization).

    Args:
      lstm_size: LSTM hidden units (32 in the paper).
      initial_learning_rate, initial_beta1, initial_beta2, initial_epsilon: the hyperparameters
        the initial meta-parameters encode (the code's 1e-4, 0.9, 0.999, 1e-8).
      output_scale: multiplier on the output layer (0.01).
      output_mode: ``"absolute"`` (default, paper) or ``"increment"`` (released code).
      step_rule: ``"adam"`` (default, Adam with bias correction) or ``"released"``.
      grad_clip: gradients are clipped to ``[-grad_clip, grad_clip]`` first (1000).
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

    def init(self, key: jax.Array) -> MetaParams:
        h = self.lstm_size
        return {
            "lstm": lstm_init(key, NUM_FEATURES, h),
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
