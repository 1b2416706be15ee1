"""flax.linen models used by the fixed tasks.

* ``MLP``: flatten, ReLU hidden layers, linear head (Metz et al. 2022, "Practical tradeoffs",
  arXiv:2203.11860, App. B.1).
* ``ConvNet``: the App. B.2 network of the same paper: three 3x3 SAME convolutions with
  ReLU (32 channels stride 2, then 64 and 64 stride 1), a mean over the spatial
  dimensions, and a linear head. The convolutions are :class:`learnopt.tasks.models.conv.Conv`
  (``nn.Conv``'s parameters and outputs, fast gradients inside ``lax.scan`` on XLA:CPU).
* ``CharLSTM``: an embedding, one LSTM layer and a linear head over the
  vocabulary (the character language model of Metz et al. 2020, arXiv:2009.11243,
  App. I.2.6, at fixed sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from learnopt.tasks.models.conv import Conv


class MLP(nn.Module):
    hidden_sizes: Sequence[int]
    num_outputs: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


class ConvNet(nn.Module):
    channels: Sequence[int] = (32, 64, 64)
    strides: Sequence[int] = (2, 1, 1)
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:  # (batch, H, W) greyscale
            x = x[..., None]
        for c, s in zip(self.channels, self.strides, strict=True):
            x = nn.relu(Conv(c, (3, 3), strides=(s, s), padding="SAME")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_outputs)(x)


class CharLSTM(nn.Module):
    vocab_size: int
    embed_size: int = 32
    hidden_size: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.embed_size)(tokens)
        x = nn.RNN(nn.OptimizedLSTMCell(self.hidden_size))(x)
        return nn.Dense(self.vocab_size)(x)
