import pytest
import torch
import torch.nn.functional as F

from lightning_selfreg.selfreg import fused
from lightning_selfreg.selfreg.losses import (
    SelfRegLoss,
    _scr_loss_reference,
    ifd_loss,
    pool_teacher,
    scr_loss,
)


def authors_intra_fd(f_s):
    """IFD exactly as the authors' code computes it (docs/method.md §1.2), for even C."""
    score = F.normalize(f_s, p=2, dim=(2, 3)).mean([0, 2, 3])
    _, idx = torch.sort(score, descending=True)
    f_s = torch.index_select(f_s, 1, idx)
    c = f_s.shape[1]
    return F.mse_loss(f_s[:, : c // 2], f_s[:, c // 2 : c])


# ---------------------------------------------------------------- IFD


def test_ifd_hand_computed():
    # channel 0 = [1, 1] (score 2/sqrt(2) = 1.41), channel 1 = [2, 0] (score 1): pair (0, 1)
    f = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]])
    assert ifd_loss(f).item() == pytest.approx(((1 - 2) ** 2 + (1 - 0) ** 2) / 2)
    # swapping the channels does not change the ranking-based pairing
    assert ifd_loss(f.flip(1)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("c", [2, 6, 16])
def test_ifd_equals_authors_code_for_even_channels(c):
    g = torch.Generator().manual_seed(c)
    f = torch.randn(3, c, 5, 7, generator=g)
    assert torch.allclose(ifd_loss(f), authors_intra_fd(f), atol=1e-6)


def test_ifd_odd_channels_leaves_out_the_median_channel():
    # scores: ch0 = 1 (dense), ch1 ~ 0.71, ch2 = 0.5: ranks 0, 1, 2 -> pair ch0 with ch2, ch1 left out
    f = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]], [[4.0, 0.0, 0.0, 0.0]]]])
    expected = F.mse_loss(f[:, 0], f[:, 2])
    assert torch.allclose(ifd_loss(f), expected)
    assert torch.isfinite(ifd_loss(torch.randn(2, 5, 3, 3)))


def test_ifd_gradient_flows_to_both_halves_by_default_and_detach_shallow_stops_the_top():
    f = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]], requires_grad=True)
    ifd_loss(f).backward()
    assert (f.grad[0, 0] != 0).all() and (f.grad[0, 1] != 0).all()
    f.grad = None
    ifd_loss(f, detach_shallow=True).backward()
    assert (f.grad[0, 0] == 0).all() and (f.grad[0, 1] != 0).all()


def test_ifd_errors():
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\) feature map with 2 or 3 spatial dims"):
        ifd_loss(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        ifd_loss(torch.randn(1, 2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="at least 2 channels"):
        ifd_loss(torch.randn(2, 1, 4, 4))


# ---------------------------------------------------------------- SCR


def test_scr_hand_computed():
    feature = torch.tensor([[[[3.0]]]])
    final = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert scr_loss(feature, final, pairing="ordered").item() == pytest.approx((3 - 2.5) ** 2)


def test_scr_ordered_equals_direct_formula_non_square():
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 12, 6, 9, generator=g)
    final = torch.randn(2, 5, 12, 18, generator=g)
    expected = F.mse_loss(feature[:, :5], F.avg_pool2d(final, 2))
    assert torch.allclose(scr_loss(feature, final, pairing="ordered"), expected, atol=1e-6)
    # student with fewer channels than the teacher: the first 3 channels of both
    small = torch.randn(2, 3, 6, 9, generator=g)
    expected = F.mse_loss(small, F.avg_pool2d(final, 2)[:, :3])
    assert torch.allclose(scr_loss(small, final, pairing="ordered"), expected, atol=1e-6)


def test_scr_final_gets_no_gradient():
    feature = torch.randn(2, 8, 4, 4, requires_grad=True)
    final = torch.randn(2, 4, 8, 8, requires_grad=True)
    for pairing in ("random", "ordered"):
        scr_loss(feature, final, pairing=pairing).backward()
    assert final.grad is None
    assert feature.grad is not None and feature.grad.abs().sum() > 0


def test_scr_random_pairing_is_seeded_and_is_a_random_matching():
    feature = torch.randn(2, 8, 4, 4)
    final = torch.randn(2, 8, 8, 8)
    a = scr_loss(feature, final, generator=torch.Generator().manual_seed(3))
    b = scr_loss(feature, final, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    draws = {scr_loss(feature, final, generator=torch.Generator().manual_seed(s)).item() for s in range(8)}
    assert len(draws) > 1
    # equal channel counts: the loss is MSE of a random permutation of the student against the teacher
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    expected = F.mse_loss(feature[:, perm], F.avg_pool2d(final, 2))
    assert torch.allclose(scr_loss(feature, final, generator=torch.Generator().manual_seed(5)), expected)


@pytest.mark.parametrize("scr", [scr_loss, _scr_loss_reference], ids=["fused", "reference"])
def test_scr_random_pairing_uses_each_student_channel_at_most_once(scr):
    # 16 student channels, 4 teacher channels: 4 distinct student channels, each paired with one teacher channel.
    # Student k is k everywhere, teacher m is 100 m: the gradient on student k is 2 (k - 100 m) / N for the one m it
    # is paired with, so it reveals exactly which channels were used and how often (a channel drawn twice gets the
    # sum of two such terms, and fewer than 4 channels get a gradient: sampling with replacement fails here).
    final = (100.0 * torch.arange(4.0)).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    n = 4 * 4  # paired channels x spatial positions
    pairs_seen = set()
    for seed in range(12):
        feature = torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 2, 2).clone().requires_grad_()
        scr(feature, final, generator=torch.Generator().manual_seed(seed)).backward()
        grad = feature.grad[0, :, 0, 0]
        used = grad.nonzero().flatten()
        assert used.numel() == 4, f"seed {seed}: {used.numel()} distinct student channels used, expected 4"
        teacher_of = (used.float() - grad[used] * n / 2) / 100  # solve 2 (k - 100 m) / N for m
        assert torch.allclose(teacher_of, teacher_of.round(), atol=1e-4)
        assert sorted(teacher_of.round().long().tolist()) == [0, 1, 2, 3], f"seed {seed}: teachers {teacher_of}"
        pairs_seen.add(tuple(used.tolist()))
    assert len(pairs_seen) > 5  # and the subset changes with the seed


def test_scr_errors():
    with pytest.raises(ValueError, match="larger than `final`"):
        scr_loss(torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="larger than `final`"):
        scr_loss(torch.randn(1, 4, 4, 16), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        scr_loss(torch.randn(2, 4, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="pairing"):
        scr_loss(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8), pairing="sorted")
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        scr_loss(torch.randn(4, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="same number of spatial dims"):
        scr_loss(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="larger than `final`"):
        scr_loss(torch.randn(1, 4, 4, 4, 16), torch.randn(1, 4, 4, 8, 8))


def test_ifd_and_scr_hand_computed_5d():
    # (B=1, C=2, D=2, H=1, W=1): channel 0 = [1, 1] (score sqrt(2)), channel 1 = [2, 0] (score 1): pair (0, 1)
    f = torch.tensor([1.0, 1.0, 2.0, 0.0]).view(1, 2, 2, 1, 1)
    assert ifd_loss(f).item() == pytest.approx(((1 - 2) ** 2 + (1 - 0) ** 2) / 2)
    assert ifd_loss(f.flip(1)).item() == pytest.approx(1.0)
    # SCR: final (1, 1, 2, 2, 2) = 1..8 pools to its mean 4.5 at (1, 1, 1); feature 3 -> (3 - 4.5)^2
    final = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)
    assert scr_loss(torch.tensor([[[[[3.0]]]]]), final, pairing="ordered").item() == pytest.approx(1.5**2)
    # pooling over depth only: (1, 1, 1, 2, 2) target = mean over D of final = [3, 4, 5, 6]
    feature = torch.tensor([3.0, 4.0, 5.0, 8.0]).view(1, 1, 1, 2, 2)
    assert scr_loss(feature, final, pairing="ordered").item() == pytest.approx((8 - 6) ** 2 / 4)


def test_pool_teacher_3d_and_size_errors():
    final = torch.randn(2, 3, 8, 12, 12)
    sizes = [(4, 6, 6), (2, 3, 3), (8, 6, 6), (3, 5, 5)]
    pooled = pool_teacher(final, sizes)
    for size in sizes:
        assert torch.allclose(pooled[size], F.adaptive_avg_pool3d(final, size), atol=1e-6), size
    with pytest.raises(ValueError, match="tuples of 3 ints"):
        pool_teacher(final, [(4, 4)])
    with pytest.raises(ValueError, match="tuples of 2 ints"):
        pool_teacher(torch.randn(1, 2, 8, 8), [(2, 2, 2)])
    with pytest.raises(ValueError, match="larger than `final`"):
        pool_teacher(final, [(16, 6, 6)])


def test_pool_teacher_matches_direct_pooling():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(2, 3, 224, 224, generator=g)
    sizes = [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7), (30, 30)]
    pooled = pool_teacher(final, sizes)
    for size in sizes:
        assert torch.allclose(pooled[size], F.adaptive_avg_pool2d(final, size), atol=1e-5), size
    non_square = torch.randn(1, 2, 12, 18, generator=g)  # sums in another order than avg_pool2d: ulps apart
    assert torch.allclose(pool_teacher(non_square, [(6, 9)])[(6, 9)], F.avg_pool2d(non_square, 2), atol=1e-6)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_pool_teacher_equals_adaptive_pooling_in_both_layouts(kernels, channels_last, ndim, monkeypatch):
    """Integer factors (2 and 3, unequal per dim) in the CPU kernel and the strided sums, either layout."""
    monkeypatch.setattr(fused, "CPU_KERNELS", kernels and fused.KERNELS_AVAILABLE)
    g = torch.Generator().manual_seed(1)
    spatial, sizes = ((12, 18), [(6, 9), (3, 3), (4, 6)]) if ndim == 2 else ((4, 12, 18), [(2, 6, 9), (1, 3, 3)])
    final = torch.randn(2, 5, *spatial, generator=g)
    if channels_last:
        final = final.contiguous(memory_format=torch.channels_last if ndim == 2 else torch.channels_last_3d)
    pooled = pool_teacher(final, sizes)
    adaptive = F.adaptive_avg_pool2d if ndim == 2 else F.adaptive_avg_pool3d
    for size in sizes:
        torch.testing.assert_close(pooled[size], adaptive(final, size), rtol=1e-6, atol=1e-6, msg=str(size))


# ---------------------------------------------------------------- SelfRegLoss


def _unet_like_features(g):
    return {
        "e1": torch.randn(2, 16, 8, 8, generator=g),
        "e2": torch.randn(2, 32, 4, 4, generator=g),
        "d1": torch.randn(2, 8, 8, 8, generator=g),
        "final": torch.randn(2, 8, 16, 16, generator=g),
    }


def test_selfreg_loss_aggregates_like_the_authors():
    feats = _unet_like_features(torch.Generator().manual_seed(0))
    loss = SelfRegLoss({"encoder": ["e1", "e2"], "decoder": ["d1"]}, {"all": ["d1", "e1", "e2"]},
                       lambda_scr=0.5, lambda_ifd=0.25, pairing="ordered")
    total, terms = loss(feats, feats["final"])
    ifd = (ifd_loss(feats["e1"]) + ifd_loss(feats["e2"])) / 2 + ifd_loss(feats["d1"])
    scr = sum(scr_loss(feats[t], feats["final"], pairing="ordered") for t in ("d1", "e1", "e2")) / 3
    assert torch.allclose(terms["ifd"], ifd) and torch.allclose(terms["scr"], scr)
    assert torch.allclose(total, 0.25 * ifd + 0.5 * scr)
    total_half, _ = loss(feats, feats["final"], lambda_scale=0.5)
    assert torch.allclose(total_half, total / 2)


def test_selfreg_loss_is_float32_under_autocast():
    feats = {k: v.to(torch.bfloat16) for k, v in _unet_like_features(torch.Generator().manual_seed(1)).items()}
    loss = SelfRegLoss({"encoder": ["e1"]}, {"all": ["e1", "d1"]})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss(feats, feats["final"])
    assert total.dtype == torch.float32 and terms["scr"].dtype == torch.float32


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), -0.5, "0.1", True])
@pytest.mark.parametrize("name", ["lambda_scr", "lambda_ifd"])
def test_selfreg_loss_lambdas_must_be_finite_and_non_negative(name, bad):
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number >= 0"):
        SelfRegLoss({}, {}, **{name: bad})
    SelfRegLoss({}, {}, **{name: 0})  # 0 switches the term off


def test_selfreg_loss_validation():
    with pytest.raises(ValueError, match="lambda_scr"):
        SelfRegLoss({}, {}, lambda_scr=-1)
    with pytest.raises(ValueError, match="implementation"):
        SelfRegLoss({}, {}, implementation="triton")
    with pytest.raises(ValueError, match="empty groups"):
        SelfRegLoss({"encoder": []}, {})
    with pytest.raises(ValueError, match="pairing"):
        SelfRegLoss({}, {}, pairing="bogus")
    loss = SelfRegLoss({"encoder": ["e1"]}, {})
    with pytest.raises(KeyError, match="missing tapped features"):
        loss({}, torch.randn(1, 2, 4, 4))


def test_reduced_precision_maps_give_the_fp32_result_and_keep_their_gradient_dtype():
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 6, 8, 8, generator=g).to(torch.bfloat16).requires_grad_()
    final = torch.randn(2, 4, 16, 16, generator=g).to(torch.bfloat16)
    ifd = ifd_loss(feature)
    assert ifd.dtype == torch.float32
    assert torch.allclose(ifd, ifd_loss(feature.detach().float()))  # the gather is exact in any dtype
    scr = scr_loss(feature, final, pairing="ordered")
    reference = F.mse_loss(feature.detach().float()[:, :4], F.avg_pool2d(final.float(), 2))
    assert torch.allclose(scr, reference, rtol=1e-2)  # the teacher is pooled in bf16 (fp32 accumulation)
    (ifd + scr).backward()
    assert feature.grad.dtype == torch.bfloat16
