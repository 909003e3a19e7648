"""Callbacks for :class:`~lightning_selfreg.SelfRegSegModule`, one per file (Lightning's convention).

The method's own callbacks live with the method, in :mod:`lightning_selfreg.selfreg`, and are re-exported here:

- :class:`SelfReg` (``selfreg/callback.py``): SCR + IFD on the tapped features, an :class:`AuxiliaryLoss`
  (``segmentation/auxiliary_loss.py``: the base class of callbacks that add a term to the training loss).
- :class:`RedundancyMonitor` (``selfreg/redundancy_monitor.py``): channel redundancy of each tapped block (the
  paper's Fig. 1c).

Training safety and resume:

- :class:`FiniteLossGuard`: stop with a clear error on a NaN / infinite loss.
- :class:`RNGStateCheckpoint`: the global RNG states in checkpoints.
- :class:`GracefulStop`: on SIGTERM / SIGINT, a resumable checkpoint at the current step, then stop.

Progress (the run's ETA): :class:`EpochLines` (one line per epoch, for logs) and :class:`RunProgressBar` (a
terminal).

Dashboards (any logger or none; media to W&B only, from rank 0):

- :class:`SegmentationPanels`: image / ground truth / prediction overlays.
- :class:`ImagesPerSecondMonitor`: training images per second.
- :class:`TestResultsTable`: the per-class test metrics as a table and summary (``results_table.py``: a library
  file must not match pytest's ``test_*.py``).

Outputs of a run, in its folder (no logger needed):

- :class:`CurvesWriter`: ``curves.png``, the loss terms and validation Dice per class from ``metrics.csv``.
- :class:`RedundancyFigure`: ``redundancy.png``, the :class:`RedundancyMonitor` heat-maps at the first and last
  epoch.
- :class:`OverlayWriter`: ``overlays/``, a picture of each test case, the lowest Dice first.
- :class:`MetricsWriter`: ``metrics.json`` and ``metrics.md``.
- :class:`TestPredictionWriter`: each case's prediction as NIfTI / PNG (a ``BasePredictionWriter``).
"""

from lightning_selfreg.callbacks.curves_writer import CurvesWriter
from lightning_selfreg.callbacks.finite_loss_guard import FiniteLossGuard
from lightning_selfreg.callbacks.graceful_stop import GracefulStop
from lightning_selfreg.callbacks.images_per_second import ImagesPerSecondMonitor
from lightning_selfreg.callbacks.metrics_writer import MetricsWriter
from lightning_selfreg.callbacks.overlay_writer import OverlayWriter
from lightning_selfreg.callbacks.prediction_writer import TestPredictionWriter
from lightning_selfreg.callbacks.progress import EpochLines, RunProgressBar
from lightning_selfreg.callbacks.redundancy_figure import RedundancyFigure
from lightning_selfreg.callbacks.results_table import TestResultsTable
from lightning_selfreg.callbacks.rng_state import RNGStateCheckpoint
from lightning_selfreg.callbacks.segmentation_panels import SegmentationPanels
from lightning_selfreg.segmentation.auxiliary_loss import AuxiliaryLoss
from lightning_selfreg.selfreg.callback import SelfReg
from lightning_selfreg.selfreg.redundancy_monitor import RedundancyMonitor

__all__ = [
    "AuxiliaryLoss",
    "CurvesWriter",
    "EpochLines",
    "FiniteLossGuard",
    "GracefulStop",
    "ImagesPerSecondMonitor",
    "MetricsWriter",
    "OverlayWriter",
    "RNGStateCheckpoint",
    "RedundancyFigure",
    "RedundancyMonitor",
    "RunProgressBar",
    "SegmentationPanels",
    "SelfReg",
    "TestPredictionWriter",
    "TestResultsTable",
]
