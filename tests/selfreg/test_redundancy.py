import numpy as np
import pytest
import torch

from lightning_selfreg import FeatureTaps
from lightning_selfreg.models import UNet
from lightning_selfreg.selfreg.redundancy import (
    block_correlations,
    channel_correlation,
    collect_block_features,
    plot_correlation_heatmaps,
    redundancy_score,
)


def test_identical_and_affine_channels_correlate_fully():
    x = torch.randn(2, 1, 6, 5)
    feature = torch.cat([x, x, 3 * x - 2, -x], dim=1)  # |corr| = 1 for copies, affine maps and negation
    corr = channel_correlation(feature)
    assert corr.dtype == torch.float32 and corr.shape == (4, 4)
    torch.testing.assert_close(corr, torch.ones(4, 4))
    assert redundancy_score(corr) == pytest.approx(1.0, abs=1e-6)


def test_independent_channels_are_nearly_uncorrelated():
    torch.manual_seed(0)
    corr = channel_correlation(torch.randn(4, 8, 64, 64))  # 16384 samples per channel: |r| ~ 0.008
    torch.testing.assert_close(corr.diagonal(), torch.ones(8))
    assert redundancy_score(corr) < 0.02


def test_constant_channels_give_zero_not_nan():
    x = torch.randn(3, 2, 7, 7)
    feature = torch.cat([x, torch.zeros(3, 1, 7, 7), torch.full((3, 1, 7, 7), 0.1), x[:, :1] + 5], dim=1)
    corr = channel_correlation(feature)
    assert torch.isfinite(corr).all()
    assert (corr[2:4] == 0).all() and (corr[:, 2:4] == 0).all()  # the two constant channels, diagonal included
    assert corr[0, 0] == 1 and corr[0, 4] == pytest.approx(1.0, abs=1e-6)


def test_matches_numpy_corrcoef_and_subsamples_first_channels():
    torch.manual_seed(1)
    base = torch.randn(2, 1, 9, 9)
    feature = torch.cat([base + 0.5 * torch.randn(2, 1, 9, 9) for _ in range(5)], dim=1).double()
    expected = np.abs(np.corrcoef(feature.transpose(0, 1).reshape(5, -1).numpy()))
    corr = channel_correlation(feature, max_channels=None)
    assert corr.dtype == torch.float32
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(channel_correlation(feature, max_channels=3).numpy(), expected[:3, :3], atol=1e-5)
    assert channel_correlation(feature, max_channels=64).shape == (5, 5)
    off = expected[~np.eye(5, dtype=bool)]
    assert redundancy_score(corr) == pytest.approx(off.mean(), abs=1e-5)
    assert channel_correlation(feature.to(torch.bfloat16)).dtype == torch.float32


def test_redundancy_score_by_hand_and_argument_errors():
    corr = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert redundancy_score(corr) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="`corr`"):
        redundancy_score(torch.ones(1, 1))
    with pytest.raises(ValueError, match="`corr`"):
        redundancy_score(torch.ones(2, 3))
    with pytest.raises(ValueError, match="`feature`"):
        channel_correlation(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="`max_channels`"):
        channel_correlation(torch.ones(1, 2, 3, 3), max_channels=0)


def test_collect_block_features_eval_no_grad_restores_mode_and_leaves_other_hooks_alone():
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=2).train()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    other = FeatureTaps(net, ["down1", "up2"])  # e.g. the SelfReg callback's taps, not capturing now
    feats = collect_block_features(net, None, torch.randn(3, 1, 16, 16))
    assert list(feats) == ["down1", "down2", "up1", "up2"]
    assert all(not f.requires_grad for f in feats.values())
    assert net.training, "train mode must be restored"
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items()), "BatchNorm stats must not move"
    assert other.pop() == {}
    assert sum(len(m._forward_hooks) for m in net.modules()) == 2, "only the other taps' hooks remain"
    other.remove()

    feats = collect_block_features(net, ["inc", "up1"], torch.randn(2, 1, 16, 16, dtype=torch.float64))
    assert list(feats) == ["inc", "up1"] and feats["inc"].dtype == torch.float32
    corrs = block_correlations(feats, max_channels=2)
    assert {k: tuple(v.shape) for k, v in corrs.items()} == {"inc": (2, 2), "up1": (2, 2)}
    with pytest.raises(ValueError, match="`tap_spec`"):
        collect_block_features(torch.nn.Conv2d(1, 2, 3), None, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="`images`"):
        collect_block_features(net, None, torch.randn(1, 16, 16))


def test_plot_correlation_heatmaps_flat_and_grid():
    pytest.importorskip("matplotlib")
    a, b = torch.eye(3), torch.full((4, 4), 0.5)
    fig = plot_correlation_heatmaps({"down1": a, "up1": b})
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2 and "r=0.500" in images[1].get_title()
    grid = plot_correlation_heatmaps({"down1": {"baseline": a, "SelfReg": a}, "up1": {"baseline": b}})
    assert len([ax for ax in grid.axes if ax.images]) == 3
    with pytest.raises(ValueError, match="`correlations`"):
        plot_correlation_heatmaps({})
