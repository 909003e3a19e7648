"""Overlap of binary masks: the Dice coefficient."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["binary_pair", "dice"]


def binary_pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``gt`` as boolean arrays of one shape; ``ValueError`` for different shapes or 0-d arrays."""
    p = np.asarray(pred).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, found pred {p.shape} and gt {g.shape}.")
    if p.ndim == 0:
        raise ValueError("`pred` and `gt` must have at least one dimension, found 0-d arrays.")
    return p, g


def dice(pred: ArrayLike, gt: ArrayLike) -> float:
    """Dice coefficient ``2 |P & G| / (|P| + |G|)`` of two binary masks.

    Args:
        pred: Predicted mask, any shape ``(*S)``; non-zero means foreground.
        gt: Ground-truth mask, shape ``(*S)``.

    Returns:
        The Dice coefficient in ``[0, 1]``, or NaN when both masks are empty (the caller's protocol decides what
        that means; medpy's ``dc`` returns 0 there).

    Raises:
        ValueError: If the shapes differ.
    """
    p, g = binary_pair(pred, gt)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return math.nan
    return 2.0 * np.count_nonzero(p & g) / total
