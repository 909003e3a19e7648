"""``NnUNetDataModule``: any nnU-Net v2 raw dataset (``DatasetXXX_Name/``), in a 2D or a 3D configuration.

Reads the raw format (:mod:`~lightning_selfreg.data.nnunet.format`), preprocesses every case once as nnU-Net does
(:mod:`~lightning_selfreg.data.nnunet.preprocess`: target spacing, normalisation, resampling) into a cache folder,
and serves:

* ``configuration="3d"``: random training patches of ``patch_size`` (D, H, W) at the preprocessed grid, a third
  of them centred on a foreground voxel (nnU-Net's oversampling); validation and test cases as whole
  preprocessed volumes with their native labels (the module predicts with a sliding window and resamples the
  logits back to the native grid);
* ``configuration="2d"``: the same sampling on single slices of the volumes, which are resampled in-plane only
  (training patches of ``patch_size`` (H, W)); validation on every slice of the validation cases (padded or
  centre-cropped to ``patch_size``); test cases as ``(D, C, H', W')`` slice stacks with their native labels.

Training sample ``i`` of an epoch draws everything (case, slice, patch position, foreground voxel) from its seed
``derive_seed(seed, epoch, i)`` (the :class:`~lightning_selfreg.data.sampling.SampleKey` that the training sampler
yields), so the batches depend on the seed, the epoch and the index only. Whether a sample is forced to
foreground is a function of its index: exactly ``round(n * 0.33)`` of an epoch's ``n`` samples are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_selfreg.data.contract import DataError, Item
from lightning_selfreg.data.datamodule import SegDataModule
from lightning_selfreg.data.nnunet.format import (
    NNUNET_LAYOUT,
    CaseFiles,
    check_case,
    crossval_split,
    find_cases,
    random_split,
    read_case_header,
    read_dataset_json,
    read_splits,
)
from lightning_selfreg.data.nnunet.planner import DatasetShape
from lightning_selfreg.data.nnunet.preprocess import (
    Fingerprint,
    cache_key,
    channel_norms,
    compute_fingerprint,
    is_preprocessed_case,
    load_preprocessed,
    preprocess_case,
    target_spacing,
)
from lightning_selfreg.data.preflight import check_disjoint, report_inverted, run_checks
from lightning_selfreg.data.preflight_record import PreflightRecord
from lightning_selfreg.data.preprocessing import (
    Preprocessing,
    check_axcodes,
    orientation_of,
    orientation_transform,
    reorient_spacing,
)
from lightning_selfreg.data.resampling import new_shape
from lightning_selfreg.data.sampling import PADDING, PaddingKey, UnpaddedDistributedSampler
from lightning_selfreg.data.transforms import RandomAffine, default_seed, derive_seed
from lightning_selfreg.utils.checks import SettingError

__all__ = ["CONFIGURATIONS", "SAMPLE_NNUNET_DIR", "Configuration", "NnUNetDataModule", "crop_or_pad"]

#: The bundled CT sample in the nnU-Net v2 raw layout (one training and one test patient, raw HU).
SAMPLE_NNUNET_DIR = Path(__file__).resolve().parents[1] / "sample_nnunet" / "Dataset900_TotalSegSample"

Configuration = Literal["2d", "3d"]  # "2d": slices of the volumes; "3d": patches, sliding-window evaluation
CONFIGURATIONS: tuple[str, ...] = get_args(Configuration)
OVERSAMPLE_FOREGROUND = 0.33  # nnU-Net's oversample_foreground_percent
MAX_DEFAULT_PATCH = {"2d": 256, "3d": 128}
DONE = "done.json"


def crop_or_pad(array: np.ndarray, lower: Sequence[int], size: Sequence[int], value: float = 0) -> np.ndarray:
    """The window ``[lower, lower + size)`` of the last ``len(size)`` axes, padded with ``value`` outside.

    Args:
        array: ``(..., *spatial)``.
        lower: Lower corner, may be negative or beyond the array.
        size: Window size.
        value: Fill value outside the array.

    Returns:
        ``(..., *size)`` copy.
    """
    n = len(size)
    spatial = array.shape[-n:]
    out = np.full(array.shape[:-n] + tuple(size), value, dtype=array.dtype)
    src, dst = [], []
    for lo, sz, dim in zip(lower, size, spatial, strict=True):
        a, b = max(lo, 0), min(lo + sz, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(..., *dst)] = array[(..., *src)]
    return out


def _bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's ``get_bbox`` range of lower corners (``need_to_pad`` = what the image lacks)."""
    shape, patch = np.asarray(shape), np.asarray(patch)
    need = np.maximum(patch - shape, 0)
    lbs = -need // 2
    ubs = shape + need // 2 + need % 2 - patch
    return lbs, ubs


def _reoriented(header: Any, orientation: Sequence[str] | None) -> Any:
    """A :class:`CaseHeader` with its shape and spacing in the voxel order ``orientation``."""
    ornt = None if orientation is None or header.affine is None else orientation_transform(header.affine, orientation)
    if ornt is None:
        return header
    shape = reorient_spacing(header.shape, ornt)  # permutes (z, y, x) triples alike
    return replace(header, shape=tuple(int(s) for s in shape),
                   spacing=np.asarray(reorient_spacing(header.spacing, ornt)))


def _forced(index: int, fraction: float) -> bool:
    """Whether sample ``index`` is forced to foreground: exactly ``round``-ish ``fraction`` of consecutive indices."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


class _PatchDataset(Dataset):
    """Training patches (3D) or slice patches (2D) drawn from the preprocessed cases.

    Item ``key`` is ``{"image": (C, *patch) float32, "label": (*patch) int64, "seed": () int64}``.
    """

    def __init__(self, cache: Path, cases: Sequence[str], patch: Sequence[int], length: int, oversample: float,
                 seed: int, intensity_shift: float = 0.0,
                 clip: Sequence[tuple[float, float] | None] = ()) -> None:
        self.cache, self.cases, self.patch = cache, list(cases), tuple(int(p) for p in patch)
        self.length, self.oversample, self.seed = length, oversample, seed
        self.intensity_shift, self.clip = intensity_shift, list(clip)
        self._loaded: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.length

    def _case(self, case: str) -> dict[str, Any]:
        if case not in self._loaded:
            self._loaded[case] = load_preprocessed(self.cache, case)
        return self._loaded[case]

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        i = int(key)
        seed = getattr(key, "seed", None)
        if seed is None:
            seed = derive_seed(self.seed, 0, i)
        rng = np.random.default_rng(seed)
        data = self._case(self.cases[int(rng.integers(len(self.cases)))])  # uniform, with replacement (nnU-Net)
        image, label, locations = data["image"], data["label"], data["locations"]
        dims = len(self.patch)
        voxel = None
        if _forced(i, self.oversample) and locations:
            cls = sorted(locations)[int(rng.integers(len(locations)))]  # class-balanced, as nnU-Net
            coords = locations[cls]
            voxel = coords[int(rng.integers(len(coords)))]
        if dims == 2:  # one slice of the volume, then a 2D patch of it
            z = int(voxel[0]) if voxel is not None else int(rng.integers(image.shape[1]))
            image, label = image[:, z], label[z]
            voxel = None if voxel is None else voxel[1:]
        lbs, ubs = _bounds(label.shape, self.patch)
        if voxel is not None:
            lower = np.maximum(lbs, np.asarray(voxel) - np.asarray(self.patch) // 2)
        else:
            lower = np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs, strict=True)])
        x = crop_or_pad(np.asarray(image), lower, self.patch, 0.0)
        y = crop_or_pad(np.asarray(label), lower, self.patch, 0)
        if self.intensity_shift > 0:
            x = self._jitter(x, rng)
        return {"image": torch.from_numpy(x.astype(np.float32)), "label": torch.from_numpy(y.astype(np.int64)),
                "seed": torch.tensor(seed, dtype=torch.int64)}

    def _jitter(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per channel ``x * U(0.9, 1.1) + U(-shift, shift)``, CT channels clipped again to their clip range."""
        x = x.astype(np.float32, copy=True)
        for c in range(x.shape[0]):
            x[c] = x[c] * rng.uniform(0.9, 1.1) + rng.uniform(-self.intensity_shift, self.intensity_shift)
            if c < len(self.clip) and self.clip[c] is not None:
                np.clip(x[c], *self.clip[c], out=x[c])
        return x


class _SliceDataset(Dataset):
    """Every slice of the given cases at the preprocessed grid, padded / centre-cropped to ``patch`` (2D val)."""

    def __init__(self, cache: Path, cases: Sequence[str], patch: Sequence[int]) -> None:
        self.cache, self.patch = cache, tuple(int(p) for p in patch)
        self.index = []
        for case in cases:
            props = json.loads((cache / case / "props.json").read_text(encoding="utf-8"))
            self.index += [(case, z) for z in range(props["shape"][0])]
        self._loaded: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        case, z = self.index[i]
        if case not in self._loaded:
            self._loaded[case] = load_preprocessed(self.cache, case)
        data = self._loaded[case]
        shape = data["label"].shape[1:]
        lower = [(s - p) // 2 for s, p in zip(shape, self.patch, strict=True)]
        x = crop_or_pad(np.asarray(data["image"][:, z]), lower, self.patch, 0.0)
        y = crop_or_pad(np.asarray(data["label"][z]), lower, self.patch, 0)
        return {"image": torch.from_numpy(x.astype(np.float32)), "label": torch.from_numpy(y.astype(np.int64))}


class _VolumeDataset(Dataset):
    """Whole cases for validation / test / predict: preprocessed image, native label, spacing, affine.

    3D: ``image`` (C, D', H', W'); 2D: ``image`` (D, C, H', W') (slices); ``label`` (D, H, W) int64 at the native
    grid in the record's voxel order (or ``native_shape`` when the case has none), ``case``, ``spacing`` (3,)
    native mm ``(z, y, x)`` in that order, ``affine`` (4, 4) of the original NIfTI file, ``source`` (its first
    channel file), ``ornt`` (3, 2) when the case was reoriented (see
    :func:`~lightning_selfreg.data.preprocessing.restore`); ``"padding": True`` for a
    :class:`~lightning_selfreg.data.sampling.PaddingKey` index (skipped by the evaluation steps).
    """

    def __init__(self, cache: Path, cases: Sequence[str], spatial_dims: int) -> None:
        self.cache, self.cases, self.spatial_dims = cache, list(cases), spatial_dims

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: int) -> dict[str, Any]:
        data = load_preprocessed(self.cache, self.cases[int(key)], mmap=False)
        image = data["image"]
        if self.spatial_dims == 2:
            image = image.transpose(1, 0, 2, 3)
        item: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                "case": data["case"],
                                "spacing": torch.as_tensor(data["native_spacing"], dtype=torch.float64)}
        if data["native"] is not None:
            item["label"] = torch.from_numpy(data["native"].astype(np.int64))
        else:
            item["native_shape"] = torch.as_tensor(data["native_shape"], dtype=torch.int64)
        if data["affine"] is not None:
            item["affine"] = torch.as_tensor(data["affine"], dtype=torch.float64)
        if data.get("ornt") is not None:  # the case was reoriented: the writer maps predictions back
            item["ornt"] = torch.as_tensor(data["ornt"], dtype=torch.float64)
        if data.get("source"):
            item["source"] = data["source"]
        if isinstance(key, PaddingKey):
            item[PADDING] = True
        return item


class NnUNetDataModule(SegDataModule):
    """An nnU-Net v2 raw dataset, preprocessed as nnU-Net does, for 2D (slice) or 3D (patch) training.

    Classes, class names and channels come from ``dataset.json``, read at construction (nothing else is read
    then), so :attr:`num_classes`, :attr:`class_names`, :attr:`in_channels`, :attr:`volumetric`,
    :attr:`spatial_dims` and :attr:`input_size` (None: the network runs at the preprocessed grid) are known right
    after it; :attr:`roi_size` (3D: the patch size) reads the image headers when ``patch_size`` is not given.

    The splits: ``fold=None`` trains on every training case without validation (nnU-Net's fold ``"all"``);
    ``fold=k`` validates on fold ``k`` of ``splits_final.json`` (``splits_file``, default
    ``<data_dir>/splits_final.json`` when it exists), else of nnU-Net's own default 5-fold split
    (:func:`~lightning_selfreg.data.nnunet.format.crossval_split`: the same folds as an nnU-Net baseline), and
    ``fold >= number of folds`` uses nnU-Net's random 80:20 split; ``val_cases`` overrides both. Test cases are
    the ``imagesTs`` cases with their label in ``labelsTs``; an ``imagesTs`` case without one is an error unless
    ``unlabeled_test_cases="predict_only"`` (then it is left out of testing and listed in a warning).

    Preprocessing (fingerprint, normalisation, resampling; see
    :mod:`~lightning_selfreg.data.nnunet.preprocess`) runs once, with a progress bar, in :meth:`prepare_data`
    (or the first :meth:`setup`) into :attr:`cache_dir` (``<cache_dir>/nnunet/<dataset>-<hash of its path>/<hash
    of settings and files>/``, one folder per case, each written atomically) and is reused by later runs.
    :meth:`validate` reads every file in full before that (see there).

    Args:
        data_dir: The ``DatasetXXX_Name`` folder; None: the bundled CT sample (:data:`SAMPLE_NNUNET_DIR`).
        configuration: ``"3d"`` (patches, sliding-window evaluation) or ``"2d"`` (slices).
        patch_size: Training patch ``(D, H, W)`` in 3D or ``(H, W)`` in 2D (an int: the same on every axis).
            Default: the median preprocessed shape per axis, at most 128 (3D) / 256 (2D), rounded up to a multiple
            of 16, whatever the network and the device. ``experiments.run --dataset nnunet`` passes the patch of
            :func:`~lightning_selfreg.data.nnunet.planner.plan_configuration` instead, which also fits it to the
            network's depth and the device's memory (call it for the same plan in Python).
        batch_size: Patches per training batch (nnU-Net: 2 in 3D, 12 in 2D for its default sizes).
        samples_per_epoch: Training patches per epoch (default: ``250 * batch_size``, nnU-Net's 250 iterations).
        num_workers: DataLoader workers.
        fold: Validation fold (see above); ``None``: no validation.
        val_cases: Training cases to validate on instead of a fold.
        splits_file: A ``splits_final.json`` (default: ``<data_dir>/splits_final.json`` if present).
        orientation: The voxel order every case is brought to before preprocessing (axis codes of the NIfTI
            ``(x, y, z)`` axes, e.g. ``"RAS"``; see :mod:`~lightning_selfreg.data.preprocessing`). ``"auto"``: the
            orientation most training cases are stored in (so a dataset stored in one orientation is used as
            stored, as nnU-Net does, and cases stored otherwise are brought to it); None: every case as stored
            (nnU-Net's behaviour; prediction then also uses inputs as stored). 2D-image datasets have none.
        target_spacing: Override the target spacing ``(z, y, x)`` mm (nnU-Net's ``-overwrite_target_spacing``);
            in 2D only its in-plane part is used.
        oversample_foreground: Share of training patches centred on a foreground voxel.
        intensity_shift: Intensity jitter of training patches, not in nnU-Net's default augmentation (0 = off):
            each channel of a patch becomes ``x * U(0.9, 1.1) + U(-s, s)`` (normalised units, i.e. standard
            deviations of the training foreground for CT), CT channels clipped again to their normalised clip
            range. It stands in for contrast-phase differences between scans (e.g. ``s = 1`` is about one
            foreground std, ~60 HU on the bundled sample, whose training CT is non-contrast and test CT is
            contrast-enhanced).
        batch_transform: Batched on-device augmentation of 2D training batches (e.g. ``RandomAffine()``);
            must be None in 3D.
        cache_dir: Cache root for the preprocessed cases and the pre-flight's record (default
            ``$XDG_CACHE_HOME/lightning_selfreg``, ``~/.cache/lightning_selfreg``); never inside the dataset.
        unlabeled_test_cases: ``"error"``: an ``imagesTs`` case without its label in ``labelsTs`` is an error
            (named); ``"predict_only"``: such cases are left out of testing (segment them with
            ``experiments.predict``).
        seed: Seed of the training draws (default: Lightning's ``PL_GLOBAL_SEED``, else 0).
        progress: Show progress bars while preprocessing.

    Raises:
        DataError: A bad ``dataset.json`` or layout (at construction), files that fail the checks.
        ValueError: Bad arguments.
    """

    layout_help = NNUNET_LAYOUT

    def __init__(
        self,
        data_dir: str | Path | None = None,
        configuration: Configuration = "3d",
        patch_size: int | Sequence[int] | None = None,
        batch_size: int = 2,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        fold: int | None = None,
        val_cases: Sequence[str] | None = None,
        splits_file: str | Path | None = None,
        orientation: str | Sequence[str] | None = "auto",
        target_spacing: Sequence[float] | None = None,
        oversample_foreground: float = OVERSAMPLE_FOREGROUND,
        intensity_shift: float = 0.0,
        batch_transform: RandomAffine | None = None,
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        progress: bool = True,
        unlabeled_test_cases: Literal["error", "predict_only"] = "error",
    ) -> None:
        if configuration not in CONFIGURATIONS:
            raise SettingError("configuration",
                               f"`configuration` must be one of {CONFIGURATIONS}, found {configuration!r}.")
        dims = 3 if configuration == "3d" else 2
        if isinstance(patch_size, int):
            patch_size = (patch_size,) * dims
        if patch_size is not None and (len(patch_size) != dims or min(patch_size) < 1):
            raise SettingError("patch_size", f"`patch_size` must be {dims} positive ints for configuration "
                               f"{configuration!r}, found {patch_size}.")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise SettingError("samples_per_epoch", f"`samples_per_epoch` must be >= 1, found {samples_per_epoch}.")
        if fold is not None and fold < 0:
            raise SettingError("fold", f"`fold` must be >= 0, found {fold}.")
        if not 0 <= oversample_foreground <= 1:
            raise SettingError("oversample_foreground",
                               f"`oversample_foreground` must be in [0, 1], found {oversample_foreground}.")
        if intensity_shift < 0:
            raise SettingError("intensity_shift", f"`intensity_shift` must be >= 0, found {intensity_shift}.")
        if target_spacing is not None and (len(target_spacing) != 3 or min(target_spacing) <= 0):
            raise SettingError("target_spacing",
                               f"`target_spacing` must be 3 positive numbers (z, y, x) mm, found {target_spacing}.")
        if unlabeled_test_cases not in ("error", "predict_only"):
            raise SettingError("unlabeled_test_cases", f"`unlabeled_test_cases` must be 'error' or 'predict_only', "
                                                       f"found {unlabeled_test_cases!r}.")
        if batch_transform is not None and dims == 3:
            raise SettingError("batch_transform",
                               "`batch_transform` augments 2D batches; use configuration='2d' or None.")
        if data_dir is None:
            data_dir = SAMPLE_NNUNET_DIR
        super().__init__(data_dir, image_size=None, batch_size=batch_size, num_workers=num_workers, transform=None,
                         batch_transform=batch_transform, cache=False, val_cases=val_cases,
                         cache_dir=cache_dir)
        self.configuration = configuration
        self._patch_arg = None if patch_size is None else tuple(int(p) for p in patch_size)
        self.samples_per_epoch = samples_per_epoch
        self.nnunet_fold = fold
        self.splits_file = None if splits_file is None else Path(splits_file)
        self._orientation_arg = orientation if orientation == "auto" else check_axcodes(orientation)
        self.target_override = None if target_spacing is None else tuple(float(s) for s in target_spacing)
        self.oversample_foreground = oversample_foreground
        self.intensity_shift = intensity_shift
        self.unlabeled_test_cases = unlabeled_test_cases
        self.predict_only: list[str] = []  # imagesTs cases without a label (unlabeled_test_cases="predict_only")
        self.seed = seed
        self.progress = progress
        self.meta = read_dataset_json(self.data_dir)
        if self.meta.is_2d_format and dims == 3:
            raise DataError(f"{self.meta.path}: file_ending {self.meta.file_ending!r} holds 2D images; use "
                            "configuration='2d'.")
        self.num_classes = self.meta.num_classes
        self.class_names = self.meta.labels[1:]
        self.in_channels = len(self.meta.channel_names)
        self._cases: dict[str, list[CaseFiles]] | None = None
        self._headers: dict[str, Any] | None = None
        self._val_volumes: _VolumeDataset | None = None
        self._cache_dir: Path | None = None

    # ------------------------------------------------------------------ what a model needs to know (read-only)
    @property
    def volumetric(self) -> bool:
        """True for volumes (NIfTI), scored per case in 3D; False for a 2D-image dataset (``.png`` files)."""
        return not self.meta.is_2d_format

    @property
    def spatial_dims(self) -> int:
        """3 for ``configuration="3d"`` (``(B, C, D, H, W)`` patches), 2 for ``"2d"`` (slices)."""
        return 3 if self.configuration == "3d" else 2

    @property
    def input_size(self) -> None:
        """None: the network runs at the preprocessed grid (no resize), in 2D and 3D."""
        return None

    @property
    def roi_size(self) -> tuple[int, int, int] | None:
        """3D: the sliding window of evaluation, the training :attr:`patch_size` ``(D, H, W)``; 2D: None."""
        return self.patch_size if self.spatial_dims == 3 else None

    # ------------------------------------------------------------------ layout, cases, splits
    def check_layout(self) -> None:
        """dataset.json, imagesTr/ and labelsTr/ exist and name the same cases (see :func:`find_cases`)."""
        self._all_cases()

    def _all_cases(self) -> dict[str, list[CaseFiles]]:
        if self._cases is None:
            train = find_cases(self.data_dir, self.meta, "train")
            found = find_cases(self.data_dir, self.meta, "test")
            unlabeled = [c.case for c in found if c.label is None]
            if unlabeled and self.unlabeled_test_cases == "error":
                labels = self.data_dir / "labelsTs"
                shown = ", ".join(unlabeled[:5]) + (f" and {len(unlabeled) - 5} more" if len(unlabeled) > 5 else "")
                raise DataError(f"{self.data_dir / 'imagesTs'}: {len(unlabeled)} test case(s) without a label in "
                                f"labelsTs/{'' if labels.is_dir() else ' (no such folder)'}: {shown}; expected "
                                "each test image's label, or unlabeled_test_cases='predict_only' to leave them out "
                                "of testing.", parameter="unlabeled_test_cases")
            if unlabeled:
                warnings.warn(f"{self.data_dir / 'imagesTs'}: {len(unlabeled)} case(s) without a label are left out "
                              f"of testing (unlabeled_test_cases='predict_only'): {unlabeled[:5]}", stacklevel=2)
            self.predict_only = unlabeled
            self._cases = {"train": train, "test": [c for c in found if c.label is not None]}
        return self._cases

    def _fold_cases(self) -> tuple[list[str], list[str]]:
        ids = [c.case for c in self._all_cases()["train"]]
        if self.val_cases is not None:
            unknown = sorted(set(self.val_cases) - set(ids))
            if unknown:
                raise DataError(f"`val_cases` {unknown} are not training cases of {self.data_dir}.",
                                parameter="val_cases")
            held = set(self.val_cases)
            return [c for c in ids if c not in held], [c for c in ids if c in held]
        if self.nnunet_fold is None:
            return ids, []
        path = self.splits_file or self.data_dir / "splits_final.json"
        if self.splits_file is not None and not path.is_file():
            raise DataError(f"`splits_file` {path} does not exist.", parameter="splits_file")
        splits = read_splits(path, ids) if path.is_file() else crossval_split(ids)
        split = splits[self.nnunet_fold] if self.nnunet_fold < len(splits) else random_split(ids, self.nnunet_fold)
        return split["train"], split["val"]

    def splits(self) -> dict[str, list[Item]]:
        """The ``train`` / ``val`` / ``test`` cases as items (``path`` = first channel file)."""
        cases = self._all_cases()
        by_id = {c.case: c for c in cases["train"]}
        train, val = self._fold_cases()

        def items(files: Sequence[CaseFiles]) -> list[Item]:
            return [Item(c.case, c.images[0], c.label, name=c.case) for c in files]

        return {"train": items([by_id[c] for c in train]), "val": items([by_id[c] for c in val]),
                "test": items(cases["test"])}

    # ------------------------------------------------------------------ geometry from headers
    def _read_headers(self) -> dict[str, Any]:
        """Headers of every case (checked), the target spacing and the resolved patch size."""
        if self._headers is not None:
            return self._headers
        from tqdm.auto import tqdm

        cases = self._all_cases()
        headers = {}
        everything = cases["train"] + cases["test"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for case in tqdm(everything, desc="nnU-Net headers", unit="case", disable=not self.progress):
                headers[(case.split, case.case)] = read_case_header(case, self.meta)
        for w in caught[:5]:
            warnings.warn(str(w.message), stacklevel=2)
        train = [headers[("train", c.case)] for c in cases["train"]]
        orientation = self._resolve_orientation(train)
        train = [_reoriented(h, orientation) for h in train]
        fp = Fingerprint(np.array([h.spacing for h in train]), np.array([h.shape for h in train]), ())
        target = np.asarray(self.target_override if self.target_override else target_spacing(fp), dtype=np.float64)
        if self.meta.is_2d_format:
            target[0] = 999.0
        shapes = np.array([new_shape(h.shape, h.spacing, [h.spacing[0] if self.spatial_dims == 2 else target[0],
                                                           *target[1:]]) for h in train])
        median = np.median(shapes, axis=0)[3 - self.spatial_dims:]
        patch = self._patch_arg
        if patch is None:
            cap = MAX_DEFAULT_PATCH[self.configuration]
            patch = tuple(int(16 * math.ceil(min(m, cap) / 16)) for m in median)
        self._headers = {"target": target, "patch": tuple(patch), "headers": headers, "orientation": orientation,
                         "median_shape": tuple(int(round(m)) for m in np.median(shapes, axis=0)),
                         "total_voxels": int(np.prod(shapes, axis=1).sum())}
        return self._headers

    def _resolve_orientation(self, train: Sequence[Any]) -> tuple[str, str, str] | None:
        if self.meta.is_2d_format or self._orientation_arg is None:
            return None
        if self._orientation_arg != "auto":
            return self._orientation_arg
        counts = Counter(orientation_of(h.affine) for h in train if h.affine is not None)
        return counts.most_common(1)[0][0] if counts else None

    @property
    def orientation(self) -> tuple[str, str, str] | None:
        """The voxel order of the arrays the network sees (the ``orientation`` argument, ``"auto"`` resolved)."""
        return self._read_headers()["orientation"]

    def dataset_shape(self) -> DatasetShape:
        """The training cases' median shape at the target spacing, their number and voxels: what the planner needs.

        Reads the image headers only (see :mod:`~lightning_selfreg.data.nnunet.planner`).
        """
        headers = self._read_headers()
        path = self.splits_file or self.data_dir / "splits_final.json"
        return DatasetShape(headers["median_shape"], tuple(float(t) for t in headers["target"]),
                            len(self._all_cases()["train"]), headers["total_voxels"], path.is_file())

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The training patch ``(D, H, W)`` (3D) or ``(H, W)`` (2D): the argument, or the default from the headers."""
        return self._patch_arg if self._patch_arg is not None else self._read_headers()["patch"]

    @property
    def target_spacing(self) -> tuple[float, ...]:
        """Target spacing ``(z, y, x)`` mm of the 3D configuration (2D keeps each case's slice spacing)."""
        return tuple(float(t) for t in self._read_headers()["target"])

    # ------------------------------------------------------------------ cache
    def _settings(self) -> dict[str, Any]:
        orientation = self.orientation
        return {"configuration": self.configuration, "target": self.target_override,
                "orientation": None if orientation is None else "".join(orientation)}

    @property
    def cache_dir(self) -> Path:
        """Folder of this dataset's preprocessed cases for these settings.

        ``<cache_root>/nnunet/<dataset folder name>-<hash of its resolved path>/<hash of the settings, dataset.json
        and every file's name, size and modification time>``: two datasets (even of the same name) never share a
        folder, and a changed file starts a new one.
        """
        location = str(self.data_dir.resolve())
        root = self.cache_root / "nnunet" / f"{self.data_dir.name}-{hashlib.sha256(location.encode()).hexdigest()[:8]}"
        if self._cache_dir is None:
            cases = self._all_cases()
            self._cache_dir = root / cache_key(self.meta, cases["train"] + cases["test"], self._settings())
        return self._cache_dir

    def is_preprocessed(self) -> bool:
        """Whether the cache for these settings is complete."""
        return (self.cache_dir / DONE).is_file()

    def prepare_data(self) -> None:
        """Preprocess every training and test case into :attr:`cache_dir` (once; resumes an interrupted run)."""
        from tqdm.auto import tqdm

        from lightning_selfreg.utils.files import atomic_write_text, remove_orphaned_temp_files

        cache = self.cache_dir
        if (cache / DONE).is_file():
            return
        cache.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temp_files(cache)  # the temporary case folders of a killed preprocessing
        cases = self._all_cases()
        record = self.preprocessing()
        for case in tqdm(cases["train"] + cases["test"], desc="nnU-Net preprocessing", unit="case",
                         disable=not self.progress):
            if not is_preprocessed_case(cache, case.case):
                preprocess_case(case, self.meta, record, cache)
        atomic_write_text(cache / DONE, json.dumps({
            "dataset": str(self.data_dir), "settings": self._settings(), "target_spacing": record.spacing,
            "fingerprint": self._fingerprint().to_json(), "train": [c.case for c in cases["train"]],
            "test": [c.case for c in cases["test"]], "preprocessing": record.to_dict(),
        }, indent=1))

    def _fingerprint(self) -> Fingerprint:
        """The training fingerprint (computed once into the cache folder, then read from it)."""
        from lightning_selfreg.utils.files import atomic_write_text

        path = self.cache_dir / "fingerprint.json"
        if path.is_file():
            return Fingerprint.from_json(json.loads(path.read_text(encoding="utf-8")))
        path.parent.mkdir(parents=True, exist_ok=True)
        fingerprint = compute_fingerprint(self._all_cases()["train"], self.meta, progress=self.progress,
                                          orientation=self.orientation)
        atomic_write_text(path, json.dumps(fingerprint.to_json()))
        return fingerprint

    def preprocessing(self) -> Preprocessing:
        """nnU-Net's preprocessing of this dataset as a record (see :meth:`SegDataModule.preprocessing`).

        The orientation (:attr:`orientation`), the target spacing (3D: ``(z, y, x)``; 2D: in-plane only, the
        slice axis keeps each case's spacing) and the per-channel normalisation of ``channel_names`` with the
        training foreground's CT statistics from the fingerprint (computed here if the cache has none yet).
        """
        fingerprint = self._fingerprint()
        target: list[float | None] = [float(t) for t in (self.target_override or target_spacing(fingerprint))]
        if self.spatial_dims == 2:
            target[0] = None  # in-plane only
        return Preprocessing(spatial_dims=self.spatial_dims, image_dims=2 if self.meta.is_2d_format else 3,
                             channel_names=self.meta.channel_names,
                             intensity=channel_norms(self.meta.channel_names, fingerprint.intensity),
                             class_names=self.class_names, orientation=self.orientation, spacing=tuple(target))

    # ------------------------------------------------------------------ pre-flight
    def validate(self, workers: int | None = None) -> dict[str, int]:
        """Pre-flight pass over every file, before the run folder, the preprocessing cache or the first step.

        1. dataset.json, the layout, the splits (a fold of ``splits_final.json`` with a case in both train and
           val, a case in both imagesTr and imagesTs, or a test image without its label are errors), at least one
           training and one test case.
        2. Every file's header: readable, a positive spacing in the header's own ``pixdim`` and sform / qform
           (before nibabel's fixes), the channels and the label of a case agreeing in shape, spacing and affine
           (orientation and origin), the channel count of ``channel_names``.
        3. Every case read in full (:func:`~lightning_selfreg.data.nnunet.format.check_case`): complete files,
           finite intensities, labels integral and within dataset.json's labels; recorded, so that a later
           pre-flight reads only the cases whose files changed
           (:class:`~lightning_selfreg.data.preflight_record.PreflightRecord`).
        4. Labels whose majority is foreground (they look inverted) are reported, one warning line.

        Args:
            workers: Threads for step 3 (default: 2, or 1 on a one-core machine; the reads release the GIL).

        Returns:
            Number of cases per split.

        Raises:
            DataError: The first problem, one line naming the file.
        """
        splits = self.splits()
        if not splits["train"]:
            raise self._missing_error("has no training cases")
        if not splits["test"]:
            raise self._missing_error("has no test cases (imagesTs/ cases with their label in labelsTs/)")
        check_disjoint({"train": splits["train"] + splits["val"], "test": splits["test"]}, self.data_dir)
        self._read_headers()
        cases = self._all_cases()
        jobs = [(Item(c.case, c.images[0], c.label, name=c.case), c) for c in cases["train"] + cases["test"]]
        record = PreflightRecord(self.cache_root, self.data_dir,
                                 f"{type(self).__name__}/{self.num_classes}/{len(self.meta.channel_names)}")

        def files(item: Item, case: CaseFiles) -> list[Item]:  # the other channels, recorded on their own
            return [Item(case.case, path, None) for path in case.images[1:]]

        todo = [(item, case) for item, case in jobs
                if not (record.passed(item, "case") and all(record.passed(i, "channel") for i in files(item, case)))]

        def check(job: tuple[Item, CaseFiles]) -> None:
            item, case = job
            foreground = check_case(case, self.meta)
            for extra in files(item, case):
                record.add(extra, "channel", None)
            record.add(item, "case", foreground)

        try:  # NIfTI / PNG reads (zlib, NumPy) release the GIL: two threads overlap them
            run_checks(check, todo, min(2, os.cpu_count() or 1) if workers is None else workers)
        finally:
            record.save()
        report_inverted([(item, record.foreground(item)) for item, _ in jobs])
        return {name: len(items) for name, items in splits.items()}

    # ------------------------------------------------------------------ Lightning hooks
    def _seed(self) -> int:
        return default_seed() if self.seed is None else self.seed

    def setup(self, stage: str | None = None) -> None:
        """Preprocess if needed (a no-op when :meth:`prepare_data` ran), then build the stage's datasets."""
        self.prepare_data()
        cache, patch = self.cache_dir, self.patch_size
        splits = self.splits()
        train, val = [i.case for i in splits["train"]], [i.case for i in splits["val"]]
        if stage in ("fit", "validate", None) and self._train is None:
            if not train:
                raise self._missing_error("has no training cases")
            length = self.samples_per_epoch or 250 * self.batch_size
            fingerprint = json.loads((cache / "fingerprint.json").read_text(encoding="utf-8"))
            clip = [None if st is None else ((st["percentile_00_5"] - st["mean"]) / max(st["std"], 1e-8),
                                             (st["percentile_99_5"] - st["mean"]) / max(st["std"], 1e-8))
                    for st in fingerprint["intensity"]]
            self._train = _PatchDataset(cache, train, patch, length, self.oversample_foreground, self._seed(),
                                        self.intensity_shift, clip)
            if val:
                if self.spatial_dims == 2:
                    self._val = _SliceDataset(cache, val, patch)
                else:
                    self._val_volumes = _VolumeDataset(cache, val, 3)
        if stage in ("test", "predict", None) and self._test is None:
            if not splits["test"]:
                raise self._missing_error("has no test cases (imagesTs/ cases with a label in labelsTs/)")
            self._test = _VolumeDataset(cache, [i.case for i in splits["test"]], self.spatial_dims)

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists."""
        return bool(self.splits()["val"])

    def val_dataloader(self) -> DataLoader | list:
        """2D: validation slices in batches; 3D: one whole validation case per batch (like the test loader).

        Under DDP each 3D case goes to exactly one rank; a rank without one gets a padding item (see
        :class:`~lightning_selfreg.data.sampling.UnpaddedDistributedSampler`).
        """
        if self._val_volumes is not None:
            trainer = self.trainer
            sampler = None
            if trainer is not None and trainer.world_size > 1:
                sampler = UnpaddedDistributedSampler(self._val_volumes, trainer.world_size, trainer.global_rank,
                                                     pad_empty_ranks=True)
            return DataLoader(self._val_volumes, batch_size=None, sampler=sampler, num_workers=self.num_workers)
        return super().val_dataloader()
