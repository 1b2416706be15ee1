"""Character-level language modelling tasks (Metz et al. 2020, "Tasks, stability, architecture,
and compute", arXiv:2009.11243, App. I.2.6, char_rnn_language_model).

A corpus is encoded with its own character vocabulary and cut into contiguous
pieces: train [0, 80%), inner_valid [80, 90%), outer_valid [90, 95%) and test
[95, 100%) of the characters, so no window crosses two splits. Batches are
random windows of ``seq_len + 1`` characters.
"""

from __future__ import annotations

import math
from itertools import pairwise

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learnopt.tasks.base import Datasets, SequenceSplit, Task, clip_normalizer

SPLIT_BOUNDS = (0.0, 0.8, 0.9, 0.95, 1.0)


def text_datasets(tokens: np.ndarray, vocab_size: int, batch_size: int, seq_len: int) -> Datasets:
    """Four contiguous, disjoint splits of one token stream."""
    n = len(tokens)
    cuts = [int(round(b * n)) for b in SPLIT_BOUNDS]
    splits = [SequenceSplit(tokens[a:b], batch_size, seq_len) for a, b in pairwise(cuts)]
    return Datasets(*splits, extra_info={"vocab_size": vocab_size, "seq_len": seq_len})


def load_text_datasets(name: str, batch_size: int, seq_len: int) -> Datasets:
    """Datasets for a registered text corpus, encoded at the character level."""
    from learnopt.tasks.data import registry, text

    corpus = registry.load(name)
    vocab = text.char_vocab(corpus)
    return text_datasets(text.encode(corpus, vocab), len(vocab), batch_size, seq_len)


class LanguageModelTask(Task):
    """Mean next-token cross-entropy (nats per character) of a flax sequence model.

    The normalizer clips at ``1.5 ln V`` for vocabulary size ``V``, the same
    rule as the classification tasks (a uniform predictor scores ``ln V``).
    """

    def __init__(self, name: str, model: nn.Module, datasets: Datasets):
        self.name = name
        self.model = model
        self.datasets = datasets
        self.seq_len = int(datasets.extra_info["seq_len"])
        self._normalize = clip_normalizer(1.5 * math.log(datasets.extra_info["vocab_size"]))

    def init(self, key: jax.Array):
        return self.model.init(key, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def _loss_and_logits(self, params, tokens):
        logits = self.model.apply({"params": params}, tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, logits

    def loss(self, params, key, batch) -> jax.Array:
        del key
        return self._loss_and_logits(params, batch["tokens"])[0]

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return self._normalize(loss)

    def metrics(self, params, batch) -> dict[str, jax.Array]:
        loss, logits = self._loss_and_logits(params, batch["tokens"])
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["tokens"][:, 1:])
        return {"loss": loss, "accuracy": acc, "bits_per_char": loss / math.log(2.0)}
