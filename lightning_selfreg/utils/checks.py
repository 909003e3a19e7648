"""Argument checks shared by several constructors; each raises a ``ValueError`` that names the argument."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

__all__ = ["check_weight"]


def check_weight(name: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite real number >= 0 (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, found {value!r}.")
