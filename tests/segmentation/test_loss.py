import pytest
import torch
import torch.nn.functional as F

from lightning_selfreg.segmentation.loss import DiceCELoss


def authors_dice(logits, target, n_classes, smooth=1e-5):
    prob = logits.softmax(1)
    loss = 0.0
    for i in range(n_classes):
        score, t = prob[:, i], (target == i).float()
        intersect = (score * t).sum()
        loss += 1 - (2 * intersect + smooth) / ((score * score).sum() + (t * t).sum() + smooth)
    return loss / n_classes


def test_dice_ce_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    total, terms = DiceCELoss(4, 0.4, 0.6)(logits, target)
    ce = F.cross_entropy(logits, target)
    dice = authors_dice(logits, target, 4)
    assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["dice"], dice, atol=1e-6)
    assert torch.allclose(total, 0.4 * ce + 0.6 * dice, atol=1e-6)


def test_dice_ce_3d_matches_reference_and_the_2d_loss_of_stacked_slices():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    total, terms = DiceCELoss(3, 0.3, 0.7)(logits, target)
    ce, dice = F.cross_entropy(logits, target), authors_dice(logits, target, 3)
    assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["dice"], dice, atol=1e-6)
    assert torch.allclose(total, 0.3 * ce + 0.7 * dice, atol=1e-6)
    # the batch-wide Dice of a volume equals the 2-D Dice of its slices stacked along the batch
    flat_logits = logits.permute(0, 2, 1, 3, 4).reshape(8, 3, 5, 6)
    _, terms2d = DiceCELoss(3, 0.3, 0.7)(flat_logits, target.reshape(8, 5, 6))
    assert torch.allclose(terms2d["dice"], dice, atol=1e-6) and torch.allclose(terms2d["ce"], ce, atol=1e-6)
    with pytest.raises(ValueError, match="target"):
        DiceCELoss(3)(logits, target[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ce_weight=0, dice_weight=0), "`ce_weight` and `dice_weight` are both 0"),
        (dict(ce_weight=-0.1), "`ce_weight` must be a finite number >= 0"),
        (dict(dice_weight=-1), "`dice_weight` must be a finite number >= 0"),
        (dict(dice_weight=float("inf")), "`dice_weight` must be a finite number >= 0"),
        (dict(ce_weight=float("nan")), "`ce_weight` must be a finite number >= 0"),
    ],
)
def test_dice_ce_weight_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceCELoss(3, **kwargs)
    DiceCELoss(3, ce_weight=0, dice_weight=1)  # one of them may be 0


def test_dice_ce_shape_errors():
    loss = DiceCELoss(3)
    with pytest.raises(ValueError, match="logits"):
        loss(torch.randn(2, 4, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(2, 3, 5, 5), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        loss(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.long))
