"""The segmentation loss: weighted cross-entropy + soft Dice (the SelfReg / TransUNet scripts' loss)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfreg.utils.checks import SettingError, check_weight

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """Weighted cross-entropy + soft Dice, the segmentation loss of the SelfReg / TransUNet scripts.

    Dice is computed on softmax probabilities over the whole batch, per class including background, as
    ``1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)`` and averaged over classes; fully vectorised, for 2-D
    and 3-D inputs.

    Args:
        num_classes: Number of classes ``K`` (background included).
        ce_weight: Weight of cross-entropy (0.4 in the authors' Synapse recipe, 0.3 for ACDC), finite and >= 0.
        dice_weight: Weight of Dice (0.6 Synapse, 0.7 ACDC), finite and >= 0; not both weights 0.
        smooth: The ``eps`` of the Dice ratio (1e-5 in the authors' code).
    """

    def __init__(self, num_classes: int, ce_weight: float = 0.4, dice_weight: float = 0.6, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 2:
            raise SettingError("num_classes", f"`num_classes` must be >= 2, found {num_classes}.")
        check_weight("ce_weight", ce_weight)
        check_weight("dice_weight", dice_weight)
        if ce_weight == 0 and dice_weight == 0:
            raise SettingError(
                "dice_weight",
                "`ce_weight` and `dice_weight` are both 0, so the segmentation loss would be 0; set at least one > 0.",
            )
        self.num_classes = num_classes
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            logits: ``(B, K, H, W)`` or ``(B, K, D, H, W)`` raw scores.
            target: ``(B, H, W)`` or ``(B, D, H, W)`` integer labels in ``[0, K)``.

        Returns:
            ``(total, {"ce", "dice"})`` with the unweighted terms detached.
        """
        if logits.ndim not in (4, 5) or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"`logits` must be (B, {self.num_classes}, H, W) or (B, {self.num_classes}, D, H, W), "
                f"found {tuple(logits.shape)}."
            )
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"`target` must be {(logits.shape[0], *logits.shape[2:])}, found {tuple(target.shape)}.")
        target = target.long()
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        prob = logits.softmax(1)
        onehot = F.one_hot(target, self.num_classes).movedim(-1, 1).to(prob.dtype)
        dims = (0, *range(2, logits.ndim))
        inter = (prob * onehot).sum(dims)
        denom = (prob * prob).sum(dims) + onehot.sum(dims)
        dice = (1 - (2 * inter + self.smooth) / (denom + self.smooth)).mean()
        total = self.ce_weight * ce + self.dice_weight * dice
        return total, {"ce": ce.detach(), "dice": dice.detach()}
