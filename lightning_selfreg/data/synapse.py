"""Data in the Synapse (TransUNet) layout, and the CT sample bundled with the package.

Layout read as is::

    <data_dir>/train_npz/<slice>.npz         keys `image` (H, W) float in [0, 1], `label` (H, W) int
    <data_dir>/test_vol_h5/<case>.npy.h5     datasets `image`, `label` (D, H, W); optional attr `spacing` (z, y, x)
    <data_dir>/lists/train.txt               slice names (``<case>_slice<NNN>``), one per line
    <data_dir>/lists/test_vol.txt            case names, one per line
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_selfreg.data.transforms import RandomAffine, resize_image, resize_label

__all__ = [
    "SAMPLE_CLASS_NAMES",
    "SAMPLE_DIR",
    "SYNAPSE_CLASS_NAMES",
    "DataError",
    "SampleCTDataModule",
    "SynapseLayoutDataModule",
    "read_slice",
    "read_volume",
]

SYNAPSE_CLASS_NAMES = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")
SAMPLE_CLASS_NAMES = SYNAPSE_CLASS_NAMES
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


class DataError(ValueError):
    """A data file or folder does not match the expected layout or content; the message names the file."""


def _check_arrays(path: Path, image: np.ndarray, label: np.ndarray, num_classes: int, ndim: int) -> None:
    if image.ndim != ndim:
        raise DataError(f"{path}: `image` must have {ndim} dimensions, found shape {image.shape}.")
    if image.shape != label.shape:
        raise DataError(f"{path}: `image` shape {image.shape} differs from `label` shape {label.shape}.")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: `image` contains NaN or infinite values.")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), found values in [{label.min()}, {label.max()}]."
        )
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise DataError(f"{path}: `label` holds non-integer values.")


def read_slice(path: str | Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one training slice ``.npz`` (keys ``image``, ``label``).

    Returns:
        ``(image float32 (H, W), label int64 (H, W))``.

    Raises:
        DataError: Unreadable file, missing key, shape mismatch, non-finite image or out-of-range label.
    """
    path = Path(path)
    try:
        with np.load(path) as data:
            missing = [k for k in ("image", "label") if k not in data.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; found keys {data.files}.")
            image, label = data["image"], data["label"]
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot be read as .npz ({err}).") from err
    _check_arrays(path, image, label, num_classes, ndim=2)
    return image.astype(np.float32), label.astype(np.int64)


def read_volume(path: str | Path, num_classes: int) -> dict[str, Any]:
    """Read and check one test volume ``.npy.h5`` (datasets ``image``, ``label``; optional attr ``spacing``).

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
    _check_arrays(path, image, label, num_classes, ndim=3)
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,) or not (spacing > 0).all():
            raise DataError(f"{path}: attribute `spacing` must be 3 positive numbers (z, y, x), found {spacing}.")
    return {"image": image.astype(np.float32), "label": label.astype(np.int64), "spacing": spacing}


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"List file {path} does not exist.")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"List file {path} is empty.")
    return names


class _SliceDataset(Dataset):
    """Pre-resized slices held in memory as tensors."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class _VolumeDataset(Dataset):
    """Test volumes read from disk on access (no handle is kept open, so it is safe in worker processes)."""

    def __init__(self, paths: Sequence[Path], num_classes: int) -> None:
        self.paths, self.num_classes = list(paths), num_classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        volume = read_volume(self.paths[i], self.num_classes)
        item = {
            "image": torch.from_numpy(volume["image"]),
            "label": torch.from_numpy(volume["label"]),
            "case": self.paths[i].name.removesuffix(".npy.h5"),
        }
        if volume["spacing"] is not None:
            item["spacing"] = torch.from_numpy(volume["spacing"])
        return item


class UnpaddedDistributedSampler(DistributedSampler):
    """Shard an evaluation set over ranks without repeating samples (rank ``r`` gets ``r, r + W, r + 2W, ...``).

    ``DistributedSampler`` pads the set so all ranks get the same count, which would count some test cases twice
    in per-case metrics. Ranks may get one sample less here; metrics that gather their states still see every case
    exactly once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class SynapseLayoutDataModule(pl.LightningDataModule):
    """2D training slices and 3D test volumes in the Synapse (TransUNet) layout.

    Training slices are read and checked once, resized to ``image_size`` and kept in memory as tensors;
    augmentation runs batched on the training device (:meth:`on_after_batch_transfer`). Test volumes are read
    one at a time; each test batch is one whole volume.

    Args:
        data_dir: Root of the layout (see the module docstring).
        image_size: Side (or ``(H, W)``) the network is trained at.
        batch_size: Training batch size.
        num_classes: Classes including background.
        class_names: Foreground class names.
        val_cases: Case names held out of ``train.txt`` for validation (none: no validation loop).
        augment: Batched augmentation applied to training batches, or ``None``.
        num_workers: DataLoader workers for the test volumes.
    """

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int | Sequence[int] = 224,
        batch_size: int = 24,
        num_classes: int = 9,
        class_names: Sequence[str] = SYNAPSE_CLASS_NAMES,
        val_cases: Sequence[str] = (),
        augment: RandomAffine | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, found {batch_size}.")
        if len(class_names) != num_classes - 1:
            raise ValueError(f"`class_names` must have {num_classes - 1} entries, found {len(class_names)}.")
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.val_cases = tuple(val_cases)
        self.augment = augment
        self.num_workers = num_workers
        self._train: _SliceDataset | None = None
        self._val: _SliceDataset | None = None
        self._test: _VolumeDataset | None = None

    def check_layout(self) -> None:
        """Fail with one message naming every missing part of the layout.

        Raises:
            DataError: If ``data_dir`` or one of its expected entries is missing.
        """
        expected = ["train_npz/", "test_vol_h5/", "lists/train.txt", "lists/test_vol.txt"]
        missing = [e for e in expected if not (self.data_dir / e.rstrip("/")).exists()]
        if not self.data_dir.is_dir() or missing:
            what = "does not exist" if not self.data_dir.is_dir() else f"lacks {', '.join(missing)}"
            raise DataError(
                f"Data directory {self.data_dir} {what}. Expected the Synapse layout: train_npz/<slice>.npz "
                "(keys image, label), test_vol_h5/<case>.npy.h5 (datasets image, label), lists/train.txt, "
                "lists/test_vol.txt."
            )

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists."""
        return bool(self.val_cases)

    def _load_slices(self, names: Sequence[str]) -> _SliceDataset:
        images, labels = [], []
        for name in names:
            image, label = read_slice(self.data_dir / "train_npz" / f"{name}.npz", self.num_classes)
            images.append(resize_image(torch.from_numpy(image)[None, None], self.image_size)[0])
            labels.append(resize_label(torch.from_numpy(label)[None], self.image_size)[0].to(torch.uint8))
        return _SliceDataset(torch.stack(images), torch.stack(labels))

    def setup(self, stage: str | None = None) -> None:
        """Index, check and cache the split(s) the stage needs."""
        self.check_layout()
        if stage in ("fit", "validate", None) and self._train is None:
            names = _read_list(self.data_dir / "lists" / "train.txt")
            cases = {n.rsplit("_slice", 1)[0] for n in names}
            unknown = sorted(set(self.val_cases) - cases)
            if unknown:
                raise DataError(f"`val_cases` {unknown} are not cases of lists/train.txt (cases: {sorted(cases)}).")
            held_out = set(self.val_cases)
            self._train = self._load_slices([n for n in names if n.rsplit("_slice", 1)[0] not in held_out])
            if held_out:
                self._val = self._load_slices([n for n in names if n.rsplit("_slice", 1)[0] in held_out])
        if stage in ("test", "predict", None) and self._test is None:
            cases = _read_list(self.data_dir / "lists" / "test_vol.txt")
            paths = [self.data_dir / "test_vol_h5" / f"{c}.npy.h5" for c in cases]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"Test volumes listed in lists/test_vol.txt are missing: {missing}.")
            self._test = _VolumeDataset(paths, self.num_classes)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training slices; the last incomplete batch is kept (as in the authors' loaders)."""
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, num_workers=0,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        """Validation slices (empty when there is no validation split)."""
        return DataLoader(self._val if self._val is not None else [], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """One whole volume per batch; under DDP each case goes to exactly one rank."""
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(self._test, trainer.world_size, trainer.global_rank)
        return DataLoader(self._test, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Same volumes as :meth:`test_dataloader`."""
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Labels to int64; augmentation of training batches on their device."""
        if "label" in batch:
            batch["label"] = batch["label"].long()
        trainer = self.trainer
        if self.augment is not None and trainer is not None and trainer.training and batch["image"].ndim == 4:
            batch["image"], batch["label"] = self.augment(batch["image"], batch["label"])
        return batch


class SampleCTDataModule(SynapseLayoutDataModule):
    """The real abdominal CT sample bundled with the package (TotalSegmentator 2.18.0 test data, Apache-2.0).

    One training patient (51 axial slices at 3 mm, all 8 Synapse organs) and one test patient (20 slices of
    512 x 512, 0.98 mm; aorta, liver, pancreas, spleen, stomach). The masks are TotalSegmentator predictions,
    not manual labels. See ``lightning_selfreg/data/sample/README.md``. There is no validation split (one
    training patient); the test patient is only used by ``trainer.test``.

    Args:
        image_size: Training side; slices are resized to ``image_size x image_size``.
        batch_size: Training batch size.
        augment: Batched augmentation or ``None``; default: rotation +-15 deg, zoom 1/1.5..1.5, shift 7.5 %, intensity
            jitter (no flips: they ruin left/right organs on this sample).
        data_dir: Override the bundled folder.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 128,
        batch_size: int = 8,
        augment: RandomAffine | None = RandomAffine(),  # noqa: B008 (stateless)
        data_dir: str | Path = SAMPLE_DIR,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_classes=9,
            class_names=SAMPLE_CLASS_NAMES,
            augment=augment,
        )
