"""Normalising flows for the TaskSet ``maf`` and ``nvp`` families.

Metz et al. 2020, "Tasks, stability, architecture, and compute", arXiv:2009.11243, App. I.2.9
(masked autoregressive flows, Papamakarios et al. 2017) and I.2.10 (real NVP, Dinh et al. 2017)
model flattened images with a chain of 1 to 4 bijectors whose shift / log-scale networks share
the sampled hidden sizes, activation and initializer. We follow the released code's TensorFlow
Probability construction:

* **MAF** bijector (``tfb.MaskedAutoregressiveFlow`` with
  ``masked_autoregressive_default_template``): a MADE network (Germain et al. 2015) with
  left-to-right input degrees ``1..D``, hidden degrees ``k mod max(1, D-1) + min(1, D-1)``
  ("equal" hidden degrees), masks ``hidden >= input`` between hidden layers and
  ``output > hidden`` into the output, which holds a shift and a log-scale per dimension.
  The log-scale is clipped to [-5, 3] (TFP's defaults). Sampling runs ``x_i = z_i *
  exp(s_i(x_<i)) + mu_i(x_<i)``, so the density direction is parallel:
  ``z = (x - mu(x)) * exp(-s(x))`` with log-determinant ``-sum s``.
* **Real NVP** bijector (``tfb.RealNVP`` with ``real_nvp_default_template``): the first
  ``D // 2`` dimensions pass unchanged and condition a dense network giving shift and
  log-scale of the rest. Departure: TFP leaves the NVP log-scale unclipped; we clip it to
  [-5, 3] as for MAF, so that sampled initializers of scale up to 10 do not overflow.
* Departure (both kinds): after each bijector of the density direction ``z`` is clipped to
  [-1e4, 1e4] (:data:`Z_CLIP`; TFP has no such bound). A bijector can multiply its input by
  up to ``e^5`` (the log-scale's lower clip) and add an unbounded shift, so with sampled
  initializers of scale up to 10 (I.1.1) three or four bijectors carry ``z`` past ``1e19``
  and ``z^2`` overflows float32 at init: loss inf, gradient NaN, for about 1 % of sampled
  configs (10 of 1000 ``maf``, 11 of 1000 ``nvp`` at ``TaskSetLimits.tiny()``). With the
  non-saturating ``cos`` activation the gradient alone can overflow too, as each bijector's
  backward pass scales by ``|z|`` times its network's Jacobian (bounding only the shift
  left 3 of 20000 ``maf`` configs so). A flow fitted to [0, 1] data keeps ``|z|`` far below
  the bound (one bijector maps the data to at most about ``e^5`` in size), so the clip only
  acts on runaway initialisations; there the flow is not invertible and, as for the
  clipped log-scale, no gradient passes a clipped unit. Measured with the clip: finite
  loss and gradient for every config of seeds 0-99 and every one with 2+ bijectors and an
  init scale of 2+ of seeds 0-999, at tiny and default sizes; the largest gradient entry
  of the extreme corner (4 bijectors of 128-128 ``cos`` units, normal init of std 10,
  16x16 images) is ``1e34``, so larger images (``TaskSetLimits.paper()``) may still
  overflow there.
* Between consecutive bijectors a fixed permutation of the dimensions (``perm_i =
  RandomState(i).permutation(D)``, the released NVP code's choice; its MAF code drew an
  unseeded permutation), none after the last. The base distribution is a standard normal.

All dense layers (including the output layer of each bijector network) use the sampled
kernel initializer and zero biases. ``Flow.apply(variables, x)`` returns ``log p(x)`` per example;
the task adds N(0, 0.01^2) noise to the data first (the released code's dequantisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOG_SCALE_CLIP = (-5.0, 3.0)
Z_CLIP = 1e4  # bound on |z| after each bijector (a departure, see the module docstring)
FLOW_KINDS = ("maf", "nvp")


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """``log N(z; 0, I)`` summed over the last axis."""
    d = z.shape[-1]
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * d * math.log(2 * math.pi)


def made_degrees(dim: int, hidden_sizes: Sequence[int]) -> list[np.ndarray]:
    """Degrees of the input and each hidden layer of a MADE network (TFP's "equal" rule)."""
    degrees = [np.arange(1, dim + 1)]
    for units in hidden_sizes:
        degrees.append(np.arange(units) % max(1, dim - 1) + min(1, dim - 1))
    return degrees


def made_masks(dim: int, hidden_sizes: Sequence[int], outputs_per_dim: int = 2) -> list[np.ndarray]:
    """The (in, out) 0/1 masks of each MADE layer; the output layer has ``outputs_per_dim``
    blocks of ``dim`` units (shift, log-scale), each block with degrees ``1..dim``."""
    deg = made_degrees(dim, hidden_sizes)
    masks = [
        (d_out[None, :] >= d_in[:, None]) for d_in, d_out in zip(deg[:-1], deg[1:], strict=True)
    ]
    out_deg = np.tile(np.arange(1, dim + 1), outputs_per_dim)
    masks.append(out_deg[None, :] > deg[-1][:, None])
    return [m.astype(np.float32) for m in masks]


class MaskedDense(nn.Module):
    mask: np.ndarray
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, self.mask.shape)
        bias = self.param("bias", nn.initializers.zeros, (self.mask.shape[1],))
        return x @ (kernel * jnp.asarray(self.mask)) + bias


class MADE(nn.Module):
    """Autoregressive shift and log-scale networks: output ``i`` depends on ``x_<i`` only."""

    hidden_sizes: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        dim = x.shape[-1]
        masks = made_masks(dim, self.hidden_sizes)
        h = x
        for i, m in enumerate(masks[:-1]):
            h = self.activation(MaskedDense(m, self.kernel_init, name=f"hidden_{i}")(h))
        out = MaskedDense(masks[-1], self.kernel_init, name="output")(h)
        return out[..., :dim], out[..., dim:]


class NVPNet(nn.Module):
    """Dense shift and log-scale network of a real NVP coupling layer."""

    hidden_sizes: Sequence[int]
    out_dim: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x
        for i, units in enumerate(self.hidden_sizes):
            h = self.activation(
                nn.Dense(units, kernel_init=self.kernel_init, name=f"hidden_{i}")(h)
            )
        out = nn.Dense(2 * self.out_dim, kernel_init=self.kernel_init, name="output")(h)
        return out[..., : self.out_dim], out[..., self.out_dim :]


def permutation(index: int, dim: int) -> np.ndarray:
    """The fixed permutation after bijector ``index``."""
    return np.random.RandomState(index).permutation(dim)


class Flow(nn.Module):
    """A chain of ``num_bijectors`` MAF or NVP bijectors over flat ``(batch, D)`` data."""

    kind: str
    hidden_sizes: Sequence[int]
    num_bijectors: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``log p(x)`` for each row of ``x`` (shape ``(batch, D)``)."""
        if self.kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow kind {self.kind!r}; valid: {', '.join(FLOW_KINDS)}")
        if self.num_bijectors < 1:
            raise ValueError(f"num_bijectors must be >= 1, got {self.num_bijectors}")
        dim = x.shape[-1]
        m = dim // 2
        z, log_det = x, jnp.zeros(x.shape[:-1], x.dtype)
        for i in reversed(range(self.num_bijectors)):  # density direction: last bijector first
            if self.kind == "maf":
                net = MADE(
                    self.hidden_sizes, self.activation, self.kernel_init, name=f"bijector_{i}"
                )
                shift, log_scale = net(z)
                log_scale = jnp.clip(log_scale, *LOG_SCALE_CLIP)
                z = (z - shift) * jnp.exp(-log_scale)
            else:
                net = NVPNet(
                    self.hidden_sizes,
                    dim - m,
                    self.activation,
                    self.kernel_init,
                    name=f"bijector_{i}",
                )
                shift, log_scale = net(z[..., :m])
                log_scale = jnp.clip(log_scale, *LOG_SCALE_CLIP)
                z = jnp.concatenate([z[..., :m], (z[..., m:] - shift) * jnp.exp(-log_scale)], -1)
            z = jnp.clip(z, -Z_CLIP, Z_CLIP)
            log_det = log_det - jnp.sum(log_scale, axis=-1)
            if i > 0:  # undo the permutation that followed bijector i - 1 when sampling
                z = z[..., np.argsort(permutation(i - 1, dim))]
        return standard_normal_log_prob(z) + log_det
