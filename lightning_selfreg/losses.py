"""SelfReg loss terms (SCR, IFD), their aggregation, and the CE + Dice segmentation loss.

The two SelfReg terms follow the authors' released code (``KDloss`` in ChongQingNoSubway/SelfReg-UNet),
which is the default for reproduction; where code and paper differ an option selects the paper's reading:

* **SCR** (semantic consistency regularisation, the code's ``inter_fd``): the last decoder feature map
  ``F_final`` (before the 1x1 head) is detached, average-pooled to a block's ``(H, W)`` and compared with the
  block by MSE after matching channels. The authors pool to ``(H, H)``; we pool to ``(H, W)`` so non-square
  inputs work. Channels are matched by a fresh random pairing every call (code) or by position (``"ordered"``).
* **IFD** (internal feature distillation, the code's ``intra_fd``): channels of one block are ranked by the
  batch-and-space mean of their spatially L2-normalised maps, and the top-ranked half is regressed onto the
  bottom-ranked half by MSE. The code lets both halves receive gradient (default); ``detach_shallow=True``
  follows the paper's wording that the shallow (top) half guides the deep half.

All SelfReg terms are computed in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PAIRINGS", "DiceCELoss", "SelfRegLoss", "ifd_loss", "pool_teacher", "scr_loss"]

PAIRINGS = ("random", "ordered")


def _check_map(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`{name}` must be a (B, C, H, W) feature map, found {found}.")


def ifd_loss(feature: Tensor, detach_shallow: bool = False) -> Tensor:
    """Internal feature distillation of one feature map.

    Channels are ranked (descending) by ``mean_{b,h,w}(x_bc / ||x_bc||_2)``, the score of the authors' code
    (scale-free: it ranks dense, positive maps first). Rank ``k`` is paired with rank ``k + ceil(C / 2)`` and
    the MSE of the pairs is returned. For even ``C`` this is exactly the authors' first-half/second-half split;
    for odd ``C`` (where their code fails on a shape mismatch) the median-ranked channel is left out, so the
    two halves are the top and bottom ``C // 2`` channels.

    Args:
        feature: Block output, shape ``(B, C, H, W)`` with ``C >= 2``.
        detach_shallow: Stop the gradient through the top-ranked ("shallow") half, so it acts as the teacher
            of the bottom half as the paper describes. The authors' code detaches nothing (default).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: If ``feature`` is not 4-D or has fewer than 2 channels.
    """
    _check_map(feature, "feature")
    c = feature.shape[1]
    if c < 2:
        raise ValueError(f"`feature` needs at least 2 channels for IFD, found {c}.")
    with torch.no_grad():  # fp32 accumulation without an fp32 copy of the map
        norm = torch.linalg.vector_norm(feature.flatten(2), dim=2, dtype=torch.float32).clamp_min(1e-12)  # (B, C)
        score = (feature.sum(dim=(2, 3), dtype=torch.float32) / norm).mean(0)  # (C,); 1/(HW) does not change ranks
        order = torch.argsort(score, descending=True)
        half = c // 2
        pairs = torch.cat([order[:half], order[(c + 1) // 2 :]])  # top half, then the bottom half (median left out)
    # one gather in the map's own dtype, then fp32 on the gathered channels only
    top, bottom = feature.index_select(1, pairs).float().split(half, dim=1)
    if detach_shallow:
        top = top.detach()
    return F.mse_loss(top, bottom)


def pool_teacher(final: Tensor, sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Tensor]:
    """Detach ``final`` and average-pool it once to every requested spatial size.

    Sizes are visited from large to small and each is pooled from the smallest already-pooled map whose
    height and width it divides, which is exact (an average of equal-sized block averages) and touches far
    less memory than pooling the full-resolution map again for every tap.

    Args:
        final: Teacher map ``F_final``, shape ``(B, C, H, W)``.
        sizes: Target ``(h, w)`` sizes, each no larger than ``(H, W)``.

    Returns:
        Mapping ``(h, w) -> (B, C, h, w)`` float32 tensors without gradient, for the requested sizes.

    Raises:
        ValueError: If a size is larger than ``final`` in either dimension.
    """
    _check_map(final, "final")
    teacher = final.detach()  # pooled in its own dtype (pooling accumulates in fp32), cast after pooling
    full = tuple(teacher.shape[-2:])
    wanted = {(int(s[0]), int(s[1])) for s in sizes}
    pooled: dict[tuple[int, int], Tensor] = {full: teacher}
    for size in sorted(wanted, key=lambda s: s[0] * s[1], reverse=True):
        if size in pooled:
            continue
        if size[0] > full[0] or size[1] > full[1]:
            raise ValueError(
                f"A tapped feature of spatial size {size} is larger than `final` {full}; SCR pools `final` down "
                "to each tap, so `final` must be the largest map (check the tap spec's `final`)."
            )
        source = min(
            (s for s in pooled if s[0] % size[0] == 0 and s[1] % size[1] == 0),
            key=lambda s: s[0] * s[1],
            default=full,
        )
        pooled[size] = F.adaptive_avg_pool2d(pooled[source], size)
    return {size: p.float() for size, p in pooled.items() if size in wanted}


def _pair_channels(c_s: int, c_t: int, pairing: str, generator: torch.Generator | None, device) -> tuple:
    """Channel indices ``(idx_s, idx_t)`` of equal length ``min(c_s, c_t)``; ``None`` means "all, in order"."""
    c = min(c_s, c_t)
    if pairing == "ordered":
        return (None if c == c_s else slice(0, c)), (None if c == c_t else slice(0, c))
    # The authors draw a random subset of size c on BOTH sides and pair them by position. Pairing a
    # uniformly drawn ordered subset of the larger side with the smaller side kept in order induces the
    # same distribution over channel matchings, with one random draw instead of two.
    gen_device = generator.device if generator is not None else device
    if c_s >= c_t:
        return torch.randperm(c_s, generator=generator, device=gen_device)[:c].to(device), None
    return None, torch.randperm(c_t, generator=generator, device=gen_device)[:c].to(device)


def _select(x: Tensor, idx) -> Tensor:
    if idx is None:
        return x
    if isinstance(idx, slice):
        return x[:, idx]
    return x.index_select(1, idx)


def scr_loss(
    feature: Tensor,
    final: Tensor,
    pairing: str = "random",
    generator: torch.Generator | None = None,
    pooled: Tensor | None = None,
) -> Tensor:
    """Semantic consistency regularisation of one block by the detached final decoder map.

    Args:
        feature: Student block output, shape ``(B, C_s, h, w)``, not larger than ``final`` in space.
        final: Teacher ``F_final``, shape ``(B, C_t, H, W)``; never receives gradient.
        pairing: ``"random"`` (authors' code: a fresh random channel matching of size ``min(C_s, C_t)`` at every
            call, drawn from ``generator``) or ``"ordered"`` (the first ``min(C_s, C_t)`` channels of both).
        generator: Torch generator for ``"random"``; the global torch RNG when ``None``.
        pooled: ``final`` already detached and pooled to ``(h, w)`` (see :func:`pool_teacher`), to share the
            pooling between taps; computed here when ``None``.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: On non-4-D inputs, a batch mismatch, an unknown ``pairing`` or a feature larger than
            ``final`` in space.
    """
    _check_map(feature, "feature")
    _check_map(final, "final")
    if pairing not in PAIRINGS:
        raise ValueError(f"`pairing` must be one of {PAIRINGS}, found {pairing!r}.")
    if feature.shape[0] != final.shape[0]:
        raise ValueError(f"Batch sizes differ: `feature` has {feature.shape[0]}, `final` has {final.shape[0]}.")
    size = tuple(feature.shape[-2:])
    if pooled is None:
        pooled = pool_teacher(final, [size])[size]
    idx_s, idx_t = _pair_channels(feature.shape[1], final.shape[1], pairing, generator, feature.device)
    return F.mse_loss(_select(feature, idx_s).float(), _select(pooled, idx_t))


class SelfRegLoss(nn.Module):
    """The SelfReg regulariser over named tapped features, aggregated as in the authors' code.

    ``total = lambda_ifd * sum_g mean_{t in g} IFD(t) + lambda_scr * sum_g mean_{t in g} SCR(t, final)``, where
    the IFD and SCR groups come from the tap spec. For the paper's UNet the IFD groups are the 4 encoder and the
    3 decoder taps and SCR has one group of all 7 taps (paper.md §2.3).

    Args:
        ifd_groups: Group name -> tap names whose IFD losses are averaged together.
        scr_groups: Group name -> tap names whose SCR losses are averaged together.
        lambda_scr: Weight of SCR (the paper's lambda_1).
        lambda_ifd: Weight of IFD (the paper's lambda_2).
        pairing: SCR channel pairing, see :func:`scr_loss`.
        detach_shallow: IFD option, see :func:`ifd_loss`.

    Example:
        >>> loss = SelfRegLoss({"enc": ["a"]}, {"all": ["a"]})
        >>> feats = {"a": torch.randn(2, 8, 4, 4), "final": torch.randn(2, 4, 8, 8)}
        >>> total, terms = loss(feats, feats["final"])
        >>> sorted(terms)
        ['ifd', 'scr']
    """

    def __init__(
        self,
        ifd_groups: Mapping[str, Sequence[str]],
        scr_groups: Mapping[str, Sequence[str]],
        lambda_scr: float = 0.015,
        lambda_ifd: float = 0.015,
        pairing: str = "random",
        detach_shallow: bool = False,
    ) -> None:
        super().__init__()
        if pairing not in PAIRINGS:
            raise ValueError(f"`pairing` must be one of {PAIRINGS}, found {pairing!r}.")
        for name, value in (("lambda_scr", lambda_scr), ("lambda_ifd", lambda_ifd)):
            if not value >= 0:
                raise ValueError(f"`{name}` must be a non-negative number, found {value!r}.")
        for name, groups in (("ifd_groups", ifd_groups), ("scr_groups", scr_groups)):
            empty = [g for g, taps in groups.items() if len(taps) == 0]
            if empty:
                raise ValueError(f"`{name}` has empty groups {empty}; every group needs at least one tap.")
        self.ifd_groups = {g: tuple(t) for g, t in ifd_groups.items()}
        self.scr_groups = {g: tuple(t) for g, t in scr_groups.items()}
        self.lambda_scr = float(lambda_scr)
        self.lambda_ifd = float(lambda_ifd)
        self.pairing = pairing
        self.detach_shallow = detach_shallow

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Every tap the loss reads, in first-use order (``final`` excluded)."""
        names = [t for groups in (self.ifd_groups, self.scr_groups) for taps in groups.values() for t in taps]
        return tuple(dict.fromkeys(names))

    def forward(
        self,
        features: Mapping[str, Tensor],
        final: Tensor,
        generator: torch.Generator | None = None,
        lambda_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the weighted regulariser.

        Args:
            features: Tap name -> ``(B, C, h, w)`` map; must hold every tap of the groups.
            final: ``F_final``, shape ``(B, C_t, H, W)``.
            generator: Generator for the random SCR pairing.
            lambda_scale: Multiplier on both lambdas (e.g. a warm-up ramp in ``[0, 1]``).

        Returns:
            ``(total, terms)``: the weighted scalar and the unweighted ``{"scr", "ifd"}`` group sums (detached),
            all float32.
        """
        missing = [t for t in self.tap_names if t not in features]
        if missing:
            raise KeyError(f"SelfRegLoss is missing tapped features {missing}; captured: {sorted(features)}.")
        with torch.autocast(device_type=final.device.type, enabled=False):
            zero = final.new_zeros((), dtype=torch.float32)
            ifd = zero
            for taps in self.ifd_groups.values():
                ifd = ifd + torch.stack([ifd_loss(features[t], self.detach_shallow) for t in taps]).mean()
            scr = zero
            if self.scr_groups:
                scr_taps = {t for taps in self.scr_groups.values() for t in taps}
                sizes = [tuple(features[t].shape[-2:]) for t in scr_taps]
                pooled = pool_teacher(final, sizes)
                for taps in self.scr_groups.values():
                    per_tap = [
                        scr_loss(features[t], final, self.pairing, generator, pooled[tuple(features[t].shape[-2:])])
                        for t in taps
                    ]
                    scr = scr + torch.stack(per_tap).mean()
            total = lambda_scale * (self.lambda_scr * scr + self.lambda_ifd * ifd)
        return total, {"scr": scr.detach(), "ifd": ifd.detach()}


class DiceCELoss(nn.Module):
    """Weighted cross-entropy + soft Dice, the segmentation loss of the SelfReg / TransUNet scripts.

    Dice is computed on softmax probabilities over the whole batch, per class including background, as
    ``1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)`` and averaged over classes; fully vectorised.

    Args:
        num_classes: Number of classes ``K`` (background included).
        ce_weight: Weight of cross-entropy (0.4 in the authors' Synapse recipe, 0.3 for ACDC).
        dice_weight: Weight of Dice (0.6 Synapse, 0.7 ACDC).
        smooth: The ``eps`` of the Dice ratio (1e-5 in the authors' code).
    """

    def __init__(self, num_classes: int, ce_weight: float = 0.4, dice_weight: float = 0.6, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, found {num_classes}.")
        self.num_classes = num_classes
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            logits: ``(B, K, H, W)`` raw scores.
            target: ``(B, H, W)`` integer labels in ``[0, K)``.

        Returns:
            ``(total, {"ce", "dice"})`` with the unweighted terms detached.
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"`logits` must be (B, {self.num_classes}, H, W), found {tuple(logits.shape)}.")
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"`target` must be {(logits.shape[0], *logits.shape[2:])}, found {tuple(target.shape)}.")
        target = target.long()
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        prob = logits.softmax(1)
        onehot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).to(prob.dtype)
        dims = (0, 2, 3)
        inter = (prob * onehot).sum(dims)
        denom = (prob * prob).sum(dims) + onehot.sum(dims)
        dice = (1 - (2 * inter + self.smooth) / (denom + self.smooth)).mean()
        total = self.ce_weight * ce + self.dice_weight * dice
        return total, {"ce": ce.detach(), "dice": dice.detach()}
