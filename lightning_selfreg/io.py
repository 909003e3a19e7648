"""Writing predictions and reading user images for inference (NIfTI via nibabel, 2D images via Pillow)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "HU_WINDOW", "atomic_write", "atomic_write_text", "load_image_2d", "load_nifti", "remove_orphaned_temp_files",
    "save_nifti", "save_prediction",
]

log = logging.getLogger(__name__)
# The standard abdominal CT window (Synapse / TransUNet preprocessing), in HU: image = (clip(HU, low, high) - low) /
# (high - low). The bundled sample was built with it (tools/build_totalseg_sample.py); the default of predict.py's
# --window.
HU_WINDOW: tuple[float, float] = (-125.0, 275.0)
TEMP_NAME = re.compile(r"\.tmp(?P<pid>\d+)\.(?P<name>.+)")  # the temporary names of atomic_write: .tmp<pid>.<name>


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".tmp{pid}.{path.name}")  # keeps the suffix: writers that infer the format work


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary path next to ``path``, then rename it into place.

    ``os.replace`` is atomic, so readers see the old complete file or the new complete file, never a partial one,
    and a failed or killed write leaves no half-written ``path``. The temporary file is ``.tmp<pid>.<name>``; a
    failed write removes it, a killed one (SIGKILL, power loss) cannot: :func:`remove_orphaned_temp_files` does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, os.getpid())
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):  # not a valid pid here
        return False
    return True


def remove_orphaned_temp_files(folder: str | os.PathLike, include_own: bool = True) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder`` (not recursive).

    A write killed between creating its ``.tmp<pid>.<name>`` file and renaming it leaves that file behind (a
    checkpoint's is as large as the checkpoint). Only files of exactly that name pattern are considered, and only
    those whose writer process no longer exists on this machine: a live process may still be writing its file.
    A file carrying this process's own pid is an orphan of an earlier process that had the same pid (containers
    and job restarts reuse pids) as long as this process has not started writing there; ``include_own=False``
    keeps such files, for calls made while this process may have writes in flight in that folder.

    Args:
        folder: The folder to clean; a missing folder is fine.
        include_own: Also delete files carrying this process's pid.

    Returns:
        The deleted paths (each is also logged at INFO level).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match["pid"])
        if (pid == os.getpid() and not include_own) or (pid != os.getpid() and _process_alive(pid)):
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        log.info("removed %s (%d bytes), left by an interrupted write of %s", entry, size, match["name"])
        removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


def save_prediction(pred: np.ndarray, out_dir: Path, case: str, spacing: Sequence[float] | None,
                    num_classes: int, affine: np.ndarray | None = None) -> Path:
    """Save one case's ``(D, H, W)`` prediction: ``<case>.nii.gz`` for volumes, ``<case>.png`` for ``D = 1``.

    Binary PNG masks are written as 0/255 so that they are visible; multi-class ones hold the class index. A
    volume is written with ``affine`` when given (the input file's, e.g. an nnU-Net case item's ``"affine"``: the
    prediction then has the input's geometry voxel for voxel), else with ``diag(spacing)``.

    Returns:
        The written path.
    """
    if pred.shape[0] == 1:
        path = out_dir / f"{case}.png"
        mask = pred[0].astype(np.uint8) * (255 if num_classes == 2 else 1)
        atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))
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
