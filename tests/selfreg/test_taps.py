import pytest
import torch
from torch import nn

from lightning_selfreg import FeatureTaps, SelfRegLoss, TapSpec, list_tap_candidates
from lightning_selfreg.models import UNet

PAPER_TAPS_224 = {  # docs/method.md §4
    "down1": (128, 112, 112),
    "down2": (256, 56, 56),
    "down3": (512, 28, 28),
    "down4": (512, 14, 14),
    "up1": (256, 28, 28),
    "up2": (128, 56, 56),
    "up3": (64, 112, 112),
    "up4": (64, 224, 224),
}


def test_paper_unet_parameter_count_and_taps_at_224():
    with torch.device("meta"):  # shapes and counts only: meta tensors skip the 17M-parameter init and the arithmetic
        net = UNet(1, 9)
    assert sum(p.numel() for p in net.parameters()) == 17_262_345  # the authors' UNet_hd, 9 classes
    spec = net.tap_spec
    assert spec.ifd_groups == {"encoder": ("down1", "down2", "down3", "down4"), "decoder": ("up1", "up2", "up3")}
    assert spec.scr_groups == {"all": ("up1", "up2", "up3", "down1", "down2", "down3", "down4")}
    assert spec.final == "up4"
    net.eval()
    with FeatureTaps(net, spec.paths) as taps, taps.capture() as feats, torch.no_grad():
        logits = net(torch.zeros(1, 1, 224, 224, device="meta"))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == PAPER_TAPS_224
    assert logits.shape == (1, 9, 224, 224)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (50, 70)])
def test_tiny_unet_forward_returns_logits_in_train_and_eval(size):
    net = UNet(1, 3, base_channels=4, depth=3)
    x = torch.randn(2, 1, *size)
    assert net(x).shape == (2, 3, *size)
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)


def test_unet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base_channels"):
        UNet(1, 3, base_channels=1)
    with pytest.raises(ValueError, match="num_classes"):
        UNet(1, 1)


def test_taps_capture_only_inside_capture_and_release_after_pop():
    net = UNet(1, 3, base_channels=4, depth=2)
    taps = FeatureTaps(net, net.tap_spec.paths)
    net(torch.randn(1, 1, 16, 16))
    assert taps.pop() == {}
    with taps.capture():
        net(torch.randn(1, 1, 16, 16))
    feats = taps.pop()
    assert set(feats) == {"down1", "down2", "up1", "up2"}
    assert taps.pop() == {}
    taps.remove()
    assert all(not m._forward_hooks for m in net.modules())


def test_unknown_tap_names_fail_with_the_available_names():
    net = UNet(1, 3, base_channels=4, depth=2)
    with pytest.raises(ValueError) as err:
        FeatureTaps(net, ["down1", "dwon2"])
    message = str(err.value)
    assert "'dwon2'" in message and "did you mean 'down2'" in message and "up1" in message


def test_tap_on_module_with_non_tensor_output_fails_clearly():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    net = nn.Sequential(Pair())
    taps = FeatureTaps(net, ["0"])
    with pytest.raises(TypeError, match="returned tuple"), taps.capture():
        net(torch.zeros(1, 1, 2, 2))


def test_tap_spec_from_config_forms_and_errors():
    spec = TapSpec.from_config({"encoder": ["a", "b"], "decoder": ["c"], "final": "d"})
    assert spec == TapSpec.unet(["a", "b"], ["c"], "d")
    assert spec.paths == ("a", "b", "c", "d")
    grouped = TapSpec.from_config({"final": "d", "ifd_groups": {"x": ["a"]}, "scr_groups": {"y": ["a", "b"]}})
    assert grouped.paths == ("a", "b", "d")
    with pytest.raises(ValueError, match="final"):
        TapSpec.from_config({"encoder": ["a"]})
    with pytest.raises(ValueError, match="Unknown tap spec keys"):
        TapSpec.from_config({"final": "d", "encoder": ["a"], "students": ["b"]})
    with pytest.raises(ValueError, match="must not also be a student"):
        TapSpec.unet(["a"], ["d"], "d")


def test_selfreg_gradients_reach_every_tapped_block_but_not_final_through_scr():
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=4, depth=3)
    spec = net.tap_spec
    with FeatureTaps(net, spec.paths) as taps:
        with taps.capture():
            net(torch.randn(2, 1, 32, 32))
        feats = taps.pop()
    scr_only = SelfRegLoss({}, spec.scr_groups, lambda_scr=1.0, lambda_ifd=0.0)
    total, _ = scr_only(feats, feats[spec.final])
    total.backward()
    for path in spec.scr_groups["all"]:
        grads = [p.grad for p in net.get_submodule(path).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), path
    # F_final is the teacher: its own block and the head get nothing from SCR
    assert all(p.grad is None for p in net.get_submodule(spec.final).parameters())
    assert all(p.grad is None for p in net.outc.parameters())


def test_list_tap_candidates_reports_paths_and_shapes():
    net = UNet(1, 3, base_channels=4, depth=2)
    found = {path: shape for path, _, shape in list_tap_candidates(net, (1, 1, 16, 16))}
    assert found["down1"] == (1, 8, 8, 8)
    assert found["up2"] == (1, 4, 16, 16)
    assert found["outc"] == (1, 3, 16, 16)
    assert all(not m._forward_hooks for m in net.modules())


def test_nhwc_taps_are_permuted_to_nchw():
    class ChannelsLastBlock(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1) * 2

    net = nn.Sequential()
    net.add_module("block", ChannelsLastBlock())
    net.add_module("final", nn.Identity())
    spec = TapSpec(final="final", scr_groups={"all": ("block",)}, nhwc=["block"])
    assert spec.nhwc == ("block",)
    x = torch.randn(2, 3, 4, 5)
    with FeatureTaps(net, spec.paths, nhwc=spec.nhwc) as taps, taps.capture() as feats:
        net(x)
    assert torch.equal(feats["block"], x * 2)
    assert feats["final"].shape == (2, 4, 5, 3)  # not listed as nhwc: left as is
    with pytest.raises(ValueError, match="not taps"):
        TapSpec(final="final", scr_groups={"all": ("a",)}, nhwc=["b"])
    assert TapSpec.from_config({"encoder": ["a"], "final": "f", "nhwc": ["a"]}).nhwc == ("a",)


def test_an_empty_tap_path_is_rejected_not_the_whole_model_tapped():
    """'' names the model itself in named_modules(): tapping it would hand SelfReg the logits as a feature map."""
    net = UNet(1, 3, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"Tap module\(s\) not found in the model: ''"):
        FeatureTaps(net, ["down1", ""])
    assert all(not m._forward_hooks for m in net.modules())  # nothing hooked
