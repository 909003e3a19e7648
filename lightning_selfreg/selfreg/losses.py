"""SelfReg loss terms (SCR, IFD) and their aggregation (:class:`SelfRegLoss`).

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

All SelfReg terms are computed in float32, also under autocast, on 2-D ``(B, C, H, W)`` and 3-D
``(B, C, D, H, W)`` maps. They run through the fused implementation of :mod:`lightning_selfreg.selfreg.fused` (one
autograd node for all taps, closed-form gradients written once per tap); the straightforward autograd version
they replace is kept as the reference (``SelfRegLoss(..., implementation="reference")`` and the private
``_*_reference`` functions), which the tests and ``benchmarks/selfreg_overhead.py`` compare against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfreg.selfreg.fused import ScrTerm, TapTerms, no_autocast, pool_with_kernel, selfreg_terms
from lightning_selfreg.utils.checks import SettingError, check_weight

__all__ = [
    "IMPLEMENTATIONS", "PAIRINGS", "Pairing", "SelfRegLoss", "ifd_loss", "pool_teacher", "scr_loss",
]

Pairing = Literal["random", "ordered"]
PAIRINGS: tuple[str, ...] = get_args(Pairing)
IMPLEMENTATIONS = ("fused", "fused-compile", "reference")


def _check_map(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim not in (4, 5):
        found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"`{name}` must be a (B, C, *spatial) feature map with 2 or 3 spatial dims, i.e. (B, C, H, W) or "
            f"(B, C, D, H, W), found {found}."
        )
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point feature map, found dtype {x.dtype} "
                         f"(shape {tuple(x.shape)}).")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must be a non-empty feature map, found shape {tuple(x.shape)} (a zero-size dim).")


def _adaptive_pool(x: Tensor, size: tuple[int, ...]) -> Tensor:
    return (F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d)(x, size)


def _pool_exact(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Average-pool ``x`` to ``size``; integer factors in float32 by a CPU kernel or strided sums, else adaptively.

    On the CPU a float32 map is pooled by :func:`~lightning_selfreg.selfreg.fused.pool_with_kernel` (one pass).
    Elsewhere the sums go one dimension at a time over strided slices (fast in any layout); the one division is in
    place (on the CPU a fresh output of this size measured 2x slower, in page faults).
    """
    pooled = pool_with_kernel(x, size)
    if pooled is not None:
        return pooled
    spatial = x.shape[2:]
    if x.dtype != torch.float32 or any(s % t for s, t in zip(spatial, size, strict=True)):
        return _adaptive_pool(x, size)  # reduced precision: adaptive pooling accumulates in float32
    out, count = x, 1
    for dim, (s, t) in enumerate(zip(spatial, size, strict=True), start=2):
        k = s // t
        if k == 1:
            continue
        index = [slice(None)] * x.ndim
        parts = []
        for offset in range(k):
            index[dim] = slice(offset, None, k)
            parts.append(out[tuple(index)])
        out = torch.stack(parts).sum(0) if k > 2 else parts[0] + parts[1]
        count *= k
    return out.div_(count) if count > 1 else out


def ifd_loss(feature: Tensor, detach_shallow: bool = False) -> Tensor:
    """Internal feature distillation of one feature map.

    Channels are ranked (descending) by ``mean_{b,spatial}(x_bc / ||x_bc||_2)``, the score of the authors' code
    (scale-free: it ranks dense, positive maps first). Rank ``k`` is paired with rank ``k + ceil(C / 2)`` and
    the MSE of the pairs is returned. For even ``C`` this is exactly the authors' first-half/second-half split;
    for odd ``C`` (where their code fails on a shape mismatch) the median-ranked channel is left out, so the
    two halves are the top and bottom ``C // 2`` channels.

    Args:
        feature: Block output, shape ``(B, C, H, W)`` or ``(B, C, D, H, W)`` with ``C >= 2``, either memory format.
        detach_shallow: Stop the gradient through the top-ranked ("shallow") half, so it acts as the teacher
            of the bottom half as the paper describes. The authors' code detaches nothing (default).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: If ``feature`` is not 4-D or 5-D or has fewer than 2 channels.
    """
    _check_ifd(feature)
    with no_autocast(feature.device.type):
        return selfreg_terms([feature], [TapTerms(1.0)], detach_shallow)[0]


def _check_ifd(feature: Tensor) -> None:
    _check_map(feature, "feature")
    if feature.shape[1] < 2:
        raise ValueError(f"`feature` needs at least 2 channels for IFD, found {feature.shape[1]}.")


def _ifd_loss_reference(feature: Tensor, detach_shallow: bool = False) -> Tensor:
    """:func:`ifd_loss` by plain autograd (gather, MSE), the reference of the fused version."""
    _check_ifd(feature)
    c = feature.shape[1]
    with torch.no_grad():  # fp32 accumulation without an fp32 copy of the map
        norm = torch.linalg.vector_norm(feature.flatten(2), dim=2, dtype=torch.float32).clamp_min(1e-12)  # (B, C)
        score = (feature.flatten(2).sum(dim=2, dtype=torch.float32) / norm).mean(0)  # (C,); 1/|spatial| is a constant
        order = torch.argsort(score, descending=True, stable=True)  # ties in channel order, as the fused path
        half = c // 2
        pairs = torch.cat([order[:half], order[(c + 1) // 2 :]])  # top half, then the bottom half (median left out)
    # one gather in the map's own dtype, then fp32 on the gathered channels only
    top, bottom = feature.index_select(1, pairs).float().split(half, dim=1)
    if detach_shallow:
        top = top.detach()
    return F.mse_loss(top, bottom)


def _check_sizes(final: Tensor, sizes) -> set[tuple[int, ...]]:
    spatial = final.ndim - 2
    wanted = set()
    for size in sizes:
        size = tuple(int(v) for v in size)
        if len(size) != spatial:
            raise ValueError(
                f"Pooled sizes must be tuples of {spatial} ints for a {final.ndim}-D `final` "
                f"{tuple(final.shape)}, found {size}."
            )
        if any(s > f for s, f in zip(size, final.shape[2:], strict=True)):
            raise ValueError(
                f"A tapped feature of spatial size {size} is larger than `final` {tuple(final.shape[2:])}; SCR pools "
                "`final` down to each tap, so `final` must be the largest map (check the tap spec's `final`)."
            )
        wanted.add(size)
    return wanted


def _pool_hierarchically(final: Tensor, sizes, pool) -> dict[tuple[int, ...], Tensor]:
    _check_map(final, "final")
    wanted = _check_sizes(final, sizes)
    teacher = final.detach()  # pooled in its own dtype (pooling accumulates in fp32), cast after pooling
    full = tuple(teacher.shape[2:])
    pooled: dict[tuple[int, ...], Tensor] = {full: teacher}
    for size in sorted(wanted, key=math.prod, reverse=True):
        if size in pooled:
            continue
        source = min(
            (s for s in pooled if all(a % b == 0 for a, b in zip(s, size, strict=True))),
            key=math.prod,
            default=full,
        )
        pooled[size] = pool(pooled[source], size)
    return {size: p if p.dtype == torch.float32 else p.float() for size, p in pooled.items() if size in wanted}


def pool_teacher(final: Tensor, sizes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
    """Detach ``final`` and average-pool it once to every requested spatial size.

    Sizes are visited from large to small and each is pooled from the smallest already-pooled map whose
    sides it divides, which is exact (an average of equal-sized block averages) and touches far less memory
    than pooling the full-resolution map again for every tap. Integer factors of float32 maps are pooled by
    strided sums (fast in either memory format); other factors and dtypes by adaptive average pooling.

    Args:
        final: Teacher map ``F_final``, shape ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        sizes: Target sizes, tuples of 2 ints ``(h, w)`` for a 4-D ``final`` or 3 ints ``(d, h, w)`` for a 5-D one,
            each no larger than ``final``'s spatial size.

    Returns:
        Mapping ``size -> (B, C, *size)`` float32 tensors without gradient, for the requested sizes.

    Raises:
        ValueError: If ``final`` is not 4-D or 5-D, or a size has the wrong length or is larger than ``final``.
    """
    return _pool_hierarchically(final, sizes, _pool_exact)


def _pool_teacher_reference(final: Tensor, sizes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
    """:func:`pool_teacher` with adaptive average pooling only (the reference implementation)."""
    return _pool_hierarchically(final, sizes, _adaptive_pool)


def _pair_channels(c_s: int, c_t: int, pairing: str, generator: torch.Generator | None, device) -> tuple:
    """Channel indices ``(idx_s, idx_t)`` of equal length ``min(c_s, c_t)``; ``None`` means "all, in order"."""
    c = min(c_s, c_t)
    if pairing == "ordered":
        return (None if c == c_s else slice(0, c)), (None if c == c_t else slice(0, c))
    # The authors draw a random subset of size c on BOTH sides and pair them by position. Pairing a
    # uniformly drawn ordered subset of the larger side with the smaller side kept in order induces the
    # same distribution over channel matchings, with one random draw instead of two.
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(max(c_s, c_t), generator=generator, device=gen_device)[:c]
    if perm.device != device:
        perm = perm.to(device)
    return (perm, None) if c_s >= c_t else (None, perm)


def _select(x: Tensor, idx) -> Tensor:
    if idx is None:
        return x
    if isinstance(idx, slice):
        return x[:, idx]
    return x.index_select(1, idx)


def _check_scr(feature: Tensor, final: Tensor, pairing: str) -> None:
    _check_map(feature, "feature")
    _check_map(final, "final")
    if feature.ndim != final.ndim:
        raise ValueError(
            f"`feature` {tuple(feature.shape)} and `final` {tuple(final.shape)} must have the same number of "
            "spatial dims."
        )
    if pairing not in PAIRINGS:
        raise ValueError(f"`pairing` must be one of {PAIRINGS}, found {pairing!r}.")
    if feature.shape[0] != final.shape[0]:
        raise ValueError(f"Batch sizes differ: `feature` has {feature.shape[0]}, `final` has {final.shape[0]}.")


def _scr_term(feature: Tensor, teacher: Tensor, pairing: str, generator, weight: float) -> ScrTerm:
    """Draw the channel pairing of one SCR term (the same draws as the reference) and describe it."""
    if pairing == "ordered":
        return ScrTerm(teacher, None, None, weight, ordered=True)
    idx_s, idx_t = _pair_channels(feature.shape[1], teacher.shape[1], pairing, generator, feature.device)
    return ScrTerm(teacher, idx_s, idx_t, weight)


def scr_loss(
    feature: Tensor,
    final: Tensor,
    pairing: Pairing = "random",
    generator: torch.Generator | None = None,
    pooled: Tensor | None = None,
) -> Tensor:
    """Semantic consistency regularisation of one block by the detached final decoder map.

    Args:
        feature: Student block output, shape ``(B, C_s, *spatial)`` (2 or 3 spatial dims), not larger than
            ``final`` in space.
        final: Teacher ``F_final``, shape ``(B, C_t, *Spatial)`` with as many spatial dims; never receives gradient.
        pairing: ``"random"`` (authors' code: a fresh random channel matching of size ``min(C_s, C_t)`` at every
            call, drawn from ``generator``) or ``"ordered"`` (the first ``min(C_s, C_t)`` channels of both).
        generator: Torch generator for ``"random"``; the global torch RNG when ``None``.
        pooled: ``final`` already detached and pooled to ``feature``'s spatial size (see :func:`pool_teacher`), to
            share the pooling between taps; computed here when ``None``.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: On maps that are not 4-D or 5-D or differ in dimensionality, a batch mismatch, an unknown
            ``pairing`` or a feature larger than ``final`` in space.
    """
    _check_scr(feature, final, pairing)
    size = tuple(feature.shape[2:])
    if pooled is None:
        pooled = pool_teacher(final, [size])[size]
    with no_autocast(feature.device.type):
        term = _scr_term(feature, pooled.detach().to(torch.float32), pairing, generator, 1.0)
        return selfreg_terms([feature], [TapTerms(0.0, (term,))])[1]


def _scr_loss_reference(
    feature: Tensor,
    final: Tensor,
    pairing: Pairing = "random",
    generator: torch.Generator | None = None,
    pooled: Tensor | None = None,
) -> Tensor:
    """:func:`scr_loss` by plain autograd (gathers, MSE), the reference of the fused version."""
    _check_scr(feature, final, pairing)
    size = tuple(feature.shape[2:])
    if pooled is None:
        pooled = _pool_teacher_reference(final, [size])[size]
    idx_s, idx_t = _pair_channels(feature.shape[1], final.shape[1], pairing, generator, feature.device)
    return F.mse_loss(_select(feature, idx_s).float(), _select(pooled, idx_t))


class SelfRegLoss(nn.Module):
    """The SelfReg regulariser over named tapped features, aggregated as in the authors' code.

    ``total = lambda_ifd * sum_g mean_{t in g} IFD(t) + lambda_scr * sum_g mean_{t in g} SCR(t, final)``, where
    the IFD and SCR groups come from the tap spec. For the paper's UNet the IFD groups are the 4 encoder and the
    3 decoder taps and SCR has one group of all 7 taps (``docs/method.md`` §2, §4). Maps are ``(B, C, H, W)`` or
    ``(B, C, D, H, W)`` (all of one dimensionality), in either memory format.

    Args:
        ifd_groups: Group name -> tap names whose IFD losses are averaged together.
        scr_groups: Group name -> tap names whose SCR losses are averaged together.
        lambda_scr: Weight of SCR (the paper's lambda_1), finite and >= 0.
        lambda_ifd: Weight of IFD (the paper's lambda_2), finite and >= 0.
        pairing: SCR channel pairing, see :func:`scr_loss`.
        detach_shallow: IFD option, see :func:`ifd_loss`.
        implementation: ``"fused"`` (default: all taps in one autograd node with closed-form gradients,
            :mod:`lightning_selfreg.selfreg.fused`), ``"fused-compile"`` (the same math through ``torch.compile``,
            meant for CUDA, where it fuses the per-tap work into a few kernels; compiles once per input shape) or
            ``"reference"`` (plain autograd, one gather and MSE per term; same values, slower).

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
        pairing: Pairing = "random",
        detach_shallow: bool = False,
        implementation: str = "fused",
    ) -> None:
        super().__init__()
        if pairing not in PAIRINGS:
            raise SettingError("pairing", f"`pairing` must be one of {PAIRINGS}, found {pairing!r}.")
        if implementation not in IMPLEMENTATIONS:
            raise SettingError("implementation",
                               f"`implementation` must be one of {IMPLEMENTATIONS}, found {implementation!r}.")
        check_weight("lambda_scr", lambda_scr)
        check_weight("lambda_ifd", lambda_ifd)
        for name, groups in (("ifd_groups", ifd_groups), ("scr_groups", scr_groups)):
            empty = [g for g, taps in groups.items() if len(taps) == 0]
            if empty:
                raise SettingError(name, f"`{name}` has empty groups {empty}; every group needs at least one tap.")
        self.ifd_groups = {g: tuple(t) for g, t in ifd_groups.items()}
        self.scr_groups = {g: tuple(t) for g, t in scr_groups.items()}
        self.lambda_scr = float(lambda_scr)
        self.lambda_ifd = float(lambda_ifd)
        self.pairing = pairing
        self.detach_shallow = detach_shallow
        self.implementation = implementation
        names = [t for groups in (self.ifd_groups, self.scr_groups) for taps in groups.values() for t in taps]
        self._tap_names = tuple(dict.fromkeys(names))
        self._ifd_weights: dict[str, float] = {}
        for taps in self.ifd_groups.values():
            for t in taps:
                self._ifd_weights[t] = self._ifd_weights.get(t, 0.0) + 1.0 / len(taps)

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Every tap the loss reads, in first-use order (``final`` excluded)."""
        return self._tap_names

    def forward(
        self,
        features: Mapping[str, Tensor],
        final: Tensor,
        generator: torch.Generator | None = None,
        lambda_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the weighted regulariser.

        Args:
            features: Tap name -> ``(B, C, *spatial)`` map; must hold every tap of the groups.
            final: ``F_final``, shape ``(B, C_t, *Spatial)``.
            generator: Generator for the random SCR pairing.
            lambda_scale: Multiplier on both lambdas (e.g. a warm-up ramp in ``[0, 1]``).

        Returns:
            ``(total, terms)``: the weighted scalar and the unweighted ``{"scr", "ifd"}`` group sums (detached),
            all float32.
        """
        missing = [t for t in self.tap_names if t not in features]
        if missing:
            raise KeyError(f"SelfRegLoss is missing tapped features {missing}; captured: {sorted(features)}.")
        _check_map(final, "final")
        for t in self.tap_names:
            _check_map(features[t], f"features[{t!r}]")
        with no_autocast(final.device.type):
            if self.implementation == "reference":
                ifd, scr = self._terms_reference(features, final, generator)
            else:
                ifd, scr = self._terms_fused(features, final, generator)
            total = lambda_scale * (self.lambda_scr * scr + self.lambda_ifd * ifd)
        return total, {"scr": scr.detach(), "ifd": ifd.detach()}

    def _pooled(self, features: Mapping[str, Tensor], final: Tensor, pool) -> dict[tuple[int, ...], Tensor]:
        taps = {t for taps in self.scr_groups.values() for t in taps}
        for t in taps:
            _check_scr(features[t], final, self.pairing)
        return pool(final, [tuple(features[t].shape[2:]) for t in taps])

    def _terms_fused(self, features, final, generator) -> tuple[Tensor, Tensor]:
        """``(ifd, scr)`` group sums through one :class:`~lightning_selfreg.selfreg.fused.SelfRegTerms` node."""
        for t in self._ifd_weights:
            _check_ifd(features[t])
        pooled = self._pooled(features, final, pool_teacher) if self.scr_groups else {}
        scr_terms: dict[str, list[ScrTerm]] = {}
        for taps in self.scr_groups.values():  # the draws in the reference's order: group by group, tap by tap
            for t in taps:
                x = features[t]
                term = _scr_term(x, pooled[tuple(x.shape[2:])], self.pairing, generator, 1.0 / len(taps))
                scr_terms.setdefault(t, []).append(term)
        names = list(dict.fromkeys([*self._ifd_weights, *scr_terms]))
        if not names:
            zero = final.new_zeros((), dtype=torch.float32)
            return zero, zero
        plan = [TapTerms(self._ifd_weights.get(t, 0.0), tuple(scr_terms.get(t, ()))) for t in names]
        return selfreg_terms([features[t] for t in names], plan, self.detach_shallow,
                             compile=self.implementation == "fused-compile")

    def _terms_reference(self, features, final, generator) -> tuple[Tensor, Tensor]:
        """``(ifd, scr)`` group sums by plain autograd: one gather and MSE per term (the reference)."""
        zero = final.new_zeros((), dtype=torch.float32)
        ifd = zero
        for taps in self.ifd_groups.values():
            ifd = ifd + torch.stack([_ifd_loss_reference(features[t], self.detach_shallow) for t in taps]).mean()
        scr = zero
        if self.scr_groups:
            pooled = self._pooled(features, final, _pool_teacher_reference)
            for taps in self.scr_groups.values():
                per_tap = [
                    _scr_loss_reference(
                        features[t], final, self.pairing, generator, pooled[tuple(features[t].shape[2:])]
                    )
                    for t in taps
                ]
                scr = scr + torch.stack(per_tap).mean()
        return ifd, scr
