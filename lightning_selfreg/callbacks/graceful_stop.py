"""``GracefulStop``: on SIGTERM or SIGINT, save a resumable checkpoint at the current step, then stop.

Lightning's own signal handling does the stopping: on SIGTERM its signal connector sets
``trainer.received_sigterm`` (under DDP rank 0 broadcasts it, so every rank stops at the same step) and the loops
raise ``SIGTERMException`` at the next step boundary. Under SLURM with auto-requeue (Lightning's default when
``SLURMEnvironment`` is detected) the requeue signal (``SIGUSR1`` by default, ``#SBATCH --signal=USR1@90``) also
saves ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` and requeues the job, as Lightning does. This callback
adds what Lightning leaves out:

* **a checkpoint at the step where training stopped** (``on_exception`` with ``SIGTERMException``), written
  atomically by the Trainer's checkpoint plugin. A resume from it ends on the same weights as an uninterrupted run.
  When the signal arrives during validation (or the sanity check) no checkpoint is written: the state mid-way
  through validation would not resume exactly (the validation of that epoch would be skipped and its data-loader
  RNG draw missed), so the resume continues from the last checkpoint written before it (the previous epoch's end,
  or a step checkpoint). During testing nothing is written either: training has finished.
* **SIGINT (Ctrl+C) takes the same path**: the first SIGINT is turned into a SIGTERM to this process (so Lightning
  stops at the step boundary instead of raising ``KeyboardInterrupt`` mid-step); a second SIGINT interrupts at
  once, without a checkpoint (the previous one stays intact).

After ``trainer.fit`` raised ``SIGTERMException`` (a ``SystemExit`` whose status would be 0), :attr:`signal`,
:attr:`saved_step` and :attr:`saved_path` say what happened; the caller reports it and exits with ``128 + signal``
(143 for SIGTERM, 130 for SIGINT), so a scheduler never counts the run as a success.

Args:
    path: The checkpoint file to write (e.g. ``<run>/checkpoints/last.ckpt``, the file ``--resume`` reads).

Example:
    >>> stop = GracefulStop("runs/r/checkpoints/last.ckpt")
    >>> trainer = pl.Trainer(callbacks=[stop])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["GracefulStop"]


class GracefulStop(pl.Callback):
    """Save a resumable checkpoint at the current step on SIGTERM / SIGINT (see the module docstring).

    Attributes:
        signal: The signal that stopped the run (``signal.SIGTERM`` or ``signal.SIGINT``), or None.
        saved_step: ``trainer.global_step`` of the checkpoint written on the signal, or None when none was written
            (a signal during validation, testing, or before the first step).
        saved_path: The path written, or None.
        stage: Where the signal found the run: ``"train"``, ``"validate"``, ``"test"`` or ``"other"``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.signal: int | None = None
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self.stage: str | None = None
        self._previous_sigint: Any = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # a second Ctrl+C: stop now, without a checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal = signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: stop at the next step boundary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Route SIGINT to the graceful path (main thread only; Lightning has installed its SIGTERM handler)."""
        if threading.current_thread() is threading.main_thread() and self._previous_sigint is None:
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the SIGINT handler."""
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On ``SIGTERMException`` during the training steps of ``fit``: write the checkpoint at this step."""
        if not isinstance(exception, SIGTERMException):
            return
        if self.signal is None:
            self.signal = signal.SIGTERM
        if trainer.state.fn == TrainerFn.TESTING:
            self.stage = "test"
        elif trainer.sanity_checking or trainer.validating:
            self.stage = "validate"
        elif trainer.state.fn == TrainerFn.FITTING and trainer.training:
            self.stage = "train"
        else:
            self.stage = "other"
        if self.stage != "train" or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        self.saved_step, self.saved_path = trainer.global_step, self.path
