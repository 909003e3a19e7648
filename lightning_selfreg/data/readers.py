"""Readers shared by the dataset modules: list files, ``.npz`` slices and volumes, ``.npy.h5`` volumes.

Every reader checks what it reads (keys, shapes, finite values, label range) and raises a one-line
:class:`~lightning_selfreg.data.contract.DataError` naming the file. The histology images are read with
:func:`lightning_selfreg.data.image_io.load_image_2d`; nnU-Net's raw format has its own readers
(:mod:`~lightning_selfreg.data.nnunet.format`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lightning_selfreg.data.contract import DataError, check_arrays, check_num_classes
from lightning_selfreg.data.preflight import READ_ERRORS
from lightning_selfreg.utils.checks import SettingError

__all__ = [
    "check_npz_pair",
    "check_slice",
    "check_spacing",
    "find_list_dir",
    "list_dir_argument",
    "read_list",
    "read_npz_volume",
    "read_slice",
    "read_volume",
]


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a list file.

    Raises:
        DataError: Missing or empty file.
    """
    if not path.is_file():
        raise DataError(f"List file {path} does not exist.")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"List file {path} is empty.")
    return names


def _contents(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") or "empty"


def list_dir_argument(list_dir: str | Path | None) -> Path | None:
    """The ``list_dir`` argument of a DataModule as a path (None: search, see :func:`find_list_dir`).

    Raises:
        ValueError: For an empty string.
    """
    if isinstance(list_dir, str) and not list_dir:
        raise SettingError("list_dir", "`list_dir` must be a folder path or None, found ''.")
    return None if list_dir is None else Path(list_dir)


def find_list_dir(data_dir: str | Path, candidates: Sequence[str], required: Sequence[str],
                  list_dir: str | Path | None = None) -> Path:
    """The folder holding the list files: ``list_dir`` if given, else the first candidate that has all of them.

    Args:
        data_dir: The dataset root; ``candidates`` are relative to it.
        candidates: Folders to search, in order (e.g. :data:`~lightning_selfreg.data.synapse.SYNAPSE_LIST_DIRS`).
        required: File names the folder must hold.
        list_dir: An explicit folder (then nothing is searched).

    Raises:
        DataError: (``parameter="list_dir"``) The given folder lacks a list, or no candidate holds them all; the
            message names what was searched and what was found.
    """
    need = " and ".join(required)
    if list_dir is not None:
        folder = Path(list_dir)
        missing = [n for n in required if not (folder / n).is_file()]
        if missing:
            found = _contents(folder) if folder.is_dir() else "the folder does not exist"
            raise DataError(f"`list_dir` {folder}: expected {need}, found {found}.", parameter="list_dir")
        return folder
    data_dir = Path(data_dir)
    existing, absent = [], []
    for relative in candidates:
        folder = data_dir / relative
        if all((folder / n).is_file() for n in required):
            return folder
        (existing if folder.is_dir() else absent).append(relative)
    found = "; ".join(f"{r}/ holds {_contents(data_dir / r)}" for r in existing)
    raise DataError(f"no folder with {need} under {data_dir}: searched {', '.join(candidates)}; "
                    f"{'found ' + found if found else 'none of them exists'}. Expected the lists in one of these "
                    f"(or give `list_dir`).", parameter="list_dir")


def read_slice(path: str | Path, num_classes: int, keys: tuple[str, str] = ("image", "label")) -> tuple:
    """Read and check one 2D ``.npz`` slice.

    Args:
        path: The file.
        num_classes: Labels must lie in ``[0, num_classes)``.
        keys: Names of the image and label arrays (``("img", "label")`` for ACDC).

    Returns:
        ``(image float32 (H, W), label int64 (H, W))``.

    Raises:
        DataError: Unreadable file, missing key, shape mismatch, non-finite image or out-of-range label.
    """
    image, label = check_slice(path, num_classes, keys)
    return image.astype(np.float32), label.astype(np.int64)


def check_slice(path: str | Path, num_classes: int, keys: tuple[str, str] = ("image", "label")) -> tuple:
    """:func:`read_slice` without the dtype conversions: ``(image, label)`` as stored, checked."""
    return check_npz_pair(path, num_classes, keys, ndim=2)


def read_npz_volume(path: str | Path, num_classes: int, keys: tuple[str, str] = ("img", "label")) -> dict[str, Any]:
    """Read and check one 3D ``.npz`` volume (ACDC's test cases: keys ``img``, ``label``; no spacing stored).

    Returns:
        ``{"image": float32 (D, H, W), "label": int64 (D, H, W), "spacing": None}``.

    Raises:
        DataError: Unreadable file, missing key, shape mismatch, non-finite image or out-of-range label.
    """
    image, label = check_npz_pair(path, num_classes, keys, ndim=3)
    return {"image": image.astype(np.float32), "label": label.astype(np.int64), "spacing": None}


def check_npz_pair(path: str | Path, num_classes: int, keys: tuple[str, str], ndim: int) -> tuple:
    """Read one ``.npz`` holding an image and its label of ``ndim`` dimensions; checked, dtypes as stored.

    Args:
        path: The file.
        num_classes: Labels must lie in ``[0, num_classes)``.
        keys: Names of the image and label arrays.
        ndim: Dimensionality of both arrays (2 for slices, 3 for volumes).

    Returns:
        ``(image, label)``.

    Raises:
        DataError: Unreadable file, missing key, shape mismatch, non-finite image or out-of-range label.
    """
    path = Path(path)
    check_num_classes(num_classes)
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; found keys {data.files}.")
            image, label = data[keys[0]], data[keys[1]]
    except DataError:
        raise
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot be read as .npz ({type(err).__name__}: {err}).") from err
    check_arrays(path, image, label, num_classes, image_ndim=(ndim,), label_ndim=ndim)
    return image, label


def read_volume(path: str | Path, num_classes: int) -> dict[str, Any]:
    """Read and check one ``.npy.h5`` test volume (datasets ``image``, ``label``; optional attr ``spacing``).

    Returns:
        ``{"image": float32 (D, H, W), "label": int64 (D, H, W), "spacing": float64 (3,) or None}``.

    Raises:
        DataError: Unreadable file, missing dataset, shape mismatch, non-finite image or out-of-range label.
    """
    path = Path(path)
    check_num_classes(num_classes)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {missing}; found {list(f.keys())}.")
            image, label = f["image"][()], f["label"][()]
            spacing = f.attrs.get("spacing")
    except DataError:
        raise
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({type(err).__name__}: {err}).") from err
    check_arrays(path, image, label, num_classes, image_ndim=(3,), label_ndim=3)
    return {"image": image.astype(np.float32), "label": label.astype(np.int64), "spacing": check_spacing(path, spacing)}


def check_spacing(path: str | Path, spacing: Any) -> np.ndarray | None:
    """The ``spacing`` attribute as float64 ``(3,)`` (z, y, x) or None; DataError naming ``path`` if malformed."""
    if spacing is None:
        return None
    try:
        values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (3,) or not (np.isfinite(values) & (values > 0)).all():
        raise DataError(f"{path}: attribute `spacing` must be 3 positive numbers (z, y, x), found {spacing!r}.")
    return values
