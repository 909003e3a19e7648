"""``AuxiliaryLoss``: the base class of callbacks that add loss terms to ``SelfRegSegModule.training_step``.

A Lightning callback cannot change the loss by itself (``on_before_backward`` only sees it), so the module offers
one mechanism: every callback that subclasses :class:`AuxiliaryLoss` is asked, in ``training_step``, for a
context in which the forward pass runs (:meth:`AuxiliaryLoss.capture`) and then for its loss terms
(:meth:`AuxiliaryLoss.auxiliary_loss`), which the module adds to the segmentation loss and logs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

__all__ = ["AuxiliaryLoss"]


class AuxiliaryLoss(pl.Callback):
    """Base class for callbacks that contribute loss terms to ``SelfRegSegModule.training_step``.

    Subclasses implement :meth:`auxiliary_loss` and, when they need activations, :meth:`capture`.
    """

    def capture(self, pl_module: pl.LightningModule) -> AbstractContextManager:
        """Context in which the module runs its training forward pass (e.g. to record features)."""
        return nullcontext()

    def auxiliary_loss(self, pl_module: pl.LightningModule, batch: Any, logits: Tensor) -> tuple[Tensor, dict]:
        """Return ``(weighted term, {name: tensor to log})`` for the current training step."""
        raise NotImplementedError
