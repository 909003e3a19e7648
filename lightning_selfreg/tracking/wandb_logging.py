"""Helpers shared by the dashboard callbacks: W&B loggers on rank 0, batch unpacking.

The dashboard callbacks work with any logger, or none: scalars go through ``pl_module.log`` or
``logger.log_metrics``; media (segmentation overlays, heat-maps, tables) are logged only to a
:class:`~lightning.pytorch.loggers.WandbLogger` among ``trainer.loggers`` (:func:`wandb_loggers`), from global
rank 0 only. Without one those parts are skipped (nothing is computed for them), and nothing fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

__all__ = ["image_and_label", "log_to_wandb", "wandb_loggers"]


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """W&B loggers of the trainer, on global rank 0 only (the others must not log media)."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_to_wandb(trainer: pl.Trainer, loggers: Sequence[WandbLogger], values: Mapping[str, Any]) -> None:
    """Log ``values`` (media included) to every W&B logger at the trainer's global step."""
    for logger in loggers:
        logger.log_metrics(dict(values), step=trainer.global_step)


def image_and_label(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(image, label)`` from a ``{"image", "label"}`` dict or an ``(image, label, ...)`` sequence."""
    if isinstance(batch, Mapping) and "image" in batch and "label" in batch:
        return batch["image"], batch["label"]
    if isinstance(batch, Sequence) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]):
        return batch[0], batch[1]
    return None
