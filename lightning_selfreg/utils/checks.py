"""Argument checks shared by several constructors, and :class:`SettingError`, the error that names its parameter."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

__all__ = ["SettingError", "check_int", "check_num_classes", "check_spatial_dims", "check_weight", "label_problem"]


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


def check_num_classes(num_classes: Any, name: str = "num_classes") -> int:
    """``num_classes`` as an int >= 2 (background + at least one class); a :class:`SettingError` naming ``name``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise SettingError(name, f"`{name}` must be an int >= 2 (background included), found {num_classes!r}.")
    return int(num_classes)


def check_weight(name: str, value: Any) -> None:
    """Raise a :class:`SettingError` naming ``name`` unless ``value`` is a finite real number >= 0 (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise SettingError(name, f"`{name}` must be a finite number >= 0, found {value!r}.")


def check_spatial_dims(spatial_dims: Any) -> int:
    """``spatial_dims`` if it is 2 or 3 (a 2D or a 3D network), else a :class:`SettingError` naming it."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, Integral) or spatial_dims not in (2, 3):
        raise SettingError("spatial_dims", f"`spatial_dims` must be 2 or 3, found {spatial_dims!r}.")
    return int(spatial_dims)


def _number(value: Any) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def label_problem(label: Any, num_classes: int) -> str | None:
    """What is wrong with ``label`` as a map of class indices in ``[0, num_classes)``, or None when nothing is.

    The one label check of the package: the readers, the nnU-Net pre-flight, the metrics and the module's first
    batch call it and put the answer in their own error (naming their file or argument).

    Args:
        label: A NumPy array or a torch tensor of any shape; integer or bool, or float holding whole numbers.
            A tensor is reduced where it lives, with one host transfer (the module's first batch on a GPU).
        num_classes: Number of classes ``K``, background included.

    Returns:
        ``"expected class indices in [0, K), found ..."`` (a non-numeric dtype, non-integer values, or the range
        of the values found), or None.

    Example:
        >>> label_problem(np.array([[0, 2], [1, 0]]), 3) is None
        True
        >>> label_problem(np.array([0, 14.0]), 9)
        'expected class indices in [0, 9), found values in [0, 14]'
        >>> label_problem(np.array([0.5]), 9)
        'expected class indices in [0, 9), found non-integer values (e.g. 0.5)'
    """
    expected = f"expected class indices in [0, {num_classes}), found"
    if isinstance(label, torch.Tensor):  # reduced on its device, then one transfer
        if label.numel() == 0:
            return None
        values = label.detach()
        floating = values.is_floating_point()
        if values.dtype.is_complex:
            return f"{expected} dtype {values.dtype}"
        values = values.float() if floating else values.long()
        stats = [values.amin(), values.amax()]
        if floating:
            stats.append((values - values.round()).abs().nan_to_num(nan=1.0).amax())
        low, high, *fraction = torch.stack(stats).tolist()
        if fraction and fraction[0] > 0:
            return f"{expected} non-integer values"
    else:
        values = np.asarray(label)
        if values.dtype == bool:
            values = values.astype(np.uint8)
        if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
            return f"{expected} dtype {values.dtype}"
        if values.size == 0:
            return None
        if np.issubdtype(values.dtype, np.floating):
            fraction = values[values != np.round(values)]  # NaN lands here too
            if fraction.size:
                return f"{expected} non-integer values (e.g. {fraction.flat[0].item()!r})"
        low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
        return f"{expected} values in [{_number(low)}, {_number(high)}]"
    return None
