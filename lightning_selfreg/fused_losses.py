"""Fused SelfReg terms: every tap's IFD and SCR in one autograd node with closed-form MSE gradients.

Every SelfReg term is a mean squared error between channels of a tap (IFD) or between channels of a tap and the
detached, pooled ``F_final`` (SCR), so its gradient is closed-form. For a tap ``x`` of shape ``(B, C, *spatial)``
with IFD differences ``D_k = x_top(k) - x_bottom(k)`` (ranks ``k`` and ``k + ceil(C / 2)``) and SCR differences
``E_m = x_s(m) - t_m`` (student channel ``s(m)`` paired with teacher channel ``m``)::

    dL/dx_top(k) = a D_k,   dL/dx_bottom(k) = -a D_k,   dL/dx_s(m) += b E_m,   0 elsewhere (the median channel)

with ``a = 2 g_ifd w_ifd / N_ifd`` (``0`` on the top half under ``detach_shallow``) and ``b = 2 g_scr w_scr /
N_scr``. :class:`SelfRegTerms` computes the weighted IFD and SCR sums of all taps in one forward and, in the
backward, writes each tap's gradient once, in the tap's dtype and memory format, with no zero fill, no
``index_add`` of a zero-filled buffer and no per-term MSE backward. IFD works on ``D = x - x[:, partner]``, where
``partner`` swaps ranks ``k`` and ``k + ceil(C / 2)`` (the median channel is its own partner): ``D`` is ``+D_k``
on the top channels, ``-D_k`` on the bottom ones and ``0`` on the median, already in channel order, so the IFD sum
is ``sum(D ** 2) / 2`` and the IFD gradient is ``a D`` (``a`` masked to the bottom half under ``detach_shallow``):
one gather in the forward, none in the backward. SCR adds ``b E`` in place when the term uses every student
channel (``E`` is then built in channel order, permuting the teacher rather than the student), else with one
``index_add_`` on the drawn channels. The IFD ranking is computed once (kept from the forward); the random SCR
channel pairing is drawn by the caller, on the device, from its ``torch.Generator``
(:func:`lightning_selfreg.losses.scr_loss` draws exactly as the reference does). No host synchronisation.

Layouts: contiguous maps gather channels with ``index_select`` on dim 1; channels-last maps (NHWC / NDHWC
strides, e.g. ``channels_last`` CNNs or permuted Swin outputs) are worked on as their ``(N, C)`` rows (a view;
``index_select`` along the contiguous channel axis of the 2-D view is about twice as fast on the CPU as on the
4-D map), so they are never copied to another layout and their gradient keeps their strides.

Memory: on the CPU the forward keeps the float32 differences ``D`` and ``E`` for the backward (one tap's size
and the SCR channels); on other devices the backward recomputes them from the taps, so the loss keeps no extra
activation memory. ``compile=True`` runs the same math through ``torch.compile`` (the channel indices are plain
tensor inputs, the random draws stay outside), so on CUDA Inductor can fuse the gathers, differences and
reductions of all taps into a few kernels with float32 arithmetic in registers; the eager path makes float32
temporaries of the gathered channels for reduced-precision maps. Which CUDA path is faster is for
``benchmarks/gpu_check.sh`` to measure.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ScrTerm", "SelfRegTerms", "TapTerms", "ifd_order", "selfreg_terms"]

COMPILE_BACKEND = "inductor"
"""``torch.compile`` backend of ``compile=True`` (tests use ``"aot_eager"``)."""


@dataclass(frozen=True)
class ScrTerm:
    """One SCR term of a tap: which pooled teacher, how channels are paired, its weight in the SCR sum.

    ``idx_s``/``idx_t`` are the student/teacher channel indices paired by position (``None`` = all channels in
    order); the student uses ``min(C_s, C_t)`` channels. ``ordered`` marks the first-``c`` pairing, done with views.
    """

    teacher: Tensor
    idx_s: Tensor | None
    idx_t: Tensor | None
    weight: float
    ordered: bool = False


@dataclass(frozen=True)
class TapTerms:
    """The terms of one tap: IFD weight (``0`` = no IFD term) and its SCR terms."""

    ifd_weight: float
    scr: tuple[ScrTerm, ...] = ()


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is laid out with the channel axis contiguous (NHWC / NDHWC), and not also contiguous."""
    if x.is_contiguous():
        return False
    if x.ndim in _CHANNELS_LAST:  # a stride check, no view op
        return x.is_contiguous(memory_format=_CHANNELS_LAST[x.ndim])
    return x.movedim(1, -1).is_contiguous()


def _eager_views() -> bool:
    """Whether views may be taken with one ``as_strided`` (eager mode: one op instead of two per view)."""
    return not torch.compiler.is_compiling()


def _rows(x: Tensor) -> Tensor:
    """The ``(N, C)`` rows of a channels-last map (a view)."""
    c = x.shape[1]
    if _eager_views():  # x is NHWC-dense: element (n, c) of the rows is at n * C + c
        return x.as_strided((x.numel() // c, c), (c, 1))
    return x.movedim(1, -1).reshape(-1, c)


def _unrows(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_rows`: contiguous ``(N, C)`` rows -> a ``(B, C, *spatial)`` map with ``like``'s strides."""
    if _eager_views() and rows.is_contiguous():
        return rows.as_strided(like.shape, like.stride())
    return rows.view(like.shape[0], *like.shape[2:], rows.shape[1]).movedim(-1, 1)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def ifd_order(x: Tensor, channels_last: bool | None = None) -> Tensor:
    """IFD channel ranking of ``x``, ``(C,)``, best first; rank ``k`` pairs with rank ``k + ceil(C / 2)``.

    The score is ``mean_b(sum_s x / ||x||_2)`` per channel (the authors' ranking; the constant ``1 / |spatial|``
    does not change ranks), accumulated in float32 without a float32 copy of ``x``. ``channels_last``: the
    layout of ``x`` if the caller knows it (see :func:`_is_channels_last`).
    """
    if _is_channels_last(x) if channels_last is None else channels_last:
        dims = tuple(range(2, x.ndim))
        total = x.sum(dim=dims, dtype=torch.float32)
        if x.dtype == torch.float32:  # vector_norm over non-innermost dims is slow on the CPU
            norm = x.square().sum(dim=dims).sqrt()
        else:
            norm = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32)
    else:
        flat = x.flatten(2)
        total = flat.sum(dim=2, dtype=torch.float32)
        norm = torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32)
    score = (total / norm.clamp_min(1e-12)).mean(0)  # (C,)
    return torch.argsort(score, descending=True)


def _ifd_count(x: Tensor) -> int:
    return x.numel() // x.shape[1] * (x.shape[1] // 2)


def _scr_count(x: Tensor, term: ScrTerm) -> int:
    return x.numel() // x.shape[1] * min(x.shape[1], term.teacher.shape[1])


def _weighted_sum(parts: list[Tensor], weights: list[float]) -> Tensor:
    if len(parts) == 1:
        return parts[0] * weights[0]
    return torch.stack(torch._foreach_mul(parts, weights)).sum()  # one op for all products, no host-to-device copy


def _work(x: Tensor, cl: bool) -> Tensor:
    """The view the per-tap math works on: a channels-last map's ``(N, C)`` rows (a view), else the map itself.

    Channel gathers along the contiguous channel axis are about twice as fast on the 2-D view as on the 4-D/5-D
    map on the CPU, and the result (and so the gradient) stays channels-last.
    """
    return _rows(x) if cl else x


def _like_work(t: Tensor, work: Tensor) -> Tensor:
    """``t`` (a teacher map) in the shape of ``work``: its rows if ``work`` is rows (a copy only if not NHWC)."""
    if work.ndim != 2:
        return t
    return _rows(t) if _is_channels_last(t) else t.movedim(1, -1).reshape(-1, t.shape[1])


def _partner_rank(c: int, device: torch.device) -> Tensor:
    """``(C,)`` rank of the IFD partner of every rank: ``k <-> k + ceil(C / 2)``, the median (odd C) its own."""
    if torch.compiler.is_compiling():  # traced into the graph (Dynamo does not honour lru_cache)
        return _partner_rank_uncached(c, device)
    return _partner_rank_cached(c, device)


def _partner_rank_uncached(c: int, device: torch.device) -> Tensor:
    h = (c + 1) // 2
    kw = dict(device=device, dtype=torch.long)
    return torch.cat([torch.arange(h, c, **kw), torch.arange(c // 2, h, **kw), torch.arange(0, c // 2, **kw)])


_partner_rank_cached = functools.lru_cache(maxsize=64)(_partner_rank_uncached)  # a few small ops less per tap


def _partner(order: Tensor) -> Tensor:
    """``(C,)`` IFD partner channel of every channel, from the ranking ``order``.

    ``x - x[:, partner]`` is then ``+D`` on the top channels, ``-D`` on the bottom ones and ``0`` on the median.
    """
    ranked_partners = order.index_select(0, _partner_rank(order.numel(), order.device))
    return torch.empty_like(order).scatter_(0, order, ranked_partners)


def _prepare(x: Tensor, terms: TapTerms, detach_shallow: bool) -> tuple:
    """``(channels_last, partner, ifd_mask)`` of one tap.

    Its layout, IFD partners (:func:`_partner`) and, with ``detach_shallow``, the 0/1 mask of the bottom-ranked
    channels (the only ones IFD then passes gradient to), broadcastable along the channels of :func:`_work`.
    """
    cl = _is_channels_last(x)
    partner = ifd_mask = None
    if terms.ifd_weight:
        order = ifd_order(x, cl)
        partner = _partner(order)
        if detach_shallow:
            c = x.shape[1]
            ifd_mask = torch.zeros(c, device=x.device).index_fill_(0, order[(c + 1) // 2 :], 1.0)
            if not cl:
                ifd_mask = ifd_mask.view(-1, *([1] * (x.ndim - 2)))
    return cl, partner, ifd_mask


def _diffs(x: Tensor, terms: TapTerms, prep: tuple) -> tuple[Tensor | None, list[Tensor]]:
    """Float32 differences in the working view of :func:`_work`: ``D`` and one ``E`` per SCR term.

    ``D = x - x[:, partner]`` (``None`` without IFD); ``E`` = the term's student channels minus its teacher
    channels (``(·, min(C_s, C_t), ·)``), in the student's channel order when it uses all its channels.
    """
    cl, partner, _ = prep
    work = _work(x, cl)
    w32 = _f32(work)
    diff = None if partner is None else w32 - _f32(work.index_select(1, partner))
    n_all = x.shape[1]
    scr_diffs = []
    for term in terms.scr:
        teacher = _like_work(term.teacher, work)
        n = min(n_all, teacher.shape[1])
        if term.ordered:
            student, teacher = (w32 if n == n_all else w32[:, :n]), teacher[:, :n]
        elif term.idx_s is not None and n == n_all:  # a permutation of the student: permute the teacher instead
            student, teacher = w32, teacher.index_select(1, torch.argsort(term.idx_s))  # E in channel order
        else:
            student = w32 if term.idx_s is None else _f32(work.index_select(1, term.idx_s))
            teacher = teacher if term.idx_t is None else teacher.index_select(1, term.idx_t)
        scr_diffs.append(student - teacher)
    return diff, scr_diffs


def _forward_math(taps: Sequence[Tensor], plan: Sequence[TapTerms], detach_shallow: bool,
                  keep: bool) -> tuple[Tensor, Tensor, list]:
    """Weighted IFD and SCR sums of all taps, and per tap what the backward needs (the differences if ``keep``)."""
    ifd_parts, ifd_w, scr_parts, scr_w, saved = [], [], [], [], []
    for x, terms in zip(taps, plan, strict=True):
        prep = _prepare(x, terms, detach_shallow)
        diff, scr_diffs = _diffs(x, terms, prep)
        if diff is not None:
            ifd_parts.append(diff.square().sum())  # every pair twice (+D and -D), the median's 0 once
            ifd_w.append(terms.ifd_weight / (2 * _ifd_count(x)))
        for term, e in zip(terms.scr, scr_diffs, strict=True):
            scr_parts.append(e.square().sum())
            scr_w.append(term.weight / _scr_count(x, term))
        saved.append((prep, diff, scr_diffs) if keep else (prep,))
    zero = taps[0].new_zeros((), dtype=torch.float32)
    ifd = _weighted_sum(ifd_parts, ifd_w) if ifd_parts else zero
    scr = _weighted_sum(scr_parts, scr_w) if scr_parts else zero
    return ifd, scr, saved


def _tap_grad(x: Tensor, terms: TapTerms, saved: tuple, g_ifd: Tensor, g_scr: Tensor) -> Tensor:
    """The gradient of the weighted terms w.r.t. one tap, written once in the tap's dtype and layout.

    ``a D`` (``D = x - x[:, partner]`` is already in channel order: no gather, no scatter, no zero fill), plus
    ``b E`` on each SCR term's student channels (added in place, or ``index_add_`` for a drawn subset).
    """
    prep = saved[0]
    diff, scr_diffs = _diffs(x, terms, prep) if len(saved) == 1 else saved[1:]
    ifd_mask = prep[2]
    c = x.shape[1]
    grad = None
    if diff is not None:
        a = g_ifd * (2.0 * terms.ifd_weight / _ifd_count(x))
        grad = diff * (a if ifd_mask is None else ifd_mask * a)
    for term, e in zip(terms.scr, scr_diffs, strict=True):
        b = g_scr * (2.0 * term.weight / _scr_count(x, term))
        n = e.shape[1]
        if n == c:  # every student channel, in channel order (see _diffs)
            grad = e * b if grad is None else grad.addcmul_(e, b)
            continue
        if grad is None:  # an SCR-only tap using a subset of its channels: the others get zero gradient
            grad = torch.zeros_like(_work(x, prep[0]), dtype=torch.float32)
        if term.ordered:
            grad[:, :n].addcmul_(e, b)
        else:
            grad.index_add_(1, term.idx_s, e * b)
    if prep[0]:
        grad = _unrows(grad, x)
    return grad if grad.dtype == x.dtype else grad.to(x.dtype)


def _backward_math(taps, plan, saved, g_ifd, g_scr, needs):
    return [
        _tap_grad(x, terms, s, g_ifd, g_scr) if need else None
        for x, terms, s, need in zip(taps, plan, saved, needs, strict=True)
    ]


@functools.cache
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)


class SelfRegTerms(torch.autograd.Function):
    """``(ifd, scr)``: the weighted IFD and SCR sums over taps, with a closed-form backward (module docstring).

    On the CPU the forward keeps the pair differences for the backward (memory is cheap there, passes over the
    maps are not); elsewhere, and with ``compile``, the backward recomputes them from the taps and the kept
    IFD partners, so the loss holds no extra activation memory until the backward.
    """

    @staticmethod
    def forward(ctx, plan: tuple[TapTerms, ...], detach_shallow: bool, compile: bool, *taps: Tensor):
        """Weighted IFD and SCR sums; keeps the IFD rankings (and on the CPU the differences) for the backward."""
        keep = taps[0].device.type == "cpu" and not compile
        forward_math = _compiled(_forward_math, COMPILE_BACKEND) if compile else _forward_math
        with torch.autocast(device_type=taps[0].device.type, enabled=False):
            ifd, scr, saved = forward_math(taps, plan, detach_shallow, keep)
        ctx.plan, ctx.detach_shallow, ctx.compile, ctx.saved = plan, detach_shallow, compile, saved
        ctx.save_for_backward(*taps)
        return ifd, scr

    @staticmethod
    def backward(ctx, g_ifd: Tensor, g_scr: Tensor):
        """Each tap's gradient, written once (``None`` for taps that need none)."""
        taps = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        backward_math = _compiled(_backward_math, COMPILE_BACKEND) if ctx.compile else _backward_math
        with torch.autocast(device_type=taps[0].device.type, enabled=False):
            grads = backward_math(taps, ctx.plan, ctx.saved, _f32(g_ifd), _f32(g_scr), needs)
        return (None, None, None, *grads)


def selfreg_terms(
    taps: Sequence[Tensor], plan: Sequence[TapTerms], detach_shallow: bool = False, compile: bool = False
) -> tuple[Tensor, Tensor]:
    """Weighted IFD and SCR sums of ``taps`` (each ``(B, C, *spatial)``), float32 scalars with a fused backward.

    Args:
        taps: Tapped maps, any floating dtype and either memory format.
        plan: One :class:`TapTerms` per tap (its IFD weight and SCR terms with their pooled teachers).
        detach_shallow: IFD passes no gradient to the top-ranked half.
        compile: Run the per-tap math through ``torch.compile`` (:data:`COMPILE_BACKEND`).

    Returns:
        ``(ifd, scr)``: ``sum_t w_t IFD_t`` and ``sum_terms w SCR``.
    """
    if not taps:
        raise ValueError("selfreg_terms needs at least one tap.")
    return SelfRegTerms.apply(tuple(plan), detach_shallow, compile, *taps)
