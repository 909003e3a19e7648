"""Reading and writing images: NIfTI volumes (nibabel) and 2D images (Pillow), predictions as NIfTI or PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_selfreg.utils.files import atomic_write

__all__ = ["HU_WINDOW", "load_image_2d", "load_nifti", "save_nifti", "save_png_mask", "save_prediction"]

# The standard abdominal CT window (Synapse / TransUNet preprocessing), in HU: image = (clip(HU, low, high) - low) /
# (high - low). The bundled sample was built with it (tools/build_totalseg_sample.py); the default of predict.py's
# --window.
HU_WINDOW: tuple[float, float] = (-125.0, 275.0)

def save_nifti(array_dhw: np.ndarray, path: str | Path, spacing: Sequence[float] | None = None,
               affine: np.ndarray | None = None) -> None:
    """Write a ``(D, H, W)`` label volume as NIfTI (atomically).

    The array is stored as ``(W, H, D)`` = ``(x, y, z)`` with ``affine = diag(x, y, z spacing)`` when no affine
    is given; ``spacing`` is ``(z, y, x)`` in mm as in the test volumes.
    """
    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(array_dhw).transpose(2, 1, 0)).astype(np.uint8)
    if affine is None:
        z, y, x = spacing if spacing is not None else (1.0, 1.0, 1.0)
        affine = np.diag([x, y, z, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(np.uint8)
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def save_png_mask(mask_hw: np.ndarray, path: str | Path, num_classes: int) -> None:
    """Write a ``(H, W)`` label map as an 8-bit PNG (atomically).

    A binary mask (``num_classes == 2``) is written as 0/255, so that it is visible; a multi-class one holds the
    class index.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "mask.png"
        >>> save_png_mask(np.array([[0, 1], [1, 0]]), path, num_classes=2)
        >>> np.asarray(Image.open(path)).tolist()
        [[0, 255], [255, 0]]
    """
    mask = (np.asarray(mask_hw) * (255 if num_classes == 2 else 1)).astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))


def save_prediction(pred: np.ndarray, out_dir: Path, case: str, spacing: Sequence[float] | None,
                    num_classes: int, affine: np.ndarray | None = None) -> Path:
    """Save one case's ``(D, H, W)`` prediction: ``<case>.nii.gz`` for volumes, ``<case>.png`` for ``D = 1``.

    PNG masks are written by :func:`save_png_mask` (binary ones as 0/255). A volume is written with ``affine``
    when given (the input file's, e.g. an nnU-Net case item's ``"affine"``: the prediction then has the input's
    geometry voxel for voxel), else with ``diag(spacing)``.

    Returns:
        The written path.
    """
    if pred.shape[0] == 1:
        path = out_dir / f"{case}.png"
        save_png_mask(pred[0], path, num_classes)
        return path
    path = out_dir / f"{case}.nii.gz"
    save_nifti(pred, path, spacing, affine)
    return path


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI volume as ``(D, H, W)`` axial slices (D along the file's third axis).

    Returns:
        ``(volume float32 (D, H, W), affine (4, 4), spacing (z, y, x))``; the inverse of :func:`save_nifti`'s
        layout, so a prediction written with the same affine overlays the input.

    Raises:
        ValueError: If the file is not a 3D NIfTI volume (the message names it and the shape found).
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for bad files
        raise ValueError(f"{path}: cannot be read as NIfTI ({err}).") from err
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, found shape {data.shape}.")
    x, y, z = (float(v) for v in image.header.get_zooms()[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine, (z, y, x)


def load_image_2d(path: str | Path) -> np.ndarray:
    """Read a 2D image (PNG, BMP, JPEG, TIFF) as RGB float32 ``(H, W, 3)`` in [0, 1].

    Raises:
        ValueError: If the file cannot be read as an image.
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as err:
        raise ValueError(f"{path}: cannot be read as an image ({err}).") from err
