"""Progress of a run with the ETA of the whole run: one line per epoch for logs, a progress bar on a terminal.

- :class:`EpochLines`: for a run whose output goes to a file (a cluster job, CI): one line per epoch,
  ``epoch k/N``, the epoch's mean loss terms, the validation Dice when there is one, the elapsed time and the
  ETA of the whole run; no carriage returns, nothing per step.
- :class:`RunProgressBar`: Lightning's tqdm bar, described ``epoch k/N`` with the run's ETA beside the loss and the
  validation Dice (tqdm's own estimate is the epoch's).

Both read the loss terms from ``trainer.callback_metrics`` (what :class:`~lightning_selfreg.SelfRegSegModule` and
:class:`~lightning_selfreg.SelfReg` log) and add them up on the device; the one host transfer per term is at the
end of the epoch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

__all__ = ["EpochLines", "RunProgressBar", "format_duration", "run_eta"]

# logged name -> label in the epoch line, in order (the terms of tracking.curves.LOSS_TERMS)
TERMS = {"train/loss": "loss", "train/ce": "CE", "train/dice": "Dice", "selfreg/scr": "SCR", "selfreg/ifd": "IFD",
         "selfreg/total": "SelfReg"}
VAL_DICE = "val/dice"


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def run_eta(elapsed: float, done: float, start: float = 0.0) -> float | None:
    """Seconds left when a fraction ``done`` of the run is done after ``elapsed`` seconds (from ``start``).

    The rate is the mean since this process started (``start``: the fraction a resumed run began at). None
    before any progress.

    Example:
        >>> run_eta(60.0, 0.25)
        180.0
    """
    if done <= start:
        return None
    return elapsed * (1.0 - done) / (done - start)


def _fraction(trainer: pl.Trainer, epochs_done: float) -> float:
    """Fraction of the run done after ``epochs_done`` epochs (or the steps, for a run bounded by steps)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return min(1.0, trainer.global_step / trainer.max_steps)
    if trainer.max_epochs and trainer.max_epochs > 0:
        return min(1.0, epochs_done / trainer.max_epochs)
    return 0.0


def _total(trainer: pl.Trainer) -> str:
    return str(trainer.max_epochs) if trainer.max_epochs and trainer.max_epochs > 0 else "?"


class _RunClock:
    """Elapsed time and ETA of the run since ``start``."""

    def __init__(self) -> None:
        self.began: float | None = None
        self.start_fraction = 0.0

    def start(self, trainer: pl.Trainer) -> None:
        self.began = time.monotonic()
        self.start_fraction = _fraction(trainer, trainer.current_epoch)

    def text(self, trainer: pl.Trainer, epochs_done: float) -> tuple[str, str]:
        elapsed = time.monotonic() - (self.began or time.monotonic())
        eta = run_eta(elapsed, _fraction(trainer, epochs_done), self.start_fraction)
        return format_duration(elapsed), "?" if eta is None else format_duration(eta)


class EpochLines(ProgressBar):
    """One line per training epoch, for output that is not a terminal (see the module docstring).

    Example line::

        epoch 3/40  loss 1.021 (CE 0.512, Dice 0.480, SCR 0.713, IFD 1.52, SelfReg 0.0335)  val Dice 61.2 %
        | 41 s elapsed, ETA 8 min 05 s

    Args:
        file: Where the lines go (default ``sys.stdout`` at the time of writing).
    """

    def __init__(self, file: IO[str] | None = None) -> None:
        super().__init__()
        self.file = file
        self._enabled = True
        self._clock = _RunClock()
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._test_began = time.monotonic()

    @property
    def is_enabled(self) -> bool:
        """Whether lines are written."""
        return self._enabled

    def disable(self) -> None:
        """Write nothing (ranks other than 0)."""
        self._enabled = False

    def enable(self) -> None:
        """Write the lines."""
        self._enabled = True

    def _write(self, line: str) -> None:
        if self._enabled:
            stream = self.file or sys.stdout
            stream.write(line + "\n")
            stream.flush()

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Write a line of text (Lightning calls this for messages that must not break a bar)."""
        self._write(sep.join(map(str, args)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the run's clock (a resumed run measures its rate from where it resumed)."""
        self._clock.start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the epoch's sums."""
        self._sums, self._counts = {}, {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Add the step's loss terms to the epoch's sums (on the device: no host transfer per step)."""
        if not self._enabled:
            return
        metrics = trainer.callback_metrics
        for key in TERMS:
            value = metrics.get(key)
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
                self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
                self._counts[key] = self._counts.get(key, 0) + 1

    def epoch_line(self, trainer: pl.Trainer) -> str:
        """The line of the epoch that just ended."""
        means = {key: float(self._sums[key]) / self._counts[key] for key in TERMS if key in self._sums}
        parts = [f"epoch {trainer.current_epoch + 1}/{_total(trainer)}"]
        if "train/loss" in means:
            terms = ", ".join(f"{TERMS[k]} {means[k]:.4g}" for k in TERMS if k in means and k != "train/loss")
            parts.append(f"loss {means['train/loss']:.4g}" + (f" ({terms})" if terms else ""))
        val = trainer.callback_metrics.get(VAL_DICE)
        if isinstance(val, torch.Tensor) and math.isfinite(float(val)):
            parts.append(f"val Dice {100 * float(val):.1f} %")
        elapsed, eta = self._clock.text(trainer, trainer.current_epoch + 1)
        return "  ".join(parts) + f"  | {elapsed} elapsed, ETA {eta}"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the epoch's line."""
        if self._enabled and not trainer.sanity_checking:
            self._write(self.epoch_line(trainer))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say that the test starts and on how many batches (cases)."""
        self._test_began = time.monotonic()
        total = sum(trainer.num_test_batches) if isinstance(trainer.num_test_batches, list) else \
            trainer.num_test_batches
        self._write(f"testing {total} case(s)")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say how long the test took."""
        self._write(f"tested in {format_duration(time.monotonic() - self._test_began)}")


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar with ``epoch k/N``, the loss, the validation Dice and the run's ETA."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._clock = _RunClock()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the bar and start the run's clock."""
        super().on_train_start(trainer, pl_module)
        self._clock.start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        """Describe the bar as ``epoch k/N``."""
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{_total(trainer)}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The loss, the validation Dice and the run's ETA (no version number)."""
        metrics = trainer.progress_bar_metrics
        out: dict[str, Any] = {}
        if "train/loss" in metrics:
            out["loss"] = f"{metrics['train/loss']:.4g}"
        if VAL_DICE in metrics:
            out["val Dice"] = f"{100 * metrics[VAL_DICE]:.1f}%"
        bar = self.train_progress_bar
        done = trainer.current_epoch + (bar.n / bar.total if bar is not None and bar.total else 0.0)
        out["run ETA"] = self._clock.text(trainer, done)[1]
        return out
