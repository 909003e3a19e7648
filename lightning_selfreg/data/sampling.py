"""Training and evaluation sampling for DDP and exact mid-epoch resume: samplers, sample keys, the resumable loader.

* :class:`UnpaddedDistributedSampler`: evaluation cases sharded over ranks, none repeated (a rank that would get no
  case can get one :class:`PaddingKey`, an item marked as padding that :func:`is_padding` tells steps to skip);
* :class:`ResumableSampler`: the training order as a pure function of ``(seed, epoch, rank)``, able to start
  mid-epoch, yielding :class:`SampleKey` indices that carry each sample's seed;
* :class:`ResumableDataLoader`: a ``DataLoader`` whose position in the epoch is saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_selfreg.data.transforms import default_seed, derive_seed

__all__ = [
    "PADDING",
    "PaddingKey",
    "ResumableDataLoader",
    "ResumableSampler",
    "SampleKey",
    "UnpaddedDistributedSampler",
    "is_padding",
]

PADDING = "padding"
"""The batch key (``batch["padding"] = True``) of an evaluation item that only pads a rank without cases."""


class PaddingKey(int):
    """The index of an evaluation item that only pads a rank which would otherwise get no case (an ``int``).

    :class:`UnpaddedDistributedSampler` yields it (with ``pad_empty_ranks=True``) to a rank that holds no case of
    its own, so that the rank runs one evaluation step and reaches the epoch-end gathers of the metrics with the
    other ranks (a rank with zero batches skips the whole loop, and the ranks that wait for it in the gather fail).
    The dataset reads the case at that index as usual and marks the item with ``item[PADDING] = True``
    (:class:`~lightning_selfreg.data.datasets.CaseDataset` does); steps and callbacks skip such items
    (:func:`is_padding`), so no case is counted twice.
    """

    def __repr__(self) -> str:
        return f"PaddingKey({int(self)})"


def is_padding(batch: Any) -> bool:
    """Whether ``batch`` is a padding item (``batch["padding"]`` true, see :class:`PaddingKey`): skip it."""
    return isinstance(batch, Mapping) and bool(batch.get(PADDING, False))


class UnpaddedDistributedSampler(DistributedSampler):
    """Shard an evaluation set over ranks without repeating samples (rank ``r`` gets ``r, r + W, r + 2W, ...``).

    ``DistributedSampler`` pads the set so all ranks get the same count, which would count some test cases twice
    in per-case metrics. Ranks may get one sample less here; metrics that gather their states still see every case
    exactly once.

    With fewer samples than ranks (the bundled CT sample has one test case), the last ranks get none. Lightning then
    skips their whole evaluation loop, epoch-end hooks included, and the ranks waiting for them in a metric's gather
    fail. With ``pad_empty_ranks=True`` such a rank gets exactly one :class:`PaddingKey` (a duplicate index, marked:
    the dataset must put ``item["padding"] = True`` in its item, as
    :class:`~lightning_selfreg.data.datasets.CaseDataset` does, and the steps skip it, see :func:`is_padding`), so
    every rank takes part in the gathers while every case is still counted once. Ranks that hold cases get no
    padding. Leave it off for loaders whose items nothing skips (prediction).

    Args:
        dataset: The evaluation dataset.
        num_replicas: Number of ranks ``W``.
        rank: This rank.
        pad_empty_ranks: Give a rank without samples one padding item.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, pad_empty_ranks: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.pad_empty_ranks = pad_empty_ranks
        self.num_samples = len(self._indices())

    def _indices(self) -> list[int]:
        indices: list[int] = list(range(self.rank, len(self.dataset), self.num_replicas))
        if not indices and self.pad_empty_ranks and len(self.dataset) > 0:
            indices = [PaddingKey(self.rank % len(self.dataset))]
        return indices

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

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
            seed = default_seed()
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

    Why not torchdata's ``StatefulDataLoader`` (checked with torchdata 0.11.0, Lightning 2.6.6, against the bit-exact
    resume tests): it passes them only with three additions that are this class's logic again. (1) Lightning builds
    a resumed epoch's iterator in ``FitLoop.setup_data``, before it calls ``set_epoch``, and ``StatefulDataLoader``
    starts the sampler iterator eagerly, so a sampler whose state lacks its epoch replays the rest of epoch 0's
    permutation. (2) Lightning counts a step checkpoint taken after an epoch's last batch as a finished epoch and
    uses the restored, exhausted iterator as the next epoch's, so one epoch is silently skipped unless the loader
    itself moves on to the next epoch (as :meth:`load_state_dict` does). (3) When
    ``trainer.estimated_stepping_batches`` is read first (a per-step LR schedule), Lightning restores no stateful
    loader at all (Lightning #20550), so the DataModule must save and restore the position either way. Its worker
    and dataset snapshots add nothing here, since every sample's draws come from its :class:`SampleKey`.
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
