"""The fused SelfReg loss (``lightning_selfreg.selfreg.fused``) against the plain-autograd reference.

Tolerances: values to 1e-6 relative in float32; gradients to 1e-6 of the largest gradient entry of the tap (both
implementations form each entry as ``2 (a - b) g / N`` terms, summed in a different order); bfloat16 maps within
one bf16 rounding (``2**-7`` relative of the largest entry), since the reference rounds each term's gradient to
bf16 before summing them and the fused path rounds the sum once.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_selfreg.selfreg.fused as fused
from lightning_selfreg.selfreg.losses import (
    SelfRegLoss,
    _ifd_loss_reference,
    _scr_loss_reference,
    ifd_loss,
    scr_loss,
)

IFD = {"enc": ["e1", "e2", "e3"], "dec": ["d1", "d2"]}
SCR = {"all": ["d1", "d2", "e1", "e2", "e3"], "extra": ["e1"]}  # e1 twice: two SCR terms, two random draws


def _maps(ndim: int, channels_last: bool, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Taps with odd C, C_s > C_t, C_s < C_t and C_s == C_t, non-square sizes, three taps sharing a pooled size."""
    g = torch.Generator().manual_seed(seed)
    big, small = ((4, 6, 8), (2, 3, 4)) if ndim == 3 else ((6, 8), (3, 4))
    shapes = {
        "e1": (2, 9, *big),  # odd C > C_t
        "e2": (2, 16, *small),
        "e3": (2, 6, *small),  # C_s == C_t
        "d1": (2, 4, *big),  # C_s < C_t
        "d2": (2, 7, *small),
        "final": (2, 6, *(2 * s for s in big)),
    }
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[ndim + 2]
    out = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        out[name] = x.requires_grad_()
    return out


@pytest.fixture(params=[True, False], ids=["kernels", "eager"])
def cpu_path(request, monkeypatch):
    """Both CPU paths of the fused loss: the compiled kernels (float32) and the eager torch ops."""
    if request.param and not fused.KERNELS_AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(fused, "CPU_KERNELS", request.param)
    return request.param


def _run(maps, implementation, **kwargs):
    loss = SelfRegLoss(IFD, SCR, lambda_scr=0.7, lambda_ifd=0.3, implementation=implementation, **kwargs)
    for v in maps.values():
        v.grad = None
    generator = torch.Generator(device=maps["final"].device).manual_seed(11)  # drawn on the maps' device
    total, terms = loss(maps, maps["final"], generator)
    total.backward()
    grads = {k: v.grad for k, v in maps.items()}
    return total.detach(), terms, grads, generator.get_state()


def _assert_grads_close(grads, ref, rel):
    for name, g_ref in ref.items():
        if g_ref is None:
            assert grads[name] is None, name
            continue
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(grads[name].float(), g_ref.float(), rtol=rel, atol=rel * scale, msg=name)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "nhwc"])
@pytest.mark.parametrize("pairing", ["random", "ordered"])
@pytest.mark.parametrize("detach_shallow", [False, True])
def test_fused_equals_reference(ndim, channels_last, pairing, detach_shallow, cpu_path):
    maps = _maps(ndim, channels_last)
    opts = dict(pairing=pairing, detach_shallow=detach_shallow)
    total, terms, grads, state = _run(maps, "fused", **opts)
    ref_total, ref_terms, ref_grads, ref_state = _run(maps, "reference", **opts)
    assert torch.equal(state, ref_state)  # the same random draws, in the same order
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for k in ("ifd", "scr"):
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-6)
    assert grads["final"] is None  # F_final is only the (detached) SCR teacher
    for name, x in maps.items():  # each gradient in its tap's layout and dtype
        if name != "final":
            assert grads[name].stride() == x.stride() and grads[name].dtype == x.dtype, name


def test_fused_bf16_within_one_rounding_and_float32_terms():
    maps = _maps(2, True, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms, grads, _ = _run(maps, "fused")
        ref_total, ref_terms, ref_grads, _ = _run(maps, "reference")
    assert total.dtype == terms["ifd"].dtype == terms["scr"].dtype == torch.float32
    # the gathers and float32 casts are exact; the teacher is pooled the same way in both: equal values
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads, 2**-7)
    assert all(grads[k].dtype == torch.bfloat16 for k in maps if k != "final")


def test_public_functions_are_fused_and_equal_the_reference(cpu_path):
    g = torch.Generator().manual_seed(3)
    for c in (2, 5, 12):  # even and odd channel counts
        x = torch.randn(3, c, 5, 7, generator=g).requires_grad_()
        for detach_shallow in (False, True):
            value = ifd_loss(x, detach_shallow)
            (grad,) = torch.autograd.grad(value, x)
            ref = _ifd_loss_reference(x, detach_shallow)
            (ref_grad,) = torch.autograd.grad(ref, x)
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6 * ref_grad.abs().max().item())
    final = torch.randn(3, 6, 10, 14, generator=g)
    for c in (3, 6, 11):  # C_s < C_t, ==, >
        x = torch.randn(3, c, 5, 7, generator=g).requires_grad_()
        for pairing in ("random", "ordered"):
            value = scr_loss(x, final, pairing, torch.Generator().manual_seed(c))
            ref = _scr_loss_reference(x, final, pairing, torch.Generator().manual_seed(c))
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
            (grad,) = torch.autograd.grad(value, x)
            (ref_grad,) = torch.autograd.grad(ref, x)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6 * ref_grad.abs().max().item())
    assert type(ifd_loss(x).grad_fn).__name__ == "SelfRegTermsBackward"


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "nhwc"])
def test_tied_ranking_scores_pair_as_the_reference(channels_last, cpu_path):
    """Channels with equal scores (repeated channels) are ranked in channel order, as the reference's stable sort."""
    maps = _maps(2, channels_last)
    # e3: 64 channels, dead ones among them (all zero, as after a ReLU), where an unstable sort reorders ties
    zero = torch.zeros_like(maps["e3"][:, :1])
    maps["e3"] = torch.cat([maps["e3"].detach(), zero], 1)
    for name, repeat in (("e1", [0, 1, 1, 0, 2, 2, 2, 3, 0]), ("e2", [0] * 8 + [1] * 8),
                         ("e3", [6, 0, 6, 1, 6, 2, 6, 3, 6, 4, 6, 5] * 5 + [6] * 4)):
        x = maps[name].detach()[:, repeat]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        maps[name] = (x + 0.0).contiguous(memory_format=fmt).requires_grad_()
    total, _, grads, _ = _run(maps, "fused", pairing="ordered")
    ref_total, _, ref_grads, _ = _run(maps, "reference", pairing="ordered")
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-6)


def test_mixed_layouts_and_a_tap_without_gradient(cpu_path):
    maps = _maps(2, False)
    maps["e2"] = maps["e2"].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    maps["d2"] = maps["d2"].detach()  # e.g. a frozen block: no gradient is computed for it
    total, _, grads, _ = _run(maps, "fused")
    ref_total, _, ref_grads, _ = _run(maps, "reference")
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    assert grads["d2"] is None
    _assert_grads_close(grads, ref_grads, 1e-6)


def test_second_backward_with_retain_graph_gives_the_same_gradients(cpu_path):
    """The eager first backward reuses the kept differences as gradient buffers; a second one must recompute them."""
    maps = _maps(2, True)
    loss = SelfRegLoss(IFD, SCR, lambda_scr=0.7, lambda_ifd=0.3)
    total, _ = loss(maps, maps["final"], torch.Generator().manual_seed(2))
    total.backward(retain_graph=True)
    first = {k: v.grad.clone() for k, v in maps.items() if v.grad is not None}
    total.backward()
    for name, g in first.items():
        torch.testing.assert_close(maps[name].grad, 2 * g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "nhwc"])
def test_recomputing_backward_equals_the_reference(monkeypatch, channels_last):
    """The eager path of other devices (the backward recomputes the differences) is the CPU path's math."""
    monkeypatch.setattr(fused, "KEEP_DIFFERENCES_ON", frozenset())
    monkeypatch.setattr(fused, "CPU_KERNELS", False)
    maps = _maps(2, channels_last)
    for detach_shallow in (False, True):
        total, _, grads, _ = _run(maps, "fused", detach_shallow=detach_shallow)
        ref_total, _, ref_grads, _ = _run(maps, "reference", detach_shallow=detach_shallow)
        torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
        _assert_grads_close(grads, ref_grads, 1e-6)


def test_no_autocast_switches_autocast_off_only_where_it_is_on():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fused.no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    with fused.no_autocast("cpu"):  # off already: a no-op context
        assert not torch.is_autocast_enabled("cpu")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__.split(".")[0], out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "nhwc"])
def test_fused_backward_writes_each_gradient_once_without_zero_fills(channels_last, monkeypatch):
    monkeypatch.setattr(fused, "CPU_KERNELS", False)  # the eager path's ops (the kernels' test is below)
    maps = _maps(2, channels_last)
    del maps["d1"]  # every remaining tap has IFD, so no SCR-only tap needs zeros for its unused channels
    loss = SelfRegLoss(IFD | {"dec": ["d2"]}, {"all": ["d2", "e1", "e2", "e3"]})
    total, _ = loss(maps, maps["final"], torch.Generator().manual_seed(0))
    with _OpLog() as log:
        total.backward()
    names = [name for name, _ in log.ops]
    smallest_tap = min(v.numel() for k, v in maps.items() if k != "final")
    assert not [op for op in log.ops if op[0] in ("zeros", "zeros_like", "new_zeros", "fill_", "zero_")
                and op[1] >= smallest_tap]
    for op in ("mse_loss_backward", "index_select_backward", "new_zeros", "_to_copy"):
        assert op not in names, op


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "nhwc"])
def test_cpu_kernels_run_the_loss_without_torch_ops_on_the_maps(channels_last):
    """With the kernels, the forward and backward dispatch no torch op on map-sized data but the outputs' allocation
    (red when the kernels are bypassed: the eager path dispatches gathers, differences and norms)."""
    if not fused.KERNELS_AVAILABLE:
        pytest.skip("numba is not installed")
    maps = _maps(2, channels_last)
    smallest = min(v.numel() for v in maps.values())
    loss = SelfRegLoss(IFD, SCR, lambda_scr=0.7, lambda_ifd=0.3)
    with _OpLog() as log:
        total, _ = loss(maps, maps["final"], torch.Generator().manual_seed(0))
        total.backward()
    big = {name for name, numel in log.ops if numel >= smallest}
    assert big <= {"empty", "empty_like", "empty_strided", "view", "as_strided", "detach", "permute"}, big
    for name, x in maps.items():
        if name != "final":
            assert maps[name].grad.stride() == x.stride(), name


def test_fused_compile_path_matches_eager(monkeypatch):
    """``implementation="fused-compile"`` traces the same math (``aot_eager`` here: Inductor is for CUDA)."""
    dynamo = pytest.importorskip("torch._dynamo")
    monkeypatch.setattr(fused, "COMPILE_BACKEND", "aot_eager")
    dynamo.reset()
    maps = _maps(2, False)
    small = {"g": ["e1", "e2"]}
    for pairing in ("random", "ordered"):
        results = []
        for implementation in ("fused", "fused-compile"):
            loss = SelfRegLoss(small, small, pairing=pairing, implementation=implementation)
            for v in maps.values():
                v.grad = None
            total, _ = loss(maps, maps["final"], torch.Generator().manual_seed(5))
            total.backward()
            results.append((total.detach(), maps["e1"].grad.clone(), maps["e2"].grad.clone()))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["fused", "fused-compile"])
@pytest.mark.parametrize("mode", ["fp32", "bf16-cl"])
def test_fused_on_cuda_equals_reference_without_host_syncs(implementation, mode):
    """On a GPU: both CUDA paths (eager, and Inductor through ``torch.compile``) against the reference."""
    dtype, channels_last = (torch.bfloat16, True) if mode == "bf16-cl" else (torch.float32, False)
    maps = {k: v.detach().cuda().requires_grad_() for k, v in _maps(2, channels_last, dtype).items()}
    total, terms, grads, _ = _run(maps, implementation)
    ref_total, _, ref_grads, _ = _run(maps, "reference")
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-5 if dtype == torch.float32 else 2**-7)
    assert grads["final"] is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the loss raises
    try:
        _run(maps, implementation)
    finally:
        torch.cuda.set_sync_debug_mode("default")
