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
(:func:`lightning_selfreg.selfreg.losses.scr_loss` draws exactly as the reference does). No host synchronisation.

Few ops: at the sizes SelfReg taps, the eager loss is bound by the number of ops as much as by bytes, so the work
of all taps is batched where the shapes allow. The IFD channels of all taps are ranked by one sort of their
concatenated scores (then one stable sort by tap), and their partners and ``detach_shallow`` masks come from
cached index tables in a few ops for all taps; the subtractions and sums of squares of all taps are ``_foreach``
ops; the two weighted sums are dot products with cached weight vectors; the backward's per-tap scales are one
vector op. Per tap remain the two ranking reductions, the IFD gather, the SCR gathers and the SCR scatter. On the
CPU the forward keeps the differences and the first backward turns them into the gradients in place (no fresh
tap-sized buffers); a second backward (``retain_graph=True``) recomputes them from the taps.

CPU kernels: float32 taps on the CPU (the tests, CI and the CPU preset) go through the compiled loops of
:mod:`lightning_selfreg.selfreg.cpu_kernels` instead (:data:`CPU_KERNELS`): per tap one kernel call in the forward and
one in the backward, reading the tap once per pass and writing its gradient once, with the same values,
gradients and random draws. The eager path below is what CUDA, reduced precision and ``torch.compile`` run.

Layouts: contiguous maps gather channels with ``index_select`` on dim 1; channels-last maps (NHWC / NDHWC
strides, e.g. ``channels_last`` CNNs or permuted Swin outputs) are worked on as their ``(N, C)`` rows (a view;
``index_select`` along the contiguous channel axis of the 2-D view is about twice as fast on the CPU as on the
4-D map), so they are never copied to another layout and their gradient keeps their strides.

Memory: the eager path on the CPU (reduced precision, or the kernels off) keeps the float32 differences ``D``
and ``E`` for the backward (one tap's size and the SCR channels, which then become the gradients); on other
devices the backward recomputes them from the taps, so the loss keeps no extra activation memory (nor do the CPU
kernels, which keep only the partners and the teachers). ``compile=True`` runs the same math through ``torch.compile``
(the channel indices are plain tensor inputs, the random draws stay outside), so on CUDA Inductor can fuse the
gathers, differences and reductions of all taps into a few kernels with float32 arithmetic in registers; the
eager path makes float32 temporaries of the gathered channels for reduced-precision maps. Which CUDA path is
faster is for ``benchmarks/gpu_check.sh`` to measure (on the CPU, Inductor compiled for 37 s and ran 2x slower
than the eager path).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CPU_KERNELS", "KERNELS_AVAILABLE", "ScrTerm", "SelfRegTerms", "TapTerms", "no_autocast",
    "pool_with_kernel", "selfreg_terms",
]

COMPILE_BACKEND = "inductor"
"""``torch.compile`` backend of ``compile=True`` (tests use ``"aot_eager"``)."""

KEEP_DIFFERENCES_ON = frozenset({"cpu"})
"""Device types on which the eager forward keeps the differences for the backward (elsewhere it recomputes them;
tests empty it to run the recomputing path on the CPU)."""


KERNELS_AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether the CPU kernels can run (Numba installed; it is imported on first use, not with this module)."""

CPU_KERNELS = KERNELS_AVAILABLE
"""Whether float32 CPU taps go through the compiled kernels of :mod:`lightning_selfreg.selfreg.cpu_kernels` (tests
switch it off to run the eager path on the CPU)."""


@functools.cache
def _cpu_kernels():
    """:mod:`lightning_selfreg.selfreg.cpu_kernels`, imported on first use.

    Numba's import costs ~0.5 s, which a process that never runs the loss on the CPU (a GPU job) need not pay.
    """
    from lightning_selfreg.selfreg import cpu_kernels

    return cpu_kernels


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


def no_autocast(device_type: str):
    """A context that disables autocast on ``device_type``.

    ``torch.autocast(enabled=False)`` when autocast is on, else a no-op: entering and leaving an autocast context
    costs tens of microseconds, paid several times per step otherwise.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _ifd_count(x: Tensor) -> int:
    return x.numel() // x.shape[1] * (x.shape[1] // 2)


def _scr_count(x: Tensor, term: ScrTerm) -> int:
    return x.numel() // x.shape[1] * min(x.shape[1], term.teacher.shape[1])


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


def _rank_tables_uncached(cs: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant index tables of the IFD taps with channel counts ``cs``, concatenated in tap order.

    Returns ``(segment, ranked_partner, base, bottom)``, each over the concatenated ``sum(cs)`` channels or ranks:
    the tap of every channel, the (global) rank of the partner of every rank (``k <-> k + ceil(C / 2)`` within
    its tap, the median of an odd ``C`` its own), the first global index of every channel's tap, and the global
    ranks of the bottom-ranked halves (the channels ``detach_shallow`` lets IFD pass gradient to).
    """
    kw = dict(device=device, dtype=torch.long)
    segment, partner, base, bottom = [], [], [], []
    offset = 0
    for t, c in enumerate(cs):
        h = (c + 1) // 2
        segment.append(torch.full((c,), t, **kw))
        partner.append(offset + torch.cat([torch.arange(h, c, **kw), torch.arange(c // 2, h, **kw),
                                           torch.arange(0, c // 2, **kw)]))
        base.append(torch.full((c,), offset, **kw))
        bottom.append(torch.arange(offset + h, offset + c, **kw))
        offset += c
    return torch.cat(segment), torch.cat(partner), torch.cat(base), torch.cat(bottom)


_rank_tables_cached = functools.lru_cache(maxsize=64)(_rank_tables_uncached)


def _rank_tables(cs: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if torch.compiler.is_compiling():  # traced into the graph (Dynamo does not honour lru_cache)
        return _rank_tables_uncached(cs, device)
    return _rank_tables_cached(cs, device)


def _channel_stats(x: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    """``(sum, L2 norm)`` of every ``(b, c)`` map of ``x`` over space, ``(B, C)`` float32 each, no float32 copy."""
    if channels_last:
        dims = tuple(range(2, x.ndim))
        total = x.sum(dim=dims, dtype=torch.float32)
        if x.dtype == torch.float32:  # vector_norm over non-innermost dims is slow on the CPU
            return total, x.square().sum(dim=dims).sqrt()
        return total, torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32)
    flat = x.flatten(2)
    return flat.sum(dim=2, dtype=torch.float32), torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32)


def _ifd_partners(xs: list[Tensor], cls: list[bool], detach_shallow: bool) -> tuple[list[Tensor], list]:
    """IFD partners of every channel of every tap in ``xs`` (and the ``detach_shallow`` masks), ranked at once.

    Each channel's score is ``mean_b(sum_s x / ||x||_2)`` (the authors' ranking; the constant ``1 / |spatial|``
    does not change ranks), accumulated in float32 without a float32 copy of ``x``; rank ``k`` of a tap pairs
    with rank ``k + ceil(C / 2)``. The scores of all taps are sorted together (by score, then stably by tap), so
    the ranking, pairing and masks of all taps cost a fixed number of small ops instead of a dozen per tap.
    Returns per tap the ``(C,)`` partner channel of every channel (``x - x[:, partner]`` is then ``+D`` on the top
    channels, ``-D`` on the bottom ones and ``0`` on the median) and, with ``detach_shallow``, the 0/1 float32 mask
    of its bottom-ranked channels (else ``None``).
    """
    stats = [_channel_stats(x, cl) for x, cl in zip(xs, cls, strict=True)]
    if len({x.shape[0] for x in xs}) == 1:
        total = torch.cat([s for s, _ in stats], 1) if len(stats) > 1 else stats[0][0]
        norm = torch.cat([n for _, n in stats], 1) if len(stats) > 1 else stats[0][1]
        score = (total / norm.clamp_min(1e-12)).mean(0)
    else:  # taps of different batch sizes: one score vector per tap
        score = torch.cat([(s / n.clamp_min(1e-12)).mean(0) for s, n in stats])
    cs = tuple(x.shape[1] for x in xs)
    segment, ranked_partner, base, bottom = _rank_tables(cs, score.device)
    order = torch.argsort(score, descending=True, stable=True)
    if len(cs) > 1:  # group by tap, keeping each tap's ranking
        order = order.index_select(0, torch.argsort(segment.index_select(0, order), stable=True))
    partner = torch.empty_like(order).scatter_(0, order, order.index_select(0, ranked_partner)).sub_(base)
    partners = partner.split(cs)
    if not detach_shallow:
        return list(partners), [None] * len(xs)
    mask = torch.zeros(sum(cs), device=score.device).index_fill_(0, order.index_select(0, bottom), 1.0).split(cs)
    shaped = [m if cl else m.view(-1, *([1] * (x.ndim - 2))) for m, x, cl in zip(mask, xs, cls, strict=True)]
    return list(partners), shaped


def _prepare(taps: Sequence[Tensor], plan: Sequence[TapTerms], detach_shallow: bool) -> list[tuple]:
    """``(channels_last, partner, ifd_mask)`` of every tap: its layout, IFD partners and ``detach_shallow`` mask.

    The masks (``None`` without ``detach_shallow``) are broadcastable along the channels of :func:`_work`; taps
    without IFD get ``None`` partners.
    """
    cls = [_is_channels_last(x) for x in taps]
    ifd = [i for i, terms in enumerate(plan) if terms.ifd_weight]
    partners, masks = [None] * len(taps), [None] * len(taps)
    if ifd:
        found = _ifd_partners([taps[i] for i in ifd], [cls[i] for i in ifd], detach_shallow)
        for i, partner, mask in zip(ifd, *found, strict=True):
            partners[i], masks[i] = partner, mask
    return list(zip(cls, partners, masks, strict=True))


def _diffs(taps: Sequence[Tensor], plan: Sequence[TapTerms], preps: list[tuple]) -> tuple[list, list[list[Tensor]]]:
    """Float32 differences in the working views of :func:`_work`, for all taps at once.

    Returns per tap ``-D = x[:, partner] - x`` (``None`` without IFD; the sign does not matter to the sum of
    squares and is folded into the gradient's scale) and one ``E`` per SCR term: the term's student channels minus
    its teacher channels (``(·, min(C_s, C_t), ·)``), in the student's channel order when it uses all its
    channels. The subtractions of all taps are one ``_foreach`` op each for IFD and SCR.
    """
    works = [_work(x, prep[0]) for x, prep in zip(taps, preps, strict=True)]
    ifd = [i for i, prep in enumerate(preps) if prep[1] is not None]
    neg_d: list = [None] * len(taps)
    if ifd:
        gathered = [_f32(works[i].index_select(1, preps[i][1])) for i in ifd]
        for i, d in zip(ifd, torch._foreach_sub_(gathered, [works[i] for i in ifd]), strict=True):
            neg_d[i] = d
    views, view_teachers, copies, copy_teachers, owners = [], [], [], [], []
    for i, (work, terms) in enumerate(zip(works, plan, strict=True)):
        n_all = work.shape[1]
        for term in terms.scr:
            teacher = _like_work(term.teacher, work)
            n = min(n_all, teacher.shape[1])
            if term.ordered:
                student, teacher = (work if n == n_all else work[:, :n]), teacher[:, :n]
            elif term.idx_s is not None and n == n_all:  # a permutation of the student: permute the teacher
                student, teacher = work, teacher.index_select(1, torch.argsort(term.idx_s))  # E in channel order
            else:
                student = work if term.idx_s is None else work.index_select(1, term.idx_s)
                teacher = teacher if term.idx_t is None else teacher.index_select(1, term.idx_t)
            # a gathered or converted student is our own copy, so the difference may overwrite it
            copy = student is not work and not term.ordered or student.dtype != torch.float32
            (copies if copy else views).append(_f32(student))
            (copy_teachers if copy else view_teachers).append(teacher)
            owners.append((i, copy))
    scr_e: list[list[Tensor]] = [[] for _ in taps]
    from_copies = iter(torch._foreach_sub_(copies, copy_teachers) if copies else ())
    from_views = iter(torch._foreach_sub(views, view_teachers) if views else ())
    for i, copy in owners:  # in term order
        scr_e[i].append(next(from_copies if copy else from_views))
    return neg_d, scr_e


def _constants_uncached(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


_constants_cached = functools.lru_cache(maxsize=64)(_constants_uncached)


def _constants(values: tuple[float, ...], device: torch.device) -> Tensor:
    """``values`` as a float32 vector on ``device``, made once per distinct tuple (no host-to-device copy per step)."""
    if torch.compiler.is_compiling():
        return _constants_uncached(values, device)
    return _constants_cached(values, device)


def _forward_math(taps: Sequence[Tensor], plan: Sequence[TapTerms], detach_shallow: bool,
                  keep: bool) -> tuple[Tensor, Tensor, tuple]:
    """Weighted IFD and SCR sums of all taps, and what the backward needs (the differences if ``keep``).

    The sums of squares of all differences are one ``_foreach_norm``; their weighted sums two dot products with
    constant weight vectors (zero where a difference belongs to the other term).
    """
    preps = _prepare(taps, plan, detach_shallow)
    neg_d, scr_e = _diffs(taps, plan, preps)
    parts, w_ifd, w_scr = [], [], []
    for x, terms, d in zip(taps, plan, neg_d, strict=True):
        if d is not None:
            parts.append(d)
            w_ifd.append(terms.ifd_weight / (2 * _ifd_count(x)))  # every pair twice (+D and -D), the median 0
            w_scr.append(0.0)
    for x, terms, es in zip(taps, plan, scr_e, strict=True):
        for term, e in zip(terms.scr, es, strict=True):
            parts.append(e)
            w_ifd.append(0.0)
            w_scr.append(term.weight / _scr_count(x, term))
    norms = torch.stack(torch._foreach_norm(parts))
    squares = norms.mul_(norms)
    device = squares.device
    ifd = torch.dot(squares, _constants(tuple(w_ifd), device))
    scr = torch.dot(squares, _constants(tuple(w_scr), device))
    return ifd, scr, (preps, neg_d, scr_e) if keep else (preps,)


def _backward_math(taps, plan, saved, g_ifd, g_scr, needs, inplace: bool = False) -> list:
    """Every tap's gradient (``None`` where not needed), written once in the tap's dtype and layout.

    ``a D`` for IFD (``D`` is already in channel order: no gather, no scatter, no zero fill; the scales of all
    taps are one vector op, their products with the differences one ``_foreach`` op), plus ``b E`` on each SCR
    term's student channels (added in place, or ``index_add_`` for a drawn subset). ``inplace``: the kept
    differences may be overwritten (they become the gradients; no new buffers).
    """
    preps = saved[0]
    neg_d, scr_e = _diffs(taps, plan, preps) if len(saved) == 1 else saved[1:]
    want = [i for i, need in enumerate(needs) if need]
    grads: list = [None] * len(taps)
    ifd = [i for i in want if neg_d[i] is not None]
    if ifd:  # dL/dx = a D = -a (-D), a = 2 g w / N (masked to the bottom half under detach_shallow)
        consts = tuple(-2.0 * plan[i].ifd_weight / _ifd_count(taps[i]) for i in ifd)
        scales = (g_ifd * _constants(consts, g_ifd.device)).unbind(0)
        scales = [s if preps[i][2] is None else preps[i][2] * s for i, s in zip(ifd, scales, strict=True)]
        ds = [neg_d[i] for i in ifd]
        for i, g in zip(ifd, torch._foreach_mul_(ds, scales) if inplace else torch._foreach_mul(ds, scales),
                        strict=True):
            grads[i] = g
    scr = [(i, term, e) for i in want for term, e in zip(plan[i].scr, scr_e[i], strict=True)]
    if scr:
        consts = tuple(2.0 * term.weight / _scr_count(taps[i], term) for i, term, _ in scr)
        scales = (g_scr * _constants(consts, g_scr.device)).unbind(0)
        for (i, term, e), b in zip(scr, scales, strict=True):
            c, n = taps[i].shape[1], e.shape[1]
            if grads[i] is not None and n == c:  # every student channel, in channel order (see _diffs)
                grads[i].addcmul_(e, b)
                continue
            eb = e.mul_(b) if inplace else e * b
            if n == c:
                grads[i] = eb
                continue
            if grads[i] is None:  # an SCR-only tap using a subset of its channels: the others get zero gradient
                grads[i] = torch.zeros_like(_work(taps[i], preps[i][0]), dtype=torch.float32)
            if term.ordered:
                grads[i][:, :n].add_(eb)
            else:
                grads[i].index_add_(1, term.idx_s, eb)
    for i in want:
        if grads[i] is None:
            continue
        g = _unrows(grads[i], taps[i]) if preps[i][0] else grads[i]
        grads[i] = g if g.dtype == taps[i].dtype else g.to(taps[i].dtype)
    return grads


# ---------------------------------------------------------------------------------------------------------------
# Float32 CPU taps: the compiled kernels of lightning_selfreg.selfreg.cpu_kernels (each tap read once per pass, its
# gradient written once, a few kernel calls per tap instead of the eager path's ops).
# ---------------------------------------------------------------------------------------------------------------
_NO_TEACHER = np.zeros((0, 0, 0), np.float32)
_NO_INDEX = np.zeros(0, np.int64)


def _use_kernels(taps: Sequence[Tensor], plan: Sequence[TapTerms], compile: bool) -> bool:
    """Whether the compiled CPU kernels take these taps: all float32 on the CPU, outside ``torch.compile``."""
    if not CPU_KERNELS or compile or torch.compiler.is_compiling():
        return False
    tensors = [*taps, *(term.teacher for terms in plan for term in terms.scr)]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def pool_with_kernel(x: Tensor, size: tuple[int, ...]) -> Tensor | None:
    """``x`` average-pooled to ``size`` by the CPU kernel (one pass), float32, in ``x``'s memory format.

    Returns ``None`` where the kernel does not apply (kernels off or unavailable, not a float32 CPU map, a
    non-integer factor, or inside ``torch.compile``); the caller then pools with torch ops.
    """
    spatial = x.shape[2:]
    if (not CPU_KERNELS or torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or any(s % t for s, t in zip(spatial, size, strict=True))):
        return None
    factors = tuple(s // t for s, t in zip(spatial, size, strict=True))
    x = x.detach()
    cl = _is_channels_last(x)
    if cl:  # channels-last in and out: the (B, *spatial, C) rows
        out = torch.empty((x.shape[0], *size, x.shape[1]), dtype=torch.float32)
        src, dst = x.movedim(1, -1).numpy(), out.numpy()
        out = out.movedim(-1, 1)
        if x.ndim == 4:  # as 3-D maps of depth 1
            src, dst = src[:, None], dst[:, None]
    else:
        out = torch.empty((*x.shape[:2], *size), dtype=torch.float32)
        src, dst = x.contiguous().numpy(), out.numpy()
        if x.ndim == 4:
            src, dst = src[:, :, None], dst[:, :, None]
    _cpu_kernels().avg_pool(src, (1, *factors) if x.ndim == 4 else factors, dst, cl)
    return out


def _array(x: Tensor, channels_last: bool) -> np.ndarray:
    """A float32 map as the kernels' C-ordered array: ``(B, C, S)``, or with ``channels_last`` its ``(B, S, C)`` rows.

    A view when the map has that layout, else a copy (a teacher pooled in the other layout than the tap's).
    """
    x = x.detach()
    b, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if channels_last:
        if _is_channels_last(x):  # NHWC-dense: element (b, s, c) at (b * S + s) * C + c
            return x.as_strided((b, s, c), (s * c, c, 1)).numpy()
        return np.ascontiguousarray(x.movedim(1, -1).reshape(b, s, c).numpy())
    if x.is_contiguous():
        return x.view(b, c, s).numpy()
    return np.ascontiguousarray(x.reshape(b, c, s).numpy())


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    return np.arange(n)  # shared: the kernels never write index arrays


def _pair_arrays(term: ScrTerm, c_s: int) -> tuple[np.ndarray, np.ndarray]:
    """``(student, teacher)`` channel indices of an SCR term, paired by position, as int64 arrays."""
    n = min(c_s, term.teacher.shape[1])
    if term.ordered:
        return _arange(n), _arange(n)
    student = _arange(n) if term.idx_s is None else term.idx_s.numpy()
    teacher = _arange(n) if term.idx_t is None else term.idx_t.numpy()
    return student, teacher


def _kernel_forward(taps: Sequence[Tensor], plan: Sequence[TapTerms]) -> tuple[Tensor, Tensor, list]:
    """Weighted IFD and SCR sums through the CPU kernels; per tap what the backward needs (layout, partners, terms)."""
    ifd = scr = 0.0
    saved = []
    teachers: dict[tuple[int, bool], np.ndarray] = {}  # a teacher shared by several taps is converted once
    for x, terms in zip(taps, plan, strict=True):
        cl = _is_channels_last(x)
        arr = _array(x, cl)
        scr_args = []
        for term in terms.scr:
            key = (id(term.teacher), cl)
            if key not in teachers:
                teachers[key] = _array(term.teacher, cl)
            scr_args.append((teachers[key], *_pair_arrays(term, x.shape[1])))
        first = scr_args[0] if scr_args else (_NO_TEACHER, _NO_INDEX, _NO_INDEX)
        partner, bottom, ifd_sum, scr_sum = _cpu_kernels().tap_forward(arr, cl, bool(terms.ifd_weight), *first)
        if terms.ifd_weight:
            ifd += terms.ifd_weight * ifd_sum / _ifd_count(x)
        sums = [scr_sum, *(_cpu_kernels().scr_sum(arr, cl, *args) for args in scr_args[1:])]
        for term, total in zip(terms.scr, sums, strict=False):  # no sums without SCR terms
            scr += term.weight * total / _scr_count(x, term)
        saved.append((cl, partner, bottom, scr_args))
    return torch.tensor(ifd, dtype=torch.float32), torch.tensor(scr, dtype=torch.float32), saved


def _kernel_backward(taps, plan, saved, g_ifd: Tensor, g_scr: Tensor, needs, detach_shallow: bool) -> list:
    """Every tap's gradient through the CPU kernels, each written once in the tap's layout (``None`` if not needed)."""
    gi, gs = (_f32(g).detach().reshape(1).numpy() for g in (g_ifd, g_scr))
    grads: list = []
    for x, terms, (cl, partner, bottom, scr_args), need in zip(taps, plan, saved, needs, strict=True):
        if not need:
            grads.append(None)
            continue
        a = 2.0 * terms.ifd_weight / _ifd_count(x)
        ascale = bottom * a if detach_shallow else np.full(x.shape[1], a)
        first = scr_args[0] if scr_args else (_NO_TEACHER, _NO_INDEX, _NO_INDEX)
        bscale = 2.0 * terms.scr[0].weight / _scr_count(x, terms.scr[0]) if terms.scr else 0.0
        grad = torch.empty_like(x) if cl else torch.empty(x.shape, dtype=x.dtype)  # NHWC-dense like x, or NCHW
        out = _array(grad, cl)  # a view: written in place
        arr = _array(x, cl)
        _cpu_kernels().grad_tap(arr, cl, partner, ascale, gi, *first, bscale, gs, out)
        for term, args in zip(terms.scr[1:], scr_args[1:], strict=True):
            _cpu_kernels().scr_add_grad(arr, cl, *args, 2.0 * term.weight / _scr_count(x, term), gs, out)
        grads.append(grad)
    return grads


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
        ctx.plan, ctx.detach_shallow, ctx.compile = plan, detach_shallow, compile
        ctx.save_for_backward(*taps)
        ctx.kernels = _use_kernels(taps, plan, compile)
        if ctx.kernels:
            ifd, scr, ctx.saved = _kernel_forward(taps, plan)
            return ifd, scr
        keep = taps[0].device.type in KEEP_DIFFERENCES_ON and not compile
        forward_math = _compiled(_forward_math, COMPILE_BACKEND) if compile else _forward_math
        with no_autocast(taps[0].device.type):
            ifd, scr, ctx.saved = forward_math(taps, plan, detach_shallow, keep)
        return ifd, scr

    @staticmethod
    def backward(ctx, g_ifd: Tensor, g_scr: Tensor):
        """Each tap's gradient, written once (``None`` for taps that need none)."""
        taps = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        if ctx.kernels:
            return (None, None, None, *_kernel_backward(taps, ctx.plan, ctx.saved, g_ifd, g_scr, needs,
                                                         ctx.detach_shallow))
        backward_math = _compiled(_backward_math, COMPILE_BACKEND) if ctx.compile else _backward_math
        inplace = len(ctx.saved) > 1 and not ctx.compile  # the kept differences become the gradients
        with no_autocast(taps[0].device.type):
            grads = backward_math(taps, ctx.plan, ctx.saved, _f32(g_ifd), _f32(g_scr), needs, inplace)
        if inplace:  # consumed: a second backward (retain_graph=True) recomputes the differences from the taps
            ctx.saved = ctx.saved[:1]
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
