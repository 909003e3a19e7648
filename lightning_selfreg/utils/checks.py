"""Argument checks shared by several constructors, and :class:`SettingError`, the error that names its parameter."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

__all__ = ["SettingError", "check_int", "check_weight"]


class SettingError(ValueError):
    """A constructor argument has a bad value; :attr:`parameter` names it as data, the message says the rest.

    It is a ``ValueError``, so code that catches those is unaffected. A command line reads :attr:`parameter` to
    name the setting (``--model.lr``, ``--data.batch_size``) without parsing the message.

    Args:
        parameter: The constructor parameter whose value is wrong (e.g. ``"lr"``).
        message: One line: what was expected and what was found (it usually names the parameter too).

    Example:
        >>> err = SettingError("lr", "`lr` must be > 0, found -1.")
        >>> err.parameter, str(err)
        ('lr', '`lr` must be > 0, found -1.')
        >>> isinstance(err, ValueError)
        True
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter

    def __reduce__(self) -> tuple:  # pickled across processes (DataLoader workers, DDP) with its parameter
        return type(self), (self.parameter, str(self))


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (not a bool); a :class:`SettingError` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise SettingError(name, f"`{name}` must be an int >= {minimum}, found {value!r}.")
    return int(value)


def check_weight(name: str, value: Any) -> None:
    """Raise a :class:`SettingError` naming ``name`` unless ``value`` is a finite real number >= 0 (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise SettingError(name, f"`{name}` must be a finite number >= 0, found {value!r}.")
