"""ACDC cardiac MRI in the preprocessed layout most papers use (the MT-UNet / CASCADE copy, as in the SelfReg code).

Layout read as is::

    <list_dir>/train.txt              slice file names (with extension), one per line
    <list_dir>/valid.txt              slice file names
    <list_dir>/test.txt               volume file names
    <data_dir>/train/<name>           2D slice .npz with keys `img` (H, W), `label` (H, W)
    <data_dir>/valid/<name>           2D slice .npz
    <data_dir>/test/<name>            3D volume .npz with keys `img` (D, H, W), `label` (D, H, W)

The list folder is ``list_dir`` if given, else the first of :data:`ACDC_LIST_DIRS` that holds the three lists
(``<data_dir>/lists_ACDC`` in the MT-UNet copy; ``lists/lists_ACDC`` as some repositories keep it).

Classes: background, RV (1), Myo (2), LV (3).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_selfreg.data.contract import Item
from lightning_selfreg.data.datamodule import SegDataModule
from lightning_selfreg.data.preflight import check_pair_header, npz_headers
from lightning_selfreg.data.preflight_record import foreground_fraction
from lightning_selfreg.data.preprocessing import ChannelNorm, check_axcodes
from lightning_selfreg.data.readers import (
    check_slice,
    find_list_dir,
    list_dir_argument,
    read_list,
    read_npz_volume,
    read_slice,
)
from lightning_selfreg.utils.checks import SettingError

__all__ = ["ACDC_CLASS_NAMES", "ACDC_LIST_DIRS", "ACDCDataModule"]

ACDC_CLASS_NAMES = ("RV", "Myo", "LV")

ACDC_LAYOUT = (
    "lists_ACDC/{train,valid,test}.txt (file names with extension); train/<name>.npz and valid/<name>.npz "
    "(keys img, label; 2D slices); test/<name>.npz (keys img, label; D x H x W volumes)"
)
ACDC_LIST_FILES = ("train.txt", "valid.txt", "test.txt")
ACDC_LIST_DIRS = ("lists_ACDC", "lists/lists_ACDC", "../lists_ACDC", "../lists/lists_ACDC")


def _patient(name: str) -> str:
    match = re.match(r"(patient\d+)", name)
    return match.group(1) if match else name.split("_")[0]


class ACDCDataModule(SegDataModule):
    """ACDC (70 train / 10 valid / 20 test patients in the standard split); 4 classes.

    Validation uses ``valid/`` by default; ``val_cases`` (patients) or ``fold`` / ``num_folds`` re-split
    train + valid by patient.

    **Prediction on raw scans.** The copy's arrays are stored normalised, and how is not documented by MT-UNet;
    ``intensity`` says what a raw cine-MRI volume needs before this model sees it: ``"rescale_to_0_1"``
    (per-volume min-max, what the published ACDC conversions such as SSL4MIS's do; the default), ``"zscore"`` or
    ``"none"``. No anatomical orientation is declared by default (``orientation=None``): the short-axis stacks
    are oblique, and reorienting them to the closest canonical axes can move the slice axis off the file's third
    axis; inputs are then segmented slice by slice along their third axis as stored, as the copy's volumes are.

    Args:
        data_dir: Root of the layout (see the module docstring).
        list_dir: Folder with ``train.txt``, ``valid.txt``, ``test.txt`` (default: the first of
            :data:`ACDC_LIST_DIRS` under ``data_dir`` that has them).
        intensity: Normalisation of raw inputs at prediction (see above).
        orientation: Axis codes of the arrays' ``(W, H, D)`` axes, or None (see above).
        **kwargs: See :class:`~lightning_selfreg.data.datamodule.SegDataModule` (``image_size`` 224, ``batch_size`` 24
            (the authors use 12), ``transform="paper"``, ...).
    """

    num_classes = 4
    class_names = ACDC_CLASS_NAMES
    in_channels = 1
    layout_help = ACDC_LAYOUT
    channel_names = ("MRI",)

    def __init__(self, data_dir: str | Path | None = None, list_dir: str | Path | None = None,
                 intensity: Literal["rescale_to_0_1", "zscore", "none"] = "rescale_to_0_1",
                 orientation: str | None = None, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.list_dir = list_dir_argument(list_dir)
        if intensity not in ("rescale_to_0_1", "zscore", "none"):
            raise SettingError("intensity", f"`intensity` must be 'rescale_to_0_1', 'zscore' or 'none', found "
                                            f"{intensity!r}.")
        self.intensity = (ChannelNorm(intensity),)
        self._orientation = check_axcodes(orientation)

    @property
    def orientation(self) -> tuple[str, str, str] | None:
        """The declared voxel order of the layout's arrays (``orientation``; None by default, see the class)."""
        return self._orientation

    @property
    def lists(self) -> Path:
        """The folder the list files are read from (``list_dir`` or the first match of the search)."""
        return find_list_dir(self.data_dir, ACDC_LIST_DIRS, ACDC_LIST_FILES, self.list_dir)

    def check_layout(self) -> None:
        """The three data folders exist and the list folder is found."""
        self._require("train", "valid", "test")
        _ = self.lists

    def _index(self, split: str) -> list[Item] | None:
        folder = {"train": "train", "val": "valid", "test": "test"}[split]
        names = read_list(self.lists / f"{folder}.txt")
        return [Item(_patient(n), self.data_dir / folder / n, name=n) for n in names]

    def _check_header(self, item: Item) -> None:
        ndim = 3 if item.path.parent.name == "test" else 2
        check_pair_header(item.path, npz_headers(item.path), ("img", "label"), (ndim,), ndim)

    def _read_sample(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        return read_slice(item.path, self.num_classes, keys=("img", "label"))

    def _check_sample(self, item: Item) -> float | None:
        return foreground_fraction(check_slice(item.path, self.num_classes, keys=("img", "label"))[1])

    def _read_case(self, item: Item) -> dict[str, Any]:
        return read_npz_volume(item.path, self.num_classes, keys=("img", "label"))
