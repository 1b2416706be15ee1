"""``hierarchical_rnn``: the hierarchical GRU learned optimizer of Wichrowska et al. 2017.

Wichrowska et al. 2017, "Learned Optimizers that Scale and Generalize", arXiv:1703.04813: §3 /
Fig. 1 (architecture), §3.1 (hierarchy and sizes), §3.2 (attention, momentum on several
timescales, dynamic input scaling, direction times step length), §3.3 (inputs and outputs,
Eqs. 10-13), App. A.1 (shortcut). Where the paper is silent, the released TensorFlow code
(``research/learned_optimizer`` in tensorflow/models, "the reference") settles it.

Three GRU levels (Parameter RNN per scalar [10 units], Tensor RNN per tensor [20], one Global
RNN [20]) pass injected biases down the hierarchy. Inputs are momenta on ``S`` [4] timescales
scaled by their RMS, relative log gradient magnitudes and the relative log learning rate; outputs
set a per-tensor normalised direction, a log step length with its own running average, and the
next step's decays. Per-parameter state is stored flat over all parameters.

With ``use_attention=True`` (default) the caller's parameters are the paper's *attended* point
``phi``: ``loss`` and ``grads`` passed to ``update`` are at ``phi``, the state keeps only the
offset ``phi - theta``, and :meth:`HierarchicalRNN.real_params` returns the real parameters
``theta`` to evaluate or ship. The equations and this derivation are in docs/derivations.md
§3.5; each choice where the paper is silent or departs from the reference, in
docs/departures.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.learned import common
from learnopt.learned.base import LearnedOptimizer, MetaParams

PyTree = Any

#: Epsilon under the square root of the RMS scaling and inside the log magnitudes.
EPS = 1e-16
#: Epsilon of the per-tensor direction normaliser ``sqrt(mean(d^2) + eps)``.
DIRECTION_EPS = 1e-16
#: Lower clip of the log learning rate (the reference's ``log(min int32) - 1``).
MIN_LOG_LR = -33.0

_HIGHEST = jax.lax.Precision.HIGHEST


# -------------------------------------------------------------------------------------------
# Small building blocks: affine maps and the bias GRU.


Sampler = Callable[..., jax.Array]


def init_affine(normal: Sampler, fan_in: int, fan_out: int, scale: float = 0.5) -> dict:
    """``{"w": (fan_in, fan_out) ~ N(0, scale/sqrt(fan_in)), "b": zeros(fan_out)}``;
    ``normal(shape, std, mean=0)`` draws the weights."""
    return {"w": normal((fan_in, fan_out), scale / math.sqrt(fan_in)),
            "b": jnp.zeros((fan_out,), jnp.float32)}


def affine(p: dict, x: jax.Array) -> jax.Array:
    return jnp.matmul(x, p["w"], precision=_HIGHEST) + p["b"]


def init_bias_gru(normal: Sampler, input_size: int, hidden: int, scale: float = 0.5,
                  gate_bias: float = 2.2) -> dict:
    """Weights of a bias GRU: gates ``[x, h] -> 2 * hidden`` (reset, update), candidate
    ``[x, r * h] -> hidden``; weights ``N(0, scale/sqrt(fan_in))``, gate biases ``gate_bias``."""
    fan_in = input_size + hidden
    return {"w_gates": normal((fan_in, 2 * hidden), scale / math.sqrt(fan_in)),
            "b_gates": jnp.full((2 * hidden,), gate_bias, jnp.float32),
            "w_cand": normal((fan_in, hidden), scale / math.sqrt(fan_in)),
            "b_cand": jnp.zeros((hidden,), jnp.float32)}


def bias_gru(p: dict, x: jax.Array, h: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """One step of the bias GRU over the trailing axis; ``bias`` is ``(3 * hidden,)`` laid out
    ``[reset, update, candidate]`` and broadcasts over leading axes."""
    k = h.shape[-1]
    gates = jnp.matmul(jnp.concatenate([x, h], -1), p["w_gates"], precision=_HIGHEST)
    gates = gates + p["b_gates"]
    cand_bias = p["b_cand"]
    if bias is not None:
        gates = gates + bias[..., : 2 * k]
        cand_bias = cand_bias + bias[..., 2 * k:]
    r = jax.nn.sigmoid(gates[..., :k])
    u = jax.nn.sigmoid(gates[..., k:])
    c = jnp.tanh(jnp.matmul(jnp.concatenate([x, r * h], -1), p["w_cand"], precision=_HIGHEST)
                 + cand_bias)
    return u * h + (1.0 - u) * c


def gru_num_params(input_size: int, hidden: int) -> int:
    """``(input + hidden) * 3 * hidden + 3 * hidden`` (gates and candidate, with biases)."""
    return (input_size + hidden) * 3 * hidden + 3 * hidden


def _safe_mean(x: jax.Array, axis: int = 0) -> jax.Array:
    """Mean over ``axis`` that is 0 (not NaN) for an empty axis."""
    return jnp.sum(x, axis=axis) / max(x.shape[axis], 1)


def _straight_through_clip(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """``clip(x, lo, hi)`` in the forward pass, the identity's gradient in the backward pass."""
    return x + jax.lax.stop_gradient(jnp.clip(x, lo, hi) - x)


# -------------------------------------------------------------------------------------------
# Multi-timescale accumulators (Eqs. 1-4).


def timescale_decays(logit: jax.Array, num_scales: int, multiple: bool = True) -> jax.Array:
    """``sigmoid(logit) ** (2 ** -s)`` for ``s < num_scales`` (trailing axis), computed as
    ``exp(2**-s * log_sigmoid(logit))``; with ``multiple=False`` every scale gets
    ``sigmoid(logit)``. ``logit`` has a trailing axis of 1."""
    powers = 2.0 ** -jnp.arange(num_scales, dtype=jnp.float32)
    if not multiple:
        powers = jnp.ones_like(powers)
    return jnp.exp(jax.nn.log_sigmoid(logit) * powers)


def accumulate(gbar: jax.Array, lam: jax.Array, decay_logits: jax.Array, g: jax.Array,
               first: jax.Array | bool, multiple_scale_decays: bool = True
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Eqs. 1-4 for a flat tensor: returns ``(gbar, lam, m, gamma)``, each ``(N, S)``.

    ``gbar``, ``lam``: ``(N, S)``; ``decay_logits``: ``(N, 2)`` = (beta_g, beta_lambda);
    ``g``: ``(N,)``; ``first``: at the first step every decay is 0.
    """
    num_scales = gbar.shape[-1]
    c_g = timescale_decays(decay_logits[:, :1], num_scales)
    c_l = timescale_decays(decay_logits[:, 1:2], num_scales, multiple_scale_decays)
    c_g = jnp.where(first, 0.0, c_g)
    c_l = jnp.where(first, 0.0, c_l)
    gbar = c_g * gbar + (1.0 - c_g) * g[:, None]
    lam = c_l * lam + (1.0 - c_l) * jnp.square(gbar)
    m = gbar * jax.lax.rsqrt(lam + EPS)
    log_lam = jnp.log(lam + EPS)
    gamma = log_lam - jnp.mean(log_lam, axis=-1, keepdims=True)
    return gbar, lam, m, gamma


# -------------------------------------------------------------------------------------------


class HierarchicalRNNState(NamedTuple):
    """Optimizer state. Per-parameter fields are stored flat: a leading axis over all ``N``
    scalar parameters, tensor after tensor in ``jax.tree.leaves(params)`` order (each flattened
    in C order; a rank-0 tensor counts one), so the per-parameter math is one computation
    whatever the number of tensors. :meth:`HierarchicalRNN.unflatten` gives per-tensor views.

    ``param_hidden`` ``(N, K_P)``; ``grad_avg`` (gbar) and ``grad_sq_avg`` (lambda) ``(N, S)``;
    ``decay_logits`` ``(N, 2)`` (beta_g, beta_l output at the previous step); ``log_lr``
    ``(N,)`` (the running average etabar); ``attention_offset`` ``(N,)`` (phi - theta; ``None``
    without attention); ``tensor_hidden`` ``(T, K_T)`` for the ``T`` tensors;
    ``global_hidden`` ``(K_G,)``; ``iteration`` the steps taken.
    """

    param_hidden: jax.Array
    grad_avg: jax.Array
    grad_sq_avg: jax.Array
    decay_logits: jax.Array
    log_lr: jax.Array
    attention_offset: jax.Array | None
    tensor_hidden: jax.Array
    global_hidden: jax.Array
    iteration: jax.Array  # int32 scalar


class _Layout:
    """Static layout of a parameter tree: shapes, sizes and offsets on the flat axis."""

    def __init__(self, params: PyTree):
        self.leaves, self.treedef = jax.tree.flatten(params)
        self.shapes = [tuple(jnp.shape(p)) for p in self.leaves]
        self.sizes = [math.prod(sh) for sh in self.shapes]
        self.starts = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.total = sum(self.sizes)
        self.num_tensors = len(self.sizes)

    def flatten(self, tree: PyTree) -> jax.Array:
        """A tree shaped like the parameters -> one float32 ``(N,)`` array."""
        parts = [jnp.reshape(jnp.asarray(x, jnp.float32), (n,))
                 for x, n in zip(self.treedef.flatten_up_to(tree), self.sizes, strict=True)]
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)

    def pieces(self, x: jax.Array) -> list[jax.Array]:
        return [x[a:a + n] for a, n in zip(self.starts, self.sizes, strict=True)]

    def unflatten(self, x: jax.Array) -> PyTree:
        """``(N,) + tail`` -> a tree of ``shape + tail`` arrays."""
        return self.treedef.unflatten([jnp.reshape(piece, sh + x.shape[1:]) for piece, sh in
                                       zip(self.pieces(x), self.shapes, strict=True)])

    def tensor_mean(self, x: jax.Array) -> jax.Array:
        """``(N, k)`` -> ``(T, k)``: the mean over each tensor's elements (0 if empty)."""
        return jnp.stack([_safe_mean(piece) for piece in self.pieces(x)])

    def per_element(self, x: jax.Array) -> jax.Array:
        """``(T, k)`` -> ``(N, k)``: each tensor's row repeated over its elements."""
        if self.num_tensors == 1:
            return jnp.broadcast_to(x[0], (self.total,) + x.shape[1:])
        return jnp.concatenate([jnp.broadcast_to(x[i], (n,) + x.shape[1:])
                                for i, n in enumerate(self.sizes)])


def key_from_params(params: PyTree) -> jax.Array:
    """A PRNG key derived from the bits of the parameter values (deterministic, traceable)."""
    h = jnp.zeros((), jnp.uint32)
    for leaf in jax.tree.leaves(params):
        x = jax.lax.stop_gradient(jnp.asarray(leaf, jnp.float32))
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        h = h * jnp.uint32(1000003) + jnp.sum(bits, dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.PRNGKey(0), h)


class HierarchicalRNN(LearnedOptimizer):
    """The hierarchical RNN optimizer of Wichrowska et al. 2017 (see the module docstring).

    Args:
      param_hidden, tensor_hidden, global_hidden: GRU sizes ``K_P, K_T, K_G`` (10, 20, 20).
      num_scales: momentum timescales ``S`` (4).
      use_attention: the attended-gradient mechanism of §3.2.1 (True).
      use_gradient_shortcut: App. A.1's linear map from ``m_s`` to the directions (True).
      use_grad_products: add ``m_s * m_{s+1}`` inputs (reference option; False).
      multiple_scale_decays: RMS decays per timescale as in Eq. 2 (True).
      init_lr_range: range of the initial learning rate ``(1e-6, 1e-2)``.
      max_log_lr: upper clip of the log learning rate (33).
    """

    name = "hierarchical_rnn"

    def __init__(
        self,
        param_hidden: int = 10,
        tensor_hidden: int = 20,
        global_hidden: int = 20,
        num_scales: int = 4,
        use_attention: bool = True,
        use_gradient_shortcut: bool = True,
        use_grad_products: bool = False,
        multiple_scale_decays: bool = True,
        init_lr_range: tuple[float, float] = (1e-6, 1e-2),
        max_log_lr: float = 33.0,
    ):
        for what, v in (("param_hidden", param_hidden), ("tensor_hidden", tensor_hidden),
                        ("global_hidden", global_hidden), ("num_scales", num_scales)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{what} must be a positive int; got {v!r}")
        lo, hi = (float(x) for x in init_lr_range)
        if not 0.0 < lo <= hi:
            raise ValueError(f"init_lr_range must be (low, high) with 0 < low <= high; got "
                             f"{tuple(init_lr_range)}")
        if not MIN_LOG_LR < max_log_lr:
            raise ValueError(f"max_log_lr must exceed {MIN_LOG_LR}; got {max_log_lr}")
        self.param_hidden = param_hidden
        self.tensor_hidden = tensor_hidden
        self.global_hidden = global_hidden
        self.num_scales = num_scales
        self.use_attention = bool(use_attention)
        self.use_gradient_shortcut = bool(use_gradient_shortcut)
        self.use_grad_products = bool(use_grad_products)
        self.multiple_scale_decays = bool(multiple_scale_decays)
        self.init_lr_range = (lo, hi)
        self.max_log_lr = float(max_log_lr)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``HierarchicalRNN(**lopt.config())``)."""
        return {"param_hidden": self.param_hidden, "tensor_hidden": self.tensor_hidden,
                "global_hidden": self.global_hidden, "num_scales": self.num_scales,
                "use_attention": self.use_attention,
                "use_gradient_shortcut": self.use_gradient_shortcut,
                "use_grad_products": self.use_grad_products,
                "multiple_scale_decays": self.multiple_scale_decays,
                "init_lr_range": list(self.init_lr_range), "max_log_lr": self.max_log_lr}

    # ---------------------------------------------------------------------------------------
    @property
    def num_inputs(self) -> int:
        """Parameter-RNN input width: ``2S + 1`` (+ ``S - 1`` gradient products)."""
        s = self.num_scales
        return 2 * s + 1 + (s - 1 if self.use_grad_products else 0)

    @property
    def input_names(self) -> tuple[str, ...]:
        s = range(self.num_scales)
        names = [f"m{i}" for i in s] + [f"gamma{i}" for i in s] + ["eta_rel"]
        if self.use_grad_products:
            names += [f"m{i}*m{i + 1}" for i in range(self.num_scales - 1)]
        return tuple(names)

    def init(self, key: jax.Array) -> MetaParams:
        # Every jax.random call compiles its own generator graph (a dozen calls took seconds
        # to compile on CPU), so all normals and all uniforms are drawn in one call each: a
        # first pass records the sizes, the second hands out consecutive pieces.
        sizes = {"normal": 0, "uniform": 0}

        def count(kind):
            def draw(shape, *args):
                sizes[kind] += math.prod(shape)
                return jnp.zeros(shape, jnp.float32)
            return draw

        self._build_theta(count("normal"), count("uniform"))
        k_n, k_u = jax.random.split(key)
        pools = {"normal": jax.random.normal(k_n, (sizes["normal"],), jnp.float32),
                 "uniform": jax.random.uniform(k_u, (sizes["uniform"],), jnp.float32)}
        used = {"normal": 0, "uniform": 0}

        def take(kind, shape):
            n = math.prod(shape)
            out = jnp.reshape(pools[kind][used[kind]:used[kind] + n], shape)
            used[kind] += n
            return out

        def normal(shape, std, mean=0.0):
            return mean + std * take("normal", shape)

        def uniform(shape, lo, hi):
            return lo + (hi - lo) * take("uniform", shape)

        return self._build_theta(normal, uniform)

    def _build_theta(self, normal: Sampler, uniform: Sampler) -> MetaParams:
        kp, kt, kg = self.param_hidden, self.tensor_hidden, self.global_hidden
        f, s = self.num_inputs, self.num_scales
        w_dir = normal((kp,), 0.5 / math.sqrt(kp))
        theta: dict[str, Any] = {
            "param_rnn": init_bias_gru(normal, f, kp),
            "tensor_rnn": init_bias_gru(normal, kp + f, kt),
            "global_rnn": init_bias_gru(normal, kt, kg),
            "tensor_to_param": init_affine(normal, kt, 3 * kp),
            "global_to_param": init_affine(normal, kg, 3 * kp),
            "global_to_tensor": init_affine(normal, kg, 3 * kt),
            "init_param_hidden": uniform((kp,), -1.0, 1.0),
            "init_tensor_hidden": uniform((kt,), -1.0, 1.0),
            "init_global_hidden": uniform((kg,), -1.0, 1.0),
            "readout": {
                "w_dir": w_dir,
                "w_lr": jnp.zeros((kp,), jnp.float32),
                "b_lr": jnp.zeros((), jnp.float32),
                "w_decay": normal((kp, 2), 0.5 / math.sqrt(kp)),
                "b_decay": jnp.array([2.2, 3.2], jnp.float32),
            },
            "lr_momentum_logit": jnp.asarray(3.2, jnp.float32),
        }
        if self.use_gradient_shortcut:
            theta["shortcut"] = normal((s,), 0.1 / math.sqrt(s), 1.0 / s)
        if self.use_attention:
            theta["readout"]["w_attn"] = w_dir
            theta["attention_lr_offset"] = jnp.asarray(1.0, jnp.float32)
            if self.use_gradient_shortcut:
                theta["attn_shortcut"] = normal((s,), 0.1 / math.sqrt(s), 1.0 / s)
        return theta

    # ---------------------------------------------------------------------------------------
    def init_state(self, theta: MetaParams, params: PyTree,
                   key: jax.Array | None = None) -> HierarchicalRNNState:
        """Fresh state for ``params``; ``key`` draws the initial learning rates (else a key is
        derived from the parameter values, see docs/departures.md, hierarchical_rnn item 12)."""
        lay = _Layout(params)
        n, t = lay.total, lay.num_tensors
        lo, hi = (math.log(x) for x in self.init_lr_range)
        if lo == hi:
            log_lr = jnp.full((n,), lo, jnp.float32)
        else:  # one uniform draw: per-element values, then one offset per tensor
            key = key_from_params(params) if key is None else key
            u = lo / 2 + (hi - lo) / 2 * jax.random.uniform(key, (n + t,), jnp.float32)
            offsets = lay.per_element(u[n:, None])[:, 0] if t else u[n:]
            log_lr = u[:n] + offsets
        log_lr = jnp.clip(log_lr, MIN_LOG_LR, self.max_log_lr)
        h_p = jnp.asarray(theta["init_param_hidden"], jnp.float32)
        h_t = jnp.asarray(theta["init_tensor_hidden"], jnp.float32)
        return HierarchicalRNNState(
            param_hidden=jnp.broadcast_to(h_p, (n, self.param_hidden)),
            grad_avg=jnp.zeros((n, self.num_scales), jnp.float32),
            grad_sq_avg=jnp.zeros((n, self.num_scales), jnp.float32),
            decay_logits=jnp.zeros((n, 2), jnp.float32),
            log_lr=log_lr,
            attention_offset=jnp.zeros((n,), jnp.float32) if self.use_attention else None,
            tensor_hidden=jnp.broadcast_to(h_t, (t, self.tensor_hidden)),
            global_hidden=jnp.asarray(theta["init_global_hidden"], jnp.float32),
            iteration=jnp.zeros([], jnp.int32),
        )

    def unflatten(self, x: jax.Array, params: PyTree) -> PyTree:
        """A flat per-parameter array ``(N,) + tail`` (a state field, an ``aux`` entry) as a
        tree shaped like ``params``, each leaf ``shape + tail``."""
        return _Layout(params).unflatten(x)

    def real_params(self, params: PyTree, state: HierarchicalRNNState) -> PyTree:
        """The real parameters ``theta`` given the caller's (attended) ``params``."""
        if state.attention_offset is None:
            return params
        offsets = _Layout(params).unflatten(state.attention_offset)
        return jax.tree.map(lambda p, d: (jnp.asarray(p, jnp.float32) - d).astype(
            jnp.asarray(p).dtype), params, offsets)

    # ---------------------------------------------------------------------------------------
    def step(self, theta: MetaParams, grads: PyTree, state: HierarchicalRNNState,
             params: PyTree) -> tuple[PyTree, HierarchicalRNNState, dict[str, Any]]:
        """One update: ``(updates, new_state, aux)``.

        ``aux`` exposes the internals for inspection and tests, flat like the state
        (:meth:`unflatten` for per-tensor views): ``inputs`` ``(N, F)``, the Parameter-RNN
        inputs ``x``; ``tensor_inputs`` ``(T, K_P + F)``; ``global_input`` ``(K_T,)``; ``eta``
        ``(N,)``, the log step length used; ``theta_step`` (Delta theta) and ``phi_step``
        (Delta phi, or ``None``), ``(N,)``.
        """
        common.check_same_structure(grads, params, self.name)
        lay = _Layout(params)
        for i, (g, sh) in enumerate(zip(lay.treedef.flatten_up_to(grads), lay.shapes,
                                        strict=True)):
            if tuple(jnp.shape(g)) != sh:
                raise ValueError(f"{self.name}: gradient {i} has shape {jnp.shape(g)}, but its "
                                 f"parameter has shape {sh}")
        n, t = lay.total, lay.num_tensors
        if state.log_lr.shape != (n,) or state.tensor_hidden.shape[0] != t:
            raise ValueError(f"{self.name}: the state was built for {state.log_lr.shape[0]} "
                             f"parameters in {state.tensor_hidden.shape[0]} tensors, but params "
                             f"have {n} in {t}; call init(params) for these parameters")
        if t == 0:  # nothing to optimise
            return params, state._replace(iteration=state.iteration + 1), {}

        first = state.iteration == 0
        log_lr = state.log_lr
        gbar, lam, m, gamma = accumulate(state.grad_avg, state.grad_sq_avg, state.decay_logits,
                                         lay.flatten(grads), first, self.multiple_scale_decays)
        # eta_rel: relative to the mean over all parameters (E_ti).
        eta_rel = log_lr - jnp.sum(log_lr) / max(n, 1)
        feats = [m, gamma, eta_rel[:, None]]
        if self.use_grad_products:
            feats.append(m[:, :-1] * m[:, 1:])
        x = jnp.concatenate(feats, -1)

        h_g, h_t = state.global_hidden, state.tensor_hidden
        # Eq. 10: Parameter RNN, biased by the old tensor and global states.
        bias = affine(theta["tensor_to_param"], h_t) + affine(theta["global_to_param"], h_g)
        h_p = bias_gru(theta["param_rnn"], x, state.param_hidden, lay.per_element(bias))
        # Eq. 11: Tensor RNN on the means of the new parameter states and of the inputs.
        t_in = lay.tensor_mean(jnp.concatenate([h_p, x], -1))
        h_t = bias_gru(theta["tensor_rnn"], t_in, h_t, affine(theta["global_to_tensor"], h_g))
        # Eq. 12: Global RNN on the mean of the new tensor states.
        global_in = jnp.mean(h_t, axis=0)
        h_g = bias_gru(theta["global_rnn"], global_in, h_g)

        # Eq. 13 readouts from the new parameter state (+ App. A.1 shortcut).
        ro = theta["readout"]
        w_dirs, shortcuts = [ro["w_dir"]], [theta.get("shortcut")]
        if self.use_attention:
            w_dirs.append(ro["w_attn"])
            shortcuts.append(theta.get("attn_shortcut"))
        d = jnp.matmul(h_p, jnp.stack(w_dirs, -1), precision=_HIGHEST)  # (N, 1 or 2)
        if self.use_gradient_shortcut:
            d = d + jnp.matmul(m, jnp.stack(shortcuts, -1), precision=_HIGHEST)
        # Eqs. 5-6: unit-RMS directions, the mean over each tensor.
        d = d * lay.per_element(jax.lax.rsqrt(lay.tensor_mean(jnp.square(d)) + DIRECTION_EPS))
        delta_eta = jnp.matmul(h_p, ro["w_lr"], precision=_HIGHEST) + ro["b_lr"]
        new_logits = jnp.matmul(h_p, ro["w_decay"], precision=_HIGHEST) + ro["b_decay"]

        # Eqs. 7-8: multiplicative (log-additive) learning-rate change with momentum.
        eta = _straight_through_clip(log_lr + delta_eta, MIN_LOG_LR, self.max_log_lr)
        lr_mom = jax.nn.sigmoid(theta["lr_momentum_logit"])
        new_log_lr = lr_mom * log_lr + (1.0 - lr_mom) * eta
        theta_step = -jnp.exp(eta) * d[:, 0]
        if self.use_attention:  # Eq. 9 and §3.2.1
            phi_step = -jnp.exp(eta + theta["attention_lr_offset"]) * d[:, 1]
            update = phi_step - state.attention_offset
            new_offset = phi_step - theta_step
        else:
            phi_step = new_offset = None
            update = theta_step

        updates = lay.treedef.unflatten([
            jnp.reshape(piece, sh).astype(jnp.asarray(p).dtype)
            for piece, sh, p in zip(lay.pieces(update), lay.shapes, lay.leaves, strict=True)])
        new_state = HierarchicalRNNState(
            param_hidden=h_p, grad_avg=gbar, grad_sq_avg=lam, decay_logits=new_logits,
            log_lr=new_log_lr, attention_offset=new_offset, tensor_hidden=h_t,
            global_hidden=h_g, iteration=state.iteration + 1)
        aux = {"inputs": x, "tensor_inputs": t_in, "global_input": global_in, "eta": eta,
               "theta_step": theta_step, "phi_step": phi_step}
        return updates, new_state, aux

    # ---------------------------------------------------------------------------------------
    def optimizer(self, theta: MetaParams, num_steps: int, *,
                  key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
        """The optax transformation. ``num_steps`` is unused (no time features); ``key``
        draws the initial learning rates (default: derived from the parameters)."""
        del num_steps

        def init_fn(params: PyTree) -> HierarchicalRNNState:
            return self.init_state(theta, params, key)

        def update_fn(updates: PyTree, state: HierarchicalRNNState, params: PyTree = None, *,
                      loss: jax.Array | None = None, **extra_args: Any):
            del loss, extra_args  # the gradient is the only raw input (§3.2.1)
            new_updates, new_state, _ = self.step(theta, updates, state, params)
            return new_updates, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
