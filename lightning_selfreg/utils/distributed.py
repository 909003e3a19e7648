"""Gathering small Python objects (per-case results, file names) over the ranks of a distributed run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["gather_lists"]


def gather_lists(trainer: pl.Trainer, items: list[Any]) -> list[Any]:
    """Every rank's ``items`` (picklable), concatenated in rank order; the local list without a process group.

    A collective call: under DDP every rank must call it.
    """
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(items)
    gathered: list[list[Any] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]
