"""The driver's loop: apply workers' meta-gradients in arrival order with the staleness rule.

Metz et al. 2020 (arXiv:2009.11243, App. H.1): the learner takes what the workers send,
throws away estimates too far from the current weights, and updates theta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from learnopt.meta.learner import Learner, LearnerState


def run_learner(
    gradients: Any,
    learner: Learner,
    state: LearnerState,
    num_updates: int,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[LearnerState, list[dict[str, Any]]]:
    """Apply gradients from ``gradients.next(theta, version)`` (e.g. RayMetaGradients) until
    ``state.step == num_updates``; results left over in the last batch are not applied.

    Returns the learner state and one record per gradient received: the worker's metrics,
    ``version``, ``staleness``, ``applied`` and ``step`` (the learner step after it).
    """
    records: list[dict[str, Any]] = []
    while int(state.step) < num_updates:
        for grad, version, metrics in gradients.next(state.theta, int(state.step)):
            staleness = learner.staleness(state, version)
            state, applied = learner.apply(state, grad, version)
            record = {**metrics, "version": version, "staleness": staleness,
                      "applied": applied, "step": int(state.step)}
            records.append(record)
            if on_record is not None:
                on_record(record)
            if int(state.step) >= num_updates:
                break
    return state, records
