"""``RedundancyFigure``: save the trainer's :class:`RedundancyMonitor` heat-maps (paper Fig. 1c) as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl

from lightning_selfreg.selfreg.redundancy_monitor import RedundancyMonitor
from lightning_selfreg.tracking.figures import save_figure

__all__ = ["RedundancyFigure"]


class RedundancyFigure(pl.Callback):
    """Write ``path``: the channel-correlation heat-maps of every tapped block at the first and the last epoch.

    The matrices are those the trainer's :class:`~lightning_selfreg.callbacks.RedundancyMonitor` measured
    (:meth:`~lightning_selfreg.callbacks.RedundancyMonitor.figure`): one row per epoch, one column per block, each
    titled with its redundancy score (mean absolute off-diagonal correlation). Written when fitting ends, on
    global rank 0, atomically; without a monitor (or before its first measurement) nothing is written.

    Args:
        path: The PNG to write (e.g. ``<run>/redundancy.png``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the figure."""
        if not trainer.is_global_zero:
            return
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, RedundancyMonitor)), None)
        fig = monitor.figure() if monitor is not None else None
        if fig is not None:
            save_figure(fig, self.path)
