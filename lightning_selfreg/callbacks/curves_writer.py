"""``CurvesWriter``: draw ``curves.png`` (loss terms, validation Dice per class) from the run's ``metrics.csv``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_selfreg.tracking.csv_logger import MetricsCSVLogger
from lightning_selfreg.tracking.curves import plot_curves, read_metrics_csv
from lightning_selfreg.tracking.figures import save_figure
from lightning_selfreg.utils.checks import SettingError

__all__ = ["CurvesWriter"]


class CurvesWriter(pl.Callback):
    """Write ``path`` (a PNG of :func:`~lightning_selfreg.tracking.curves.plot_curves`) while and after training.

    The curves are read from the ``metrics.csv`` of the trainer's
    :class:`~lightning.pytorch.loggers.CSVLogger` (flushed first), so they show what the run logged, also when
    W&B logs beside it. The picture is redrawn at the end of an epoch when at least ``every_n_seconds`` have
    passed since the last drawing (a long run's folder shows its progress) and always when fitting ends. Written
    on global rank 0 only, atomically; without a CSVLogger the callback does nothing.

    Args:
        path: The PNG to write (e.g. ``<run>/curves.png``).
        title: The figure's title (e.g. the run's settings).
        every_n_seconds: Least time between two drawings during training (0 = every epoch).

    Example:
        >>> writer = CurvesWriter("runs/curves.png")
        >>> trainer = pl.Trainer(logger=CSVLogger("runs"), callbacks=[writer])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, title: str = "", every_n_seconds: float = 60.0) -> None:
        super().__init__()
        if every_n_seconds < 0:
            raise SettingError("every_n_seconds", f"`every_n_seconds` must be >= 0, found {every_n_seconds!r}.")
        self.path = Path(path)
        self.title = title
        self.every_n_seconds = float(every_n_seconds)
        self._last_drawn: float | None = None

    @staticmethod
    def csv_path(trainer: pl.Trainer) -> Path | None:
        """The ``metrics.csv`` of the trainer's CSV logger (a run folder's or Lightning's, flushed), or None."""
        for logger in trainer.loggers:
            if isinstance(logger, MetricsCSVLogger):
                return logger.path
            if isinstance(logger, CSVLogger):
                logger.save()
                return Path(logger.experiment.metrics_file_path)
        return None

    def draw(self, trainer: pl.Trainer) -> Path | None:
        """Draw the picture now (rank 0); returns its path, or None when there is nothing to draw from."""
        if not trainer.is_global_zero:
            return None
        source = self.csv_path(trainer)
        if source is None or not source.is_file():
            return None
        self._last_drawn = time.monotonic()
        names = getattr(trainer.lightning_module, "class_names", None)
        return save_figure(plot_curves(read_metrics_csv(source), self.title, names), self.path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock: the first picture comes after ``every_n_seconds`` of training."""
        self._last_drawn = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Redraw when ``every_n_seconds`` have passed since the last drawing."""
        if self._last_drawn is None or time.monotonic() - self._last_drawn >= self.every_n_seconds:
            self.draw(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the final curves."""
        self.draw(trainer)
