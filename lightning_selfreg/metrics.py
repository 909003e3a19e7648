"""Volume-level segmentation metrics: Dice, HD95, the two evaluation protocols, and a DDP-safe aggregator.

Everything except :class:`PerCaseMetrics` works on NumPy arrays (SciPy computes the distances) and accepts masks of
any dimensionality, ``(H, W)`` slices or ``(D, H, W)`` volumes.

**Surface distances.** The surface of a binary mask is ``mask XOR erode(mask)``, eroded once with the
connectivity-1 structuring element and a border value of 0, so a voxel on the array border is a surface voxel.
The distance of a surface voxel of ``pred`` is the Euclidean distance (in units of ``spacing``, or voxels) to the
nearest surface voxel of ``gt``. This is the definition of medpy's ``metric.binary.__surface_distances``, used
by the TransUNet / Swin-Unet / SelfReg-UNet evaluation scripts.

**Two exact engines** compute the nearest-surface distances (``method`` of :func:`hd95` and
:func:`surface_distances`). ``"edt"``: a Euclidean distance transform of the target surface, as medpy does, on the
bounding box of the two masks. ``"kdtree"``: a ``scipy.spatial.cKDTree`` of the target surface voxels, whose
coordinates are scaled by ``spacing``, queried with the source surface voxels. The KD-tree only finds the nearest
voxel; the distance is then computed from the integer index difference exactly as ``distance_transform_edt``
computes it (``sqrt(sum(((i - j) * spacing) ** 2))`` in axis order, float64), so both engines return the same
numbers up to the choice among equidistant nearest voxels (a last-bit difference at most). The EDT costs time in
proportion to the bounding box, the KD-tree in proportion to the surface, so ``"auto"`` takes the KD-tree when the
box holds more than :data:`KDTREE_BOX_PER_SURFACE` voxels per surface voxel (large organs: on a liver in a
``(100, 512, 512)`` CT the KD-tree is 4-5x faster than the EDT and 17x faster than medpy, one thread; see
``benchmarks/README.md``).

**HD95** comes in two conventions that give different numbers on the same surface-distance sets:

* ``"pooled"``: the 95th percentile of both directed distance sets concatenated (medpy ``hd95``);
* ``"max_directed"``: ``max(p95(pred -> gt), p95(gt -> pred))`` (MONAI ``HausdorffDistanceMetric``).

**Protocols** for a multi-class case (:func:`case_metrics`):

* ``"transunet"`` reproduces ``calculate_metric_percase`` of the TransUNet / Swin-Unet / SelfReg-UNet scripts:
  voxel units (spacing ignored), pooled HD95, a predicted organ absent from the ground truth scores (1, 0),
  an empty prediction scores (0, 0) whatever the ground truth, so a missed organ gets an optimistic HD95 of 0.
* ``"strict"``: physical units from ``spacing``, both-empty classes are excluded (NaN), and a class present in
  exactly one of the two volumes scores Dice 0 and the worst-case HD95 (:func:`worst_case_distance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "HD95_METHODS",
    "HD95_MODES",
    "KDTREE_BOX_PER_SURFACE",
    "PROTOCOLS",
    "Protocol",
    "PerCaseMetrics",
    "case_metrics",
    "dice",
    "hd95",
    "summarize",
    "surface_distances",
    "worst_case_distance",
]

HD95_MODES = ("pooled", "max_directed")
HD95_METHODS = ("auto", "edt", "kdtree")
# "auto" uses the KD-tree when the union's bounding box has more voxels than this many per surface voxel (of both
# masks together). Calibrated on one CPU thread (organ-sized blobs of benchmarks/hd95_speed.py, smooth 2D/3D blobs
# and salt-noise masks from 64x64 to 20x100x100): the two engines cost the same at a ratio of about 5; smooth organs
# have ratios of 10-200 (KD-tree 2-5x faster), noise-like masks 1-2 (EDT 2-3x faster).
KDTREE_BOX_PER_SURFACE = 5.0
# The evaluation protocols of :func:`case_metrics`, in the order the module computes, logs and tabulates them
# (``SelfRegSegModule.test_results_by_protocol``, the rows of a run's metrics.md): strict first.
Protocol = Literal["strict", "transunet"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

SpacingLike = float | Sequence[float] | np.ndarray | None


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------
def _binary_pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, found pred {p.shape} and gt {g.shape}.")
    if p.ndim == 0:
        raise ValueError("`pred` and `gt` must have at least one dimension, found 0-d arrays.")
    return p, g


def _normalize_spacing(spacing: SpacingLike, ndim: int) -> np.ndarray | None:
    """Return ``spacing`` as a float64 array of length ``ndim`` (a scalar applies to every axis), or None."""
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.ndim != 1 or sp.shape[0] != ndim:
        raise ValueError(
            f"`spacing` must be a scalar or have one entry per mask axis: expected length {ndim}, "
            f"found shape {sp.shape} ({np.asarray(spacing).tolist()})."
        )
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"`spacing` entries must be finite and positive, found {sp.tolist()}.")
    return sp


def _check_hd95_mode(mode: str, name: str = "mode") -> None:
    if mode not in HD95_MODES:
        raise ValueError(f"`{name}` must be one of {HD95_MODES}, found {mode!r}.")


def _check_method(method: str) -> None:
    if method not in HD95_METHODS:
        raise ValueError(f"`method` must be one of {HD95_METHODS}, found {method!r}.")


def _check_not_empty(p: np.ndarray, g: np.ndarray) -> None:
    p_empty, g_empty = not p.any(), not g.any()
    if p_empty or g_empty:
        which = "both `pred` and `gt` are" if p_empty and g_empty else ("`pred` is" if p_empty else "`gt` is")
        raise ValueError(
            f"Surface distances are undefined for an empty mask: {which} empty (no foreground voxels). "
            "Handle empty masks before calling, e.g. with `case_metrics(..., protocol=...)`."
        )


def _union_bbox(p: np.ndarray, g: np.ndarray) -> tuple[slice, ...]:
    """Slices of the bounding box of ``p | g`` (assumed non-empty).

    The box is narrowed one axis at a time on the already-cropped union, so only the first pass touches the
    whole array.
    """
    union = p | g
    slices: list[slice] = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other) if other else union)
        sl = slice(int(hit[0]), int(hit[-1]) + 1)
        slices.append(sl)
        index = [slice(None)] * union.ndim
        index[axis] = sl
        union = union[tuple(index)]
    return tuple(slices)


def _percentile95(d_pg: np.ndarray, d_gp: np.ndarray, mode: str) -> float:
    """HD95 of two directed distance sets in the given (validated) mode."""
    if mode == "pooled":
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels ``mask XOR erode(mask)``, connectivity-1 element, border value 0 (medpy convention).

    The erosion is computed as the AND of the ``2 * ndim`` face-neighbour shifts of the zero-padded mask, which is
    what ``ndimage.binary_erosion`` with that element and ``border_value=0`` computes, several times faster.
    """
    padded = np.pad(mask, 1, constant_values=False)
    centre = (slice(1, -1),) * mask.ndim
    interior = mask.copy()
    for axis in range(mask.ndim):
        for start in (0, 2):
            shifted = list(centre)
            shifted[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def _directed_edt(src: np.ndarray, dst: np.ndarray, sp: np.ndarray | None) -> np.ndarray:
    """Distances from each ``True`` voxel of ``src`` (C order) to the nearest ``True`` voxel of ``dst``, by EDT."""
    # distance_transform_edt measures the distance to the nearest zero, so the target surface is set to 0.
    return ndimage.distance_transform_edt(~dst, sampling=sp)[src]


def _directed_kdtree(src: np.ndarray, dst: np.ndarray, sp: np.ndarray | None) -> np.ndarray:
    """Same as :func:`_directed_edt`, with a KD-tree of the ``dst`` voxels (see the module docstring).

    Source voxels that are also target voxels are at distance 0 and are not queried.
    """
    out = np.zeros(np.count_nonzero(src), dtype=np.float64)
    far = ~dst[src]  # per source voxel, in C order
    if not far.any():
        return out
    src_idx = np.argwhere(src)[far]
    dst_idx = np.argwhere(dst)
    scale = np.ones(src.ndim) if sp is None else sp
    tree = cKDTree(dst_idx * scale, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(src_idx * scale)
    diff = src_idx - dst_idx[nearest]
    # distance_transform_edt's arithmetic: float64 index difference, times the spacing, squared, summed in axis order
    d2 = np.zeros(len(diff), dtype=np.float64)
    for axis in range(src.ndim):
        step = diff[:, axis].astype(np.float64)
        if sp is not None:
            step *= sp[axis]
        d2 += step * step
    out[far] = np.sqrt(d2)
    return out


def _pick_method(method: str, box_size: int, n_surface: int) -> str:
    """Resolve ``"auto"`` to the engine expected to be faster for this box and surface size."""
    if method != "auto":
        return method
    return "kdtree" if box_size > KDTREE_BOX_PER_SURFACE * n_surface else "edt"


def _directed(src: np.ndarray, dst: np.ndarray, sp: np.ndarray | None, method: str) -> np.ndarray:
    """Directed surface distances with the (resolved) engine ``method``."""
    return _directed_kdtree(src, dst, sp) if method == "kdtree" else _directed_edt(src, dst, sp)


def _cropped_surfaces(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfaces of two validated, non-empty masks, both cropped to the bounding box of their union.

    The crop is exact:

    * erosion: every voxel outside the box is 0 in both masks, which is what ``border_value=0`` assumes beyond
      the edge of the crop, so a voxel's neighbourhood -- hence the surface -- is unchanged;
    * distances: all surface voxels (sources and targets) lie inside the box, and the Euclidean distance
      between two voxels does not depend on the extent of the grid around them, so the EDT restricted to the
      box returns the same nearest-surface distances (and the KD-tree never sees the grid at all).

    On a (100, 512, 512) CT volume an organ's box is a small fraction of the array, and the erosions and the
    distance computations only run on that fraction.
    """
    box = _union_bbox(p, g)
    return _surface(p[box]), _surface(g[box])


def _both_directed(
    p: np.ndarray, g: np.ndarray, sp: np.ndarray | None, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``pred -> gt`` and ``gt -> pred`` of two validated, non-empty masks."""
    p_surf, g_surf = _cropped_surfaces(p, g)
    method = _pick_method(method, p_surf.size, np.count_nonzero(p_surf) + np.count_nonzero(g_surf))
    return _directed(p_surf, g_surf, sp, method), _directed(g_surf, p_surf, sp, method)


# --------------------------------------------------------------------------------------------------------------
# binary metrics
# --------------------------------------------------------------------------------------------------------------
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
    p, g = _binary_pair(pred, gt)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return math.nan
    return 2.0 * np.count_nonzero(p & g) / total


def surface_distances(pred: ArrayLike, gt: ArrayLike, spacing: SpacingLike = None, method: str = "auto") -> np.ndarray:
    """Distances from every surface voxel of ``pred`` to the nearest surface voxel of ``gt``.

    Args:
        pred: Predicted mask, shape ``(*S)`` with ``len(S) >= 1``; non-zero means foreground.
        gt: Ground-truth mask, shape ``(*S)``.
        spacing: Voxel size along each axis (length ``len(S)``, or a scalar for all axes) in physical units,
            e.g. mm; None measures in voxels.
        method: Distance engine: ``"edt"``, ``"kdtree"`` or ``"auto"`` (the one expected to be faster); all give
            the same distances, see the module docstring.

    Returns:
        Float64 array of shape ``(n_surface_voxels_of_pred,)`` in C order of the voxels.

    Raises:
        ValueError: If ``method`` is unknown, the shapes differ, ``spacing`` is malformed, or a mask is empty (the
            message says which).
    """
    _check_method(method)
    p, g = _binary_pair(pred, gt)
    sp = _normalize_spacing(spacing, p.ndim)
    _check_not_empty(p, g)
    p_surf, g_surf = _cropped_surfaces(p, g)
    method = _pick_method(method, p_surf.size, np.count_nonzero(p_surf) + np.count_nonzero(g_surf))
    return _directed(p_surf, g_surf, sp, method)


def hd95(
    pred: ArrayLike, gt: ArrayLike, spacing: SpacingLike = None, mode: str = "pooled", method: str = "auto"
) -> float:
    """95th-percentile Hausdorff distance between the surfaces of two non-empty binary masks.

    Percentiles use NumPy's default linear interpolation, as medpy and MONAI do.

    Args:
        pred: Predicted mask, shape ``(*S)``; non-zero means foreground.
        gt: Ground-truth mask, shape ``(*S)``.
        spacing: Voxel size per axis (or a scalar) in physical units; None measures in voxels.
        mode: ``"pooled"``: 95th percentile of the concatenated ``pred -> gt`` and ``gt -> pred`` distances
            (medpy ``hd95``); ``"max_directed"``: the larger of the two directed 95th percentiles (MONAI).
        method: Distance engine: ``"edt"`` (distance transform of the bounding box), ``"kdtree"`` (KD-tree of the
            surface voxels) or ``"auto"`` (the one expected to be faster); all give the same value, see the module
            docstring.

    Returns:
        HD95 in the units of ``spacing`` (voxels if None).

    Raises:
        ValueError: If ``mode`` or ``method`` is unknown, the shapes differ, ``spacing`` is malformed, or a mask is
            empty.
    """
    _check_hd95_mode(mode)
    _check_method(method)
    p, g = _binary_pair(pred, gt)
    sp = _normalize_spacing(spacing, p.ndim)
    _check_not_empty(p, g)
    return _percentile95(*_both_directed(p, g, sp, method), mode)


def worst_case_distance(shape: Sequence[int], spacing: SpacingLike = None) -> float:
    """Diagonal of the image's field of view, ``sqrt(sum((shape_i * spacing_i) ** 2))``.

    This is the HD95 the ``"strict"`` protocol assigns when exactly one of ``pred`` / ``gt`` is empty. It is
    strictly larger than any distance between two voxel centres of the grid (at most
    ``sqrt(sum(((shape_i - 1) * spacing_i) ** 2))``), so a missed or hallucinated organ always scores worse
    than any prediction that overlaps the volume.

    Args:
        shape: Array shape ``S``.
        spacing: Voxel size per axis (or a scalar); None means 1 (voxel units).

    Returns:
        The diagonal length in the units of ``spacing``.
    """
    sp = _normalize_spacing(spacing, len(shape))
    extent = np.asarray(shape, dtype=np.float64) * (1.0 if sp is None else sp)
    return float(np.sqrt(np.sum(extent**2)))


# --------------------------------------------------------------------------------------------------------------
# multi-class cases
# --------------------------------------------------------------------------------------------------------------
def _label_volume(x: ArrayLike, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"`{name}` must be an integer label array, found dtype {arr.dtype}.")
        bad = arr[arr != np.round(arr)]  # NaN also lands here
        if bad.size:
            raise ValueError(f"`{name}` must hold integer labels, found non-integer value {bad.flat[0]!r}.")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        for value in (lo, hi):
            if value < 0 or value >= num_classes:
                raise ValueError(
                    f"`{name}` contains label {value.item()!r}, expected labels in [0, {num_classes}) "
                    f"(num_classes={num_classes})."
                )
    return arr


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
            ``spacing``, or labels outside ``[0, num_classes)``.
        TypeError: If a label array is neither integer, boolean nor floating point.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {PROTOCOLS}, found {protocol!r}.")
    if hd95_mode is not None:
        _check_hd95_mode(hd95_mode, "hd95_mode")
        if protocol == "transunet" and hd95_mode != "pooled":
            raise ValueError(
                f"`hd95_mode` must be None or 'pooled' with protocol='transunet' (the reference scripts use "
                f"medpy's pooled hd95), found {hd95_mode!r}; use protocol='strict' for other modes."
            )
    mode = hd95_mode or "pooled"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2 (background + 1 class), found {num_classes!r}.")
    p_lab = _label_volume(pred, "pred", num_classes)
    g_lab = _label_volume(gt, "gt", num_classes)
    if p_lab.shape != g_lab.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, found pred {p_lab.shape} and gt {g_lab.shape}.")
    if p_lab.ndim == 0:
        raise ValueError("`pred` and `gt` must have at least one dimension, found 0-d arrays.")
    sp = None if protocol == "transunet" else _normalize_spacing(spacing, p_lab.ndim)

    k = num_classes - 1
    dices = np.empty(k, dtype=np.float64)
    hds = np.empty(k, dtype=np.float64)
    worst = None if protocol == "transunet" else worst_case_distance(p_lab.shape, sp)
    for c in range(1, num_classes):
        p, g = p_lab == c, g_lab == c
        p_any, g_any = bool(p.any()), bool(g.any())
        if p_any and g_any:
            dices[c - 1], hds[c - 1] = dice(p, g), _percentile95(*_both_directed(p, g, sp), mode)
        elif protocol == "transunet":
            dices[c - 1], hds[c - 1] = (1.0, 0.0) if p_any else (0.0, 0.0)
        elif p_any or g_any:
            dices[c - 1], hds[c - 1] = 0.0, worst
        else:
            dices[c - 1], hds[c - 1] = math.nan, math.nan
    return dices, hds


def _class_means(values: np.ndarray) -> list[float | None]:
    """NaN-ignoring mean of each column of ``(N, K)``; None where a column is all NaN (or empty)."""
    valid = ~np.isnan(values)
    counts = valid.sum(axis=0)
    sums = np.where(valid, values, 0.0).sum(axis=0)
    return [float(s / n) if n else None for s, n in zip(sums, counts, strict=True)]


def summarize(dice: ArrayLike, hd95: ArrayLike, class_names: Sequence[str]) -> dict:
    """Aggregate per-case, per-class metrics: mean over cases per class, then mean over classes.

    NaN entries (e.g. a class absent from both ``pred`` and ``gt`` under the ``"strict"`` protocol) are ignored.
    A class whose column is all NaN gets None and does not enter the class mean.

    Args:
        dice: Dice per case and class, shape ``(N, K)``.
        hd95: HD95 per case and class, shape ``(N, K)``.
        class_names: ``K`` names, one per column (foreground classes).

    Returns:
        ``{"num_cases": int, "dice_mean", "iou_mean", "hd95_mean": float | None,
        "per_class": {name: {"dice", "iou", "hd95": float | None}}}`` with plain Python floats, so the
        result is JSON serialisable (None becomes null). A mean is None if no class has a value.

    Raises:
        ValueError: If the arrays are not 2-D of equal shape or ``class_names`` does not have ``K`` entries.
    """
    d = np.asarray(dice, dtype=np.float64)
    h = np.asarray(hd95, dtype=np.float64)
    if d.ndim != 2 or d.shape != h.shape:
        raise ValueError(
            f"`dice` and `hd95` must be 2-D arrays (N_cases, K) of the same shape, found {d.shape} and {h.shape}."
        )
    names = list(class_names)
    if len(names) != d.shape[1]:
        raise ValueError(f"`class_names` must have K={d.shape[1]} entries (one per column), found {len(names)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` must be unique, found {names}.")
    # per case and class IoU = D / (2 - D): exact for one binary pair, so it needs no extra state
    with np.errstate(invalid="ignore", divide="ignore"):
        j = d / (2.0 - d)
    dice_c, iou_c, hd_c = _class_means(d), _class_means(j), _class_means(h)

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.mean(present)) if present else None

    return {
        "num_cases": int(d.shape[0]),
        "dice_mean": mean(dice_c),
        "iou_mean": mean(iou_c),
        "hd95_mean": mean(hd_c),
        "per_class": {
            n: {"dice": dv, "iou": jv, "hd95": hv}
            for n, dv, jv, hv in zip(names, dice_c, iou_c, hd_c, strict=True)
        },
    }


# --------------------------------------------------------------------------------------------------------------
# torchmetrics aggregator
# --------------------------------------------------------------------------------------------------------------
class PerCaseMetrics(Metric):
    """Collects per-case Dice / HD95 vectors (from :func:`case_metrics`) and summarises them.

    States are lists reduced by concatenation, so under DDP ``compute()`` sees every case of every rank and the
    means are over cases, never an average of per-rank averages. Each case is stored flattened (1-D states, so
    a rank that saw no case syncs cleanly) and reshaped to ``(N, K)`` in :meth:`compute`. Values are stored as
    float64 (the metric's dtype).

    Note: Lightning's default ``DistributedSampler`` pads the evaluation set by repeating cases so that every rank
    gets the same number; the data modules of this package use an unpadded sampler for the test set so that each
    case is counted exactly once.

    Args:
        num_classes: Number of classes including background (as for :func:`case_metrics`); ``K = num_classes - 1``.
        class_names: ``K`` foreground class names, in label order ``1 .. num_classes - 1``.
        **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``dist_sync_fn``, ``sync_on_compute``).

    Example:
        >>> m = PerCaseMetrics(3, ["a", "b"])
        >>> m.update(torch.tensor([0.5, 1.0]), torch.tensor([2.0, 0.0]))
        >>> m.compute()["dice_mean"]
        0.75
    """

    # The output mixes Dice (higher is better) and HD95 (lower is better): no single direction.
    higher_is_better = None
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, class_names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2 (background + 1 class), found {num_classes!r}.")
        names = [str(n) for n in class_names]
        if len(names) != num_classes - 1:
            raise ValueError(
                f"`class_names` must name the foreground classes: expected num_classes - 1 = {num_classes - 1} "
                f"names (background excluded), found {len(names)}."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"`class_names` must be unique, found {names}.")
        self.num_classes = int(num_classes)
        self.class_names = names
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        # States are kept in the metric's dtype: torchmetrics fills a rank without cases with an empty tensor of
        # that dtype before all_gather, and every rank must gather tensors of one dtype.
        self.set_dtype(torch.float64)

    def update(self, dice: Tensor | ArrayLike, hd95: Tensor | ArrayLike) -> None:
        """Add one case (shape ``(K,)``) or a batch of cases (shape ``(N, K)``).

        Args:
            dice: Per-class Dice, shape ``(K,)`` or ``(N, K)``; NaN marks a class excluded for that case.
            hd95: Per-class HD95, same shape as ``dice``.

        Raises:
            ValueError: If the shapes differ or the last dimension is not ``K``.
        """
        k = self.num_classes - 1
        d = torch.as_tensor(dice, dtype=self.dtype, device=self.device)
        h = torch.as_tensor(hd95, dtype=self.dtype, device=self.device)
        if d.shape != h.shape or d.ndim not in (1, 2) or d.shape[-1] != k:
            raise ValueError(
                f"`dice` and `hd95` must both have shape ({k},) or (N, {k}), found {tuple(d.shape)} and "
                f"{tuple(h.shape)}."
            )
        self.dice.append(d.reshape(-1))
        self.hd95.append(h.reshape(-1))

    def _stacked(self, state: list[Tensor] | Tensor) -> np.ndarray:
        k = self.num_classes - 1
        if isinstance(state, list) and not state:
            return np.zeros((0, k))
        return dim_zero_cat(state).detach().to("cpu", torch.float64).reshape(-1, k).numpy()

    def compute(self) -> dict:
        """Summarise all cases seen (on all ranks) with :func:`summarize`.

        Returns:
            The :func:`summarize` dict: ``dice_mean``, ``hd95_mean`` and ``per_class``; the means are None when no
            case has been added.
        """
        return summarize(self._stacked(self.dice), self._stacked(self.hd95), self.class_names)
