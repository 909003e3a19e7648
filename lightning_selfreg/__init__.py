"""lightning_selfreg: SelfReg-UNet (Zhu et al., MICCAI 2024) as a plug-and-play PyTorch Lightning library.

The public faces are imported lazily (PEP 562), so ``from lightning_selfreg import SelfRegLoss, FeatureTaps`` loads
the loss and the taps without Lightning; the faces of ``segmentation`` (``SelfRegSegModule``, ``DiceCELoss``,
``AuxiliaryLoss``, ``Predictor``) and ``SelfReg`` load Lightning when first used. How the package is laid out:
README's "How the code is laid out"; the method: ``docs/method.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_FACES: dict[str, str] = {
    "AuxiliaryLoss": "lightning_selfreg.segmentation.auxiliary_loss",
    "DiceCELoss": "lightning_selfreg.segmentation.loss",
    "FeatureTaps": "lightning_selfreg.selfreg.taps",
    "Predictor": "lightning_selfreg.segmentation.predictor",
    "SelfReg": "lightning_selfreg.selfreg.callback",
    "SelfRegLoss": "lightning_selfreg.selfreg.losses",
    "SelfRegSegModule": "lightning_selfreg.segmentation.module",
    "TapSpec": "lightning_selfreg.selfreg.taps",
    "ifd_loss": "lightning_selfreg.selfreg.losses",
    "list_tap_candidates": "lightning_selfreg.selfreg.taps",
    "resolve_tap_spec": "lightning_selfreg.selfreg.taps",
    "scr_loss": "lightning_selfreg.selfreg.losses",
}

__all__ = [
    "AuxiliaryLoss",
    "DiceCELoss",
    "FeatureTaps",
    "Predictor",
    "SelfReg",
    "SelfRegLoss",
    "SelfRegSegModule",
    "TapSpec",
    "ifd_loss",
    "list_tap_candidates",
    "resolve_tap_spec",
    "scr_loss",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from lightning_selfreg.segmentation.auxiliary_loss import AuxiliaryLoss
    from lightning_selfreg.segmentation.loss import DiceCELoss
    from lightning_selfreg.segmentation.module import SelfRegSegModule
    from lightning_selfreg.segmentation.predictor import Predictor
    from lightning_selfreg.selfreg.callback import SelfReg
    from lightning_selfreg.selfreg.losses import SelfRegLoss, ifd_loss, scr_loss
    from lightning_selfreg.selfreg.taps import FeatureTaps, TapSpec, list_tap_candidates, resolve_tap_spec


def __getattr__(name: str) -> Any:
    module = _FACES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_selfreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FACES})
