"""Fused SelfReg terms: every tap's IFD and SCR in one autograd node with closed-form MSE gradients.

Every SelfReg term is a mean squared error between channels of a tap (IFD) or between channels of a tap and the
detached, pooled ``F_final`` (SCR), so its gradient is closed-form. For a tap ``x`` of shape ``(B, C, *spatial)``
with IFD differences ``D_k = x_top(k) - x_bottom(k)`` (ranks ``k`` and ``k + ceil(C / 2)``) and SCR differences
``E_m = x_s(m) - t_m`` (student channel ``s(m)`` paired with teacher channel ``m``)::

    dL/dx_top(k) = a D_k,   dL/dx_bottom(k) = -a D_k,   dL/dx_s(m) += b E_m,   0 elsewhere (the median channel)

with ``a = 2 g_ifd w_ifd / N_ifd`` (``0`` on the top half under ``detach_shallow``) and ``b = 2 g_scr w_scr /
N_scr``. :class:`SelfRegTerms` computes the weighted IFD and SCR sums of all taps in one forward and, in the
backward, writes each tap's gradient once, in the tap's dtype and memory format: ``+-a D`` into a rank-ordered
buffer that one gather puts back in channel order (no zero fill, no ``index_add`` of a zero-filled buffer, no
per-term MSE backward), then ``b E`` added on the SCR channels. The IFD ranking is computed once (kept from the
forward); the random SCR channel pairing is drawn by the caller, on the device, from its ``torch.Generator``
(:func:`lightning_selfreg.losses.scr_loss` draws exactly as the reference does). No host synchronisation.

Layouts: contiguous maps gather channels with ``index_select``; channels-last maps (NHWC / NDHWC strides, e.g.
``channels_last`` CNNs or permuted Swin outputs) gather along their contiguous channel axis (on the CPU by a
product with a 0/1 (or +1/-1) matrix for up to :data:`CPU_MATMUL_MAX_CHANNELS` channels, exact in float32 since
every output is one or two products by +-1, else ``torch.gather``), so they are never copied to another layout
and their gradient keeps their strides.

Memory: on the CPU the forward keeps the float32 differences ``D`` and ``E`` for the backward (half a tap and
the SCR channels); on other devices the backward recomputes them from the taps, so the loss keeps no extra
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

__all__ = ["CPU_MATMUL_MAX_CHANNELS", "ScrTerm", "SelfRegTerms", "TapTerms", "ifd_order", "selfreg_terms"]

CPU_MATMUL_MAX_CHANNELS = 48
"""On the CPU, channels-last taps with at most this many channels gather channels by a matrix product."""

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


def _is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is laid out with the channel axis contiguous (NHWC / NDHWC), and not also contiguous."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _use_matmul(x: Tensor) -> bool:
    """Gather channels of this channels-last CPU map by 0/1 matrix products (exact for float32 at full precision)."""
    return (
        not torch.compiler.is_compiling()  # an eager-CPU optimisation; compiled code gathers
        and x.device.type == "cpu"
        and x.shape[1] <= CPU_MATMUL_MAX_CHANNELS
        and x.dtype in (torch.float32, torch.float64)
        and torch.get_float32_matmul_precision() == "highest"
        and _is_channels_last(x)
    )


def _rows(x: Tensor) -> Tensor:
    """The ``(N, C)`` rows of a channels-last map (a view)."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _unrows(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_rows`: ``(N, k)`` rows -> a channels-last ``(B, k, *spatial)`` map."""
    return rows.view(like.shape[0], *like.shape[2:], rows.shape[1]).movedim(-1, 1)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _one_hot_columns(idx: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    """``(c, k)`` matrix whose column ``k`` selects channel ``idx[k]``."""
    return torch.eye(c, dtype=dtype, device=idx.device).index_select(1, idx)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x[:, idx]`` of a ``(B, C, *spatial)`` map, in ``x``'s layout (channels-last maps stay channels-last)."""
    if not _is_channels_last(x):
        return x.index_select(1, idx)
    if _use_matmul(x):  # each output is 1 * x[idx[k]] + 0 * (the others): exact
        return _unrows(_rows(x) @ _one_hot_columns(idx, x.shape[1], x.dtype), x)
    xl = x.movedim(1, -1)
    return torch.gather(xl, -1, idx.expand(*xl.shape[:-1], idx.numel())).movedim(-1, 1)


def ifd_order(x: Tensor) -> Tensor:
    """IFD channel ranking of ``x``, ``(C,)``, best first; rank ``k`` pairs with rank ``k + ceil(C / 2)``.

    The score is ``mean_b(sum_s x / ||x||_2)`` per channel (the authors' ranking; the constant ``1 / |spatial|``
    does not change ranks), accumulated in float32 without a float32 copy of ``x``.
    """
    if _is_channels_last(x):
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


def _ifd_diff(x: Tensor, order: Tensor) -> tuple[Tensor, Tensor | None]:
    """Top minus bottom half of the ranked channels, in float32.

    Returns ``(D, M)``: on the matrix-product path ``D`` is ``(N, C // 2)`` rows and ``M`` the ``(C, C // 2)``
    +1/-1 matrix with ``D = rows @ M``; otherwise ``D`` is ``(B, C // 2, *spatial)`` and ``M`` is ``None``.
    """
    c = x.shape[1]
    top, bottom = order[: c // 2], order[(c + 1) // 2 :]
    if _use_matmul(x):
        m = _one_hot_columns(top, c, x.dtype) - _one_hot_columns(bottom, c, x.dtype)
        return _rows(x) @ m, m  # exact: one +1 and one -1 product per output
    ranked = _f32(_gather(x, order))
    return ranked[:, : c // 2] - ranked[:, (c + 1) // 2 :], None


def _scr_pair(x: Tensor, term: ScrTerm) -> tuple[Tensor, Tensor]:
    """The paired ``(student, teacher)`` channels of one SCR term, both ``(B, min(C_s, C_t), *spatial)``."""
    n = min(x.shape[1], term.teacher.shape[1])
    if term.ordered:
        return x[:, :n], term.teacher[:, :n]
    student = x if term.idx_s is None else _gather(x, term.idx_s)
    teacher = term.teacher if term.idx_t is None else _gather(term.teacher, term.idx_t)
    return student, teacher


def _sumsq(t: Tensor) -> Tensor:
    return t.square().sum()


def _tap_forward(x: Tensor, terms: TapTerms, order: Tensor | None) -> tuple:
    """One tap's ``(ifd_sq, [scr_sq], D, M, [E])``: sums of squares and the differences the gradient needs."""
    diff = m = ifd_sq = None
    if terms.ifd_weight:
        diff, m = _ifd_diff(x, order)
        ifd_sq = _sumsq(diff)
    scr_sq, scr_diffs = [], []
    for term in terms.scr:
        student, teacher = _scr_pair(x, term)
        e = _f32(student) - teacher
        scr_sq.append(_sumsq(e))
        scr_diffs.append(e)
    return ifd_sq, scr_sq, diff, m, scr_diffs


def _forward_math(taps: Sequence[Tensor], plan: Sequence[TapTerms], keep: bool) -> tuple[Tensor, Tensor, list]:
    """Weighted IFD and SCR sums of all taps, and per tap what the backward needs (the differences if ``keep``)."""
    ifd_parts, ifd_w, scr_parts, scr_w, saved = [], [], [], [], []
    for x, terms in zip(taps, plan, strict=True):
        order = ifd_order(x) if terms.ifd_weight else None
        ifd_sq, scr_sq, diff, m, scr_diffs = _tap_forward(x, terms, order)
        if ifd_sq is not None:
            ifd_parts.append(ifd_sq)
            ifd_w.append(terms.ifd_weight / _ifd_count(x))
        scr_parts += scr_sq
        scr_w += [term.weight / _scr_count(x, term) for term in terms.scr]
        saved.append((order, diff, m, scr_diffs) if keep else (order,))
    zero = taps[0].new_zeros((), dtype=torch.float32)
    ifd = _weighted_sum(ifd_parts, ifd_w) if ifd_parts else zero
    scr = _weighted_sum(scr_parts, scr_w) if scr_parts else zero
    return ifd, scr, saved


def _weighted_sum(parts: list[Tensor], weights: list[float]) -> Tensor:
    if len(parts) == 1:
        return parts[0] * weights[0]
    return torch.stack([p * w for p, w in zip(parts, weights, strict=True)]).sum()  # no host-to-device copy


def _tap_grad(x: Tensor, terms: TapTerms, saved: tuple, g_ifd: Tensor, g_scr: Tensor,
              detach_shallow: bool) -> Tensor:
    """The gradient of the weighted terms w.r.t. one tap, written once in the tap's dtype and layout."""
    order = saved[0]
    _, _, diff, m, scr_diffs = _tap_forward(x, terms, order) if len(saved) == 1 else (None, None, *saved[1:])
    c = x.shape[1]
    grad = rows = None
    if diff is not None:
        a = g_ifd * (2.0 * terms.ifd_weight / _ifd_count(x))
        if m is not None:  # rows @ M^T puts +a D on the top channels, -a D on the bottom ones, 0 on the median
            if detach_shallow:
                m = m.clamp(max=0)
            rows = (diff * a) @ m.T
            grad = _unrows(rows, x)
        else:  # in rank order, then one gather back to channel order
            if torch.compiler.is_compiling():  # no out= into views in traced code; Inductor fuses this anyway
                bottom = diff * -a
                parts = [torch.zeros_like(diff) if detach_shallow else -bottom]
                parts += [torch.zeros_like(diff[:, :1])] if c % 2 else []
                ranked = torch.cat([*parts, bottom], dim=1)
            else:
                ranked = torch.empty_like(x, dtype=torch.float32)  # x's layout
                if detach_shallow:
                    ranked[:, : c // 2] = 0
                else:
                    torch.mul(diff, a, out=ranked[:, : c // 2])
                torch.mul(diff, -a, out=ranked[:, (c + 1) // 2 :])
                if c % 2:
                    ranked[:, c // 2].zero_()
            grad = _gather(ranked, torch.argsort(order))
    for term, e in zip(terms.scr, scr_diffs, strict=True):
        eb = e * (g_scr * (2.0 * term.weight / _scr_count(x, term)))
        n = eb.shape[1]
        if n == c and (term.ordered or term.idx_s is None):  # every student channel, in order
            grad = eb if grad is None else grad.add_(eb)
            continue
        if grad is None:  # an SCR-only tap using a subset of its channels: the others get zero gradient
            grad = torch.zeros_like(x, dtype=torch.float32)
        if term.ordered:
            grad[:, :n].add_(eb)
        elif rows is not None:  # scatter the pairs' rows into the selected channels (exact)
            rows.addmm_(_rows(eb), _one_hot_columns(term.idx_s, c, x.dtype).T)
        else:
            grad.index_add_(1, term.idx_s, eb)
    return grad if grad.dtype == x.dtype else grad.to(x.dtype)


def _backward_math(taps, plan, saved, g_ifd, g_scr, detach_shallow, needs):
    return [
        _tap_grad(x, terms, s, g_ifd, g_scr, detach_shallow) if need else None
        for x, terms, s, need in zip(taps, plan, saved, needs, strict=True)
    ]


@functools.cache
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)


class SelfRegTerms(torch.autograd.Function):
    """``(ifd, scr)``: the weighted IFD and SCR sums over taps, with a closed-form backward (module docstring).

    On the CPU the forward keeps the pair differences for the backward (memory is cheap there, passes over the
    maps are not); elsewhere, and with ``compile``, the backward recomputes them from the taps and the kept
    IFD ranking, so the loss holds no extra activation memory until the backward.
    """

    @staticmethod
    def forward(ctx, plan: tuple[TapTerms, ...], detach_shallow: bool, compile: bool, *taps: Tensor):
        """Weighted IFD and SCR sums; keeps the IFD rankings (and on the CPU the differences) for the backward."""
        keep = taps[0].device.type == "cpu" and not compile
        forward_math = _compiled(_forward_math, COMPILE_BACKEND) if compile else _forward_math
        with torch.autocast(device_type=taps[0].device.type, enabled=False):
            ifd, scr, saved = forward_math(taps, plan, keep)
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
            grads = backward_math(taps, ctx.plan, ctx.saved, _f32(g_ifd), _f32(g_scr), ctx.detach_shallow, needs)
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
