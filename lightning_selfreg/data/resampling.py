"""Resampling to a target spacing as nnU-Net does it: order-3 images, per-class linear labels, "separate z".

``new_shape = round(spacing / target * shape)`` per axis; images are resampled with order-3 splines, labels one
class at a time with linear interpolation and a 0.5 threshold (higher labels win: nnU-Net's
``resize_segmentation``); when a spacing is anisotropic (max / min > :data:`ANISO_THRESHOLD`) the coarse axis is
resampled separately with nearest neighbour (nnU-Net's "separate z"). Coordinates are centre-aligned (skimage's
``resize`` with ``mode="edge"``, ``anti_aliasing=False``). Used by nnU-Net's preprocessing
(:mod:`lightning_selfreg.data.nnunet.preprocess`) and by the preprocessing record that prediction applies
(:class:`~lightning_selfreg.data.preprocessing.Preprocessing`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ANISO_THRESHOLD", "new_shape", "resample_image", "resample_label"]

ANISO_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD


def _separate_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """nnU-Net's "separate z" decision: the low-resolution axis when a spacing is anisotropic, else None."""
    for sp in (np.asarray(spacing, dtype=np.float64), np.asarray(target, dtype=np.float64)):
        if sp.max() / sp.min() > ANISO_THRESHOLD:
            axes = np.flatnonzero(sp.max() / sp == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _resize_axes(x: np.ndarray, shape: Sequence[int], order: int, axes: Sequence[int]) -> np.ndarray:
    """Resize the ``axes`` of a 3D array to ``shape`` (other axes must keep their size), centre-aligned.

    When exactly one axis keeps its size, each slice across it is resampled on its own (2D splines, as nnU-Net's
    "separate z" resampling does slice by slice): a spline along an axis that keeps its size only reproduces its
    samples, and the 2D splines need 16 taps per voxel instead of 64 and no prefilter along that axis.
    """
    moving = [a for a in axes if x.shape[a] != shape[a]]
    if not moving:
        return x
    fixed = [a for a in range(x.ndim) if a not in moving]
    if order > 0 and x.ndim == 3 and len(fixed) == 1:
        a = fixed[0]
        inner = [b for b in range(3) if b != a]
        slices = [_resize_axes(part, [shape[b] for b in inner], order, (0, 1)) for part in np.moveaxis(x, a, 0)]
        return np.moveaxis(np.stack(slices), 0, a)
    axes = moving
    scale = np.array([x.shape[a] / shape[a] if a in axes else 1.0 for a in range(x.ndim)])
    out_shape = tuple(int(shape[a]) if a in axes else x.shape[a] for a in range(x.ndim))
    return ndimage.affine_transform(x, scale, offset=0.5 * scale - 0.5, output_shape=out_shape, order=order,
                                    mode="nearest", prefilter=order > 1)


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """``round(spacing / target * shape)`` per axis (at least 1)."""
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target, strict=True))


def resample_image(image: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                   shape: Sequence[int] | None = None, order: int = 3) -> np.ndarray:
    """Resample a ``(C, D, H, W)`` image to ``target`` spacing (or to ``shape``), as nnU-Net does for data.

    Order-3 splines; with an anisotropic spacing the coarse axis is resampled separately with nearest neighbour.

    Returns:
        float32 ``(C, *shape)``.
    """
    shape = new_shape(image.shape[1:], spacing, target) if shape is None else tuple(shape)
    axis = _separate_axis(spacing, target)
    out = []
    for channel in image.astype(np.float32):
        if axis is None:
            out.append(_resize_axes(channel, shape, order, (0, 1, 2)))
        else:
            inplane = _resize_axes(channel, shape, order, [a for a in range(3) if a != axis])
            out.append(_resize_axes(inplane, shape, 0, (axis,)))
    return np.stack(out).astype(np.float32, copy=False)


def resample_label(label: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                   shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample a ``(D, H, W)`` label map as nnU-Net's ``resize_segmentation`` (per class, linear, >= 0.5).

    Each foreground class is resized as a binary mask with linear interpolation and set where the result is
    >= 0.5, in increasing label order (higher labels overwrite lower ones); with an anisotropic spacing the coarse
    axis then takes the nearest slice.

    Returns:
        int16 ``shape``.
    """
    shape = new_shape(label.shape, spacing, target) if shape is None else tuple(shape)
    if tuple(label.shape) == shape:
        return label.astype(np.int16)
    axis = _separate_axis(spacing, target)
    inplane_axes = (0, 1, 2) if axis is None else [a for a in range(3) if a != axis]
    mid_shape = shape if axis is None else tuple(label.shape[a] if a == axis else shape[a] for a in range(3))
    out = np.zeros(mid_shape, dtype=np.int16)
    for value in np.unique(label):
        if value == 0:
            continue
        mask = _resize_axes((label == value).astype(np.float32), mid_shape, 1, inplane_axes)
        out[mask >= 0.5] = value
    if axis is not None:
        out = _resize_axes(out, shape, 0, (axis,))
    return out
