"""Checks of run-config fields shared by meta-training and population configs.

Each raises ``ValueError`` with the field's name and value; booleans are never numbers here.
"""

from __future__ import annotations

import math
from typing import Any


def check_positive_int(name: str, value: Any, hint: str = "") -> None:
    """``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")


def check_seconds(name: str, value: Any, hint: str = "") -> None:
    """``value`` is None or a finite number > 0."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float)
        or not math.isfinite(value) or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}{hint}")


def check_seed(value: Any) -> None:
    """``value`` is an int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}")
