"""Pictures of one test case: image, ground truth and prediction as contours in the class colours.

- A 2D image (``D = 1``): the image with every class's contours.
- A volume: for each organ (class present in the ground truth or the prediction; the lowest Dice first, at most
  ``max_organs``), the axial, coronal and sagittal planes through it (each the plane where the organ's ground
  truth, or its prediction when the truth is empty, has the largest area), drawn at the voxel spacing so that
  the proportions are physical. A thin slab (its depth in mm under half its in-plane extent, e.g. a stack of a
  few slices) has no useful coronal or sagittal view: it shows three axial slices through the organ instead (at
  a quarter, half and three quarters of its extent in depth). Each row is cropped to its organ (the ground truth;
  the prediction where the truth is empty) with a margin of 30 % of its size, at least :data:`MIN_CROP_MM` mm
  wide, so small organs are seen.

Ground truth is a solid line, the prediction a dashed line, in the colour of the class
(:func:`~lightning_selfreg.tracking.figures.class_colour`); the legend names the classes. Images are shown in
grey between the 1st and 99th percentile of their unsaturated voxels (a CT normalised with clipping piles up at its
clip values, which would otherwise wash out the soft tissue; RGB images as they are). A case read from NIfTI (with
its ``affine``) is shown in the radiological convention (:func:`radiological`): the patient's right on the left,
anterior and superior up; other arrays as they are stored.

Example:
    >>> import numpy as np
    >>> label = np.zeros((4, 32, 32), dtype=np.int64); label[1:3, 8:20, 8:20] = 1
    >>> fig = plot_case(np.random.rand(4, 32, 32), label, label, ["liver"], spacing=(5.0, 1.0, 1.0))
    >>> [round(v) for v in fig.get_size_inches() * 100]
    [840, 330]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lightning_selfreg.tracking.figures import class_colour

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["MIN_CROP_MM", "PANEL_INCHES", "figure_inches", "is_thin_slab", "organ_box", "organ_planes", "plot_case",
           "radiological", "slab_slices", "to_label_grid"]

PANEL_INCHES = 2.6  # side of one panel
_MARGIN_INCHES = 0.7  # title and legend
MIN_CROP_MM = 80.0  # the least width (mm; voxels without a spacing) of a row's crop around its organ


def figure_inches(num_organs: int, volume: bool) -> tuple[float, float]:
    """``(width, height)`` in inches of :func:`plot_case`'s figure: 3 columns x organs, or one panel in 2D."""
    if not volume:
        return 4 * PANEL_INCHES / 3 + 1.6, 4 * PANEL_INCHES / 3 + _MARGIN_INCHES
    return 3 * PANEL_INCHES + 0.6, PANEL_INCHES * max(num_organs, 1) + _MARGIN_INCHES


def to_label_grid(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sample a ``(D', H', W')`` or ``(D', H', W', 3)`` image at the label grid ``shape = (D, H, W)``, nearest voxel.

    Evaluation images may be at a preprocessed grid while labels and predictions are at the native one.
    """
    out = image
    for axis, size in enumerate(shape):
        src = out.shape[axis]
        if src != size:
            index = np.minimum(((np.arange(size) + 0.5) * src / size).astype(np.int64), src - 1)
            out = np.take(out, index, axis=axis)
    return out


def organ_planes(label: np.ndarray, pred: np.ndarray, c: int) -> tuple[int, int, int] | None:
    """``(z, y, x)`` of the axial, coronal and sagittal planes where class ``c`` has the largest area.

    The ground truth decides; where class ``c`` is absent from it, the prediction. None when both are empty.
    """
    mask = label == c
    if not mask.any():
        mask = pred == c
        if not mask.any():
            return None
    return tuple(int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))


def slab_slices(label: np.ndarray, pred: np.ndarray, c: int) -> tuple[int, int, int] | None:
    """Three axial slices through class ``c``: at 1/4, 1/2 and 3/4 of its depth (ground truth, else prediction)."""
    mask = label == c
    if not mask.any():
        mask = pred == c
        if not mask.any():
            return None
    depths = np.flatnonzero(mask.any(axis=(1, 2)))
    low, high = int(depths[0]), int(depths[-1])
    return tuple(int(round(low + q * (high - low))) for q in (0.25, 0.5, 0.75))


def is_thin_slab(shape: Sequence[int], spacing: Sequence[float]) -> bool:
    """Whether a ``(D, H, W)`` volume is thinner in depth (mm) than half its smaller in-plane side."""
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    return extent[0] < 0.5 * min(extent[1], extent[2])


def organ_box(label: np.ndarray, pred: np.ndarray, c: int, spacing: Sequence[float]) -> tuple[slice, slice, slice]:
    """The crop of class ``c``: its ground truth's box (the prediction's without truth), 30 % margin, >= MIN_CROP_MM.

    Scattered false positives elsewhere do not widen it: the row is about the organ.
    """
    mask = label == c
    if not mask.any():
        mask = pred == c
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        size = mask.shape[axis]
        if present.size == 0:
            box.append(slice(0, size))
            continue
        low, high = int(present[0]), int(present[-1]) + 1
        margin = max(0.3 * (high - low), 0.5 * (MIN_CROP_MM / float(spacing[axis]) - (high - low)))
        box.append(slice(max(0, int(low - margin)), min(size, int(np.ceil(high + margin)))))
    return tuple(box)


def radiological(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """``(axes, flips)`` that put a NIfTI volume's ``(D, H, W)`` array in the radiological layout.

    The array is the file's ``(x, y, z)`` reversed, ``affine`` the file's. The layout: axis 0 superior to inferior,
    axis 1 anterior to posterior, axis 2 the patient's right to left; apply it as
    ``np.flip(array.transpose(axes), [i for i, f in enumerate(flips) if f])``.

    Example:
        >>> radiological(np.eye(4))  # RAS: every axis runs the other way
        ((0, 1, 2), (True, True, True))
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))  # per NIfTI axis: (RAS axis, sign)
    axes, flips = [], []
    for target in range(3):  # world axis S (2), A (1), R (0), each decreasing along the target array axis
        world = 2 - target
        source = next(a for a in range(3) if int(ornt[2 - a][0]) == world)
        axes.append(source)
        flips.append(bool(ornt[2 - source][1] > 0))
    return tuple(axes), tuple(flips)


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite if finite.size <= 1_000_000 else finite[:: finite.size // 1_000_000]
    inner = sample[(sample > sample.min()) & (sample < sample.max())]  # saturated (clipped) values left out
    low, high = (float(v) for v in np.percentile(inner if inner.size > 0.1 * sample.size else sample, (1, 99)))
    return (low, high) if high > low else (low, low + 1.0)


def _draw(ax: Axes, image: np.ndarray, label: np.ndarray, pred: np.ndarray, classes: Sequence[int],
          window: tuple[float, float], pixel: tuple[float, float]) -> None:
    """One panel: ``image`` (H, W) or (H, W, 3), contours of ``classes``; ``pixel`` = (row, column) size in mm."""
    height, width = label.shape
    extent = (0.0, width * pixel[1], height * pixel[0], 0.0)
    if image.ndim == 3:
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8) if image.max() > 1 else np.clip(image, 0, 1),
                  extent=extent, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
    for c in classes:
        for mask, style in ((label == c, "solid"), (pred == c, "dashed")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[class_colour(c)], linewidths=1.5,
                           linestyles=style, extent=extent, origin="upper")
    ax.set_xticks([])
    ax.set_yticks([])


def _percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def plot_case(image: np.ndarray, label: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
              spacing: Sequence[float] | None = None, dice: Sequence[float] | None = None, title: str = "",
              max_organs: int = 8) -> Figure:
    """Draw one case (see the module docstring).

    Args:
        image: ``(D, H, W)`` grey or ``(D, H, W, 3)`` RGB image, at the label's grid (see :func:`to_label_grid`).
        label: ``(D, H, W)`` ground-truth labels (``D = 1``: a 2D image).
        pred: ``(D, H, W)`` predicted labels.
        class_names: Names of the foreground classes ``1 .. K - 1``.
        spacing: ``(D, H, W)`` voxel size in mm (array-axis order); None draws square voxels.
        dice: Per-class Dice ``(K - 1,)`` (NaN where a class is in neither); orders the organs, lowest first.
        title: Figure title.
        max_organs: Most organs (rows) drawn for a volume.

    Returns:
        A figure of :func:`figure_inches` inches, not attached to pyplot.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    label, pred = np.asarray(label), np.asarray(pred)
    if label.ndim != 3 or pred.shape != label.shape or np.asarray(image).shape[:3] != label.shape:
        raise ValueError(f"`image`, `label` and `pred` must share the grid (D, H, W), found "
                         f"{np.asarray(image).shape}, {label.shape} and {pred.shape}.")
    names = list(class_names)
    present = [c for c in range(1, len(names) + 1) if (label == c).any() or (pred == c).any()]
    scores = list(dice) if dice is not None else [math.nan] * len(names)
    present.sort(key=lambda c: (not math.isfinite(scores[c - 1]), scores[c - 1] if math.isfinite(scores[c - 1])
                                else 0.0, c))
    sp = tuple(float(v) for v in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    image = np.asarray(image, dtype=np.float32)
    window = _window(image)
    volume = label.shape[0] > 1
    organs = present[:max_organs] if volume else present
    fig = Figure(figsize=figure_inches(len(organs), volume), layout="constrained")
    if not volume:
        ax = fig.subplots(1, 1)
        _draw(ax, image[0], label[0], pred[0], present, window, sp[1:])
    elif not organs:
        ax = fig.subplots(1, 1)
        ax.text(0.5, 0.5, "no foreground in the ground truth or the prediction", ha="center", va="center")
        ax.set_axis_off()
    else:
        axes = fig.subplots(len(organs), 3, squeeze=False)
        slab = is_thin_slab(label.shape, sp)
        for row, c in enumerate(organs):
            bz, by, bx = organ_box(label, pred, c, sp)
            if slab:
                cuts = [(image[z, by, bx], label[z, by, bx], pred[z, by, bx], (sp[1], sp[2]), f"axial, slice {z}")
                        for z in slab_slices(label, pred, c)]
            else:
                z, y, x = organ_planes(label, pred, c)
                cuts = [(image[z, by, bx], label[z, by, bx], pred[z, by, bx], (sp[1], sp[2]), f"axial, slice {z}"),
                        (image[bz, y, bx], label[bz, y, bx], pred[bz, y, bx], (sp[0], sp[2]), f"coronal, row {y}"),
                        (image[bz, by, x], label[bz, by, x], pred[bz, by, x], (sp[0], sp[1]),
                         f"sagittal, column {x}")]
            for col, (img, lab, prd, pixel, caption) in enumerate(cuts):
                ax = axes[row][col]
                _draw(ax, img, lab, prd, present, window, pixel)
                ax.set_title(caption, fontsize=8)
            axes[row][0].set_ylabel(f"{names[c - 1]}\nDice {_percent(scores[c - 1])}", fontsize=9,
                                    color=class_colour(c))
    handles = [Line2D([], [], color=class_colour(c), linewidth=2, label=names[c - 1]) for c in present]
    handles += [Line2D([], [], color="black", linestyle="solid", label="ground truth"),
                Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
