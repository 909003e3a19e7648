"""Reading and writing images: NIfTI volumes (nibabel) and 2D images (Pillow), predictions as NIfTI or PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_selfreg.utils.files import atomic_write

__all__ = [
    "HU_WINDOW",
    "label_image",
    "load_image_2d",
    "save_image",
    "save_nifti",
    "save_png",
    "save_prediction",
]

# The standard abdominal CT window (Synapse / TransUNet preprocessing), in HU: image = (clip(HU, low, high) - low) /
# (high - low). The bundled sample was built with it (tools/build_totalseg_sample.py); the Synapse-layout
# DataModules record it as their intensity normalisation (lightning_selfreg.data.preprocessing).
HU_WINDOW: tuple[float, float] = (-125.0, 275.0)

def label_image(array_dhw: np.ndarray, reference: Any = None, affine: np.ndarray | None = None,
                xform_code: int = 2) -> Any:
    """A NIfTI label image of a ``(D, H, W)`` label volume, stored as ``(x, y, z) = (W, H, D)``.

    With a ``reference`` image (the input it was predicted from, on the same grid) the result has exactly its
    affine and header geometry: the header is copied (qform / sform and their codes, pixdim, units), its data type
    set to the labels' and its intensity scaling reset, and the reference's own affine is passed (a recomputed one
    would make nibabel rewrite the q/s-forms). Without one, ``affine`` is used with q/s-form code ``xform_code``
    (1 = scanner, for DICOM-derived geometry; 2 = aligned).
    """
    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(array_dhw).transpose(2, 1, 0))
    dtype = np.uint16 if data.size and int(data.max()) > 255 else np.uint8
    data = data.astype(dtype)
    if reference is not None:
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        return nib.Nifti1Image(data, reference.affine, header)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(dtype)
    image.set_qform(affine, code=xform_code)
    image.set_sform(affine, code=xform_code)
    return image


def save_image(image: Any, path: str | Path) -> None:
    """Write a nibabel image atomically (see :func:`~lightning_selfreg.utils.files.atomic_write`)."""
    import nibabel as nib

    atomic_write(path, lambda tmp: nib.save(image, tmp))


def save_nifti(array_dhw: np.ndarray, path: str | Path, spacing: Sequence[float] | None = None,
               affine: np.ndarray | None = None, orientation: Sequence[str] | None = None,
               reference: Any = None) -> None:
    """Write a ``(D, H, W)`` label volume as NIfTI (atomically).

    The array is stored as ``(W, H, D)`` = ``(x, y, z)``. Its geometry: the ``reference`` image's (the file it
    was predicted from, see :func:`label_image`), else ``affine``, else the affine of the declared ``orientation``
    with ``spacing`` ``(z, y, x)`` mm (:func:`~lightning_selfreg.data.preprocessing.affine_for`: the Synapse
    layout's LPS arrays get an LPS affine; without an orientation the axes are labelled RAS, no anatomical claim).
    """
    from lightning_selfreg.data.preprocessing import affine_for

    if reference is None and affine is None:
        affine = affine_for(orientation, spacing)
    save_image(label_image(array_dhw, reference, affine), path)


def save_prediction(pred: np.ndarray, out_dir: Path, case: str, spacing: Sequence[float] | None,
                    num_classes: int, affine: np.ndarray | None = None, orientation: Sequence[str] | None = None,
                    reference: Any = None) -> Path:
    """Save one case's ``(D, H, W)`` prediction: ``<case>.nii.gz`` for volumes, ``<case>.png`` for ``D = 1``.

    Binary PNG masks are written as 0/255 so that they are visible; multi-class ones hold the class index. A
    volume gets the geometry of ``reference`` / ``affine`` / ``orientation`` and ``spacing`` (see
    :func:`save_nifti`): with the input file's, the prediction overlays it voxel for voxel.

    Returns:
        The written path.
    """
    if pred.shape[0] == 1 and affine is None and reference is None:
        path = out_dir / f"{case}.png"
        save_png(pred[0], path, num_classes)
        return path
    path = out_dir / f"{case}.nii.gz"
    save_nifti(pred, path, spacing, affine, orientation, reference)
    return path


def save_png(mask: np.ndarray, path: str | Path, num_classes: int) -> None:
    """Write an ``(H, W)`` label map as PNG (atomically): 0/255 for a binary model, the class index otherwise.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "mask.png"
        >>> save_png(np.array([[0, 1], [1, 0]]), path, num_classes=2)
        >>> np.asarray(Image.open(path)).tolist()
        [[0, 255], [255, 0]]
    """
    mask = np.asarray(mask).astype(np.uint8 if num_classes <= 256 else np.uint16)
    if num_classes == 2:
        mask = mask * np.uint8(255)
    atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))


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
