"""The two evaluation protocols of a multi-class case: per-class Dice and HD95 of one prediction.

**Protocols** for a multi-class case (:func:`case_metrics`):

* ``"transunet"`` reproduces ``calculate_metric_percase`` of the TransUNet / Swin-Unet / SelfReg-UNet scripts:
  voxel units (spacing ignored), pooled HD95, a predicted organ absent from the ground truth scores (1, 0),
  an empty prediction scores (0, 0) whatever the ground truth, so a missed organ gets an optimistic HD95 of 0.
* ``"strict"``: physical units from ``spacing``, both-empty classes are excluded (NaN), and a class present in
  exactly one of the two volumes scores Dice 0 and the worst-case HD95 (:func:`worst_case_distance`).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
from numpy.typing import ArrayLike

from lightning_selfreg.metrics.distance import (
    SpacingLike,
    check_hd95_mode,
    hd95,
    normalize_spacing,
    worst_case_distance,
)
from lightning_selfreg.metrics.overlap import dice
from lightning_selfreg.utils.checks import check_num_classes, label_problem

__all__ = ["PROTOCOLS", "Protocol", "case_metrics"]

# The evaluation protocols of :func:`case_metrics`, in the order the module computes, logs and tabulates them
# (``SelfRegSegModule.test_results_by_protocol``, the rows of a run's metrics.md): strict first.
Protocol = Literal["strict", "transunet"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)


def _label_volume(x: ArrayLike, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(x)
    problem = label_problem(arr, num_classes)
    if problem is not None:
        raise ValueError(f"`{name}`: {problem} (num_classes={num_classes}).")
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def case_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    num_classes: int,
    spacing: SpacingLike = None,
    protocol: str = "strict",
    hd95_mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-foreground-class Dice and HD95 of one case (a 2D image or a 3D volume of labels).

    Class ``c`` (``1 <= c < num_classes``) is scored on the binary masks ``pred == c`` and ``gt == c``:

    ================================  ============================  ==================================
    situation                         ``"transunet"``               ``"strict"``
    ================================  ============================  ==================================
    both non-empty                    (dice, pooled hd95, voxels)   (dice, hd95 in ``spacing`` units)
    ``pred`` non-empty, ``gt`` empty  (1, 0)                        (0, worst case)
    ``pred`` empty, ``gt`` non-empty  (0, 0)                        (0, worst case)
    both empty                        (0, 0)                        (NaN, NaN): excluded from means
    ================================  ============================  ==================================

    The worst case is :func:`worst_case_distance` of the volume: the diagonal of its field of view in physical
    units. ``"transunet"`` ignores ``spacing`` (the reference scripts call medpy without it).

    Args:
        pred: Predicted labels, integer array of shape ``(*S)`` with values in ``[0, num_classes)``. Floats holding
            integral values (e.g. labels read from HDF5) are accepted.
        gt: Ground-truth labels, shape ``(*S)``.
        num_classes: Number of classes including the background label 0.
        spacing: Voxel size per axis (or a scalar) in physical units, used by ``"strict"`` only.
        protocol: ``"transunet"`` or ``"strict"``, see the table.
        hd95_mode: HD95 convention for ``"strict"`` (``"pooled"`` if None, or ``"max_directed"``), see :func:`hd95`.
            ``"transunet"`` only allows None or ``"pooled"``.

    Returns:
        ``(dice, hd95)``, two float64 arrays of shape ``(num_classes - 1,)``; entry ``c - 1`` is class ``c``.

    Raises:
        ValueError: On an unknown ``protocol`` / ``hd95_mode``, ``num_classes < 2``, shape mismatch, malformed
            ``spacing``, or labels that are not class indices in ``[0, num_classes)`` (non-numeric dtypes included).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {PROTOCOLS}, found {protocol!r}.")
    if hd95_mode is not None:
        check_hd95_mode(hd95_mode, "hd95_mode")
        if protocol == "transunet" and hd95_mode != "pooled":
            raise ValueError(
                f"`hd95_mode` must be None or 'pooled' with protocol='transunet' (the reference scripts use "
                f"medpy's pooled hd95), found {hd95_mode!r}; use protocol='strict' for other modes."
            )
    mode = hd95_mode or "pooled"
    check_num_classes(num_classes)
    p_lab = _label_volume(pred, "pred", num_classes)
    g_lab = _label_volume(gt, "gt", num_classes)
    if p_lab.shape != g_lab.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, found pred {p_lab.shape} and gt {g_lab.shape}.")
    if p_lab.ndim == 0:
        raise ValueError("`pred` and `gt` must have at least one dimension, found 0-d arrays.")
    sp = None if protocol == "transunet" else normalize_spacing(spacing, p_lab.ndim)

    k = num_classes - 1
    dices = np.empty(k, dtype=np.float64)
    hds = np.empty(k, dtype=np.float64)
    worst = None if protocol == "transunet" else worst_case_distance(p_lab.shape, sp)
    for c in range(1, num_classes):
        p, g = p_lab == c, g_lab == c
        p_any, g_any = bool(p.any()), bool(g.any())
        if p_any and g_any:
            dices[c - 1], hds[c - 1] = dice(p, g), hd95(p, g, sp, mode=mode)
        elif protocol == "transunet":
            dices[c - 1], hds[c - 1] = (1.0, 0.0) if p_any else (0.0, 0.0)
        elif p_any or g_any:
            dices[c - 1], hds[c - 1] = 0.0, worst
        else:
            dices[c - 1], hds[c - 1] = math.nan, math.nan
    return dices, hds
