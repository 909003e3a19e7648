"""Segmentation with a SelfReg-ready LightningModule: the module, its loss and the contract for added loss terms.

``module``: :class:`SelfRegSegModule`; ``loss``: :class:`DiceCELoss`; ``auxiliary_loss``: :class:`AuxiliaryLoss`, the
base class of callbacks that add a term to the training loss (:class:`~lightning_selfreg.selfreg.SelfReg` is one).
"""

from lightning_selfreg.segmentation.auxiliary_loss import AuxiliaryLoss
from lightning_selfreg.segmentation.loss import DiceCELoss
from lightning_selfreg.segmentation.module import SelfRegSegModule

__all__ = ["AuxiliaryLoss", "DiceCELoss", "SelfRegSegModule"]
