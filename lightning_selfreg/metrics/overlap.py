"""Overlap of binary masks: the Dice coefficient."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["binary_pair", "class_dice", "dice"]


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


def class_dice(pred: ArrayLike, gt: ArrayLike, num_classes: int) -> np.ndarray:
    """Dice of every foreground class of a label map in one pass: :func:`dice` of ``pred == c`` and ``gt == c``.

    One confusion-matrix count (``bincount``) replaces ``num_classes - 1`` mask comparisons; torch tensors are
    counted where they are (a GPU prediction is not copied to the host).

    Args:
        pred: Predicted labels in ``[0, num_classes)``, any shape ``(*S)`` (NumPy array or torch tensor).
        gt: Ground-truth labels, shape ``(*S)``.
        num_classes: Number of classes ``K`` including the background 0.

    Returns:
        float64 array ``(K - 1,)``: entry ``c - 1`` is class ``c``'s Dice, NaN where both masks are empty (as
        :func:`dice`, the ``"strict"`` protocol's Dice).

    Raises:
        ValueError: If the shapes differ.

    Example:
        >>> class_dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
        array([0.66666667, 0.66666667,        nan])
    """
    import torch

    p, g = torch.as_tensor(pred), torch.as_tensor(gt)
    if p.shape != g.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, found pred {tuple(p.shape)} and gt "
                         f"{tuple(g.shape)}.")
    k = int(num_classes)
    counts = torch.bincount((g.reshape(-1).long() * k + p.to(g.device).reshape(-1).long()), minlength=k * k)
    matrix = counts.reshape(k, k).cpu().numpy().astype(np.float64)  # rows: ground truth, columns: prediction
    total = matrix.sum(0) + matrix.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 2.0 * np.diag(matrix) / total
    return np.where(total > 0, out, math.nan)[1:]
