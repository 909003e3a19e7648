"""``MetricsCSVLogger``: every logged scalar in one CSV file, which a resumed run appends to and never truncates.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new logger opens its folder (a resumed run
lost its earlier curves) and rewrites it in place when a new column appears. This logger keeps the file:

* rows go to the end of the file as they are logged (one small append per logging call, so a killed run loses
  nothing that was logged);
* a column that appears later (validation metrics after the first epoch, test metrics at the end) rewrites the
  file once with the wider header, atomically (:func:`~lightning_selfreg.utils.files.atomic_write`), the earlier
  rows kept with empty cells in the new column;
* a resumed run reads the existing header and continues after the last row; a last row cut short by a killed
  write is dropped (rewritten atomically without it) and reported.

The file's columns: ``step`` (the trainer's optimizer-step
counter, ``trainer.global_step`` at the time of logging), ``epoch``, then every logged key in sorted order
(``train/loss``, ``selfreg/scr``, ``val/dice``, ``lr-SGD``, ...). One row per logging call; a cell is empty where
that call did not log the key. After a resume the steps between the resumed checkpoint and the interruption appear
twice (a SIGKILL leaves no checkpoint at the last step): a reader keeps the last row of each ``(step, key)``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_selfreg.utils.files import atomic_write_text, named_write_errors

__all__ = ["MetricsCSVLogger"]

log = logging.getLogger(__name__)
FIRST_COLUMNS = ("step", "epoch")


def _value(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf: readable by float()
    return value


def _order(keys: set[str]) -> list[str]:
    return [k for k in FIRST_COLUMNS if k in keys] + sorted(keys - set(FIRST_COLUMNS))


class MetricsCSVLogger(Logger):
    """Log every scalar to one CSV file (``step``, ``epoch``, then the keys in sorted order); append on resume.

    Args:
        path: The CSV file (e.g. ``<run>/metrics.csv``); an existing one is continued, never truncated.
        name: The logger's name.

    Raises:
        WriteError: (:class:`~lightning_selfreg.utils.files.WriteError`) when a row cannot be written (a full disk,
            a read-only folder); the rows already in the file stay.

    Example:
        >>> logger = MetricsCSVLogger("runs/r/metrics.csv")  # doctest: +SKIP
        >>> trainer = pl.Trainer(logger=[WandbLogger(...), logger])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, name: str = "csv") -> None:
        super().__init__()
        self.path = Path(path)
        self._name = name
        self._columns: list[str] | None = None  # None: the file has not been read yet

    @property
    def name(self) -> str:
        """The logger's name."""
        return self._name

    @property
    def version(self) -> str:
        """No versions: one file per run folder."""
        return ""

    @property
    def save_dir(self) -> str:
        """The folder of the CSV file."""
        return str(self.path.parent)

    @property
    def log_dir(self) -> str:
        """The folder of the CSV file."""
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Not stored here: the run folder's ``config.yaml`` holds the configuration."""

    def _read_columns(self) -> list[str]:
        """The existing file's header (repairing a last row cut short by a killed write), or ``[]``."""
        if self._columns is not None:
            return self._columns
        self._columns = []
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return self._columns
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        header = next(csv.reader([lines[0]])) if lines else []
        if lines and not lines[-1].endswith("\n"):  # a killed append: an incomplete last row
            log.warning("%s: dropped its last row %r, cut short by an interrupted write", self.path,
                        lines[-1][:80])
            atomic_write_text(self.path, "".join(lines[:-1]) if len(lines) > 1 else "")
            if len(lines) == 1:
                header = []
        self._columns = header
        return self._columns

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write one row: ``step`` and the given values (``epoch`` among them when Lightning logs it)."""
        row = {key: _value(value) for key, value in metrics.items()}
        if step is not None:
            row["step"] = int(step)
        if not row:
            return
        columns = self._read_columns()
        with named_write_errors(self.path):
            if set(row) - set(columns):
                self._widen(_order(set(columns) | set(row)), row)
            else:
                buffer = io.StringIO()
                csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n").writerow(row)
                with self.path.open("a", encoding="utf-8", newline="") as f:
                    f.write(buffer.getvalue())

    def _widen(self, columns: list[str], row: dict[str, Any]) -> None:
        """Rewrite the file atomically with the header ``columns``: the existing rows, then ``row``."""
        rows = []
        if self.path.is_file() and self._columns:
            with self.path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, buffer.getvalue())
        self._columns = columns

    @rank_zero_only
    def save(self) -> None:
        """Nothing to do: every row is written when it is logged."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Nothing to do: every row is written when it is logged."""
