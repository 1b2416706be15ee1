"""Task augmentations: wrappers that change a task's optimization dynamics.

Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv:2211.09760, App. C.5. The wrappers are in :mod:`.wrappers`; sampling them
with the paper's probabilities and applying a sampled config is in :mod:`.sampling`.
"""

from learnopt.tasks.augment.sampling import (
    CONFIG_TYPES,
    ES_PAIRS,
    PROBABILITIES,
    REPARAM_LEVEL_CHOICES,
    REPARAM_RANGES,
    AugmentationConfig,
    apply,
    log_uniform,
    log_uniform_int,
    parse_augmentation,
    rng_from_key,
    sample_augmentation,
)
from learnopt.tasks.augment.wrappers import (
    REPARAM_LEVELS,
    BFloat16Task,
    DelayedGradientTask,
    GradientModifiedTask,
    ReducedBatchTask,
    ReparameterizedTask,
    TaskWrapper,
    delayed_gradients,
    directional_expectation_factor,
    directional_gradient,
    es_gradient,
    modify_gradient,
    normal_tree,
    normalize_gradient,
    num_parameters,
    reduce_batch_size,
    reparameterize,
    reparameterize_random,
    to_bfloat16,
    unflatten_vector,
    uniform_tree,
)

__all__ = [
    "CONFIG_TYPES", "ES_PAIRS", "PROBABILITIES", "REPARAM_LEVELS", "REPARAM_LEVEL_CHOICES",
    "REPARAM_RANGES", "AugmentationConfig", "BFloat16Task", "DelayedGradientTask",
    "GradientModifiedTask", "ReducedBatchTask", "ReparameterizedTask", "TaskWrapper", "apply",
    "delayed_gradients", "directional_expectation_factor", "directional_gradient",
    "es_gradient", "log_uniform", "log_uniform_int", "modify_gradient", "normal_tree",
    "normalize_gradient", "num_parameters", "parse_augmentation", "reduce_batch_size",
    "reparameterize",
    "reparameterize_random", "rng_from_key", "sample_augmentation", "to_bfloat16",
    "unflatten_vector", "uniform_tree",
]
