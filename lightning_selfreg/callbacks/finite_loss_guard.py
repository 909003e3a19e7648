"""``FiniteLossGuard``: stop training with a clear error when the loss becomes NaN or infinite."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_selfreg.utils.checks import check_int

__all__ = ["FiniteLossGuard"]


class FiniteLossGuard(pl.Callback):
    """Stop training with a clear error when the loss or a logged loss term becomes NaN or infinite.

    Checks ``outputs["loss"]`` every ``every_n_steps`` steps (one device-to-host sync each time) and, when it is
    not finite, names the step and every non-finite ``train/*`` and ``selfreg/*`` term logged in that step. The
    exception stops the run before the next checkpoint, so no checkpoint holds the broken weights.

    Args:
        every_n_steps: Check interval in optimizer steps.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Raise ``FloatingPointError`` naming the step and the bad terms."""
        step = max(trainer.global_step - 1, 0)  # 0-based index of the step this batch just took
        if step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is None or bool(torch.isfinite(loss).all()):
            return
        bad = sorted(
            name for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "selfreg/")) and isinstance(value, Tensor) and not torch.isfinite(value).all()
        )
        raise FloatingPointError(
            f"Non-finite training loss ({float(loss)}) at step {step} (epoch {trainer.current_epoch}, "
            f"batch {batch_idx}); non-finite terms: {', '.join(bad) or 'none logged'}. Lower the learning rate or "
            "the SelfReg weights, or train in 32-bit precision."
        )
