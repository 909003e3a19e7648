"""The shared DataModule machinery: 2D training/validation samples, evaluation cases, splits, augmentation.

A dataset module only declares what differs (:class:`SegDataModule` subclasses implement the four ``_index_*``
/ ``_read_*`` hooks and the layout check); everything else lives here:

* training and validation samples are 2D slices or images, read by the subclass, optionally cached in RAM,
  augmented per sample on the CPU (the paper's augmentation, albumentations) and/or per batch on the device
  (:class:`~lightning_selfreg.data.transforms.RandomAffine`), and resized to ``image_size``;
* evaluation cases are whole volumes ``(D, C, H, W)`` (Synapse, ACDC) or single images as ``D = 1`` (GlaS,
  MoNuSeg), one case per batch, sharded over DDP ranks without repetition;
* validation comes from the dataset's own split, a fixed list of cases, or fold ``k`` of ``num_folds``.
"""

from __future__ import annotations

import inspect
import numbers
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_selfreg.data.transforms import RandomAffine, derive_seed, resize_image, resize_label

__all__ = [
    "DataError",
    "Item",
    "ResumableDataLoader",
    "ResumableSampler",
    "SampleKey",
    "SegDataModule",
    "UnpaddedDistributedSampler",
    "check_arrays",
    "check_cases",
    "check_fold",
    "check_image_size",
    "check_num_classes",
    "paper_augmentation",
    "split_cases",
]

PairTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_BATCH_SEED = "_augment_seed"  # batch key of the on-device augmentation's seed, between the two transfer hooks


def _default_seed() -> int:
    """The run's seed: Lightning's ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _accepts_seed(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``seed`` keyword (then it is given each sample's or batch's seed)."""
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class DataError(ValueError):
    """A data file or folder does not match the expected layout or content; the message names the file.

    The message is always one line. A DataError raised in a DataLoader worker comes back to the main process
    re-created from the worker's formatted traceback ("Caught DataError in DataLoader worker process 0. ..."); the
    original one-line message is recovered from its last line.

    Args:
        message: What is wrong, naming the file or argument, what was expected and what was found.
        argument: The constructor argument the problem is about (e.g. ``"val_cases"``, ``"list_dir"``), if any;
            a command line names its flag instead of the data directory.
    """

    def __init__(self, message: str = "", argument: str | None = None) -> None:
        message = str(message)
        if message.startswith("Caught DataError") and "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("DataError: ", 1)[-1]
        super().__init__(" ".join(line.strip() for line in message.splitlines() if line.strip()))
        self.argument = argument


@dataclass(frozen=True)
class Item:
    """One sample or case: its ``case`` name (for splits), the file(s) holding it and an optional key."""

    case: str
    path: Path
    label_path: Path | None = None
    name: str = ""

    @property
    def display(self) -> str:
        """Name used in errors and outputs."""
        return self.name or self.path.name


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shorten(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _run_all(check: Callable[[Item], Any], items: Sequence[Item], workers: int) -> None:
    """``check`` every item, ``workers`` threads at a time; the first failure in item order is raised."""
    if workers <= 1 or len(items) < 2:
        for item in items:
            check(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(check, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_num_classes(num_classes: Any, name: str = "num_classes") -> int:
    """``num_classes`` as an int >= 2 (background + at least one class); ValueError naming ``name`` otherwise."""
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"`{name}` must be an int >= 2 (background included), found {num_classes!r}.")
    return int(num_classes)


def check_image_size(image_size: Any) -> int | tuple[int, int]:
    """``image_size`` as a positive int or an ``(H, W)`` pair of positive ints; ValueError naming it otherwise."""
    if _is_int(image_size) and image_size > 0:
        return int(image_size)
    if (isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2
            and all(_is_int(s) and s > 0 for s in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(f"`image_size` must be a positive int or an (H, W) pair of positive ints, found "
                     f"{image_size!r}.")


def check_cases(cases: Any, name: str = "val_cases") -> tuple[str, ...] | None:
    """A list of case names as a tuple (``None`` stays ``None``); a bare string is an error, not ``list(str)``."""
    if cases is None:
        return None
    if isinstance(cases, str | bytes):
        raise ValueError(f"`{name}` must be a list of case names, found the string {cases!r} "
                         f"(for one case write [{cases!r}]).")
    if not isinstance(cases, Sequence | set | frozenset) or not all(isinstance(c, str) and c for c in cases):
        raise ValueError(f"`{name}` must be a list of non-empty case-name strings, found {cases!r}.")
    return tuple(cases)


def check_fold(fold: Any, num_folds: Any) -> None:
    """``num_folds`` an int >= 2 and ``fold`` None or an int in ``[0, num_folds)``; ValueError naming them."""
    if not _is_int(num_folds) or num_folds < 2:
        raise ValueError(f"`num_folds` must be an int >= 2, found {num_folds!r}.")
    if fold is not None and (not _is_int(fold) or not 0 <= fold < num_folds):
        raise ValueError(f"`fold` must be None or an int in [0, {num_folds}) (`num_folds`={num_folds}), "
                         f"found {fold!r}.")


def check_arrays(source: Any, image: np.ndarray, label: np.ndarray, num_classes: int, image_ndim: Sequence[int],
                 label_ndim: int) -> None:
    """Check one image/label pair; raise :class:`DataError` naming ``source`` and the problem.

    Args:
        source: File name(s) for the message.
        image: Image array, ``label`` shape plus an optional trailing channel axis.
        label: Integer (or integer-valued float) label array.
        num_classes: Labels must lie in ``[0, num_classes)``.
        image_ndim: Allowed image dimensionalities.
        label_ndim: Required label dimensionality.
    """
    check_num_classes(num_classes)
    if image.ndim not in image_ndim:
        raise DataError(f"{source}: image must have {' or '.join(map(str, image_ndim))} dimensions, "
                        f"found shape {image.shape}.")
    if label.ndim != label_ndim or image.shape[:label_ndim] != label.shape:
        raise DataError(f"{source}: image shape {image.shape} does not match label shape {label.shape}.")
    if not np.issubdtype(image.dtype, np.number):
        raise DataError(f"{source}: expected a numeric image, found dtype {image.dtype}.")
    finite = np.isfinite(image)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DataError(f"{source}: expected finite image values, found {int(finite.size - finite.sum())} "
                        f"NaN/infinite value(s) (first at index {first}).")
    if not np.issubdtype(label.dtype, np.number):
        raise DataError(f"{source}: label has non-numeric dtype {label.dtype}.")
    if label.size:
        low, high = label.min(), label.max()
        if low < 0 or high >= num_classes:
            raise DataError(f"{source}: labels must lie in [0, {num_classes}), found values in [{low}, {high}].")
        if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
            raise DataError(f"{source}: label holds non-integer values.")


def split_cases(cases: Sequence[str], fold: int, num_folds: int) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split of case names: fold ``k`` validates on sorted cases ``k, k + n, k + 2n, ...``.

    Returns:
        ``(train_cases, val_cases)``.

    Raises:
        ValueError: If ``fold`` is not in ``[0, num_folds)`` or there are fewer cases than folds.
    """
    unique = sorted(set(cases))
    check_fold(fold, num_folds)
    if len(unique) < num_folds:
        raise ValueError(f"`num_folds`={num_folds} needs at least {num_folds} cases, found {len(unique)}.")
    val = unique[fold::num_folds]
    return [c for c in unique if c not in set(val)], val


def paper_augmentation(image_size: int | Sequence[int], seed: int | None = None) -> PairTransform:
    """The SelfReg/TransUNet training augmentation, with albumentations, followed by the resize to ``image_size``.

    With probability 0.5 a random ``rot90`` (k in 0..3) and a flip along a random axis; otherwise with probability
    0.5 (0.25 overall) a rotation by an angle in [-20, 19] degrees with nearest-neighbour interpolation for image
    and label (as the authors' ``ndimage.rotate(order=0)``); then a resize (image bicubic, label nearest), as the
    authors' ``zoom(order=3 / 0)``.

    Args:
        image_size: Output side or ``(H, W)``.
        seed: Seed of the pipeline's own stream, used by calls without a ``seed`` (``None``: albumentations
            seeds itself, not reproducibly).

    Returns:
        ``f(image (H, W[, C]) float32, label (H, W) int, seed=None) -> (image, label)`` at ``image_size``. With a
        ``seed`` (the training dataset passes each sample's, see :class:`SampleKey`) the draws are re-seeded from
        it first, so the output is a pure function of the inputs and the seed, whichever process calls it.
    """
    import albumentations as A
    import cv2

    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    nearest = cv2.INTER_NEAREST
    pipeline = A.Compose([
        A.OneOf([
            A.Sequential([A.RandomRotate90(p=1), A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)], p=1)], p=0.5),
            A.Rotate(limit=(-20, 19), interpolation=nearest, mask_interpolation=nearest,
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.25),
            A.NoOp(p=0.25),
        ], p=1),
        A.Resize(h, w, interpolation=cv2.INTER_CUBIC, mask_interpolation=nearest),
    ], seed=seed)

    return _SeededAlbumentations(pipeline)


class _SeededAlbumentations:
    """An albumentations pipeline as a ``(image, label, seed=None)`` pair transform (picklable for workers)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if seed is not None:
            # one NumPy and one Python generator shared by every transform of the pipeline: ~70 us, about 3 % of
            # the pipeline at 512 -> 224 px (set_random_seed, a generator pair per transform, costs ~450 us)
            self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.pipeline(image=image, mask=label.astype(np.uint8))
        return out["image"], out["mask"]


def _call_with_global_rngs_seeded(fn: Callable, seed: int, *args: Any) -> Any:
    """``fn(*args)`` with the Python, NumPy and torch CPU RNGs seeded from ``seed``, restored afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)
            return fn(*args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _to_chw(image: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class _SampleDataset(Dataset):
    """2D samples: read -> (optional cache) -> per-sample transform or plain resize -> tensors.

    Item ``i`` is ``{"image": (C, H, W) float32, "label": (H, W) uint8, "seed": () int64}``. ``seed`` is the
    sample's seed: the one its :class:`SampleKey` carries (``derive_seed(seed, epoch, index)``, from
    :class:`ResumableSampler`), else ``derive_seed(seed, 0, i)`` for a plain index. The transform draws from it
    (passed as ``seed=`` when the transform takes one, else through the Python / NumPy / torch CPU RNGs, seeded
    for that call and restored after), so an item is a pure function of (seed, epoch, index) in any process.
    """

    def __init__(self, items: Sequence[Item], read: Callable[[Item], tuple[np.ndarray, np.ndarray]],
                 image_size: int | Sequence[int], transform: PairTransform | None, cache: bool,
                 seed: int | None = None) -> None:
        self.items, self.read, self.image_size, self.transform = list(items), read, image_size, transform
        self.seed = _default_seed() if seed is None else seed
        self._transform_takes_seed = transform is not None and _accepts_seed(transform)
        self._cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _resized(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        x = resize_image(_to_chw(image)[None], self.image_size)[0]
        y = resize_label(torch.from_numpy(label.astype(np.int64))[None], self.image_size)[0]
        return x, y

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        i = int(key)
        seed = getattr(key, "seed", None)
        if seed is None:
            seed = derive_seed(self.seed, 0, i)
        if self._cache is not None and i in self._cache:
            cached = self._cache[i]
        else:
            image, label = self.read(self.items[i])
            # without a per-sample transform the resized tensors are deterministic: cache those
            cached = (image, label) if self.transform is not None else self._resized(image, label)
            if self._cache is not None:
                self._cache[i] = cached
        if self.transform is None:
            x, y = cached
        else:
            if self._transform_takes_seed:
                image, label = self.transform(*cached, seed=seed)
            else:
                image, label = _call_with_global_rngs_seeded(self.transform, seed, *cached)
            x, y = _to_chw(image), torch.from_numpy(np.asarray(label, dtype=np.int64))
        return {"image": x, "label": y.to(torch.uint8), "seed": torch.tensor(seed, dtype=torch.int64)}


class _CaseDataset(Dataset):
    """Evaluation cases read on access: ``image`` (D, C, H, W), ``label`` (D, H, W), ``case``, ``spacing``."""

    def __init__(self, items: Sequence[Item], read: Callable[[Item], dict[str, Any]]) -> None:
        self.items, self.read = list(items), read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = self.read(self.items[i])
        image = np.asarray(case["image"], dtype=np.float32)
        if case.get("is_2d"):
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)[None]  # (1, C, H, W)
            label = np.asarray(case["label"])[None]
        else:
            image, label = image[:, None], np.asarray(case["label"])  # (D, 1, H, W)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case": self.items[i].display,
        }
        if case.get("spacing") is not None:
            item["spacing"] = torch.as_tensor(np.asarray(case["spacing"], dtype=np.float64))
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


class SampleKey(int):
    """A sample index (an ``int``, usable wherever one is) that also carries the ``seed`` of that sample's draws.

    :class:`ResumableSampler` yields ``SampleKey(index, derive_seed(seed, epoch, index))``; the key travels with
    the index to whichever DataLoader worker reads the sample, so the sample's augmentation depends on
    ``(seed, epoch, index)`` only, not on the number of workers, which worker reads it, or a resume.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> SampleKey:
        """The index ``index`` carrying ``seed``."""
        key = super().__new__(cls, index)
        key.seed = seed
        return key

    def __reduce__(self) -> tuple[type, tuple[int, int]]:
        return SampleKey, (int(self), self.seed)

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, seed={self.seed})"


class ResumableSampler(DistributedSampler):
    """Shuffled training order that is a pure function of ``(seed, epoch, rank)`` and can start mid-epoch.

    A ``DistributedSampler`` (so Lightning keeps it under DDP instead of wrapping it) whose permutation is drawn
    from ``derive_seed(seed, epoch)``, never from the global RNG, and which can skip the first samples of its next
    pass: a run resumed from a mid-epoch checkpoint then sees exactly the samples the interrupted run had not seen
    yet, in the same order. It yields :class:`SampleKey` indices that carry each sample's seed
    ``derive_seed(seed, epoch, index)``, from which the dataset draws that sample's augmentation. As in
    ``DistributedSampler``, the last ranks repeat a few samples when the set does not divide evenly. On one device
    use ``num_replicas=1, rank=0``.

    Args:
        dataset: The training dataset.
        num_replicas: Number of ranks.
        rank: This rank.
        seed: Shuffle seed, the same on every rank (default: Lightning's ``PL_GLOBAL_SEED``, else 0).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int | None = None) -> None:
        if seed is None:
            seed = _default_seed()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def start_at(self, epoch: int, skip: int) -> None:
        """Make the next pass the one of ``epoch``, without its first ``skip`` samples (this rank's)."""
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"`skip` must be in [0, {self.num_samples}], found {skip}.")
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[SampleKey]:
        # DistributedSampler draws from seed + epoch, which makes epoch 1 of seed 0 the order of epoch 0 of seed 1
        order = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        indices = torch.randperm(len(self.dataset), generator=order).tolist()
        if self.drop_last:
            indices = indices[:self.total_size]
        else:  # pad so that every rank gets num_samples
            indices = (indices * -(-self.total_size // max(len(indices), 1)))[:self.total_size]
        indices = indices[self.rank:self.total_size:self.num_replicas][self.skip:]
        self.skip = 0  # one pass only
        return iter([SampleKey(i, derive_seed(self.seed, self.epoch, i)) for i in indices])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved in Lightning checkpoints.

    Implements the ``state_dict`` / ``load_state_dict`` interface that Lightning's fit loop saves and restores
    for its training loaders: the state is the sampler's epoch and the number of batches handed out in that epoch.
    Resuming from a mid-epoch checkpoint continues with the next unseen batch; from an end-of-epoch one, with the
    next epoch. The position is tracked with a :class:`ResumableSampler` and a ``batch_size``; with any other
    sampler (Lightning swaps in a ``SequentialSampler`` for ``overfit_batches``) it is a plain ``DataLoader``
    with an empty state.

    Since every sample's draws come from the seed its :class:`SampleKey` carries, a resumed run sees the same
    (augmented) batches as an uninterrupted one, with or without workers.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._batches = 0

    @property
    def _resumable(self) -> bool:
        return isinstance(self.sampler, ResumableSampler) and self.batch_size is not None

    def __iter__(self) -> Iterator[Any]:
        if not self._resumable:
            yield from super().__iter__()
            return
        self._batches = -(-self.sampler.skip // self.batch_size)
        # the iterator's base seed (worker seeds) comes from (seed, epoch), not from a draw of the global RNG that
        # a resumed run would make at a different point of the stream
        self.generator = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.sampler.epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: batches handed out so far in the sampler's current epoch (``{}`` if untracked)."""
        return {"epoch": self.sampler.epoch, "batches": self._batches} if self._resumable else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue after the saved position (the next epoch if the saved one was complete)."""
        if not state_dict or not self._resumable:
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            self.sampler.start_at(epoch + 1, 0)
        else:
            self.sampler.start_at(epoch, batches * self.batch_size)


class SegDataModule(pl.LightningDataModule):
    """Base DataModule: subclasses declare the layout, classes, splits and readers; this class does the rest.

    Subclasses set :attr:`num_classes`, :attr:`class_names`, :attr:`in_channels`, :attr:`layout_help` and
    implement :meth:`check_layout`, :meth:`_index` and the readers :meth:`_read_sample` / :meth:`_read_case`.

    Args:
        data_dir: Dataset root.
        image_size: Side (or ``(H, W)``) the network is trained at.
        batch_size: Training batch size (per device).
        num_workers: DataLoader workers (``persistent_workers`` when > 0).
        transform: Per-sample CPU augmentation ``f(image, label[, seed]) -> (image, label)`` that ends at
            ``image_size``; ``"paper"`` = :func:`paper_augmentation`; ``None`` = resize only. It is given each
            sample's seed (``derive_seed(seed, epoch, index)``) as ``seed=`` if it takes one; otherwise the global
            Python / NumPy / torch CPU RNGs are seeded with it for the call.
        batch_transform: Batched on-device augmentation of training batches (e.g. ``RandomAffine()``), or None;
            one that takes ``seed=`` gets the batch's seed (:meth:`on_before_batch_transfer`).
        cache: Keep decoded samples in RAM (resized ones when ``transform`` is None).
        val_cases: Cases held out of the training split for validation (overrides the dataset's default split);
            a list of names, ``()`` for no validation.
        fold: With ``num_folds``, validate on fold ``fold`` of the training cases (the alternative to
            ``val_cases``: give one or the other).
        num_folds: Number of folds for cross-validation (>= 2).

    Raises:
        ValueError: A bad argument (``image_size <= 0``, a string for ``val_cases``, ``fold`` outside
            ``[0, num_folds)``, both ``val_cases`` and ``fold``, ...), naming it.
    """

    num_classes: int = 2
    class_names: tuple[str, ...] = ("foreground",)
    in_channels: int = 1
    layout_help: str = ""
    # fold used for validation when the dataset has no validation split and none is configured (None: no val)
    fallback_val_fold: int | None = None

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int | Sequence[int] = 224,
        batch_size: int = 24,
        num_workers: int = 0,
        transform: PairTransform | str | None = "paper",
        batch_transform: RandomAffine | None = None,
        cache: bool = False,
        val_cases: Sequence[str] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        super().__init__()
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, found {batch_size!r}.")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, found {num_workers!r}.")
        if isinstance(transform, str) and transform != "paper":
            raise ValueError(f"`transform` must be 'paper', None or a callable, found {transform!r}.")
        check_num_classes(self.num_classes, f"{type(self).__name__}.num_classes")
        if len(self.class_names) != self.num_classes - 1:
            raise ValueError(f"`{type(self).__name__}.class_names` must name the {self.num_classes - 1} "
                             f"non-background classes, found {len(self.class_names)}: {self.class_names}.")
        image_size = check_image_size(image_size)
        check_fold(fold, num_folds)
        val_cases = check_cases(val_cases)
        if val_cases is not None and fold is not None:
            raise ValueError(f"give `val_cases` or `fold` / `num_folds`, not both; found val_cases={list(val_cases)}, "
                             f"fold={fold}.")
        if data_dir is None or (isinstance(data_dir, str) and not data_dir):
            raise ValueError(f"`data_dir` must be a folder path, found {data_dir!r}.")
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = paper_augmentation(image_size) if transform == "paper" else transform
        self.batch_transform = batch_transform
        self.cache = cache
        self.val_cases = val_cases
        self.fold, self.num_folds = fold, num_folds
        self._train: _SampleDataset | None = None
        self._val: _SampleDataset | None = None
        self._test: _CaseDataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict[str, int] | None = None

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

    def _check_sample(self, item: Item) -> None:
        """Pre-flight full check of one validation sample (label range, finite values, shapes); default: read it."""
        self._read_sample(item)

    def _check_case(self, item: Item) -> None:
        """Pre-flight full check of one evaluation case (label range, finite values, shapes); default: read it."""
        self._read_case(item)

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
                                    f"found {len(known)} in {self.data_dir}: {_shorten(known)}.", argument="num_folds")
                _, held_out = split_cases(cases, fold, self.num_folds)
            else:
                unknown = [c for c in self.val_cases if c not in set(known)]
                if unknown:
                    raise DataError(f"`val_cases` {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                                    f"among the {len(known)} training cases of {self.data_dir} ({_shorten(known)}); "
                                    f"expected held-out cases present in the data (or `fold` / `num_folds`).",
                                    argument="val_cases")
                held_out = self.val_cases
            held = set(held_out)
            train = [i for i in pool if i.case not in held]
            val = [i for i in pool if i.case in held]
        return {"train": train, "val": val or [], "test": self._index("test") or []}

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists (checks the layout)."""
        return bool(self.splits()["val"])

    def validate(self, workers: int | None = None) -> dict[str, int]:
        """Pre-flight pass over every file the run will use, before the first training step.

        1. The layout and the splits resolve, every listed file exists and is non-empty (all missing files listed).
        2. Every file's cheap part is checked (:meth:`_check_header`: ``.npz`` keys, shapes and dtypes from the
           zip directory and ``.npy`` headers, ``.h5`` datasets, image headers; see
           :mod:`~lightning_selfreg.data.preflight`).
        3. Validation samples and evaluation cases are read in full (:meth:`_check_sample`, :meth:`_check_case`):
           label range ``[0, num_classes)``, finite values, image/label shape agreement.

        Training files are only read in full when training reads them; a corrupt one that passes (2) still
        raises a :class:`DataError` naming it then.

        Args:
            workers: Threads for steps 2-4 (default 1). More threads overlap the decompression, but NumPy parses
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
        bad = []
        for items in splits.values():
            for item in items:
                for path in (item.path, item.label_path):
                    if path is not None and (not path.is_file() or path.stat().st_size == 0):
                        bad.append(f"{path} ({'empty' if path.is_file() else 'missing'})")
        if bad:
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(f"Listed files are missing or empty: {', '.join(bad[:20])}{more}.")
        workers = 1 if workers is None else workers
        _run_all(self._check_header, [i for items in splits.values() for i in items], workers)
        _run_all(self._check_sample, splits["val"], workers)
        _run_all(self._check_case, splits["test"], workers)
        return {name: len(items) for name, items in splits.items()}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Index and check the splits the stage needs."""
        self.check_layout()
        splits = self.splits()
        if stage in ("fit", "validate", None) and self._train is None:
            if not splits["train"]:
                raise self._missing_error("has no training samples")
            self._train = _SampleDataset(splits["train"], self._read_sample, self.image_size, self.transform,
                                         self.cache)
            if splits["val"]:
                self._val = _SampleDataset(splits["val"], self._read_sample, self.image_size, None, self.cache)
        if stage in ("test", "predict", None) and self._test is None:
            if not splits["test"]:
                raise self._missing_error("has no test cases")
            self._test = _CaseDataset(splits["test"], self._read_case)

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
        """One whole case per batch; under DDP each case goes to exactly one rank."""
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(self._test, trainer.world_size, trainer.global_rank)
        return DataLoader(self._test, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Same cases as :meth:`test_dataloader`."""
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
            if seed is not None and _accepts_seed(self.batch_transform):
                batch["image"], batch["label"] = self.batch_transform(batch["image"], batch["label"], seed=seed)
            else:
                batch["image"], batch["label"] = self.batch_transform(batch["image"], batch["label"])
        return batch
