import inspect
import math
import sys

import lightning.pytorch as pl
import pytest
import torch

from lightning_selfreg import FeatureTaps, SelfReg, SelfRegLoss, SelfRegSegModule
from lightning_selfreg.data import SynapseDataModule
from lightning_selfreg.models.registry import create_model, list_models
from lightning_selfreg.models.swin_unet import SwinUnet
from lightning_selfreg.models.third_party import (
    monai_basic_unet,
    monai_basic_unet_tap_spec,
    monai_dynunet,
    monai_dynunet_tap_spec,
    monai_swin_unetr,
    monai_swin_unetr_tap_spec,
    ready_tap_spec,
    smp_unet,
    smp_unet_tap_spec,
)
from lightning_selfreg.models.unet import UNet
from lightning_selfreg.selfreg.taps import resolve_tap_spec
from tests.conftest import capture


@pytest.fixture
def needs_monai():
    pytest.importorskip("monai")
    pytest.importorskip("einops")


def basic_unet(num_classes=3):
    return monai_basic_unet(1, num_classes, features=(4, 4, 8, 16, 32, 4))


def swin_unetr(num_classes=3):
    return monai_swin_unetr(1, num_classes, feature_size=12)


BACKBONES = {  # builder, input side, expected tap shapes (C, H, W)
    "basicunet": (basic_unet, 64, {
        "down_1": (4, 32, 32), "down_2": (8, 16, 16), "down_3": (16, 8, 8), "down_4": (32, 4, 4),
        "upcat_4": (16, 8, 8), "upcat_3": (8, 16, 16), "upcat_2": (4, 32, 32), "upcat_1": (4, 64, 64),
    }),
    "swinunetr": (swin_unetr, 64, {
        **{f"swinViT.layers{i + 1}.0.blocks.{j}": (12 * 2**i, 32 // 2**i, 32 // 2**i)
           for i in range(4) for j in (0, 1)},
        "decoder5": (96, 4, 4), "decoder4": (48, 8, 8), "decoder3": (24, 16, 16), "decoder2": (12, 32, 32),
        "decoder1": (12, 64, 64),
    }),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_tap_shapes_and_eval_logits(name, needs_monai):
    build, side, expected = BACKBONES[name]
    torch.manual_seed(0)
    net = build()
    feats, logits = capture(net, torch.randn(2, 1, side, side))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    assert logits.shape == (2, 3, side, side)
    net.eval()
    out = net(torch.randn(2, 1, side, side))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, side, side)


def test_basic_unet_taps_at_224(needs_monai):
    with torch.device("meta"):  # shapes only: meta tensors skip the init and the 224 x 224 arithmetic
        net = monai_basic_unet(1, 9).eval()
    with torch.no_grad():
        feats, logits = capture(net, torch.zeros(1, 1, 224, 224, device="meta"))
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    assert shapes == {
        "down_1": (32, 112, 112), "down_2": (64, 56, 56), "down_3": (128, 28, 28), "down_4": (256, 14, 14),
        "upcat_4": (128, 28, 28), "upcat_3": (64, 56, 56), "upcat_2": (32, 112, 112), "upcat_1": (32, 224, 224),
    }
    assert logits.shape == (1, 9, 224, 224)


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("term", ["scr", "ifd"])
def test_gradients_reach_every_tapped_block_but_not_final_through_scr(name, term, needs_monai):
    torch.manual_seed(0)
    net = BACKBONES[name][0]()
    spec = net.tap_spec
    feats, _ = capture(net, torch.randn(2, 1, 64, 64))
    if term == "scr":
        loss = SelfRegLoss({}, spec.scr_groups, lambda_scr=1.0, lambda_ifd=0.0)
    else:
        loss = SelfRegLoss(spec.ifd_groups, {}, lambda_scr=0.0, lambda_ifd=1.0)
    loss(feats, feats[spec.final])[0].backward()
    for path in spec.paths[:-1]:
        params = list(net.get_submodule(path).named_parameters())
        assert params, path
        for pname, p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{path}.{pname}"
    if term == "scr":
        head = net.final_conv if name == "basicunet" else net.out
        for module in (net.get_submodule(spec.final), head):
            assert all(p.grad is None for p in module.parameters())


def test_swin_unetr_spec_lists_channels_last_blocks_and_largest_final():
    spec = monai_swin_unetr_tap_spec((2, 2, 4, 2))
    assert spec.final == "decoder1"
    assert spec.ifd_groups["encoder_last"] == tuple(f"swinViT.layers{i}.0.blocks.{j}"
                                                    for i, j in ((1, 1), (2, 1), (3, 3), (4, 1)))
    assert set(spec.nhwc) == {p for p in spec.paths if p.startswith("swinViT")}
    assert spec.scr_groups["last_blocks"][:4] == ("decoder5", "decoder4", "decoder3", "decoder2")
    with pytest.raises(ValueError, match="depths"):
        monai_swin_unetr_tap_spec((2, 2, 2))
    assert monai_basic_unet_tap_spec().paths[-1] == "upcat_1"


def test_misspelled_tap_fails_with_the_module_list(needs_monai):
    net = basic_unet()
    with pytest.raises(ValueError) as err:
        FeatureTaps(net, ["down_1", "down_l"])
    message = str(err.value)
    assert "'down_l'" in message and "did you mean" in message and "down_1" in message and "upcat_1" in message


@pytest.mark.parametrize("name", list(BACKBONES))
def test_short_fit_with_selfreg(name, synapse_dir, needs_monai):
    pl.seed_everything(0)
    build, side, _ = BACKBONES[name]  # SwinUNETR: sides multiple of 32, >= 64 (InstanceNorm on the 1/32 map)
    dm = SynapseDataModule(synapse_dir, image_size=side, batch_size=2, val_cases=(), transform=None)
    module = SelfRegSegModule(build(num_classes=9), 9, input_size=side)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[SelfReg()], log_every_n_steps=1)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in ("selfreg/scr", "selfreg/ifd", "train/loss"):
        assert math.isfinite(float(metrics[key])) and float(metrics[key]) > 0, key
    assert all(not m._forward_hooks for m in module.net.modules())


def test_monai_networks_as_monai_builds_them_need_no_spec(synapse_dir, needs_monai):
    """SelfReg() on MONAI's own BasicUNet (no tap_spec attribute): the ready spec is found by the class."""
    from monai.networks.nets import BasicUNet, DynUNet, SwinUNETR

    pl.seed_everything(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=9, features=(4, 4, 8, 16, 32, 4))
    assert not hasattr(net, "tap_spec") and resolve_tap_spec(net) == monai_basic_unet_tap_spec()
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=(), transform=None)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[SelfReg()], log_every_n_steps=1)
    trainer.fit(SelfRegSegModule(net, 9, input_size=32), dm)
    assert float(trainer.callback_metrics["selfreg/scr"]) > 0 and float(trainer.callback_metrics["selfreg/ifd"]) > 0
    # the spec follows the instance: DynUNet's levels, SwinUNETR's blocks per stage
    dyn = DynUNet(2, 1, 3, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5)
    assert resolve_tap_spec(dyn) == monai_dynunet_tap_spec(6)
    assert monai_dynunet(1, 3, strides=[1, 2, 2, 2, 2, 2]).tap_spec == monai_dynunet_tap_spec(6)
    swin = SwinUNETR(1, 3, depths=(2, 2, 4, 2), feature_size=12, spatial_dims=2)
    assert resolve_tap_spec(swin) == monai_swin_unetr_tap_spec((2, 2, 4, 2))
    assert ready_tap_spec(torch.nn.Conv2d(1, 3, 1)) is None
    with pytest.raises(ValueError, match="has no `tap_spec` attribute .*nor a ready spec"):
        resolve_tap_spec(torch.nn.Conv2d(1, 3, 1))


# --backbone NAME: (overrides of the file's network arguments that keep it small, the Python spec of the file's
# network; None: the network's own tap_spec)
BACKBONE_FILES = {
    "unet": ({"base_channels": 4}, None),
    "swinunet": ({"embed_dim": 12, "window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}, None),
    "monai-basicunet": ({"features": [4, 4, 8, 8, 16, 4]}, lambda: monai_basic_unet_tap_spec()),
    "monai-dynunet": ({"filters": [4, 8, 8, 16, 16]}, lambda: monai_dynunet_tap_spec(5)),
    "monai-swinunetr": ({"feature_size": 12}, lambda: monai_swin_unetr_tap_spec((2, 2, 2, 2))),
    "smp-unet": ({"encoder_name": "resnet18"}, lambda: smp_unet_tap_spec("resnet34", 5)),
}


@pytest.mark.parametrize("name", list_models())
def test_backbone_files_resolve_to_the_python_spec_and_every_tap_fires(name):
    """Each configs/backbones file builds its network as the CLI does (the data-linked arguments included); the
    spec SelfReg resolves for it is the Python one, and every tapped path is a module whose output is captured."""
    import yaml

    from experiments.cli_errors import LINKS
    from experiments.cli_errors import import_class as _import
    from experiments.flags import backbone_file

    pytest.importorskip("monai" if name.startswith("monai") else "torch")
    if name == "smp-unet":
        pytest.importorskip("segmentation_models_pytorch")
    config = yaml.safe_load(backbone_file(name).read_text())
    overrides, python_spec = BACKBONE_FILES[name]
    cls = _import(config["model"]["net"]["class_path"])
    parameters = inspect.signature(cls).parameters
    data = {"num_classes": 3, "in_channels": 1, "spatial_dims": 2, "input_size": 64}  # SwinUNETR: >= 64
    arguments = {**(config["model"]["net"].get("init_args") or {}), **overrides}
    for source, targets, compute in LINKS:
        for target in targets:
            argument = target.removeprefix("model.net.init_args.")
            if target.startswith("model.net.init_args.") and argument in parameters:
                arguments[argument] = compute(data[source]) if compute else data[source]
    net = cls(**arguments)
    taps = ((config.get("selfreg") or {}).get("init_args") or {}).get("taps")
    spec = resolve_tap_spec(net, taps)
    assert spec == (python_spec() if python_spec else net.tap_spec)
    modules = dict(net.named_modules())
    assert set(spec.paths) <= set(modules), sorted(set(spec.paths) - set(modules))
    with FeatureTaps(net, spec.paths, spec.nhwc) as feature_taps:
        with feature_taps.capture(), torch.no_grad():
            net.eval()(torch.randn(1, 1, 64, 64))
        features = feature_taps.pop()
    assert set(features) == set(spec.paths) and all(f.ndim == 4 and f.shape[0] == 1 for f in features.values())


# ---------------------------------------------------------------- segmentation_models_pytorch


def test_smp_unet_spec_from_the_documented_layout():
    spec = smp_unet_tap_spec("resnet34")
    assert spec.ifd_groups == {"encoder": ("encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"),
                               "decoder": ("decoder.blocks.0", "decoder.blocks.1", "decoder.blocks.2",
                                           "decoder.blocks.3")}
    assert spec.final == "decoder.blocks.4"
    assert smp_unet_tap_spec("resnet18", encoder_depth=3).paths == (
        "encoder.layer1", "encoder.layer2", "decoder.blocks.0", "decoder.blocks.1", "decoder.blocks.2")
    with pytest.raises(ValueError, match="list_tap_candidates"):
        smp_unet_tap_spec("efficientnet-b0")
    with pytest.raises(ValueError, match="encoder_depth"):
        smp_unet_tap_spec("resnet34", encoder_depth=6)


def test_smp_unet_taps():
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception as err:  # ImportError, or RuntimeError from a torchvision built for another torch
        pytest.skip(f"segmentation_models_pytorch is not importable here ({type(err).__name__}: {err}); it needs "
                    "timm and a torchvision matching the installed torch")
    net = smp_unet(1, 3, encoder_name="resnet18")
    feats, logits = capture(net, torch.randn(2, 1, 64, 64))
    assert {k: v.shape[-1] for k, v in feats.items()} == {
        "encoder.layer1": 16, "encoder.layer2": 8, "encoder.layer3": 4, "encoder.layer4": 2,
        "decoder.blocks.0": 4, "decoder.blocks.1": 8, "decoder.blocks.2": 16, "decoder.blocks.3": 32,
        "decoder.blocks.4": 64,
    }
    assert logits.shape == (2, 3, 64, 64)


# ---------------------------------------------------------------- registry (unet / swinunet need no MONAI)


def test_registry_names_and_unknown_name():
    assert list_models() == ["monai-basicunet", "monai-dynunet", "monai-swinunetr", "smp-unet", "swinunet", "unet"]
    with pytest.raises(KeyError, match="Unknown model 'unte'; available models: monai-basicunet, .*unet"):
        create_model("unte", 1, 3)


def test_registry_builds_unet_and_swinunet(tmp_path):
    net = create_model("unet", 1, 3, base_channels=4, depth=2)
    assert isinstance(net, UNet) and net.tap_spec.final == "up2"
    tiny = dict(img_size=32, patch_size=2, embed_dim=12, num_heads=(1, 2, 4, 8), window_size=4)
    torch.manual_seed(0)
    source = SwinUnet(num_classes=3, **tiny)
    path = tmp_path / "swin.pth"
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k.startswith("layers.")}}, path)
    net = create_model("swinunet", 1, 3, pretrained=str(path), **tiny)
    assert isinstance(net, SwinUnet) and (net.in_chans, net.embed_chans) == (1, 3) and net.tap_spec.final == "up"
    assert torch.equal(net.state_dict()["layers_up.3.blocks.0.attn.qkv.weight"],
                       source.state_dict()["layers.0.blocks.0.attn.qkv.weight"])
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert create_model("swinunet", 4, 3, **tiny).in_chans == 4
    with pytest.raises(ValueError, match="img_size"):
        create_model("swinunet", 1, 3, img_size=96)


def test_registry_builds_monai_backbones(needs_monai):
    net = create_model("monai-basicunet", 1, 3, features=(4, 4, 8, 16, 32, 4))
    assert net.tap_spec == monai_basic_unet_tap_spec()
    net = create_model("monai-swinunetr", 1, 3, feature_size=12)
    assert net.tap_spec == monai_swin_unetr_tap_spec()


@pytest.mark.parametrize("name, module", [("monai-basicunet", "monai.networks.nets"),
                                          ("monai-swinunetr", "monai.networks.nets"),
                                          ("monai-swinunetr", "einops")])
def test_missing_monai_gives_the_install_hint(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r"pip install 'lightning_selfreg\[monai\]'"):
        create_model(name, 1, 3)
