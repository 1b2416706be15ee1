"""Argument checks shared by the hand-designed optimizers (arXiv:2203.11860, §2.1, App. F).

Each check looks only at concrete values (Python numbers, numpy scalars, concrete
jax arrays). Traced values (inside ``jit``/``vmap``/``grad``) pass unchecked, so a
sweep can vmap over learning rates or NAdamW configurations.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_float(value: Any, name: str) -> float | None:
    """``value`` as a Python float, or None when it is traced (not checkable).

    Raises ValueError for booleans and for anything that is not a real scalar.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a real number, got the boolean {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise ValueError(f"{name} must be a real number, got {value!r}") from err
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    return float(arr)


def check_learning_rate(learning_rate: Any, name: str = "learning_rate") -> None:
    """Raise ValueError unless ``learning_rate`` is a finite number > 0.

    A callable (an optax schedule) and a traced value are accepted unchecked.
    """
    if callable(learning_rate):
        return
    value = concrete_float(learning_rate, name)
    if value is None:
        return
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {learning_rate!r}")


def check_range(
    value: Any,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ValueError unless ``low <= value <= high`` (or strict where open)."""
    v = concrete_float(value, name)
    if v is None:
        return
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")


def check_num_steps(num_steps: Any) -> None:
    """Raise ValueError unless ``num_steps`` is an integer >= 1 (traced: unchecked)."""
    if num_steps is None:
        raise ValueError("num_steps is required (the length of the run, for the schedule)")
    if isinstance(num_steps, jax.core.Tracer):
        return
    if isinstance(num_steps, bool | np.bool_):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    value = concrete_float(num_steps, "num_steps")
    if value is None:
        return
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
