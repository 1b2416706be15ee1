"""The one registry of sampled task families: name -> (constructor, one-line description).

Names:

* ``velo_<name>``: the nine families of Metz et al. 2022, VeLO, arXiv:2211.09760, App. C.3
  (:mod:`learnopt.tasks.families.velo`, :mod:`learnopt.tasks.families.lopt`). Their
  ``family.name`` and ``config.family`` are the short ``<name>`` (``mlp``, ..., ``lopt``),
  which the step-time model of :mod:`learnopt.tasks.timing` is keyed by.
* ``taskset_<name>``: the eleven TaskSet families of Metz et al. 2020, "Tasks, stability,
  architecture, and compute", arXiv:2009.11243, App. I.2
  (:mod:`learnopt.tasks.families.taskset`; ``taskset_losg_tasks`` is App. I.2.8).
* ``synthetic``: the ensemble of Wichrowska et al. 2017, arXiv:1703.04813, §4.1
  (:mod:`learnopt.tasks.families.synthetic`).
* ``quadratic``: sampled quadratics (:mod:`learnopt.tasks.families.quadratic`).

``get_family(name, **kwargs)`` calls the constructor with ``kwargs`` (each group takes its
own options: VeLO ``size`` / ``data`` / ``substitutes``; TaskSet ``limits`` /
``substitutes`` / ``synthetic``; synthetic ``max_dim`` / ``max_examples`` / ``kinds``;
quadratic ``min_dim`` / ``max_dim``). Every family is a :class:`~learnopt.tasks.base.TaskFamily`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from learnopt.tasks.base import TaskFamily, config_from_dict
from learnopt.tasks.families import lopt, synthetic, taskset, velo
from learnopt.tasks.families.quadratic import QuadraticConfig, QuadraticFamily

VELO_PREFIX = "velo_"
TASKSET_PREFIX = "taskset_"


class FamilyEntry(NamedTuple):
    constructor: Callable[..., TaskFamily]
    description: str


_VELO = {
    "mlp": "VeLO C.3.1: MLP image classifiers",
    "conv": "VeLO C.3.2: ConvNet image classifiers",
    "mlp_ae": "VeLO C.3.3: MLP image auto-encoders",
    "mlp_vae": "VeLO C.3.4: MLP image VAEs",
    "resnet": "VeLO C.3.5: ResNet image classifiers",
    "rnn_lm": "VeLO C.3.6: RNN language models",
    "transformer_lm": "VeLO C.3.7: Transformer language models",
    "vit": "VeLO C.3.8: Vision Transformer image classifiers",
    "lopt": "VeLO C.3.9: meta-training a learned optimizer on an inner MLP task",
}
_TASKSET = {
    "mlp": "TaskSet I.2.1: MLP image classifiers",
    "mlp_ae": "TaskSet I.2.2: MLP image auto-encoders",
    "mlp_vae": "TaskSet I.2.3: MLP image VAEs",
    "conv_pooling": "TaskSet I.2.4: ConvNets with spatial pooling",
    "conv_fc": "TaskSet I.2.5: ConvNets with fully connected layers",
    "char_rnn_language_model": "TaskSet I.2.6: character-level RNN language models",
    "word_rnn_language_model": "TaskSet I.2.7: word-level RNN language models",
    "rnn_text_classification": "TaskSet I.2.12: RNN text classifiers",
    "losg_tasks": "TaskSet I.2.8: resampled Wichrowska et al. 2017 (LOSG) problems",
    "maf": "TaskSet I.2.9: masked autoregressive flows on images",
    "nvp": "TaskSet I.2.10: real NVP flows on images",
}

FAMILIES: dict[str, FamilyEntry] = {
    **{
        VELO_PREFIX + c.name: FamilyEntry(c, _VELO[c.name])
        for c in (*velo.FAMILY_CLASSES, lopt.LOptFamily)
    },
    **{TASKSET_PREFIX + c.key: FamilyEntry(c, _TASKSET[c.key]) for c in taskset.FAMILY_CLASSES},
    "synthetic": FamilyEntry(
        synthetic.SyntheticFamily,
        "Wichrowska et al. 2017 §4.1: synthetic problems, transformations, multi-task sums",
    ),
    "quadratic": FamilyEntry(
        QuadraticFamily, "0.5 ||A x - b||^2 with controlled singular values, optional noise"
    ),
}

# Every config type of every family, by class name (names are unique across families).
CONFIG_TYPES: dict[str, type] = {
    **velo.CONFIG_TYPES,
    **lopt.CONFIG_TYPES,
    **taskset.CONFIG_TYPES,
    **synthetic.CONFIG_TYPES,
    "QuadraticConfig": QuadraticConfig,
}


def list_families() -> list[tuple[str, str]]:
    """``[(name, one-line description)]`` of every registered family."""
    return [(name, entry.description) for name, entry in FAMILIES.items()]


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """The family ``name`` built with ``kwargs``; an unknown name lists the valid ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[name].constructor(**kwargs)


def velo_names() -> list[str]:
    """The short names of the VeLO families (``mlp``, ..., ``lopt``)."""
    return [n.removeprefix(VELO_PREFIX) for n in FAMILIES if n.startswith(VELO_PREFIX)]


def velo_families(names: Iterable[str] | None = None, **kwargs: Any) -> dict[str, TaskFamily]:
    """VeLO families keyed by short name (all nine by default), built with ``kwargs``.

    ``names`` may be short (``mlp``) or registry names (``velo_mlp``).
    """
    valid = velo_names()
    names = valid if names is None else [n.removeprefix(VELO_PREFIX) for n in names]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown family {unknown[0]!r}; valid families: {', '.join(valid)}")
    return {n: get_family(VELO_PREFIX + n, **kwargs) for n in names}


def family_config_from_dict(data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`learnopt.tasks.base.config_to_dict` for the config of any family."""
    return config_from_dict(data, CONFIG_TYPES)


__all__ = [
    "CONFIG_TYPES",
    "FAMILIES",
    "FamilyEntry",
    "family_config_from_dict",
    "get_family",
    "list_families",
    "velo_families",
    "velo_names",
]
