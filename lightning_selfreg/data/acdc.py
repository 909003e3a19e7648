"""ACDC cardiac MRI in the preprocessed layout most papers use (the MT-UNet / CASCADE copy, as in the SelfReg code).

Layout read as is::

    <data_dir>/lists_ACDC/train.txt   slice file names (with extension), one per line
    <data_dir>/lists_ACDC/valid.txt   slice file names
    <data_dir>/lists_ACDC/test.txt    volume file names
    <data_dir>/train/<name>           2D slice .npz with keys `img` (H, W), `label` (H, W)
    <data_dir>/valid/<name>           2D slice .npz
    <data_dir>/test/<name>            3D volume .npz with keys `img` (D, H, W), `label` (D, H, W)

Classes: background, RV (1), Myo (2), LV (3).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lightning_selfreg.data.base import DataError, Item, SegDataModule, check_arrays
from lightning_selfreg.data.synapse import read_list, read_slice

__all__ = ["ACDC_CLASS_NAMES", "ACDCDataModule"]

ACDC_CLASS_NAMES = ("RV", "Myo", "LV")

ACDC_LAYOUT = (
    "lists_ACDC/{train,valid,test}.txt (file names with extension); train/<name>.npz and valid/<name>.npz "
    "(keys img, label; 2D slices); test/<name>.npz (keys img, label; D x H x W volumes)"
)


def _patient(name: str) -> str:
    match = re.match(r"(patient\d+)", name)
    return match.group(1) if match else name.split("_")[0]


class ACDCDataModule(SegDataModule):
    """ACDC (70 train / 10 valid / 20 test patients in the standard split); 4 classes.

    Validation uses ``valid/`` by default; ``fold`` / ``num_folds`` re-split train + valid by patient.

    Args:
        data_dir: Root of the layout (see the module docstring).
        **kwargs: See :class:`~lightning_selfreg.data.base.SegDataModule` (``image_size`` 224, ``batch_size`` 24
            (the authors use 12), ``transform="paper"``, ...).
    """

    num_classes = 4
    class_names = ACDC_CLASS_NAMES
    in_channels = 1
    layout_help = ACDC_LAYOUT

    def check_layout(self) -> None:
        """The lists and the three folders exist."""
        self._require("lists_ACDC/train.txt", "lists_ACDC/valid.txt", "lists_ACDC/test.txt", "train", "valid",
                      "test")

    def _index(self, split: str) -> list[Item] | None:
        folder = {"train": "train", "val": "valid", "test": "test"}[split]
        names = read_list(self.data_dir / "lists_ACDC" / f"{folder}.txt")
        return [Item(_patient(n), self.data_dir / folder / n, name=n) for n in names]

    def _read_sample(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        return read_slice(item.path, self.num_classes, keys=("img", "label"))

    def _read_case(self, item: Item) -> dict[str, Any]:
        try:
            with np.load(item.path) as data:
                missing = [k for k in ("img", "label") if k not in data.files]
                if missing:
                    raise DataError(f"{item.path}: missing key(s) {missing}; found keys {data.files}.")
                image, label = data["img"], data["label"]
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{item.path}: cannot be read as .npz ({err}).") from err
        check_arrays(item.path, image, label, self.num_classes, image_ndim=(3,), label_ndim=3)
        return {"image": image.astype(np.float32), "label": label.astype(np.int64), "spacing": None}
