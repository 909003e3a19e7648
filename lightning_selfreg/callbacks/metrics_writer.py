"""``MetricsWriter``: write a run's test results as ``metrics.json`` and ``metrics.md`` when testing ends."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_selfreg.tracking.report import format_paper_table
from lightning_selfreg.utils.files import atomic_write_text

__all__ = ["MetricsWriter"]


class MetricsWriter(pl.Callback):
    """Write ``<dirpath>/metrics.json`` and ``<dirpath>/metrics.md`` at the end of testing, on global rank 0.

    ``metrics.json`` (indent 2, trailing newline) is ``{**info, "eval_protocol", "test", "protocols",
    "checkpoint"}``: the ``info`` mapping (e.g. the CLI's ``dataset``, ``backbone``, ``selfreg``, ``seed``), then
    ``pl_module.hparams.eval_protocol``, ``pl_module.test_results`` (the chosen protocol),
    ``pl_module.test_results_by_protocol`` and the tested checkpoint (``trainer.ckpt_path``, or None for the
    weights in memory). It is what :func:`lightning_selfreg.tracking.compare.load_results` reads. ``metrics.md`` is
    :func:`~lightning_selfreg.tracking.report.format_paper_table` of both protocols, volumetric when the DataModule
    says so (``trainer.datamodule.volumetric``, default True). Both files are written atomically
    (:func:`~lightning_selfreg.utils.files.atomic_write_text`), so a reader never sees a partial file.

    Args:
        dirpath: Folder of the two files (created if needed).
        info: JSON-serialisable values put first in ``metrics.json``.

    Raises:
        RuntimeError: At test end, if the module has no ``test_results`` (not a
            :class:`~lightning_selfreg.segmentation.module.SelfRegSegModule`, or no test case was scored).

    Example:
        >>> writer = MetricsWriter("runs/synapse-unet", info={"dataset": "synapse", "seed": 0})
        >>> trainer = pl.Trainer(callbacks=[writer])  # doctest: +SKIP
    """

    def __init__(self, dirpath: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.info = dict(info or {})

    def metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The ``metrics.json`` content of the test that just ended."""
        results = getattr(pl_module, "test_results", None)
        if results is None:
            raise RuntimeError(f"MetricsWriter: {type(pl_module).__name__} has no `test_results` after testing; it "
                               "needs a SelfRegSegModule (or a module that sets `test_results` and "
                               "`test_results_by_protocol` in `on_test_epoch_end`).")
        return {
            **self.info,
            "eval_protocol": pl_module.hparams.eval_protocol,
            "test": results,
            "protocols": pl_module.test_results_by_protocol,
            "checkpoint": trainer.ckpt_path or None,
        }

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write both files (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        metrics = self.metrics(trainer, pl_module)
        volumetric = bool(getattr(trainer.datamodule, "volumetric", True))
        atomic_write_text(self.dirpath / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(self.dirpath / "metrics.md", format_paper_table(metrics["protocols"], volumetric) + "\n")
