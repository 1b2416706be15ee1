"""Gradient estimators by name: ``build_estimator(name, unroll, options)``.

Each entry is a constructor taking the truncated unroll and the estimator's options, a
one-line description and the options' defaults. ``estimator.config()`` returns the options
an estimator was built with, so ``{"name": ..., "config": ...}`` (from
:func:`estimator_config`) rebuilds it through :func:`build_estimator`::

    est = build_estimator("pes", unroll, {"std": 0.02})
    spec = estimator_config(est)  # {"name": "pes", "config": {"std": 0.02, "num_pairs": 1}}
    same = build_estimator(spec["name"], unroll, spec["config"])

The ES estimators take ``std`` (perturbation standard deviation) and ``num_pairs`` (antithetic
pairs per inner run of the unroll; docs/derivations.md §1.3); ``full_es`` also ``objective``
(``"mean"`` or ``"final"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from learnopt.meta.estimators.base import GradientEstimator
from learnopt.meta.estimators.full_es import FullES
from learnopt.meta.estimators.pes import PES
from learnopt.meta.estimators.tbptt import TruncatedBPTT
from learnopt.meta.unroll import TruncatedUnroll


class EstimatorEntry(NamedTuple):
    """``constructor(unroll, **options, jit=...)``, a description and the default options."""

    constructor: Callable[..., GradientEstimator]
    description: str
    defaults: Mapping[str, Any]


def _truncated_es(
    unroll: TruncatedUnroll, std: float = 0.01, num_pairs: int = 1, jit: bool = True
) -> PES:
    return PES(unroll, std=std, num_pairs=num_pairs, accumulate=False, jit=jit)


ESTIMATORS: dict[str, EstimatorEntry] = {
    "pes": EstimatorEntry(
        PES,
        "Persistent Evolution Strategies, antithetic (Vicol et al. 2021, arXiv:2112.13835)",
        {"std": 0.01, "num_pairs": 1},
    ),
    "truncated_es": EstimatorEntry(
        _truncated_es,
        "antithetic ES over one truncation, no PES accumulator (biased to short horizons)",
        {"std": 0.01, "num_pairs": 1},
    ),
    "tbptt": EstimatorEntry(
        TruncatedBPTT, "truncated backpropagation through time over one truncation", {}
    ),
    "full_es": EstimatorEntry(
        FullES,
        "antithetic ES over whole inner runs, mean or final loss (VeLO, arXiv:2211.09760)",
        {"std": 0.01, "num_pairs": 1, "objective": "mean"},
    ),
}


def list_estimators() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered estimator."""
    return [(name, entry.description) for name, entry in ESTIMATORS.items()]


def _entry(name: str) -> EstimatorEntry:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimator_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The named estimator's defaults updated with ``options``; unknown keys raise."""
    defaults = dict(_entry(name).defaults)
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) if defaults else "none"
        raise ValueError(
            f"unknown options {unknown} for estimator {name!r}; accepted: {accepted}"
        )
    return {**defaults, **options}


def build_estimator(
    name: str,
    unroll: TruncatedUnroll,
    options: Mapping[str, Any] | None = None,
    *,
    jit: bool = True,
) -> GradientEstimator:
    """The named estimator over ``unroll`` with ``options`` (defaults for missing ones)."""
    return _entry(name).constructor(unroll, **estimator_options(name, options), jit=jit)


def estimator_config(estimator: GradientEstimator) -> dict[str, Any]:
    """``{"name": registry name, "config": options}``, JSON-ready; see :func:`build_estimator`."""
    _entry(estimator.name)
    return {"name": estimator.name, "config": estimator.config()}
