"""``fc_lopt``: the per-parameter MLP learned optimizer of Metz et al. 2019.

Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
optimizers", arXiv:1810.10180, as the ``fc_lopt`` baseline of Metz et al. 2022, "Practical
tradeoffs between memory, compute, and performance in learned optimizers", arXiv:2203.11860, §4;
the released ``MLPLOpt`` of learned_optimization (github.com/google/learned_optimization).

Six momenta with fixed decays (0.1 ... 0.9999), ``g`` and ``p``, each normalised over the
tensor, plus 11 time features ``tanh(t / x - 1)``: 19 inputs to a ReLU MLP 19 -> 32 -> 32 -> 2
(1,762 meta-parameters); the parameter moves by ``-d * exp(0.001 m) * 0.001``. On CPU each
tensor's step (momenta, normalisers, MLP, update) is one call of a native kernel
(:mod:`learnopt.learned.native_fc_lopt`); elsewhere, under autodiff and without numba it is
XLA's matmul path, the same function. Details: docs/derivations.md §3.2; departures:
docs/departures.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learnopt.learned import common, native, native_fc_lopt
from learnopt.learned.base import LearnedOptimizer, MetaParams

#: Fixed momentum decays of fc_lopt (the released ``MLPLOpt``).
FC_LOPT_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


def _mlp_concat(theta, chans, time):
    """The released computation: stack, normalise over the tensor, append time, MLP."""
    x = jnp.stack(chans, axis=-1)
    x = common.second_moment_normalize(x, axis=tuple(range(chans[0].ndim)))
    x = jnp.concatenate([x, jnp.broadcast_to(time, chans[0].shape + time.shape)], axis=-1)
    return common.apply_mlp(theta, x)


@common.differentiated_as(_mlp_concat)
def _mlp_on_features(theta, chans, time):
    """``apply_mlp(theta, [normalise(stack(chans)), time])`` without materialising the inputs.

    The same function as :func:`_mlp_concat`: each channel's normaliser (a per-tensor scalar)
    is folded into its row of the first-layer weights, and the time features (the same for
    every parameter) into the first-layer bias, so the first layer is one matmul of the raw
    ``(..., 8)`` channels. Under autodiff it evaluates as :func:`_mlp_concat`.
    """
    axes = tuple(range(chans[0].ndim))
    nf = len(chans)
    scales = jax.lax.rsqrt(common.NORMALIZER_EPS + jnp.stack(
        [jnp.mean(jnp.square(c), axis=axes) for c in chans]))
    w0 = theta["w0"]
    first = {"w0": scales[:, None] * w0[:nf],
             "b0": theta["b0"] + jnp.dot(time, w0[nf:], precision=jax.lax.Precision.HIGHEST)}
    return common.apply_mlp({**theta, **first}, jnp.stack(chans, axis=-1))



def _xla_step(theta, time, decays, p, g, m, *, exp_mult: float, step_mult: float):
    """One tensor's ``(update, m)`` from its momenta before the step, by XLA."""
    orig_shape, orig_dtype = jnp.shape(p), jnp.asarray(p).dtype
    g = jnp.asarray(g, jnp.float32)
    m = common.momentum_update(common.MomentumState(m), g, decays).m
    shape = orig_shape or (1,)
    flat_m = jnp.reshape(m, m.shape[:1] + shape)
    out = _mlp_on_features(theta, [jnp.reshape(g, shape),
                                   jnp.reshape(jnp.asarray(p, jnp.float32), shape)]
                           + [flat_m[k] for k in range(m.shape[0])], time)
    step = out[..., 0] * jnp.exp(out[..., 1] * exp_mult) * step_mult
    return jnp.reshape(-step, orig_shape).astype(orig_dtype), m


@functools.cache
def _native_step(hidden_layers: int, exp_mult: float, step_mult: float):
    """``step(theta, time, decays, p, g, m) -> (update, m)`` of one tensor by the native CPU
    kernel (:mod:`learnopt.learned.native_fc_lopt`); differentiated, it evaluates as
    :func:`_xla_step` (the same function)."""
    reference = functools.partial(_xla_step, exp_mult=exp_mult, step_mult=step_mult)

    @common.differentiated_as(reference)
    def step(theta, time, decays, p, g, m):
        k, h = m.shape[0], theta["w0"].shape[1]
        n = int(jnp.size(p))  # > 0: empty tensors take the XLA path
        mlp = native.mlp_inputs(theta, hidden_layers, jnp.stack,
                                lambda shape: jnp.zeros(shape, jnp.float32))
        arrays = {**{name: x[None] for name, x in mlp.items()}, "decays": decays[None],
                  "time": time[None], "consts": jnp.asarray(
                      [[exp_mult, step_mult, common.NORMALIZER_EPS, 0.0]], jnp.float32),
                  "p": jnp.reshape(jnp.asarray(p, jnp.float32), (1, n)),
                  "g": jnp.reshape(jnp.asarray(g, jnp.float32), (1, n)),
                  "m": m}  # in its own shape: updated in place (native.batched_call)
        out = native_fc_lopt.xla_call(k, h, hidden_layers, time.shape[0], arrays)
        update = jnp.reshape(out["update"], jnp.shape(p)).astype(jnp.asarray(p).dtype)
        return update, out["m_out"]

    return step


class FcLOptState(NamedTuple):
    """Optimizer state of ``fc_lopt`` (the parameters are not part of it)."""

    momentum: common.MomentumState
    iteration: jax.Array  # int32 scalar
    num_steps: jax.Array  # int32 scalar (stored, unused)


class FcLOpt(LearnedOptimizer):
    """Per-parameter MLP learned optimizer ``fc_lopt`` (``MLPLOpt`` in learned_optimization).

    Args:
      hidden_size, hidden_layers: MLP widths (32, 2 in the paper).
      exp_mult, step_mult: ``step = d * exp(exp_mult * m) * step_mult`` (both 0.001).
      decays: fixed momentum decays.
    """

    name = "fc_lopt"

    def __init__(
        self,
        hidden_size: int = 32,
        hidden_layers: int = 2,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        decays: Sequence[float] = FC_LOPT_DECAYS,
    ):
        if hidden_size < 1 or hidden_layers < 0:
            raise ValueError(f"need hidden_size >= 1 and hidden_layers >= 0; got {hidden_size}, "
                             f"{hidden_layers}")
        if not decays or not all(0.0 <= d <= 1.0 for d in decays):
            raise ValueError(f"decays must be a non-empty list in [0, 1]; got {tuple(decays)}")
        self.hidden_size = hidden_size
        self.hidden_layers = hidden_layers
        self.exp_mult = exp_mult
        self.step_mult = step_mult
        self.momentum_decays = tuple(float(d) for d in decays)
        if (sizes := self._kernel_sizes()) is not None:  # see native.prefetch
            native.prefetch(native_fc_lopt.kernel_module, *sizes)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``FcLOpt(**lopt.config())`` rebuilds it)."""
        return {"hidden_size": self.hidden_size, "hidden_layers": self.hidden_layers,
                "exp_mult": self.exp_mult, "step_mult": self.step_mult,
                "decays": list(self.momentum_decays)}

    @property
    def num_inputs(self) -> int:
        """19 with the defaults: g, p, 6 momenta and 11 time features."""
        return 2 + len(self.momentum_decays) + len(common.TIME_SCALES)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.num_inputs,) + (self.hidden_size,) * self.hidden_layers + (2,)

    def init(self, key: jax.Array) -> MetaParams:
        return common.init_mlp(key, self.layer_sizes)

    def _kernel_sizes(self) -> tuple[int, int, int, int] | None:
        """The native kernel's sizes (:func:`native_fc_lopt.kernel_module`) where it is used:
        at least one hidden layer and a CPU backend (elsewhere XLA runs the matmuls well)."""
        if self.hidden_layers < 1 or jax.default_backend() != "cpu":
            return None
        return (len(self.momentum_decays), self.hidden_size, self.hidden_layers,
                len(common.TIME_SCALES))

    def _native(self) -> bool:
        """Whether tensors are updated by the native CPU kernel: where :meth:`_kernel_sizes`
        allows and the kernel builds (:func:`native_fc_lopt.ready`)."""
        sizes = self._kernel_sizes()
        return sizes is not None and native_fc_lopt.ready(*sizes)

    def optimizer(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        decays = jnp.asarray(self.momentum_decays, jnp.float32)

        def init_fn(params: Any) -> FcLOptState:
            return FcLOptState(
                momentum=common.momentum_init(params, len(self.momentum_decays)),
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update_fn(updates: Any, state: FcLOptState, params: Any = None, *,
                      loss: jax.Array | None = None, **extra_args: Any):
            del loss, extra_args  # fc_lopt has no loss feature
            grads = updates
            common.check_same_structure(grads, params, self.name)
            time = common.tanh_time_features(state.iteration)
            xla = functools.partial(_xla_step, exp_mult=self.exp_mult,
                                    step_mult=self.step_mult)
            fast = (_native_step(self.hidden_layers, self.exp_mult, self.step_mult)
                    if self._native() else xla)
            treedef = jax.tree.structure(grads)
            out = [(fast if jnp.size(p) else xla)(theta, time, decays, p, g, m)  # empty: XLA
                   for p, g, m in zip(treedef.flatten_up_to(params),
                                      treedef.flatten_up_to(grads),
                                      treedef.flatten_up_to(state.momentum.m), strict=True)]
            momentum = common.MomentumState(m=treedef.unflatten([m for _, m in out]))
            return treedef.unflatten([u for u, _ in out]), FcLOptState(
                momentum=momentum, iteration=state.iteration + 1, num_steps=state.num_steps)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
