"""The method: SelfReg's two loss terms, the feature taps that feed them, the callback and the redundancy diagnostic.

========================  ====================================================================================
module                    what it holds
========================  ====================================================================================
``losses``                :func:`ifd_loss`, :func:`scr_loss`, :class:`SelfRegLoss` (the terms, their checks and
                          aggregation; the readable autograd reference beside the fused default)
``fused``                 the fused implementation: one autograd node for all taps, closed-form gradients
``cpu_kernels``           its compiled CPU kernels (Numba), loaded on first use
``taps``                  :class:`TapSpec` (which blocks, grouped how) and :class:`FeatureTaps` (forward hooks)
``callback``              :class:`SelfReg`, the Lightning callback that adds the terms to the training loss
``redundancy``            channel correlation and the redundancy score (the paper's Fig. 1c)
``redundancy_monitor``    :class:`RedundancyMonitor`, the callback that logs it during training
========================  ====================================================================================

The equations, shapes and where the defaults follow the authors' code: ``docs/method.md``. Names load lazily, so
the losses and the taps import without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES: dict[str, str] = {
    "FeatureTaps": "taps",
    "RedundancyMonitor": "redundancy_monitor",
    "SelfReg": "callback",
    "SelfRegLoss": "losses",
    "TapSpec": "taps",
    "block_correlations": "redundancy",
    "channel_correlation": "redundancy",
    "collect_block_features": "redundancy",
    "ifd_loss": "losses",
    "list_tap_candidates": "taps",
    "plot_correlation_heatmaps": "redundancy",
    "redundancy_score": "redundancy",
    "resolve_tap_spec": "taps",
    "scr_loss": "losses",
}

__all__ = [
    "FeatureTaps",
    "RedundancyMonitor",
    "SelfReg",
    "SelfRegLoss",
    "TapSpec",
    "block_correlations",
    "channel_correlation",
    "collect_block_features",
    "ifd_loss",
    "list_tap_candidates",
    "plot_correlation_heatmaps",
    "redundancy_score",
    "resolve_tap_spec",
    "scr_loss",
]

if TYPE_CHECKING:
    from lightning_selfreg.selfreg.callback import SelfReg
    from lightning_selfreg.selfreg.losses import SelfRegLoss, ifd_loss, scr_loss
    from lightning_selfreg.selfreg.redundancy import (
        block_correlations,
        channel_correlation,
        collect_block_features,
        plot_correlation_heatmaps,
        redundancy_score,
    )
    from lightning_selfreg.selfreg.redundancy_monitor import RedundancyMonitor
    from lightning_selfreg.selfreg.taps import FeatureTaps, TapSpec, list_tap_candidates, resolve_tap_spec


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_selfreg.selfreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
