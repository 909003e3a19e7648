"""The DataModule every dataset builds on (:class:`SegDataModule`): splits, loaders, pre-flight, batch hooks.

A dataset module only declares what differs (:class:`SegDataModule` subclasses implement the layout check, the
``_index`` hook and the ``_read_*`` readers); everything else lives here:

* training and validation samples are 2D slices or images, read by the subclass, optionally cached in RAM,
  augmented per sample on the CPU (the paper's augmentation, :mod:`~lightning_selfreg.data.augmentation`) and/or
  per batch on the device (:class:`~lightning_selfreg.data.transforms.RandomAffine`), and resized to
  ``image_size`` (:mod:`~lightning_selfreg.data.datasets`);
* evaluation cases are whole volumes ``(D, C, H, W)`` (Synapse, ACDC) or single images as ``D = 1`` (GlaS,
  MoNuSeg), one case per batch, sharded over DDP ranks without repetition (:mod:`~lightning_selfreg.data.sampling`);
* validation comes from the dataset's own split, a fixed list of cases, or fold ``k`` of ``num_folds``
  (:mod:`~lightning_selfreg.data.splits`);
* what a model needs to know about the data (:attr:`~SegDataModule.in_channels`, ``num_classes``,
  ``class_names``, :attr:`~SegDataModule.volumetric`, :attr:`~SegDataModule.spatial_dims`,
  :attr:`~SegDataModule.input_size`, :attr:`~SegDataModule.roi_size`) is available right after construction,
  so a command line can link it to the model's arguments before any data is read;
* what the DataModule does to a raw image (orientation, spacing, intensity normalisation) is recorded by
  :meth:`~SegDataModule.preprocessing`; the module stores that record in its checkpoints for prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_selfreg.data.augmentation import PairTransform, accepts_seed, paper_augmentation
from lightning_selfreg.data.contract import (
    DataError,
    Item,
    check_cases,
    check_fold,
    check_image_size,
    check_int,
    check_num_classes,
)
from lightning_selfreg.data.datasets import CaseDataset, SampleDataset
from lightning_selfreg.data.preflight import check_disjoint, report_inverted, run_checks
from lightning_selfreg.data.preflight_record import PreflightRecord, default_cache_dir, foreground_fraction
from lightning_selfreg.data.preprocessing import ChannelNorm, Preprocessing
from lightning_selfreg.data.sampling import ResumableDataLoader, ResumableSampler, UnpaddedDistributedSampler
from lightning_selfreg.data.splits import split_cases
from lightning_selfreg.data.transforms import RandomAffine, derive_seed
from lightning_selfreg.utils.checks import SettingError

__all__ = ["SegDataModule"]

_BATCH_SEED = "_augment_seed"  # batch key of the on-device augmentation's seed, between the two transfer hooks


def _shorten(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class SegDataModule(pl.LightningDataModule):
    """Base DataModule: subclasses declare the layout, classes, splits and readers; this class does the rest.

    Subclasses set :attr:`num_classes`, :attr:`class_names`, :attr:`in_channels`, :attr:`layout_help`,
    :attr:`channel_names` and :attr:`intensity` (what :meth:`preprocessing` records) and
    implement :meth:`check_layout`, :meth:`_index` and the readers :meth:`_read_sample` / :meth:`_read_case`;
    they override :attr:`volumetric`, :attr:`spatial_dims`, :attr:`input_size` and :attr:`roi_size` where the
    defaults (volumes, a 2D network at ``image_size``, no sliding window) do not hold. All of these are known
    right after construction, without reading the data.

    Args:
        data_dir: Dataset root (required: nothing is downloaded; the default None only lets a configuration
            name the missing folder as this argument).
        image_size: Side (or ``(H, W)``) the network is trained at. None only for a DataModule whose own
            :attr:`input_size` says what the network sees (:class:`~lightning_selfreg.data.nnunet.NnUNetDataModule`:
            its patches).
        batch_size: Training batch size (per device).
        num_workers: DataLoader workers (``persistent_workers`` when > 0).
        transform: Per-sample CPU augmentation ``f(image, label[, seed]) -> (image, label)`` that ends at
            ``image_size`` (on a command line: a class path or a function's import path); ``"paper"`` = the
            paper's augmentation (:func:`~lightning_selfreg.data.augmentation.paper_augmentation`); ``None`` =
            resize only. It is given each sample's seed (``derive_seed(seed, epoch, index)``) as ``seed=`` if it
            takes one; otherwise the global Python / NumPy / torch CPU RNGs are seeded with it for the call.
        batch_transform: Batched on-device augmentation of training batches (e.g. ``RandomAffine()``), or None;
            one that takes ``seed=`` gets the batch's seed (:meth:`on_before_batch_transfer`).
        cache: Keep decoded samples in RAM (resized ones when ``transform`` is None).
        val_cases: Cases held out of the training split for validation (overrides the dataset's default split);
            a list of names, ``()`` for no validation.
        fold: With ``num_folds``, validate on fold ``fold`` of the training cases (the alternative to
            ``val_cases``: give one or the other).
        num_folds: Number of folds for cross-validation (>= 2).
        cache_dir: Folder for what is derived from the data (the pre-flight's record of checked files; the
            preprocessed cases of :class:`~lightning_selfreg.data.nnunet.NnUNetDataModule`); default
            ``$XDG_CACHE_HOME/lightning_selfreg`` (``~/.cache/lightning_selfreg``). Never written inside the
            dataset or the package.

    Raises:
        ValueError: A bad argument (``image_size <= 0``, a string for ``val_cases``, ``fold`` outside
            ``[0, num_folds)``, both ``val_cases`` and ``fold``, ...), naming it.
    """

    num_classes: int = 2
    class_names: tuple[str, ...] = ("foreground",)
    in_channels: int = 1
    # what a raw image's channels are and how they are normalised (see `preprocessing`)
    channel_names: tuple[str, ...] = ("image",)
    intensity: tuple[ChannelNorm, ...] = (ChannelNorm("none"),)
    layout_help: str = ""
    # fold used for validation when the dataset has no validation split and none is configured (None: no val)
    fallback_val_fold: int | None = None
    # splits must not share a case; True: compare the image files' bytes (file names that are not patient ids)
    disjoint_by_content: bool = False

    def __init__(
        self,
        data_dir: str | Path | None = None,
        image_size: int | Sequence[int] | None = 224,
        batch_size: int = 24,
        num_workers: int = 0,
        transform: Literal["paper"] | PairTransform | None = "paper",
        batch_transform: RandomAffine | None = None,
        cache: bool = False,
        val_cases: Sequence[str] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        check_int(batch_size, "batch_size", 1)
        check_int(num_workers, "num_workers", 0)
        if isinstance(transform, str) and transform != "paper":
            raise SettingError("transform", f"`transform` must be 'paper', None or a callable, found {transform!r}.")
        check_num_classes(self.num_classes, f"{type(self).__name__}.num_classes")
        if len(self.class_names) != self.num_classes - 1:
            raise SettingError("class_names", f"`{type(self).__name__}.class_names` must name the "
                               f"{self.num_classes - 1} non-background classes, found {len(self.class_names)}: "
                               f"{self.class_names}.")
        if image_size is not None or type(self).input_size is SegDataModule.input_size:
            image_size = check_image_size(image_size)
        check_fold(fold, num_folds)
        val_cases = check_cases(val_cases)
        if val_cases is not None and fold is not None:
            raise SettingError("val_cases", f"give `val_cases` or `fold` / `num_folds`, not both; found "
                               f"val_cases={list(val_cases)}, fold={fold}.")
        if data_dir is None or (isinstance(data_dir, str) and not data_dir):
            raise SettingError("data_dir", f"`data_dir` must be the dataset's folder (nothing is downloaded), found "
                                           f"{data_dir!r}.")
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = paper_augmentation(image_size) if transform == "paper" else transform
        self.batch_transform = batch_transform
        self.cache = cache
        self.val_cases = val_cases
        self.fold, self.num_folds = fold, num_folds
        if isinstance(cache_dir, str) and not cache_dir:
            raise SettingError("cache_dir", "`cache_dir` must be a folder path or None, found ''.")
        self.cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._train: SampleDataset | None = None
        self._val: SampleDataset | None = None
        self._test: CaseDataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict[str, int] | None = None

    # ------------------------------------------------------------------ what a model needs to know (read-only)
    @property
    def volumetric(self) -> bool:
        """Whether the test cases are volumes scored per case in 3D (Dice, HD95 at the case's voxel spacing).

        True for CT / MRI volumes (Synapse, the CT sample, ACDC, nnU-Net volumes); False for 2D images scored one
        image per case (GlaS, MoNuSeg). A command line chooses its report table's layout from it.
        """
        return True

    @property
    def spatial_dims(self) -> int:
        """2 when the network sees 2D slices or images ``(B, C, H, W)``; 3 for ``(B, C, D, H, W)`` patches."""
        return 2

    @property
    def input_size(self) -> int | tuple[int, int] | None:
        """The side or ``(H, W)`` the network sees (evaluation slices are resized to it): ``image_size``.

        None: the network runs at each case's own grid (the preprocessed one of
        :class:`~lightning_selfreg.data.nnunet.NnUNetDataModule`).
        """
        return self.image_size

    @property
    def roi_size(self) -> tuple[int, int, int] | None:
        """The sliding window ``(D, H, W)`` of 3D evaluation (the training patch); None for a 2D network."""
        return None

    @property
    def orientation(self) -> tuple[str, str, str] | None:
        """Axis codes of the ``(W, H, D)`` axes of the arrays the network is trained on, or None.

        None: no anatomical orientation is declared, images are used in their stored voxel order. See
        :mod:`~lightning_selfreg.data.preprocessing`.
        """
        return None

    def preprocessing(self) -> Preprocessing:
        """The record of what this DataModule does to a raw image before the network sees it.

        :class:`~lightning_selfreg.SelfRegSegModule` stores it in its checkpoints; prediction applies it to new
        images (:class:`~lightning_selfreg.segmentation.predictor.Predictor`). The default: the class's
        :attr:`channel_names` and :attr:`intensity`, :attr:`orientation`, no resampling (slices are resized to
        :attr:`input_size` by the module). A layout whose files store arrays that are already normalised (the
        TransUNet / MT-UNet copies) reads them as they are; :attr:`intensity` says what a raw image needs.
        """
        return Preprocessing(spatial_dims=self.spatial_dims, image_dims=3 if self.volumetric else 2,
                             channel_names=self.channel_names, intensity=self.intensity,
                             class_names=self.class_names, orientation=self.orientation)

    # ------------------------------------------------------------------ hooks for subclasses
    def check_layout(self) -> None:
        """Raise :class:`DataError` naming every missing part of the expected layout."""
        raise NotImplementedError

    def _index(self, split: str) -> list[Item] | None:
        """Items of ``split`` in ``{"train", "val", "test"}``; ``None`` if the dataset has no such split."""
        raise NotImplementedError

    def _read_sample(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """One 2D training/validation sample: ``(image (H, W[, C]) float32, label (H, W) int)``."""
        raise NotImplementedError

    def _read_case(self, item: Item) -> dict[str, Any]:
        """One evaluation case as a dict.

        Keys: ``image`` (D, H, W) for volumes or (H, W[, C]) for 2D images, ``label``, ``spacing`` (mm, (z, y, x))
        or None, and ``is_2d`` (True for 2D images).
        """
        raise NotImplementedError

    def _check_header(self, item: Item) -> None:
        """Pre-flight check of one item from what can be read cheaply (array or image headers, no pixel data).

        Called by :meth:`validate` for every item of every split. Raise :class:`DataError` naming the file, what
        was expected and what was found. The default checks nothing.
        """

    def _check_sample(self, item: Item) -> float | None:
        """Pre-flight full check of one training or validation sample (label range, finite values, shapes).

        Returns the share of its label that is foreground (None when unknown). Default: read it.
        """
        return foreground_fraction(self._read_sample(item)[1])

    def _check_case(self, item: Item) -> float | None:
        """Pre-flight full check of one evaluation case (label range, finite values, shapes).

        Returns the share of its label that is foreground (None when unknown). Default: read it.
        """
        return foreground_fraction(self._read_case(item).get("label"))

    # ------------------------------------------------------------------ splits
    def _missing_error(self, what: str) -> DataError:
        return DataError(f"Data directory {self.data_dir} {what}. Expected layout: {self.layout_help}")

    def _require(self, *relative: str) -> None:
        if not self.data_dir.is_dir():
            raise self._missing_error("does not exist")
        missing = [r for r in relative if not (self.data_dir / r).exists()]
        if missing:
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in self.data_dir.iterdir())
            shown = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
            raise self._missing_error(f"lacks {', '.join(missing)} (found: {shown or 'nothing'})")

    def splits(self) -> dict[str, list[Item]]:
        """The resolved ``train`` / ``val`` / ``test`` items (val may be empty)."""
        train = self._index("train") or []
        val = self._index("val")
        fold = self.fold
        if fold is None and self.val_cases is None and val is None:
            fold = self.fallback_val_fold
        if fold is not None or self.val_cases is not None:
            pool = train + (val or [])
            cases = [item.case for item in pool]
            known = sorted(set(cases))
            if fold is not None:
                if len(known) < self.num_folds:
                    raise DataError(f"`num_folds`={self.num_folds} needs at least {self.num_folds} training cases, "
                                    f"found {len(known)} in {self.data_dir}: {_shorten(known)}.", parameter="num_folds")
                _, held_out = split_cases(cases, fold, self.num_folds)
            else:
                unknown = [c for c in self.val_cases if c not in set(known)]
                if unknown:
                    raise DataError(f"`val_cases` {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                                    f"among the {len(known)} training cases of {self.data_dir} ({_shorten(known)}); "
                                    f"expected held-out cases present in the data (or `fold` / `num_folds`).",
                                    parameter="val_cases")
                held_out = self.val_cases
            held = set(held_out)
            train = [i for i in pool if i.case not in held]
            val = [i for i in pool if i.case in held]
        return {"train": train, "val": val or [], "test": self._index("test") or []}

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists (checks the layout)."""
        return bool(self.splits()["val"])

    def preflight_record(self) -> PreflightRecord:
        """The record of what the pre-flight has checked for this dataset (in :attr:`cache_root`)."""
        return PreflightRecord(self.cache_root, self.data_dir, f"{type(self).__name__}/{self.num_classes}")

    def validate(self, workers: int | None = None) -> dict[str, int]:
        """Pre-flight pass over every file the run will use, before the run folder, a cache or the first step.

        1. The layout and the splits resolve, every listed file exists and is non-empty (all missing files listed),
           there is a training and a test split, and no case is in two splits
           (:func:`~lightning_selfreg.data.preflight.check_disjoint`).
        2. Every item (training and validation samples, test cases) is checked: its cheap part first
           (:meth:`_check_header`: ``.npz`` keys, shapes and dtypes from the zip directory and ``.npy`` headers,
           ``.h5`` datasets, image headers; see :mod:`~lightning_selfreg.data.preflight`), then read in full
           (:meth:`_check_sample`, :meth:`_check_case`): readable to the end, finite intensities, labels integral
           and in ``[0, num_classes)``, image/label shape agreement, spacing > 0.
        3. Items that passed are recorded (:class:`~lightning_selfreg.data.preflight_record.PreflightRecord`, in
           ``cache_root``), so a later pre-flight reads only the files that changed since.
        4. Labels whose majority is foreground (they look inverted) are reported, one warning line.

        Args:
            workers: Threads for step 2 (default 1). More threads overlap the decompression, but NumPy parses
                every ``.npy`` header with ``ast.literal_eval``, and CPython 3.11's parser is not thread-safe
                (it raises ``SystemError: AST constructor recursion depth mismatch`` at random, seen here on
                3.11.7), so threads are only safe on an interpreter without that bug.

        Returns:
            Number of items per split.

        Raises:
            DataError: One line naming the first bad file (or all missing ones), what was expected and what was
                found.
        """
        self.check_layout()
        splits = self.splits()
        if not splits["train"]:
            raise self._missing_error("has no training samples")
        if not splits["test"]:
            raise self._missing_error("has no test cases")
        bad = []
        for items in splits.values():
            for item in items:
                for path in (item.path, item.label_path):
                    if path is not None and (not path.is_file() or path.stat().st_size == 0):
                        bad.append(f"{path} ({'empty' if path.is_file() else 'missing'})")
        if bad:
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(f"Listed files are missing or empty: {', '.join(bad[:20])}{more}.")
        check_disjoint(splits, self.data_dir, by_content=self.disjoint_by_content)
        jobs = [(item, "case" if split == "test" else "sample") for split, items in splits.items() for item in items]
        record = self.preflight_record()
        todo = [job for job in jobs if not record.passed(*job)]

        def check(job: tuple[Item, str]) -> None:
            item, kind = job
            self._check_header(item)
            record.add(item, kind, self._check_sample(item) if kind == "sample" else self._check_case(item))

        try:
            run_checks(check, todo, 1 if workers is None else workers)
        finally:
            record.save()
        report_inverted([(item, record.foreground(item)) for item, _ in jobs])
        return {name: len(items) for name, items in splits.items()}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Index and check the splits the stage needs."""
        self.check_layout()
        splits = self.splits()
        if stage in ("fit", "validate", None) and self._train is None:
            if not splits["train"]:
                raise self._missing_error("has no training samples")
            self._train = SampleDataset(splits["train"], self._read_sample, self.image_size, self.transform,
                                         self.cache)
            if splits["val"]:
                self._val = SampleDataset(splits["val"], self._read_sample, self.image_size, None, self.cache)
        if stage in ("test", "predict", None) and self._test is None:
            if not splits["test"]:
                raise self._missing_error("has no test cases")
            self._test = CaseDataset(splits["test"], self._read_case)

    def _loader(self, dataset: Dataset, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        return loader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                      pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training samples in an order that resumes mid-epoch (:class:`ResumableDataLoader`).

        The last incomplete batch is kept, as in the authors' loaders. Under DDP each rank gets its share.
        """
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self._train, num_replicas=world, rank=rank)
        loader = self._loader(self._train, ResumableDataLoader, batch_size=self.batch_size, sampler=sampler)
        if self._resume_position is not None:
            loader.load_state_dict(self._resume_position)
            self._resume_position = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (epoch, batches handed out), saved in checkpoints.

        Lightning's fit loop also saves and restores stateful training loaders, but skips the restore when
        ``trainer.estimated_stepping_batches`` was read first (e.g. by a per-step LR schedule in
        ``configure_optimizers``; Lightning issue #20550). Restoring through the DataModule, which Lightning does
        before the optimizers are configured, makes mid-epoch resume exact either way; applying the same position
        twice is harmless.
        """
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved loader position for the next :meth:`train_dataloader`."""
        self._resume_position = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader | list:
        """Validation samples; ``[]`` (no validation loop) when there is no validation split."""
        return [] if self._val is None else self._loader(self._val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """One whole case per batch; under DDP each case goes to exactly one rank.

        In testing, a rank without a case of its own gets one padding item, which the test step skips (see
        :class:`~lightning_selfreg.data.sampling.UnpaddedDistributedSampler`); in prediction it gets none.
        """
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(self._test, trainer.world_size, trainer.global_rank,
                                                 pad_empty_ranks=not trainer.predicting)
        return DataLoader(self._test, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Same cases as :meth:`test_dataloader` (no padding items)."""
        return self.test_dataloader()

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Replace the samples' seeds by the seed of the batch's on-device draws.

        ``batch["seed"]`` (``(B,)`` int64, still on the CPU here: no device sync) becomes ``derive_seed(*seeds)``.
        """
        if isinstance(batch, dict) and "seed" in batch:
            batch[_BATCH_SEED] = derive_seed(*batch.pop("seed").tolist())
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Labels to int64; on-device augmentation of training batches, seeded from the batch's samples.

        A ``batch_transform`` that takes a ``seed`` keyword (:class:`RandomAffine`) gets the batch's seed (see
        :meth:`on_before_batch_transfer`), so its draws follow from (seed, epoch, the batch's sample indices) and
        not from the global RNG; any other is called as ``f(image, label)``.
        """
        seed = batch.pop(_BATCH_SEED, None) if isinstance(batch, dict) else None
        if "label" in batch:
            batch["label"] = batch["label"].long()
        trainer = self.trainer
        if self.batch_transform is not None and trainer is not None and trainer.training:
            if seed is not None and accepts_seed(self.batch_transform):
                batch["image"], batch["label"] = self.batch_transform(batch["image"], batch["label"], seed=seed)
            else:
                batch["image"], batch["label"] = self.batch_transform(batch["image"], batch["label"])
        return batch
