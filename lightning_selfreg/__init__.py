"""lightning_selfreg: SelfReg-UNet (Zhu et al., MICCAI 2024) as a plug-and-play PyTorch Lightning library."""

from lightning_selfreg.callbacks import AuxiliaryLoss, SelfReg
from lightning_selfreg.losses import DiceCELoss, SelfRegLoss, ifd_loss, scr_loss
from lightning_selfreg.module import SelfRegSegModule
from lightning_selfreg.taps import FeatureTaps, TapSpec, list_tap_candidates, resolve_tap_spec

__version__ = "0.1.0"

__all__ = [
    "AuxiliaryLoss",
    "DiceCELoss",
    "FeatureTaps",
    "SelfReg",
    "SelfRegLoss",
    "SelfRegSegModule",
    "TapSpec",
    "ifd_loss",
    "list_tap_candidates",
    "resolve_tap_spec",
    "scr_loss",
]
