"""Hand-designed optimizers as optax transformations, with their search spaces.

The baselines of Metz et al. 2022 ("Practical tradeoffs", arXiv:2203.11860), §2.1 and
App. F: SGD, SGD with
momentum 0.9, Adam, and NAdamW (Nesterov Adam, AdamW decay, cosine schedule
with warm-up; App. F.1) with its random-search space (App. F.2) and the
learning-rate grid used to tune the others.

    from learnopt.optimizers import get_optimizer
    opt = get_optimizer("nadamw", learning_rate=3e-4, num_steps=2000)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, loss=loss)
"""

from learnopt.optimizers.hand import adam, sgd, sgdm
from learnopt.optimizers.nadamw import NAdamWConfig, NAdamWState, nadamw, nadamw_from_config
from learnopt.optimizers.registry import (
    OPTIMIZERS,
    OptimizerInfo,
    get_optimizer,
    list_optimizers,
)
from learnopt.optimizers.schedules import cosine_warmup_schedule
from learnopt.optimizers.search import (
    LR_GRID,
    NADAMW_LOG_RANGES,
    sample_nadamw_config,
    sample_nadamw_configs,
)

__all__ = [
    "LR_GRID",
    "NADAMW_LOG_RANGES",
    "OPTIMIZERS",
    "NAdamWConfig",
    "NAdamWState",
    "OptimizerInfo",
    "adam",
    "cosine_warmup_schedule",
    "get_optimizer",
    "list_optimizers",
    "nadamw",
    "nadamw_from_config",
    "sample_nadamw_config",
    "sample_nadamw_configs",
    "sgd",
    "sgdm",
]
