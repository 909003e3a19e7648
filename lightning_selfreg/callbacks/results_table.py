"""``TestResultsTable``: the per-class test metrics of ``pl_module.test_results`` as a table and summary values."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

__all__ = ["TestResultsTable"]


class TestResultsTable(pl.Callback):
    """Log ``pl_module.test_results`` at the end of testing.

    ``test_results`` is the dict of :class:`~lightning_selfreg.segmentation.module.SelfRegSegModule`: ``{"num_cases",
    "<metric>_mean", ..., "per_class": {name: {"<metric>": value}}}`` with metrics such as ``dice``, ``iou`` and
    ``hd95``, and None for a class absent from every case.

    - W&B: a ``wandb.Table`` ``test/per_class`` (columns ``class`` and one per metric, e.g. dice, iou, hd95; a last
      row "mean") and the run summary values ``test/num_cases``, ``test/<metric>_mean`` and
      ``test/<metric>/<class>`` (None values are left out of the summary and empty in the table).
    - Any other logger: the same scalars through ``log_metrics``.

    Nothing happens without a logger, on ranks other than 0, or when the module has no ``test_results``.
    """

    __test__ = False  # not a pytest test class despite the name

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the table and the summary values."""
        results = getattr(pl_module, "test_results", None)
        if not trainer.is_global_zero or not trainer.loggers or not isinstance(results, Mapping):
            return
        per_class = results.get("per_class") or {}
        metrics = list(dict.fromkeys(m for values in per_class.values() for m in values))
        scalars = {"test/num_cases": results.get("num_cases")}
        scalars.update({f"test/{m}_mean": results.get(f"{m}_mean") for m in metrics})
        for name, values in per_class.items():
            scalars.update({f"test/{m}/{name}": values.get(m) for m in metrics})
        scalars = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[name, *(values.get(m) for m in metrics)] for name, values in per_class.items()]
                rows.append(["mean", *(results.get(f"{m}_mean") for m in metrics)])
                logger.log_table("test/per_class", columns=["class", *metrics], data=rows, step=trainer.global_step)
                logger.experiment.summary.update(scalars)
            else:
                logger.log_metrics(scalars, step=trainer.global_step)
                logger.save()
