"""Synapse multi-organ CT in the TransUNet layout, and the CT sample bundled with the package (same layout).

Layout read as is::

    <data_dir>/train_npz/<case>_slice<NNN>.npz   keys `image` (H, W) float in [0, 1], `label` (H, W)
    <data_dir>/test_vol_h5/<case>.npy.h5         datasets `image`, `label` (D, H, W); optional attr `spacing` (z, y, x)
    <list_dir>/train.txt                         slice names without extension, one per line
    <list_dir>/test_vol.txt                      case names, one per line

The list folder is ``list_dir`` if given, else the first of :data:`SYNAPSE_LIST_DIRS` (relative to ``data_dir``)
that holds both lists: ``<data_dir>/lists``, or ``lists/lists_Synapse`` as TransUNet's and Swin-Unet's
repositories ship it, next to or above the data folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_selfreg.data.contract import Item
from lightning_selfreg.data.datamodule import SegDataModule
from lightning_selfreg.data.image_io import HU_WINDOW
from lightning_selfreg.data.preflight import check_h5_volume, check_pair_header, h5_headers, npz_headers
from lightning_selfreg.data.preflight_record import foreground_fraction
from lightning_selfreg.data.preprocessing import ChannelNorm, check_axcodes
from lightning_selfreg.data.readers import (
    check_slice,
    check_spacing,
    find_list_dir,
    list_dir_argument,
    read_list,
    read_slice,
    read_volume,
)
from lightning_selfreg.data.transforms import RandomAffine
from lightning_selfreg.utils.checks import SettingError

__all__ = [
    "SAMPLE_DIR",
    "SYNAPSE_CLASS_NAMES",
    "SYNAPSE_LIST_DIRS",
    "SYNAPSE_VAL_CASES",
    "SampleCTDataModule",
    "SynapseDataModule",
]

SYNAPSE_CLASS_NAMES = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
# The standard protocol has no validation list. We hold out these 4 of the 18 training cases (every 4th case of
# the sorted list starting from the second: 0006 0010 0026 0031; 14 cases / 1,708 slices stay for training) so
# that checkpoints are chosen on validation Dice and the 12 test cases are only used by `trainer.test`.
SYNAPSE_VAL_CASES = ("case0006", "case0010", "case0026", "case0031")

SYNAPSE_LAYOUT = (
    "train_npz/<case>_slice<NNN>.npz (keys image, label; 2D); test_vol_h5/<case>.npy.h5 (datasets image, label; "
    "D x H x W; optional attribute spacing = z, y, x mm); lists/train.txt (slice names) and lists/test_vol.txt "
    "(cases), or TransUNet's lists/lists_Synapse/ beside or above the data folder"
)
SYNAPSE_LIST_FILES = ("train.txt", "test_vol.txt")
# where users keep the lists, relative to the data folder: our layout; TransUNet's / Swin-Unet's repository folder
# `lists/lists_Synapse` copied into, next to, or one level above the data folder, or the repository itself beside it
SYNAPSE_LIST_DIRS = (
    "lists", "lists/lists_Synapse", "lists_Synapse", "../lists/lists_Synapse", "../lists_Synapse",
    "../../lists/lists_Synapse", "../TransUNet/lists/lists_Synapse", "../../TransUNet/lists/lists_Synapse",
    "../Swin-Unet/lists/lists_Synapse", "../../Swin-Unet/lists/lists_Synapse",
)


def _case_of(slice_name: str) -> str:
    return slice_name.rsplit("_slice", 1)[0]


class SynapseDataModule(SegDataModule):
    """Synapse multi-organ CT (TransUNet preprocessing): 2D training slices, 3D test volumes, 9 classes.

    Validation holds out :data:`SYNAPSE_VAL_CASES` of the 18 training cases by default (the standard protocol
    has no validation list); pass other ``val_cases``, ``val_cases=()`` for none, or ``fold`` / ``num_folds``
    for cross-validation over the training cases. The 12 test volumes are only read by the test stage (and in
    full by the pre-flight :meth:`validate`).

    **Orientation.** The layout's arrays carry no affine. Their voxel order is declared by ``orientation``, the
    axis codes of the ``(W, H, D)`` array axes (see :mod:`~lightning_selfreg.data.preprocessing`): ``"LPS"``
    (columns towards the patient's left, rows towards posterior, slices inferior to superior: axial slices in
    the radiological display), which the bundled sample's converter writes (``tools/build_totalseg_sample.py``)
    and which TransUNet's arrays follow as far as they are documented (their ``(D, H, W)`` order with axial
    slices, and TransUNet writing its predictions with SimpleITK's identity direction, i.e. LPS); the in-plane
    directions of the original BTCV conversion are not documented, so set ``orientation`` if your copy differs.
    Prediction reorients every input to it; test predictions are written with this orientation's affine.

    Args:
        data_dir: Root of the layout (see the module docstring).
        val_cases: Held-out training cases for validation (default :data:`SYNAPSE_VAL_CASES`, or none when
            ``fold`` is given).
        list_dir: Folder with ``train.txt`` and ``test_vol.txt`` (default: the first of
            :data:`SYNAPSE_LIST_DIRS` under ``data_dir`` that has both, e.g. TransUNet's ``lists/lists_Synapse``).
        orientation: Axis codes of the arrays' ``(W, H, D)`` axes, or None for no anatomical orientation (inputs
            are then used in their stored voxel order).
        **kwargs: See :class:`~lightning_selfreg.data.datamodule.SegDataModule` (``image_size`` 224, ``batch_size``
            24, ``transform="paper"``, ``cache``, ``fold``, ...).
    """

    num_classes = 9
    class_names = SYNAPSE_CLASS_NAMES
    in_channels = 1
    layout_help = SYNAPSE_LAYOUT
    channel_names = ("CT",)
    intensity = (ChannelNorm("window", *HU_WINDOW),)  # the layout's files store the windowed image in [0, 1]

    def __init__(self, data_dir: str | Path | None = None, val_cases: Sequence[str] | None = None,
                 list_dir: str | Path | None = None, orientation: str | None = "LPS", **kwargs) -> None:
        if val_cases is None and kwargs.get("fold") is None:
            val_cases = SYNAPSE_VAL_CASES
        super().__init__(data_dir, val_cases=val_cases, **kwargs)
        self.list_dir = list_dir_argument(list_dir)
        self._orientation = check_axcodes(orientation)

    @property
    def orientation(self) -> tuple[str, str, str] | None:
        """The declared voxel order of the layout's arrays (the ``orientation`` argument; see the class)."""
        return self._orientation

    @property
    def lists(self) -> Path:
        """The folder the list files are read from (``list_dir`` or the first match of the search)."""
        return find_list_dir(self.data_dir, SYNAPSE_LIST_DIRS, SYNAPSE_LIST_FILES, self.list_dir)

    def check_layout(self) -> None:
        """The data folders of the TransUNet layout exist and the list folder is found."""
        self._require("train_npz", "test_vol_h5")
        _ = self.lists

    def _index(self, split: str) -> list[Item] | None:
        if split == "train":
            names = read_list(self.lists / "train.txt")
            return [Item(_case_of(n), self.data_dir / "train_npz" / f"{n}.npz", name=n) for n in names]
        if split == "test":
            cases = read_list(self.lists / "test_vol.txt")
            return [Item(c, self.data_dir / "test_vol_h5" / f"{c}.npy.h5", name=c) for c in cases]
        return None

    def _check_header(self, item: Item) -> None:
        if item.path.suffix == ".npz":
            check_pair_header(item.path, npz_headers(item.path), ("image", "label"), (2,), 2)
        else:
            datasets, attrs = h5_headers(item.path)
            check_pair_header(item.path, datasets, ("image", "label"), (3,), 3, kind="datasets")
            check_spacing(item.path, attrs.get("spacing"))

    def _check_sample(self, item: Item) -> float | None:
        return foreground_fraction(check_slice(item.path, self.num_classes)[1])

    def _check_case(self, item: Item) -> float | None:
        return check_h5_volume(item.path, self.num_classes)

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
        batch_transform: Batched augmentation, ``None`` for none, or ``"default"``: ``RandomAffine()``, rotation
            +-15 deg, zoom 1/1.5..1.5, shift 7.5 %, intensity jitter (no flips: they ruin left/right organs on this
            sample). A name rather than an instance as the default, so that a configuration file can say it.
        data_dir: Override the bundled folder.
        cache_dir: Cache root for the pre-flight's record (default ``$XDG_CACHE_HOME/lightning_selfreg``).
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 96,
        batch_size: int = 8,
        batch_transform: RandomAffine | Literal["default"] | None = "default",
        data_dir: str | Path = SAMPLE_DIR,
        cache_dir: str | Path | None = None,
    ) -> None:
        if isinstance(batch_transform, str):
            if batch_transform != "default":
                raise SettingError("batch_transform", f"`batch_transform` must be a RandomAffine, 'default' or "
                                   f"None, found {batch_transform!r}.")
            batch_transform = RandomAffine()
        super().__init__(data_dir, image_size=image_size, batch_size=batch_size, transform=None,
                         batch_transform=batch_transform, cache=True, val_cases=(), cache_dir=cache_dir)
