"""CPU kernels of the fused SelfReg terms (Numba): each tap read once per pass, its gradient written once.

On the CPU the eager fused path (:mod:`lightning_selfreg.selfreg.fused`) is bound by the number of ops (about 160
per step, each with microseconds of dispatch) as much as by bytes. These kernels do a tap's work in compiled loop
nests: the forward reads the tap once for the IFD ranking statistics and again for the IFD pair and SCR sums
(partner and teacher channels read side by side, no gathered copies, no differences written); the backward
reads it once more and writes its gradient once. The teacher pyramid is pooled by a kernel too. That is a few
kernel calls per tap instead of about twenty ops.

Layouts: a contiguous map is worked on as its channels-first ``(B, C, S)`` view (``S`` = the flattened spatial
size), a channels-last one as its ``(B, S, C)`` rows, each with loops in its memory order: whole channels are
streamed side by side in the first, the partner and teacher channels are gathered within each row (in L1) in the
second. Neither is copied, and each gradient is written in its tap's layout. Indices into rows are unsigned, which
spares Numba's negative-index wrap-around (1.7x in those loops). Float32 only (Numba has no bfloat16):
reduced-precision taps use the eager path. The kernels are serial (one thread, as the benchmarks' CPU defaults)
and compiled on first use, then cached on disk by Numba (``cache=True``: 5-12 s once per installation, ~0.7 s to
load in a later process).

Arithmetic: the ranking statistics and the loss sums accumulate in float64 (channels-last rows: float32 within a
row, float64 across rows), the pooling and the gradients in float32 (as in the eager path). The ranking is the
authors' score, ties in channel order (a stable descending sort, as the eager path's).
"""

from __future__ import annotations

import numba
import numpy as np

# Imported only by lightning_selfreg.selfreg.fused, on first use and where Numba is installed
# (selfreg.fused.KERNELS_AVAILABLE).
__all__ = ["avg_pool", "grad_tap", "scr_add_grad", "scr_sum", "tap_forward"]

_FLAGS = {"reassoc", "contract"}  # vectorised sums; no assumption about NaN or inf


def _jit(fn, inline: str = "never"):
    return numba.njit(cache=True, fastmath=_FLAGS, nogil=True, inline=inline)(fn)


def _jit_inline(fn):
    """:func:`_jit` for a per-row helper: inlined into its callers by Numba (a call per row costs 16 %)."""
    return _jit(fn, inline="always")


@_jit
def _order(score):
    """Channels by descending ``score``, ties in channel order (as torch's stable descending sort).

    A bottom-up merge sort: a few lines that compile in a fraction of the time of ``np.argsort(kind="mergesort")``.
    """
    n = score.shape[0]
    order = np.arange(n)
    tmp = np.empty(n, np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                if j < hi and (i >= mid or score[order[j]] > score[order[i]]):  # the right run only if larger
                    tmp[k] = order[j]
                    j += 1
                else:
                    tmp[k] = order[i]
                    i += 1
        order, tmp = tmp, order
        width *= 2
    return order


@_jit
def _pair(score):
    """IFD partners of the ranking of ``score``, ``(C,)``: best first, rank ``k`` <-> rank ``k + ceil(C / 2)``.

    Also returns the pairs ``(lo, hi)`` as channel indices and the 0/1 mask of the bottom-ranked half.
    """
    c = score.shape[0]
    order = _order(score)
    h = (c + 1) // 2
    partner = np.arange(c)
    lo = np.empty(c // 2, np.int64)
    hi = np.empty(c // 2, np.int64)
    bottom = np.zeros(c)
    for k in range(c // 2):
        top, bot = order[k], order[k + h]
        partner[top], partner[bot] = bot, top
        lo[k], hi[k] = top, bot
    for k in range(h, c):
        bottom[order[k]] = 1.0
    return partner, lo, hi, bottom


@_jit
def _identity(c):
    """The partners, pairs and mask of a tap without IFD: every channel its own partner, no pairs."""
    return np.arange(c), np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(c)


@_jit
def _forward_cf(x, rank, t, sidx, tidx):
    """Channels-first ``(B, C, S)`` tap: IFD partners and pair sum (if ``rank``), SCR sum over ``(sidx, tidx)``."""
    b_, c_, s_ = x.shape
    if rank:
        score = np.zeros(c_)
        for b in range(b_):
            for c in range(c_):
                s1 = 0.0
                s2 = 0.0
                for s in range(s_):
                    v = np.float64(x[b, c, s])
                    s1 += v
                    s2 += v * v
                score[c] += s1 / max(np.sqrt(s2), 1e-12)
        partner, lo, hi, bottom = _pair(score / b_)
    else:
        partner, lo, hi, bottom = _identity(c_)
    return partner, bottom, _pair_sum_cf(x, x, lo, hi), _pair_sum_cf(x, t, sidx, tidx)


@_jit
def _pair_sum_cf(x, y, i_idx, j_idx):
    """``sum_{b, k, s} (x[b, i_k, s] - y[b, j_k, s]) ** 2`` over channels-first maps (float64 sums)."""
    total = 0.0
    for b in range(x.shape[0]):
        for k in range(i_idx.shape[0]):
            i, j = i_idx[k], j_idx[k]
            acc = 0.0
            for s in range(x.shape[2]):
                d = np.float64(x[b, i, s]) - np.float64(y[b, j, s])
                acc += d * d
            total += acc
    return total


@_jit
def _teacher_map(c, sidx, tidx):
    tmap = np.full(c, -1, np.int64)
    for m in range(sidx.shape[0]):
        tmap[sidx[m]] = tidx[m]
    return tmap


@_jit
def _grad_cf(x, partner, ascale, gi, t, sidx, tidx, bscale, gs, g):
    """``g = a_c (x - x[:, partner]) + b (x_s - t)`` on the first SCR term's student channels (channels-first)."""
    b_, c_, s_ = x.shape
    tmap = _teacher_map(c_, sidx, tidx)
    bs = np.float32(bscale * gs[0])
    for b in range(b_):
        for c in range(c_):
            p = partner[c]
            a = np.float32(ascale[c] * gi[0])
            j = tmap[c]
            if j >= 0:
                for s in range(s_):
                    v = x[b, c, s]
                    g[b, c, s] = a * (v - x[b, p, s]) + bs * (v - t[b, j, s])
            else:
                for s in range(s_):
                    g[b, c, s] = a * (x[b, c, s] - x[b, p, s])


@_jit
def _scr_add_cf(x, t, sidx, tidx, bscale, gs, g):
    b_, _, s_ = x.shape
    bs = np.float32(bscale * gs[0])
    for b in range(b_):
        for m in range(sidx.shape[0]):
            i, j = sidx[m], tidx[m]
            for s in range(s_):
                g[b, i, s] += bs * (x[b, i, s] - t[b, j, s])


@_jit
def _unsigned(index):
    """Indices as uint64: loads at unsigned offsets skip Numba's negative-index wrap-around (1.7x in the row loops)."""
    return index.astype(np.uint64)


@_jit
def _forward_rows(x, rank, t, sidx, tidx):
    """Channels-last ``(B, S, C)`` rows (teacher ``(B, S, C_t)``): as :func:`_forward_cf`, row by row.

    The statistics are vectorised over channels; the pairs and the SCR channels are read from the same row
    (gathers in L1), so the tap is read once per pass and no difference is written.
    """
    b_, s_, c_ = x.shape
    if rank:
        score = np.zeros(c_)
        s1 = np.empty(c_)
        s2 = np.empty(c_)
        for b in range(b_):
            s1[:] = 0.0
            s2[:] = 0.0
            for s in range(s_):
                for c in range(c_):
                    v = np.float64(x[b, s, c])
                    s1[c] += v
                    s2[c] += v * v
            for c in range(c_):
                score[c] += s1[c] / max(np.sqrt(s2[c]), 1e-12)
        partner, lo, hi, bottom = _pair(score / b_)
    else:
        partner, lo, hi, bottom = _identity(c_)
    flat, tflat = x.reshape(-1), t.reshape(-1)
    ulo, uhi, us, ut = _unsigned(lo), _unsigned(hi), _unsigned(sidx), _unsigned(tidx)
    ct = t.shape[2]
    ifd = 0.0
    scr = 0.0
    for row in range(b_ * s_):
        base, tbase = np.uint64(row * c_), np.uint64(row * ct)
        ifd += _row_pair_sum(flat, base, flat, base, ulo, uhi)
        scr += _row_pair_sum(flat, base, tflat, tbase, us, ut)
    return partner, bottom, ifd, scr


@_jit_inline
def _row_pair_sum(x, base, y, ybase, i_idx, j_idx):
    """``sum_k (x[base + i_k] - y[ybase + j_k]) ** 2`` of one row (float32: a row has at most a few hundred terms)."""
    part = np.float32(0.0)
    for k in range(i_idx.shape[0]):
        d = x[base + i_idx[k]] - y[ybase + j_idx[k]]
        part += d * d
    return part


@_jit_inline
def _row_scr_add(g, x, base, t, tbase, us, ut, bs):
    """``g[base + s_m] += bs (x[base + s_m] - t[tbase + t_m])``: one row's SCR gradient on its student channels."""
    for m in range(us.shape[0]):
        i = base + us[m]
        g[i] += bs * (x[i] - t[tbase + ut[m]])


@_jit
def _scr_sum_rows(x, t, sidx, tidx):
    b_, s_, c_ = x.shape
    flat, tflat = x.reshape(-1), t.reshape(-1)
    us, ut = _unsigned(sidx), _unsigned(tidx)
    ct = t.shape[2]
    scr = 0.0
    for row in range(b_ * s_):
        scr += _row_pair_sum(flat, np.uint64(row * c_), tflat, np.uint64(row * ct), us, ut)
    return scr


@_jit
def _grad_rows(x, partner, ascale, gi, t, sidx, tidx, bscale, gs, g):
    """As :func:`_grad_cf` for channels-last rows: each gradient row written once, then its SCR channels added."""
    b_, s_, c_ = x.shape
    flat, tflat, gflat = x.reshape(-1), t.reshape(-1), g.reshape(-1)
    up, us, ut = _unsigned(partner), _unsigned(sidx), _unsigned(tidx)
    a = (ascale * gi[0]).astype(np.float32)
    bs = np.float32(bscale * gs[0])
    ct = t.shape[2]
    for row in range(b_ * s_):
        base, tbase = np.uint64(row * c_), np.uint64(row * ct)
        for c in range(c_):
            gflat[base + c] = a[c] * (flat[base + c] - flat[base + up[c]])
        _row_scr_add(gflat, flat, base, tflat, tbase, us, ut, bs)


@_jit
def _scr_add_rows(x, t, sidx, tidx, bscale, gs, g):
    b_, s_, c_ = x.shape
    flat, tflat, gflat = x.reshape(-1), t.reshape(-1), g.reshape(-1)
    us, ut = _unsigned(sidx), _unsigned(tidx)
    bs = np.float32(bscale * gs[0])
    ct = t.shape[2]
    for row in range(b_ * s_):
        _row_scr_add(gflat, flat, np.uint64(row * c_), tflat, np.uint64(row * ct), us, ut, bs)


@_jit
def _avg_pool_cf(x, kd, kh, kw, out):
    """Block means of a channels-first ``x`` ``(P, D, H, W)`` into ``out`` ``(P, D / kd, H / kh, W / kw)``.

    The ``kd * kh`` input rows of an output row are summed whole (vectorised), then ``kw`` neighbours at a time.
    """
    p_, d_, h_, w_ = out.shape
    scale = np.float32(1.0 / (kd * kh * kw))
    row = np.empty(x.shape[3], np.float32)
    for p in range(p_):
        for d in range(d_):
            for h in range(h_):
                row[:] = 0.0
                for i in range(kd):
                    for j in range(kh):
                        row += x[p, d * kd + i, h * kh + j]
                dst = out[p, d, h]
                if kw == 2:  # the common factor, written out: vectorised (4.7x the generic loop)
                    for w in range(w_):
                        dst[w] = (row[2 * w] + row[2 * w + 1]) * scale
                else:
                    for w in range(w_):
                        acc = np.float32(0.0)
                        for k in range(kw):
                            acc += row[w * kw + k]
                        dst[w] = acc * scale


@_jit
def _avg_pool_rows(x, kd, kh, kw, out):
    """Block means of a channels-last ``x`` ``(B, D, H, W, C)`` into channels-last ``out`` ``(B, d, h, w, C)``.

    The channel loop is innermost (vectorised).
    """
    b_, d_, h_, w_, c_ = out.shape
    scale = np.float32(1.0 / (kd * kh * kw))
    acc = np.empty((w_, c_), np.float32)
    for b in range(b_):
        for d in range(d_):
            for h in range(h_):
                acc[:] = 0.0
                for i in range(kd):
                    for j in range(kh):
                        src = x[b, d * kd + i, h * kh + j]
                        for w in range(w_):
                            for k in range(kw):
                                for c in range(c_):
                                    acc[w, c] += src[w * kw + k, c]
                for w in range(w_):
                    for c in range(c_):
                        out[b, d, h, w, c] = acc[w, c] * scale


def avg_pool(x: np.ndarray, factors: tuple[int, int, int], out: np.ndarray, channels_last: bool) -> None:
    """Average-pool a float32 map by integer ``factors`` ``(kd, kh, kw)`` into ``out``, in the same layout.

    Args:
        x: C-ordered ``(B, C, D, H, W)``, or with ``channels_last`` C-ordered ``(B, D, H, W, C)``.
        factors: Pooling factor of each spatial dim.
        out: Float32, C-ordered, the pooled shape in ``x``'s layout; written. Sums accumulate in float32, as in
            the strided sums of :func:`lightning_selfreg.selfreg.losses.pool_teacher`.
        channels_last: Which of the two layouts ``x`` and ``out`` are.
    """
    if channels_last:
        _avg_pool_rows(x, *factors, out)
    else:
        b, c = out.shape[:2]
        _avg_pool_cf(x.reshape(b * c, *x.shape[2:]), *factors, out.reshape(b * c, *out.shape[2:]))


def tap_forward(x: np.ndarray, channels_last: bool, rank: bool, t: np.ndarray, sidx: np.ndarray,
                tidx: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One tap's forward: IFD partners, bottom mask and pair sum (if ``rank``), and one SCR term's sum.

    Args:
        x: The float32 tap, C-ordered ``(B, C, S)`` (``S`` the flattened spatial size), or with ``channels_last``
            its C-ordered ``(B, S, C)`` rows.
        channels_last: Which of the two ``x`` (and ``t``) is.
        rank: Whether the tap has an IFD term (else partners are the identity and the IFD sum 0).
        t: The SCR teacher in ``x``'s layout, float32 ``(B, C_t, S)`` / ``(B, S, C_t)``.
        sidx: ``(n,)`` int64 student channels of the term (empty: no SCR term).
        tidx: ``(n,)`` int64 teacher channels paired with them by position.

    Returns:
        ``(partner, bottom, ifd_sum, scr_sum)``: ``(C,)`` int64 partners, ``(C,)`` float64 0/1 mask of the bottom
        half, the sum of squared pair differences and of squared student-teacher differences.
    """
    return (_forward_rows if channels_last else _forward_cf)(x, rank, t, sidx, tidx)


def scr_sum(x: np.ndarray, channels_last: bool, t: np.ndarray, sidx: np.ndarray, tidx: np.ndarray) -> float:
    """Sum of squared student-teacher differences of one more SCR term (arguments as :func:`tap_forward`)."""
    return _scr_sum_rows(x, t, sidx, tidx) if channels_last else _pair_sum_cf(x, t, sidx, tidx)


def grad_tap(x: np.ndarray, channels_last: bool, partner: np.ndarray, ascale: np.ndarray, gi: np.ndarray,
             t: np.ndarray, sidx: np.ndarray, tidx: np.ndarray, bscale: float, gs: np.ndarray, g: np.ndarray) -> None:
    """Write a tap's gradient into ``g`` (every element, once): IFD and its first SCR term.

    ``g = gi ascale[c] (x - x[:, partner]) + gs bscale (x[:, sidx[m]] - t[:, tidx[m]])`` (the SCR part on the
    student channels ``sidx`` only). ``ascale``: ``(C,)`` float64, ``0`` where IFD passes no gradient; ``gi``,
    ``gs``: the incoming gradients of the IFD and SCR sums as ``(1,)`` float32 arrays (read in the kernel: no
    conversion to a Python number); ``g``: the float32 gradient in ``x``'s layout; other arguments as
    :func:`tap_forward`.
    """
    kernel = _grad_rows if channels_last else _grad_cf
    kernel(x, partner, ascale, gi, t, sidx, tidx, bscale, gs, g)


def scr_add_grad(x: np.ndarray, channels_last: bool, t: np.ndarray, sidx: np.ndarray, tidx: np.ndarray,
                 bscale: float, gs: np.ndarray, g: np.ndarray) -> None:
    """Add a further SCR term's gradient ``gs bscale (x_s - t)`` to ``g`` (arguments as :func:`grad_tap`)."""
    (_scr_add_rows if channels_last else _scr_add_cf)(x, t, sidx, tidx, bscale, gs, g)
