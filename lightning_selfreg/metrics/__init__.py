"""Segmentation metrics: Dice, HD95 (two exact engines), the two evaluation protocols and per-case aggregation.

``overlap``: :func:`dice`; ``distance``: :func:`surface_distances`, :func:`hd95`, :func:`worst_case_distance`;
``protocols``: :func:`case_metrics` under ``"strict"`` or ``"transunet"``; ``aggregation``: :func:`summarize` and the
DDP-safe :class:`PerCaseMetrics`. Everything but :class:`PerCaseMetrics` works on NumPy arrays of any dimension.
"""

from lightning_selfreg.metrics.aggregation import PerCaseMetrics, summarize
from lightning_selfreg.metrics.distance import (
    HD95_METHODS,
    HD95_MODES,
    KDTREE_BOX_PER_SURFACE,
    hd95,
    surface_distances,
    worst_case_distance,
)
from lightning_selfreg.metrics.overlap import dice
from lightning_selfreg.metrics.protocols import PROTOCOLS, Protocol, case_metrics

__all__ = [
    "HD95_METHODS",
    "HD95_MODES",
    "KDTREE_BOX_PER_SURFACE",
    "PROTOCOLS",
    "PerCaseMetrics",
    "Protocol",
    "case_metrics",
    "dice",
    "hd95",
    "summarize",
    "surface_distances",
    "worst_case_distance",
]
