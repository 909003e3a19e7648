"""SelfReg in 3D: the 3D UNet, 5-D taps, MONAI 3D tap specs, and SelfRegSegModule on volumes (issue 12)."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_selfreg import FeatureTaps, SelfReg, SelfRegLoss, SelfRegSegModule, TapSpec, list_tap_candidates
from lightning_selfreg.callbacks import TestPredictionWriter
from lightning_selfreg.data.transforms import resize_image
from lightning_selfreg.models import UNet, create_model
from lightning_selfreg.models.third_party import monai_dynunet, monai_dynunet_tap_spec
from lightning_selfreg.segmentation.inference import linear_resize_argmax
from tests.conftest import capture


@pytest.fixture
def needs_monai():
    pytest.importorskip("monai")
    pytest.importorskip("einops")


def assert_selfreg_reaches_every_tap(net, feats):
    """SCR + IFD on the captured 5-D taps: finite, positive, gradient in every tapped block, none in F_final."""
    spec = net.tap_spec
    loss = SelfRegLoss(spec.ifd_groups, spec.scr_groups, lambda_scr=1.0, lambda_ifd=1.0)
    total, terms = loss(feats, feats[spec.final], torch.Generator().manual_seed(0))
    assert math.isfinite(float(total.detach())) and float(terms["scr"]) > 0 and float(terms["ifd"]) > 0
    total.backward()
    for path in spec.paths[:-1]:
        params = [p for p in net.get_submodule(path).parameters()]
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), path
    assert all(p.grad is None for p in net.get_submodule(spec.final).parameters())  # SCR's teacher is detached


# ---------------------------------------------------------------- the paper's UNet in 3D


def test_unet_3d_layers_shapes_and_taps():
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=3, spatial_dims=3)
    kinds = {type(m) for m in net.modules()}
    assert {nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d} <= kinds and not kinds & {nn.Conv2d, nn.BatchNorm2d}
    assert net.up1.mode == "trilinear"
    assert net.tap_spec == UNet(1, 3, base_channels=4, depth=3).tap_spec  # the same taps as in 2D
    feats, logits = capture(net, torch.randn(2, 1, 12, 20, 18))  # sides not multiples of 8: skips are padded
    assert logits.shape == (2, 3, 12, 20, 18)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "down1": (8, 6, 10, 9), "down2": (16, 3, 5, 4), "down3": (16, 1, 2, 2),
        "up1": (8, 3, 5, 4), "up2": (4, 6, 10, 9), "up3": (4, 12, 20, 18),
    }
    # parameters: every 3x3 kernel becomes 3x3x3, so the conv weights grow 3x, norms and head stay
    def conv_weights(net, kind):
        return sum(m.weight.numel() for m in net.modules() if isinstance(m, kind) and set(m.kernel_size) == {3})

    assert conv_weights(UNet(1, 9, 8, spatial_dims=3), nn.Conv3d) == 3 * conv_weights(UNet(1, 9, 8), nn.Conv2d)
    with pytest.raises(ValueError, match=r"UNet\(spatial_dims=3\) expects \(B, C, D, H, W\)"):
        net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(1, 3, spatial_dims=1)


def test_selfreg_loss_on_3d_unet_taps_backprops():
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=3, spatial_dims=3)
    feats, _ = capture(net, torch.randn(2, 1, 8, 16, 16))
    assert_selfreg_reaches_every_tap(net, feats)


# ---------------------------------------------------------------- 5-D taps


def test_channels_last_3d_taps_are_permuted_and_candidates_follow_the_input_rank():
    class ChannelsLast(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 4, 1) * 2

    net = nn.Sequential()
    net.add_module("block", ChannelsLast())
    net.add_module("final", nn.Identity())
    x = torch.randn(2, 3, 4, 5, 6)
    with FeatureTaps(net, ["block", "final"], nhwc=["block"]) as taps, taps.capture() as feats:
        net(x)
    assert torch.equal(feats["block"], x * 2)  # (B, D, H, W, C) -> (B, C, D, H, W)
    unet = UNet(1, 3, base_channels=4, depth=2, spatial_dims=3)
    found = {path: shape for path, _, shape in list_tap_candidates(unet, (1, 1, 8, 8, 8))}
    assert found["down1"] == (1, 8, 4, 4, 4) and found["up2"] == (1, 4, 8, 8, 8) and found["outc"] == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, D, H, W\)"):
        list_tap_candidates(unet, (8, 8, 8))


# ---------------------------------------------------------------- MONAI 3D backbones

MONAI_3D = {  # name, kwargs, input side, expected tap shapes (C, D, H, W)
    "monai-basicunet": (dict(features=(4, 4, 8, 16, 32, 4)), 32, {  # InstanceNorm: the 1/16 map must be > 1 voxel
        "down_1": (4, 16, 16, 16), "down_2": (8, 8, 8, 8), "down_3": (16, 4, 4, 4), "down_4": (32, 2, 2, 2),
        "upcat_4": (16, 4, 4, 4), "upcat_3": (8, 8, 8, 8), "upcat_2": (4, 16, 16, 16), "upcat_1": (4, 32, 32, 32),
    }),
    "monai-dynunet": (dict(strides=(1, 2, 2, 2), filters=(4, 8, 16, 32)), 16, {
        "downsamples.0": (8, 8, 8, 8), "downsamples.1": (16, 4, 4, 4), "bottleneck": (32, 2, 2, 2),
        "upsamples.0": (16, 4, 4, 4), "upsamples.1": (8, 8, 8, 8), "upsamples.2": (4, 16, 16, 16),
    }),
    "monai-swinunetr": (dict(feature_size=12, window_size=2, norm_name="batch"), 32, {  # batch norm: 1-voxel map
        **{f"swinViT.layers{i + 1}.0.blocks.{j}": (12 * 2**i, *(16 // 2**i,) * 3) for i in range(4) for j in (0, 1)},
        "decoder5": (96, 2, 2, 2), "decoder4": (48, 4, 4, 4), "decoder3": (24, 8, 8, 8), "decoder2": (12, 16, 16, 16),
        "decoder1": (12, 32, 32, 32),
    }),
}


@pytest.mark.parametrize("name", list(MONAI_3D))
def test_monai_3d_backbones_capture_every_tap_and_selfreg_backprops(name, needs_monai):
    kwargs, side, expected = MONAI_3D[name]
    torch.manual_seed(0)
    net = create_model(name, 1, 3, spatial_dims=3, **kwargs)
    feats, logits = capture(net, torch.randn(2, 1, side, side, side))
    assert logits.shape == (2, 3, side, side, side)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    assert_selfreg_reaches_every_tap(net, feats)


def test_dynunet_spec_follows_the_number_of_levels(needs_monai):
    spec = monai_dynunet_tap_spec(6)  # nnU-Net's 3D plans: 6 levels
    assert spec.ifd_groups == {"encoder": ("downsamples.0", "downsamples.1", "downsamples.2", "downsamples.3",
                                           "bottleneck"),
                               "decoder": ("upsamples.0", "upsamples.1", "upsamples.2", "upsamples.3")}
    assert spec.final == "upsamples.4" and spec == TapSpec.from_config(spec)
    with pytest.raises(ValueError, match="num_levels"):
        monai_dynunet_tap_spec(2)
    with pytest.raises(ValueError, match="deep_supervision"):
        monai_dynunet(1, 3, spatial_dims=3, deep_supervision=True)
    with pytest.raises(ValueError, match="spatial_dims"):
        create_model("monai-basicunet", 1, 3, spatial_dims=4)
    net = monai_dynunet(1, 3, spatial_dims=3, strides=(1, (1, 2, 2), 2), filters=(4, 8, 16))  # anisotropic level
    feats, logits = capture(net, torch.randn(1, 1, 8, 16, 16))
    assert logits.shape == (1, 3, 8, 16, 16) and tuple(feats["bottleneck"].shape) == (1, 16, 4, 4, 4)


# ---------------------------------------------------------------- resampling to the label grid


def test_linear_resize_argmax_is_trilinear_in_chunks():
    torch.manual_seed(0)
    for src, dst in [((7, 9, 11), (13, 5, 20)), ((12, 6, 6), (4, 6, 6)), ((5, 8, 8), (5, 16, 12))]:
        logits = torch.randn(1, 4, *src, dtype=torch.float64)
        expected = F.interpolate(logits, size=dst, mode="trilinear", align_corners=False)[0].argmax(0)
        assert torch.equal(linear_resize_argmax(logits[0].transpose(0, 1), dst, chunk=3)[0], expected), (src, dst)


class Threshold(nn.Module):
    """A pointwise 'oracle' network: logits (0, 10 * (x - 0.5)), so the prediction is x > 0.5 (any window size)."""

    def __init__(self, spatial_dims):
        super().__init__()
        self.head = (nn.Conv3d if spatial_dims == 3 else nn.Conv2d)(1, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, *(1,) * spatial_dims))
            self.head.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x):
        return self.head(x)


def ball(shape, centre, radius):
    grids = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    return sum(((g / n - c) / radius) ** 2 for g, n, c in zip(grids, shape, centre, strict=True)) <= 1


@torch.no_grad()
def test_3d_prediction_is_the_trilinear_resample_of_the_blended_logits(needs_monai):
    native, grid = (10, 28, 24), (16, 20, 20)  # label grid != preprocessed grid on every axis
    label = torch.from_numpy(ball(native, (0.5, 0.45, 0.55), 0.35).astype(np.int64))
    image = torch.from_numpy(ball(grid, (0.5, 0.45, 0.55), 0.35).astype(np.float32))[None]  # (C, D, H, W)
    module = SelfRegSegModule(Threshold(3), 2, spatial_dims=3, roi_size=(8, 12, 12), sw_batch_size=3)
    pred = module.predict_volume(image, label.shape)
    logits = module.net(image[None])  # pointwise: the Gaussian blending of the windows changes nothing
    expected = F.interpolate(logits, size=native, mode="trilinear", align_corners=False)[0].argmax(0)
    assert pred.shape == native and pred.dtype == torch.int64
    assert (pred != expected).float().mean() < 1e-3  # equal up to float rounding at ties
    assert module.predict_step({"image": image, "native_shape": torch.tensor(native)}, 0).shape == native
    assert module.predict_step({"image": image}, 0).shape == grid
    module.test_step({"image": image, "label": label, "case": "c", "spacing": torch.tensor([3.0, 0.8, 0.8])}, 0)
    results = {p: m.compute() for p, m in module.test_metrics.items()}
    assert results["strict"]["dice_mean"] > 0.9 and results["transunet"]["dice_mean"] > 0.8


@torch.no_grad()
def test_2d_cases_with_a_native_label_grid_are_resampled_to_it():
    image = torch.zeros(4, 1, 20, 20)
    image[:, :, 5:13, 5:14] = 1.0
    module = SelfRegSegModule(Threshold(2), 2)
    logits = module.net(image)
    # same depth: slice-wise, each slice's logits resized bilinearly to the label's in-plane grid (as before), only
    # class borders interpolated: the same labels except at exact ties (this oracle's logits 0 and 0 at the edges)
    resized = resize_image(logits, (30, 26))
    differ = module.predict_volume(image, (4, 30, 26)) != resized.argmax(1)
    assert ((resized[:, 1] - resized[:, 0]).abs()[differ] < 1e-5).all() and differ.float().mean() < 0.01
    # another depth too: trilinear over the stacked slice logits
    trilinear = F.interpolate(logits.transpose(0, 1)[None], size=(7, 30, 26), mode="trilinear",
                              align_corners=False)[0]
    expected = trilinear.argmax(0)
    pred = module.predict_volume(image, (7, 30, 26))
    differ = pred != expected
    assert pred.shape == (7, 30, 26) and ((trilinear[1] - trilinear[0]).abs()[differ] < 1e-5).all()
    module.test_step({"image": image, "label": pred.clone(), "case": "c"}, 0)  # the test step predicts the same
    assert module.test_metrics["strict"].compute()["dice_mean"] == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- SelfRegSegModule in 3D: fit, validate, test


class Patches(Dataset):
    def __init__(self, n, patch, seed):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            label = ball(patch, rng.uniform(0.3, 0.7, 3), 0.3).astype(np.uint8)
            image = (label + rng.normal(0, 0.2, patch)).astype(np.float32)[None]
            self.items.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


AFFINE = np.array([[-0.7, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


class Cases(Dataset):
    """Whole cases: image at a preprocessed grid, label at another (native) grid, native spacing (z, y, x)."""

    def __init__(self, native, grid):
        self.item = {
            "image": torch.from_numpy(ball(grid, (0.5, 0.5, 0.5), 0.3).astype(np.float32))[None],
            "label": torch.from_numpy(ball(native, (0.5, 0.5, 0.5), 0.3).astype(np.int64)),
            "case": "case_0", "spacing": torch.tensor([2.5, 0.7, 0.7], dtype=torch.float64),
            "affine": torch.tensor(AFFINE),
        }

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.item


class Tiny3D(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Patches(4, (16, 16, 16), seed=0), batch_size=2)

    def val_dataloader(self):
        return DataLoader(Cases((10, 30, 26), (20, 24, 24)), batch_size=None)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()


def test_3d_module_fits_with_selfreg_validates_tests_and_predicts_at_the_native_grid(needs_monai, tmp_path):
    nib = pytest.importorskip("nibabel")
    pl.seed_everything(0)
    net = UNet(1, 2, base_channels=4, depth=2, spatial_dims=3)
    module = SelfRegSegModule(net, 2, spatial_dims=3, roi_size=16, sw_batch_size=2, lr=0.01, channels_last=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=2, limit_val_batches=1, val_check_interval=2,
                         num_sanity_val_steps=0, callbacks=[SelfReg(), TestPredictionWriter(tmp_path)],
                         log_every_n_steps=1)
    trainer.fit(module, Tiny3D())
    metrics = trainer.callback_metrics
    for key in ("selfreg/scr", "selfreg/ifd", "train/loss", "val/loss", "val/dice", "val/dice/class_1"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert float(metrics["selfreg/scr"]) > 0 and float(metrics["selfreg/ifd"]) > 0
    trainer.test(module, Tiny3D(), verbose=False)
    assert module.test_results["num_cases"] == 1 and set(module.test_results_by_protocol) == {"strict", "transunet"}
    image = nib.load(tmp_path / "case_0.nii.gz")  # native grid, the case's own geometry
    assert image.shape[::-1] == (10, 30, 26) and np.allclose(image.affine, AFFINE)
    assert np.allclose(image.header.get_zooms()[::-1], (2.5, 0.7, 0.7))
    (pred,) = trainer.predict(module, Tiny3D())
    assert pred.shape == (10, 30, 26)  # the label's (native) grid, not the preprocessed (20, 24, 24)


def test_3d_inference_is_monai_sliding_window_with_gaussian_blending(needs_monai, monkeypatch):
    import monai.inferers

    calls = []
    original = monai.inferers.sliding_window_inference

    def recording(inputs, roi_size, sw_batch_size, predictor, **kwargs):
        calls.append((tuple(inputs.shape), tuple(roi_size), sw_batch_size, kwargs))
        return original(inputs, roi_size, sw_batch_size, predictor, **kwargs)

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", recording)
    module = SelfRegSegModule(Threshold(3), 2, spatial_dims=3, roi_size=8, sw_batch_size=5)
    module.predict_volume(torch.zeros(1, 6, 12, 10))  # smaller than the window along D: MONAI pads, then crops
    assert calls == [((1, 1, 6, 12, 10), (8, 8, 8), 5, {"overlap": 0.5, "mode": "gaussian"})]


def test_3d_module_options_fail_fast(needs_monai):
    net = UNet(1, 2, base_channels=4, depth=2, spatial_dims=3)
    with pytest.raises(ValueError, match="needs `roi_size`"):
        SelfRegSegModule(net, 2, spatial_dims=3)
    with pytest.raises(ValueError, match="`input_size` is for spatial_dims=2"):
        SelfRegSegModule(net, 2, spatial_dims=3, roi_size=16, input_size=32)
    with pytest.raises(ValueError, match="`roi_size` is for spatial_dims=3"):
        SelfRegSegModule(net, 2, roi_size=16)
    with pytest.raises(ValueError, match="sw_overlap"):
        SelfRegSegModule(net, 2, spatial_dims=3, roi_size=16, sw_overlap=1.0)
    with pytest.raises(ValueError, match="spatial_dims"):
        SelfRegSegModule(net, 2, spatial_dims=1)
    module = SelfRegSegModule(net, 2, spatial_dims=3, roi_size=16)
    with pytest.raises(ValueError, match=r"must be \(C, D, H, W\)"):
        module.predict_volume(torch.zeros(1, 1, 8, 8, 8))
