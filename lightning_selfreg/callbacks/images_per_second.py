"""``ImagesPerSecondMonitor``: training images per second, per epoch and over the last logging window."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.data import extract_batch_size

__all__ = ["ImagesPerSecondMonitor"]


class ImagesPerSecondMonitor(pl.Callback):
    """Log training throughput in images per second, measured with ``time.perf_counter``.

    Not Lightning's :class:`~lightning.pytorch.callbacks.ThroughputMonitor` (hence the other name), which needs a
    ``batch_size_fn``, synchronises CUDA after every batch, writes ``train|device/{batches,samples}_per_sec``
    (and FLOPs/MFU when the module declares ``flops_per_batch``) straight to the loggers, and has no per-epoch
    value. This one infers the batch size, never synchronises the device, logs through ``pl_module.log`` (so the
    rate is in ``trainer.callback_metrics`` and on the progress bar) and gives a per-epoch rate with the
    validation runs inside the epoch left out. Use Lightning's for FLOPs and MFU.

    Images are counted with Lightning's ``extract_batch_size`` (the leading dimension of the first tensor in the
    batch). Time runs from the start of each training epoch to its last batch, data loading included, with
    validation runs inside the epoch left out.

    - ``train/images_per_sec``: per epoch (``pl_module.log`` at epoch end, so every logger records it).
    - ``train/images_per_sec_step``: over the last ``trainer.log_every_n_steps`` batches, logged at each step
      (Lightning writes it to the loggers every ``log_every_n_steps`` steps).

    Under DDP every rank counts its own batches and times its own loop; the logged value is the local rate times
    ``trainer.world_size``, i.e. the global rate when the ranks run in step (as DDP's gradient synchronisation
    forces). On a GPU the CUDA queue is not synchronised, so the per-step value may lag by a few steps; the per
    epoch value is exact up to the last step's kernels.
    """

    def __init__(self) -> None:
        super().__init__()
        self._paused_total = 0.0
        self._pause_start: float | None = None
        self._epoch_start = 0.0
        self._last_batch_end: float | None = None
        self._window: deque[tuple[float, int]] = deque()
        self.epoch_images = 0

    def _now(self) -> float:
        return time.perf_counter() - self._paused_total

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch clock."""
        self._epoch_start = self._now()
        self._last_batch_end = None
        self.epoch_images = 0
        self._window = deque([(self._epoch_start, 0)], maxlen=max(1, trainer.log_every_n_steps) + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the batch and log the windowed rate."""
        now = self._now()
        size = extract_batch_size(batch)
        self.epoch_images += size
        self._last_batch_end = now
        self._window.append((now, size))
        elapsed = now - self._window[0][0]
        if elapsed > 0:
            images = sum(n for _, n in list(self._window)[1:])
            pl_module.log("train/images_per_sec_step", images / elapsed * trainer.world_size, on_step=True,
                          on_epoch=False, prog_bar=True, batch_size=size)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop the clock during validation (all times are read on a clock that excludes the pauses)."""
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restart the clock."""
        if self._pause_start is not None:
            self._paused_total += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``train/images_per_sec`` of the epoch."""
        if self._last_batch_end is None or self.epoch_images == 0:
            return
        elapsed = self._last_batch_end - self._epoch_start
        if elapsed > 0:
            rate = self.epoch_images / elapsed * trainer.world_size
            pl_module.log("train/images_per_sec", rate, on_step=False, on_epoch=True)
