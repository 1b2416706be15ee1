"""Learned optimizers by name: ``get_learned_optimizer(name)``, ``list_learned_optimizers()``."""

from __future__ import annotations

from collections.abc import Callable

from learnopt.learned.adafac_mlp import SmallFcLOpt
from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.hierarchical_rnn import HierarchicalRNN
from learnopt.learned.learnable import LearnableAdam, LearnableSGD, LearnableSGDM
from learnopt.learned.mlp import FcLOpt
from learnopt.learned.nn_adam import NNAdam
from learnopt.learned.rnn_mlp import RnnFcLOpt
from learnopt.learned.velo import Velo

LEARNED: dict[str, tuple[Callable[[], LearnedOptimizer], str]] = {
    "small_fc_lopt": (SmallFcLOpt, "per-parameter 39->4->4->2 MLP, 197 meta-params (seed 004)"),
    "fc_lopt": (FcLOpt, "per-parameter 19->32->32->2 MLP, 1762 meta-params (seed 004)"),
    "nn_adam": (NNAdam, "per-tensor LSTM setting Adam's hyperparameters (seed 004 App. C)"),
    "rnn_fc_lopt": (RnnFcLOpt, "per-tensor LSTM + per-parameter MLP, LSTM_FF (seed 000 App. C)"),
    "hierarchical_rnn": (HierarchicalRNN, "3-level GRU hierarchy, 8093 meta-params (seed 002)"),
    "velo": (Velo, "VeLO LSTM hypernetwork, paper size 2,316,289 meta-params (seed 001 App. B)"),
    "velo_small": (Velo.small, "VeLO at CPU size: LSTM 16, bank of 8 (4,961 meta-params)"),
    "learnable_sgd": (LearnableSGD, "SGD with a meta-learned learning rate"),
    "learnable_sgdm": (LearnableSGDM, "SGD with meta-learned learning rate and momentum"),
    "learnable_adam": (LearnableAdam, "Adam with meta-learned lr, betas and eps"),
}


def list_learned_optimizers() -> list[tuple[str, str]]:
    return [(name, desc) for name, (_, desc) in LEARNED.items()]


def get_learned_optimizer(name: str) -> LearnedOptimizer:
    """A fresh learned optimizer of the named architecture (default sizes)."""
    if name not in LEARNED:
        raise ValueError(f"unknown learned optimizer {name!r}; valid: {', '.join(LEARNED)}")
    return LEARNED[name][0]()
