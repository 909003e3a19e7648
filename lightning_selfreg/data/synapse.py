"""Synapse multi-organ CT in the TransUNet layout, and the CT sample bundled with the package (same layout).

Layout read as is::

    <data_dir>/train_npz/<case>_slice<NNN>.npz   keys `image` (H, W) float in [0, 1], `label` (H, W)
    <data_dir>/test_vol_h5/<case>.npy.h5         datasets `image`, `label` (D, H, W); optional attr `spacing` (z, y, x)
    <data_dir>/lists/train.txt                   slice names without extension, one per line
    <data_dir>/lists/test_vol.txt                case names, one per line
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lightning_selfreg.data.base import DataError, Item, SegDataModule, check_arrays
from lightning_selfreg.data.transforms import RandomAffine

__all__ = [
    "SAMPLE_CLASS_NAMES",
    "SAMPLE_DIR",
    "SYNAPSE_CLASS_NAMES",
    "SYNAPSE_VAL_CASES",
    "SampleCTDataModule",
    "SynapseDataModule",
    "read_list",
    "read_slice",
    "read_volume",
]

SYNAPSE_CLASS_NAMES = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")
SAMPLE_CLASS_NAMES = SYNAPSE_CLASS_NAMES
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
# The standard protocol has no validation list. We hold out these 4 of the 18 training cases (every 4th case of
# the sorted list starting from the second: 0006 0010 0026 0031; 14 cases / 1,708 slices stay for training) so
# that checkpoints are chosen on validation Dice and the 12 test cases are only used by `trainer.test`.
SYNAPSE_VAL_CASES = ("case0006", "case0010", "case0026", "case0031")

SYNAPSE_LAYOUT = (
    "train_npz/<case>_slice<NNN>.npz (keys image, label; 2D); test_vol_h5/<case>.npy.h5 (datasets image, label; "
    "D x H x W; optional attribute spacing = z, y, x mm); lists/train.txt (slice names); lists/test_vol.txt (cases)"
)


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
    path = Path(path)
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; found keys {data.files}.")
            image, label = data[keys[0]], data[keys[1]]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot be read as .npz ({err}).") from err
    check_arrays(path, image, label, num_classes, image_ndim=(2,), label_ndim=2)
    return image.astype(np.float32), label.astype(np.int64)


def read_volume(path: str | Path, num_classes: int) -> dict[str, Any]:
    """Read and check one ``.npy.h5`` test volume (datasets ``image``, ``label``; optional attr ``spacing``).

    Returns:
        ``{"image": float32 (D, H, W), "label": int64 (D, H, W), "spacing": float64 (3,) or None}``.

    Raises:
        DataError: Unreadable file, missing dataset, shape mismatch, non-finite image or out-of-range label.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {missing}; found {list(f.keys())}.")
            image, label = f["image"][()], f["label"][()]
            spacing = f.attrs.get("spacing")
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err}).") from err
    check_arrays(path, image, label, num_classes, image_ndim=(3,), label_ndim=3)
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,) or not (spacing > 0).all():
            raise DataError(f"{path}: attribute `spacing` must be 3 positive numbers (z, y, x), found {spacing}.")
    return {"image": image.astype(np.float32), "label": label.astype(np.int64), "spacing": spacing}


def _case_of(slice_name: str) -> str:
    return slice_name.rsplit("_slice", 1)[0]


class SynapseDataModule(SegDataModule):
    """Synapse multi-organ CT (TransUNet preprocessing): 2D training slices, 3D test volumes, 9 classes.

    Validation holds out :data:`SYNAPSE_VAL_CASES` of the 18 training cases by default (the standard protocol
    has no validation list); pass ``val_cases=()`` for none, or ``fold`` / ``num_folds`` for cross-validation
    over the training cases. The 12 test volumes are only read by the test stage.

    Args:
        data_dir: Root of the layout (see the module docstring).
        val_cases: Held-out training cases for validation (default :data:`SYNAPSE_VAL_CASES`).
        **kwargs: See :class:`~lightning_selfreg.data.base.SegDataModule` (``image_size`` 224, ``batch_size``
            24, ``transform="paper"``, ``cache``, ``fold``, ...).
    """

    num_classes = 9
    class_names = SYNAPSE_CLASS_NAMES
    in_channels = 1
    layout_help = SYNAPSE_LAYOUT

    def __init__(self, data_dir: str | Path, val_cases: Sequence[str] | None = SYNAPSE_VAL_CASES, **kwargs) -> None:
        super().__init__(data_dir, val_cases=val_cases, **kwargs)

    def check_layout(self) -> None:
        """Every folder and list of the TransUNet layout exists."""
        self._require("train_npz", "test_vol_h5", "lists/train.txt", "lists/test_vol.txt")

    def _index(self, split: str) -> list[Item] | None:
        if split == "train":
            names = read_list(self.data_dir / "lists" / "train.txt")
            return [Item(_case_of(n), self.data_dir / "train_npz" / f"{n}.npz", name=n) for n in names]
        if split == "test":
            cases = read_list(self.data_dir / "lists" / "test_vol.txt")
            return [Item(c, self.data_dir / "test_vol_h5" / f"{c}.npy.h5", name=c) for c in cases]
        return None

    def _read_sample(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        return read_slice(item.path, self.num_classes)

    def _read_case(self, item: Item) -> dict[str, Any]:
        return read_volume(item.path, self.num_classes)


class SampleCTDataModule(SynapseDataModule):
    """The real abdominal CT sample bundled with the package (TotalSegmentator 2.18.0 test data, Apache-2.0).

    One training patient (51 axial slices at 3 mm, all 8 Synapse organs) and one test patient (20 slices of
    512 x 512, 0.98 mm; aorta, liver, pancreas, spleen, stomach). The masks are TotalSegmentator predictions,
    not manual labels (``lightning_selfreg/data/sample/README.md``). There is no validation split (one training
    patient); the test patient is only used by ``trainer.test``. Training slices are resized once and cached;
    augmentation runs batched on the training device.

    Args:
        image_size: Training side; slices are resized to ``image_size x image_size``.
        batch_size: Training batch size.
        batch_transform: Batched augmentation or ``None``; default: rotation +-15 deg, zoom 1/1.5..1.5, shift
            7.5 %, intensity jitter (no flips: they ruin left/right organs on this sample).
        data_dir: Override the bundled folder.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 96,
        batch_size: int = 8,
        batch_transform: RandomAffine | None = RandomAffine(),  # noqa: B008 (stateless)
        data_dir: str | Path = SAMPLE_DIR,
    ) -> None:
        super().__init__(data_dir, image_size=image_size, batch_size=batch_size, transform=None,
                         batch_transform=batch_transform, cache=True, val_cases=None)
