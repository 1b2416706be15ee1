"""Shared sampled components of the TaskSet families (Metz et al. 2020, "Tasks, stability,
architecture, and compute", arXiv:2009.11243, App. I.1.1).

App. I.1.1 defines the sampling routines every sampled task family uses:

* **Activations**, by weight: relu 6, tanh 3, cos 1, elu 1, sigmoid 1, swish 1, leaky relu
  with alpha 0.4, 0.2 and 0.1 (1 each). Names follow the released code (``leaky_relu4`` is
  alpha 0.4, ...).
* **Initializers**, by weight: he normal 2, he uniform 2, glorot normal 2, glorot uniform 2,
  orthogonal 1 (gain log-uniform in [0.1, 10]), random uniform 1 (on ``[-s, s]``, ``s``
  log-uniform in [0.1, 10]), random normal 1 (std log-uniform in [0.1, 10]), truncated
  normal 1 (std log-uniform in [0.1, 10]) and variance scaling 1 (scale log-uniform in
  [0.1, 10], fan-in, truncated normal as TF1's default). An initializer is an
  :class:`InitConfig` ``(name, scale)``; ``scale`` is ``None`` for the four He/Glorot ones.
  The released code maps "truncated_normal" to a plain normal by mistake; we use a normal
  truncated at two standard deviations, as the name says.
* **RNN cores**: vanilla RNN, GRU or LSTM with equal probability, hidden size log-uniform in
  [32, 128], one shared initializer or (1 time in 5) one initializer per weight matrix. The
  weight matrices are the released code's: ``in_to_hidden``, ``hidden_to_hidden`` (vanilla
  RNN, which also samples its activation); ``wz, wr, wh, uz, ur, uh`` (GRU, Sonnet's
  equations). For the LSTM the released code samples a single initializer for its fused gate
  matrix; following the paper's "per parameter vector" we keep two, ``in_to_gates`` and
  ``hidden_to_gates`` (shared 4 times in 5 as for the other cores). The LSTM follows Sonnet:
  gates ``i, j, f, o``, forget-gate bias 1.

Random draws come from a numpy ``Generator`` seeded by the raw data of a ``jax.random`` key
(:func:`key_rng`), so a config is a deterministic function of the key and sampling costs
microseconds. Biases are always initialised to zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# --- sampling helpers ----------------------------------------------------------------------


def key_rng(key: jax.Array, salt: str = "") -> np.random.Generator:
    """A numpy Generator determined by ``key`` (raw uint32 key or typed key) and ``salt``."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = [int(w) for w in np.asarray(key, dtype=np.uint32).reshape(-1)]
    return np.random.default_rng([*words, zlib.crc32(salt.encode())])


def log_int(rng: np.random.Generator, low: float, high: float) -> int:
    """An integer log-uniform in [low, high] (``round(exp(U[log low, log high]))``)."""
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def log_float(rng: np.random.Generator, low: float, high: float) -> float:
    """A float log-uniform in [low, high]."""
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer uniform in [low, high] (both ends included)."""
    return int(rng.integers(low, high + 1))


def bernoulli(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.uniform() < p)


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key of ``weights`` drawn with probability proportional to its weight."""
    names = list(weights)
    p = np.asarray([weights[n] for n in names], np.float64)
    return str(names[int(rng.choice(len(names), p=p / p.sum()))])


def choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# --- nested, JSON round-trippable configs ---------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(hint: Any, value: Any) -> Any:
    """Turn JSON-decoded ``value`` (dicts, lists) back into the type ``hint`` names."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(hint):
            if arg is not type(None):
                out = _coerce(arg, value)
                if out is not value or not isinstance(value, dict | list):
                    return out
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return hint(**value)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(item, v) for v in value)
    return value


class NestedConfig:
    """Mixin for frozen config dataclasses with nested dataclass / tuple fields.

    ``learnopt.tasks.base.config_from_dict`` turns only top-level lists back into tuples;
    this ``__post_init__`` also restores nested dataclasses (from dicts) and tuples of them,
    so configs round-trip through ``config_to_dict`` / JSON / ``config_from_dict``.
    """

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            coerced = _coerce(hint, value)
            if coerced is not value:
                object.__setattr__(self, name, coerced)


# --- activations (I.1.1) --------------------------------------------------------------------

ACTIVATION_WEIGHTS: dict[str, float] = {
    "relu": 6,
    "tanh": 3,
    "cos": 1,
    "elu": 1,
    "sigmoid": 1,
    "swish": 1,
    "leaky_relu4": 1,
    "leaky_relu2": 1,
    "leaky_relu1": 1,
}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "cos": jnp.cos,
    "elu": jax.nn.elu,
    "sigmoid": jax.nn.sigmoid,
    "swish": lambda x: x * jax.nn.sigmoid(x),
    "leaky_relu4": lambda x: jax.nn.leaky_relu(x, 0.4),
    "leaky_relu2": lambda x: jax.nn.leaky_relu(x, 0.2),
    "leaky_relu1": lambda x: jax.nn.leaky_relu(x, 0.1),
}


def sample_activation(rng: np.random.Generator) -> str:
    return weighted_choice(rng, ACTIVATION_WEIGHTS)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --- initializers (I.1.1) -------------------------------------------------------------------

INITIALIZER_WEIGHTS: dict[str, float] = {
    "he_normal": 2,
    "he_uniform": 2,
    "glorot_normal": 2,
    "glorot_uniform": 2,
    "orthogonal": 1,
    "random_uniform": 1,
    "random_normal": 1,
    "truncated_normal": 1,
    "variance_scaling": 1,
}
SCALED_INITIALIZERS = (
    "orthogonal",
    "random_uniform",
    "random_normal",
    "truncated_normal",
    "variance_scaling",
)
INIT_SCALE_RANGE = (0.1, 10.0)


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """A sampled initializer: its name and (for the last five kinds) its scale."""

    name: str
    scale: float | None = None


def sample_initializer(rng: np.random.Generator) -> InitConfig:
    name = weighted_choice(rng, INITIALIZER_WEIGHTS)
    scale = log_float(rng, *INIT_SCALE_RANGE) if name in SCALED_INITIALIZERS else None
    return InitConfig(name, scale)


def _symmetric_uniform(s: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -s, s)

    return init


def make_initializer(cfg: InitConfig) -> Callable:
    """The ``jax.nn.initializers`` function of a sampled :class:`InitConfig`.

    Fans follow ``jax.nn.initializers`` (input axis -2, output axis -1, the rest receptive
    field), which is right for flax Dense (in, out) and Conv (h, w, in, out) kernels.
    """
    init = jax.nn.initializers
    s = cfg.scale
    if cfg.name in SCALED_INITIALIZERS and s is None:
        raise ValueError(f"initializer {cfg.name!r} needs a scale")
    makers: dict[str, Callable[[], Callable]] = {
        "he_normal": init.he_normal,
        "he_uniform": init.he_uniform,
        "glorot_normal": init.glorot_normal,
        "glorot_uniform": init.glorot_uniform,
        "orthogonal": lambda: init.orthogonal(scale=s),
        "random_uniform": lambda: _symmetric_uniform(s),
        "random_normal": lambda: init.normal(stddev=s),
        "truncated_normal": lambda: init.truncated_normal(stddev=s),
        "variance_scaling": lambda: init.variance_scaling(s, "fan_in", "truncated_normal"),
    }
    if cfg.name not in makers:
        raise ValueError(f"unknown initializer {cfg.name!r}; valid: {', '.join(makers)}")
    return makers[cfg.name]()


# --- RNN cores (I.1.1) ----------------------------------------------------------------------

RNN_CORES = ("vrnn", "gru", "lstm")
RNN_WEIGHTS: dict[str, tuple[str, ...]] = {
    "vrnn": ("in_to_hidden", "hidden_to_hidden"),
    "gru": ("wz", "wr", "wh", "uz", "ur", "uh"),
    "lstm": ("in_to_gates", "hidden_to_gates"),
}
RNN_HIDDEN_RANGE = (32, 128)


@dataclasses.dataclass(frozen=True)
class RNNCoreConfig(NestedConfig):
    """A sampled RNN core: kind, hidden size, one initializer per weight matrix (in the order
    of ``RNN_WEIGHTS[core]``) and, for the vanilla RNN, its activation."""

    core: str
    core_dim: int
    inits: tuple[InitConfig, ...]
    act_fn: str | None = None


def sample_rnn_core(rng: np.random.Generator) -> RNNCoreConfig:
    core = choice(rng, RNN_CORES)
    linked = bernoulli(rng, 0.8)  # shared : per-matrix = 4 : 1
    names = RNN_WEIGHTS[core]
    if linked:
        shared = sample_initializer(rng)
        inits = tuple(shared for _ in names)
    else:
        inits = tuple(sample_initializer(rng) for _ in names)
    act = sample_activation(rng) if core == "vrnn" else None
    return RNNCoreConfig(core, log_int(rng, *RNN_HIDDEN_RANGE), inits, act)


class SampledRNN(nn.Module):
    """Runs a sampled RNN core over ``(batch, time, features)`` inputs, returning all outputs.

    The initial state is a trainable parameter (zeros at init) or fixed zeros.
    """

    config: RNNCoreConfig
    trainable_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h, e = cfg.core_dim, x.shape[-1]
        inits = dict(
            zip(RNN_WEIGHTS[cfg.core], (make_initializer(i) for i in cfg.inits), strict=True)
        )
        zeros = nn.initializers.zeros
        n_state = 2 if cfg.core == "lstm" else 1
        if self.trainable_init:
            state0 = self.param("initial_state", zeros, (n_state, h))
        else:
            state0 = jnp.zeros((n_state, h), x.dtype)
        state0 = jnp.broadcast_to(state0[:, None, :], (n_state, x.shape[0], h))
        xs = jnp.swapaxes(x, 0, 1)  # (time, batch, features)

        if cfg.core == "vrnn":
            act = activation_fn(cfg.act_fn or "tanh")
            w = self.param("in_to_hidden", inits["in_to_hidden"], (e, h))
            u = self.param("hidden_to_hidden", inits["hidden_to_hidden"], (h, h))
            b = self.param("bias", zeros, (h,))
            xw = xs @ w + b

            def step(state, xt):
                new = act(xt + state[0] @ u)
                return new[None], new

        elif cfg.core == "gru":
            w = {k: self.param(k, inits[k], (e, h)) for k in ("wz", "wr", "wh")}
            u = {k: self.param(k, inits[k], (h, h)) for k in ("uz", "ur", "uh")}
            b = {k: self.param(k, zeros, (h,)) for k in ("bz", "br", "bh")}
            xw = jnp.stack(
                [xs @ w[k] + b[c] for k, c in (("wz", "bz"), ("wr", "br"), ("wh", "bh"))]
            )
            xw = jnp.moveaxis(xw, 0, 1)  # (time, 3, batch, h)

            def step(state, xt):
                prev = state[0]
                z = jax.nn.sigmoid(xt[0] + prev @ u["uz"])
                r = jax.nn.sigmoid(xt[1] + prev @ u["ur"])
                cand = jnp.tanh(xt[2] + (r * prev) @ u["uh"])
                new = (1 - z) * prev + z * cand
                return new[None], new

        elif cfg.core == "lstm":
            w = self.param("in_to_gates", inits["in_to_gates"], (e, 4 * h))
            u = self.param("hidden_to_gates", inits["hidden_to_gates"], (h, 4 * h))
            b = self.param("bias", zeros, (4 * h,))
            xw = xs @ w + b

            def step(state, xt):
                hid, cell = state[0], state[1]
                i, j, f, o = jnp.split(xt + hid @ u, 4, axis=-1)
                cell = jax.nn.sigmoid(f + 1.0) * cell + jax.nn.sigmoid(i) * jnp.tanh(j)
                hid = jax.nn.sigmoid(o) * jnp.tanh(cell)
                return jnp.stack([hid, cell]), hid

        else:
            raise ValueError(f"unknown RNN core {cfg.core!r}; valid: {', '.join(RNN_CORES)}")

        _, ys = jax.lax.scan(step, state0, xw)
        return jnp.swapaxes(ys, 0, 1)
