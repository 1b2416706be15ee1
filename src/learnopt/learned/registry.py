"""Learned optimizers by name, and their configs.

``get_learned_optimizer(name, config)`` builds an architecture from its registry name and
constructor hyperparameters; ``learned_optimizer_config(lopt)`` is the JSON-ready inverse::

    spec = learned_optimizer_config(SmallFcLOpt(hidden_size=8))
    # {"name": "small_fc_lopt", "config": {"hidden_size": 8, ...}}
    lopt = learned_optimizer_from_config(spec["name"], spec["config"])   # an equal optimizer

Every registered class has ``config() -> dict`` (its constructor arguments, JSON types
only), so a checkpoint or a shipped pretrained file stores the architecture as a name and a
config and rebuilds it without the code that wrote it guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from learnopt.learned.adafac_mlp import SmallFcLOpt
from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.hierarchical_rnn import HierarchicalRNN
from learnopt.learned.learnable import LearnableAdam, LearnableSGD, LearnableSGDM
from learnopt.learned.mlp import FcLOpt
from learnopt.learned.nn_adam import NNAdam
from learnopt.learned.rnn_mlp import RnnFcLOpt
from learnopt.learned.velo import Velo


class LearnedEntry(NamedTuple):
    """A registry entry: ``constructor(**config)`` builds the optimizer; one-line description."""

    constructor: Callable[..., LearnedOptimizer]
    description: str


_TRADEOFFS = "Metz et al. 2022, arXiv:2203.11860"

LEARNED: dict[str, LearnedEntry] = {
    "small_fc_lopt": LearnedEntry(
        SmallFcLOpt, f"per-parameter 39->4->4->2 MLP, 197 meta-params ({_TRADEOFFS})"
    ),
    "fc_lopt": LearnedEntry(
        FcLOpt, f"per-parameter 19->32->32->2 MLP, 1762 meta-params ({_TRADEOFFS})"
    ),
    "nn_adam": LearnedEntry(
        NNAdam, f"per-tensor LSTM setting Adam's hyperparameters ({_TRADEOFFS}, App. C)"
    ),
    "rnn_fc_lopt": LearnedEntry(
        RnnFcLOpt,
        "per-tensor LSTM + per-parameter MLP, LSTM_FF (Metz et al. 2020, arXiv:2009.11243, "
        "App. C)",
    ),
    "hierarchical_rnn": LearnedEntry(
        HierarchicalRNN,
        "3-level GRU hierarchy, 8093 meta-params (Wichrowska et al. 2017, arXiv:1703.04813)",
    ),
    "velo": LearnedEntry(
        Velo,
        "VeLO LSTM hypernetwork, paper size 2,316,289 meta-params (Metz et al. 2022, "
        "arXiv:2211.09760, App. B)",
    ),
    "velo_small": LearnedEntry(
        Velo.small, "VeLO at CPU size: LSTM 16, bank of 8 (4,961 meta-params)"
    ),
    "learnable_sgd": LearnedEntry(LearnableSGD, "SGD with a meta-learned learning rate"),
    "learnable_sgdm": LearnedEntry(
        LearnableSGDM, "SGD with meta-learned learning rate and momentum"
    ),
    "learnable_adam": LearnedEntry(LearnableAdam, "Adam with meta-learned lr, betas and eps"),
}


def list_learned_optimizers() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered architecture."""
    return [(name, entry.description) for name, entry in LEARNED.items()]


def _entry(name: str) -> LearnedEntry:
    if name not in LEARNED:
        raise ValueError(f"unknown learned optimizer {name!r}; valid: {', '.join(LEARNED)}")
    return LEARNED[name]


def default_config(name: str) -> dict[str, Any]:
    """The config of the named architecture at its default hyperparameters."""
    return _entry(name).constructor().config()


def get_learned_optimizer(name: str, config: Mapping[str, Any] | None = None) -> LearnedOptimizer:
    """A fresh learned optimizer of the named architecture.

    ``config`` holds constructor hyperparameters (a subset of :func:`default_config`'s
    keys; the rest keep their defaults). An unknown key raises ``ValueError`` naming the
    accepted ones.
    """
    entry = _entry(name)
    config = dict(config or {})
    if config:
        accepted = default_config(name)
        unknown = sorted(set(config) - set(accepted))
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown} for learned optimizer {name!r}; accepted: "
                f"{', '.join(accepted)}"
            )
    return entry.constructor(**config)


def learned_optimizer_from_config(
    name: str, config: Mapping[str, Any] | None = None
) -> LearnedOptimizer:
    """The inverse of :func:`learned_optimizer_config`: ``name`` and its ``config``."""
    return get_learned_optimizer(name, config)


def learned_optimizer_config(lopt: LearnedOptimizer) -> dict[str, Any]:
    """``{"name": registry name, "config": lopt.config()}``, JSON-ready.

    ``learned_optimizer_from_config(**learned_optimizer_config(lopt))`` builds an equal
    optimizer (same meta-parameter shapes, same updates for the same theta).
    """
    if lopt.name not in LEARNED:
        raise ValueError(
            f"{type(lopt).__name__} (name {lopt.name!r}) is not a registered learned "
            f"optimizer; registered: {', '.join(LEARNED)}"
        )
    config = getattr(lopt, "config", None)
    if config is None:
        raise ValueError(f"{type(lopt).__name__} has no config() method")
    return {"name": lopt.name, "config": config()}
