"""``MetricsWriter``: write a run's test results as ``metrics.json`` and ``metrics.md`` when testing ends."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from lightning_selfreg.callbacks.overlay_writer import OverlayWriter
from lightning_selfreg.data.sampling import is_padding
from lightning_selfreg.metrics.overlap import class_dice
from lightning_selfreg.segmentation.inference import step_prediction
from lightning_selfreg.tracking.report import format_run_markdown, hd95_units
from lightning_selfreg.tracking.wandb_logging import image_and_label
from lightning_selfreg.utils.distributed import gather_lists
from lightning_selfreg.utils.files import atomic_write_text

# caption -> file name in the run folder, linked from metrics.md when the file exists
PICTURES = {"training curves": "curves.png",
            "channel redundancy of each tapped block, first and last epoch (the paper's Fig. 1c)": "redundancy.png"}

__all__ = ["MetricsWriter"]


class MetricsWriter(pl.Callback):
    """Write ``<dirpath>/metrics.json`` and ``<dirpath>/metrics.md`` at the end of testing, on global rank 0.

    ``metrics.json`` (indent 2, trailing newline) is ``{**info, "eval_protocol", "test", "protocols",
    "hd95_units", "cases", "checkpoint"}``: the ``info`` mapping (e.g. the CLI's ``dataset``, ``backbone``,
    ``selfreg``, ``seed``), then ``pl_module.hparams.eval_protocol``, ``pl_module.test_results`` (the chosen
    protocol), ``pl_module.test_results_by_protocol``, the unit of each protocol's HD95 (``"mm"`` or
    ``"voxels"``), the per-case Dice ``[{"case", "mean_dice", "dice": {class: value | None}}]`` (the ``strict``
    Dice of the test step's prediction, ``outputs["prediction"]``, against the label; None for a class in neither;
    gathered over ranks) and the tested checkpoint (``trainer.ckpt_path``, or None for the weights in memory). It
    is what :func:`lightning_selfreg.tracking.compare.load_results` reads. ``metrics.md`` is
    :func:`~lightning_selfreg.tracking.report.format_run_markdown`: the ``settings`` line, the per-organ table of
    both protocols with units, the cases (lowest mean Dice first, linked to the pictures of an
    :class:`~lightning_selfreg.callbacks.OverlayWriter` that runs before this callback), the papers' layout
    (volumetric when ``trainer.datamodule.volumetric``, default True) and links to the run folder's pictures
    (:data:`PICTURES`) that exist. Both files are written atomically
    (:func:`~lightning_selfreg.utils.files.atomic_write_text`), so a reader never sees a partial file.

    Args:
        dirpath: Folder of the two files (created if needed).
        info: JSON-serialisable values put first in ``metrics.json``.
        settings: The run's settings in one line, at the top of ``metrics.md``
            (:func:`~lightning_selfreg.tracking.report.settings_line`).

    Raises:
        RuntimeError: At test end, if the module has no ``test_results`` (not a
            :class:`~lightning_selfreg.segmentation.module.SelfRegSegModule`, or no test case was scored).

    Example:
        >>> writer = MetricsWriter("runs/synapse-unet", info={"dataset": "synapse", "seed": 0})
        >>> trainer = pl.Trainer(callbacks=[writer])  # doctest: +SKIP
    """

    def __init__(self, dirpath: str | os.PathLike, info: Mapping[str, Any] | None = None, settings: str = "") -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.info = dict(info or {})
        self.settings = settings
        self._cases: list[dict[str, Any]] = []
        self._spacing_known = False

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the list of cases."""
        self._cases, self._spacing_known = [], False

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Record the case's Dice per class (from the step's ``outputs["prediction"]``) and whether it has a spacing."""
        prediction = step_prediction(outputs)
        pair = image_and_label(batch)
        if prediction is None or pair is None or is_padding(batch):
            return
        label = pair[1]
        names = list(getattr(pl_module, "class_names", None) or [])
        dice = class_dice(prediction.reshape(label.shape), label, len(names) + 1)
        finite = dice[np.isfinite(dice)]
        case = str(batch.get("case", f"case{batch_idx}")) if isinstance(batch, Mapping) else f"case{batch_idx}"
        self._spacing_known = self._spacing_known or (isinstance(batch, Mapping) and batch.get("spacing") is not None)
        self._cases.append({"case": case, "mean_dice": float(finite.mean()) if finite.size else None,
                            "dice": {n: float(v) if np.isfinite(v) else None for n, v in zip(names, dice,
                                                                                              strict=True)}})

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather the cases (and whether a spacing was seen) of every rank."""
        self._cases = gather_lists(trainer, self._cases)
        self._spacing_known = any(gather_lists(trainer, [self._spacing_known]))

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
            "hd95_units": {p: hd95_units(p, self._spacing_known) for p in pl_module.test_results_by_protocol},
            "cases": self._cases,
            "checkpoint": trainer.ckpt_path or None,
        }

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write both files (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        metrics = self.metrics(trainer, pl_module)
        volumetric = bool(getattr(trainer.datamodule, "volumetric", True))
        pictures = {caption: name for caption, name in PICTURES.items() if (self.dirpath / name).is_file()}
        overlay = next((cb for cb in trainer.callbacks if isinstance(cb, OverlayWriter)), None)
        overlays = {}
        for case, path in (overlay.pictures.items() if overlay is not None else ()):
            try:
                overlays[case] = path.relative_to(self.dirpath).as_posix()
            except ValueError:  # pictures outside the run folder: linked by their full path
                overlays[case] = str(path)
        markdown = format_run_markdown(metrics, self._spacing_known, volumetric, self.settings, pictures, overlays)
        atomic_write_text(self.dirpath / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(self.dirpath / "metrics.md", markdown)
