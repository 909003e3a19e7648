"""Surface distances and HD95 of binary masks of any dimensionality (NumPy in, SciPy computes the distances).

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial import cKDTree

from lightning_selfreg.metrics.overlap import binary_pair

__all__ = [
    "HD95_METHODS",
    "HD95_MODES",
    "KDTREE_BOX_PER_SURFACE",
    "SpacingLike",
    "check_hd95_mode",
    "hd95",
    "normalize_spacing",
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

SpacingLike = float | Sequence[float] | np.ndarray | None


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------
def normalize_spacing(spacing: SpacingLike, ndim: int) -> np.ndarray | None:
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


def check_hd95_mode(mode: str, name: str = "mode") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``mode`` is one of :data:`HD95_MODES`."""
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
    p, g = binary_pair(pred, gt)
    sp = normalize_spacing(spacing, p.ndim)
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
    check_hd95_mode(mode)
    _check_method(method)
    p, g = binary_pair(pred, gt)
    sp = normalize_spacing(spacing, p.ndim)
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
    sp = normalize_spacing(spacing, len(shape))
    extent = np.asarray(shape, dtype=np.float64) * (1.0 if sp is None else sp)
    return float(np.sqrt(np.sum(extent**2)))
