import logging

import lightning.pytorch as pl
import pytest
import torch

from lightning_selfreg import FeatureTaps, SelfReg, SelfRegLoss, SelfRegSegModule
from lightning_selfreg.data import SynapseDataModule
from lightning_selfreg.models.swin_unet import SwinBlock, SwinUnet

PAPER_TAPS_224 = {  # docs/method.md §4
    **{f"layers.{i}.blocks.{j}": (96 * 2**i, 56 // 2**i, 56 // 2**i) for i in range(4) for j in range(2)},
    **{f"layers_up.{k}.blocks.{j}": (768 // 2**k, 7 * 2**k, 7 * 2**k) for k in range(1, 4) for j in range(2)},
    "up": (96, 224, 224),
}

# Microsoft Swin checkpoint keys of the first encoder stage and the stage-independent ones (swin_tiny format).
MICROSOFT_KEYS = [
    "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias",
    "layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias",
    "layers.0.blocks.0.attn.relative_position_bias_table", "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.qkv.bias", "layers.0.blocks.0.attn.proj.weight", "layers.0.blocks.0.attn.proj.bias",
    "layers.0.blocks.0.norm2.weight", "layers.0.blocks.0.norm2.bias", "layers.0.blocks.0.mlp.fc1.weight",
    "layers.0.blocks.0.mlp.fc1.bias", "layers.0.blocks.0.mlp.fc2.weight", "layers.0.blocks.0.mlp.fc2.bias",
    "layers.0.downsample.reduction.weight", "layers.0.downsample.norm.weight", "layers.0.downsample.norm.bias",
    "norm.weight", "norm.bias",
]


def tiny(**kwargs):
    """A 32x32 SwinUnet: token maps 16, 8, 4, 2 with window 4 (the 4x4 and 2x2 maps are one window)."""
    config = dict(img_size=32, patch_size=2, num_classes=3, embed_dim=12, num_heads=(1, 2, 4, 8), window_size=4,
                  drop_path_rate=0.1)
    return SwinUnet(**{**config, **kwargs})


def test_paper_swin_unet_taps_at_224():
    net = SwinUnet(num_classes=9)
    assert sum(p.numel() for p in net.parameters()) == 27_168_900  # Swin-Unet's reported 27.17M
    spec = net.tap_spec
    sizes = {name: len(taps) for name, taps in spec.ifd_groups.items()}
    assert sizes == {"encoder_last": 4, "encoder_first": 4, "decoder_first": 3, "decoder_last": 3}
    assert spec.scr_groups["last_blocks"] == (
        "layers_up.1.blocks.1", "layers_up.2.blocks.1", "layers_up.3.blocks.1",
        "layers.0.blocks.1", "layers.1.blocks.1", "layers.2.blocks.1", "layers.3.blocks.1",
    )
    assert spec.scr_groups["first_blocks"] == tuple(p.replace("blocks.1", "blocks.0")
                                                    for p in spec.scr_groups["last_blocks"])
    assert spec.final == "up" and set(spec.nhwc) == set(PAPER_TAPS_224)
    net.eval()
    with FeatureTaps(net, spec.paths, spec.nhwc) as taps, taps.capture() as feats, torch.no_grad():
        logits = net(torch.randn(1, 1, 224, 224))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == PAPER_TAPS_224
    assert logits.shape == (1, 9, 224, 224)


def test_tiny_forward_returns_logits_in_train_and_eval():
    torch.manual_seed(0)
    net = tiny()
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32)
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32)
    assert torch.equal(out, net(x))  # no stochastic depth in eval


def test_one_channel_input_is_repeated_to_three():
    torch.manual_seed(0)
    net = tiny().eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(net(x), net(x.repeat(1, 3, 1, 1)))
    grey = tiny(in_chans=1)  # keeps the 3-channel embedding of the ImageNet weights
    assert grey.patch_embed.proj.in_channels == 3 and grey(x).shape == (2, 3, 32, 32)


def test_swin_block_matches_monai_and_shifted_windows_differ():
    swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 16)
    outputs = {}
    for shift in (0, 2):
        ours = SwinBlock(16, (8, 8), num_heads=2, window=4, shift=shift, mlp_ratio=4.0, qkv_bias=True,
                         drop_path=0.0)
        ref = swin_unetr.SwinTransformerBlock(16, 2, (4, 4), (shift, shift), 4.0, True)
        state = {k.replace("mlp.fc", "mlp.linear"): v for k, v in ours.state_dict().items()}
        assert ref.load_state_dict(state, strict=False).unexpected_keys == []
        mask = swin_unetr.compute_mask([8, 8], (4, 4), (shift, shift), x.device) if shift else None
        outputs[shift] = ours(x)
        torch.testing.assert_close(outputs[shift], ref(x, mask))
        if shift:
            torch.testing.assert_close(ours.attn_mask, mask)
    assert not torch.allclose(outputs[0], outputs[2])


def capture(net, x):
    spec = net.tap_spec
    with FeatureTaps(net, spec.paths, spec.nhwc) as taps:
        with taps.capture():
            net(x)
        return taps.pop()


@pytest.mark.parametrize("term", ["scr", "ifd"])
def test_selfreg_gradients_reach_every_tapped_block_but_not_final_through_scr(term):
    torch.manual_seed(0)
    net = tiny(drop_path_rate=0.0)
    spec = net.tap_spec
    feats = capture(net, torch.randn(2, 1, 32, 32))
    if term == "scr":
        loss = SelfRegLoss({}, spec.scr_groups, lambda_scr=1.0, lambda_ifd=0.0)
    else:
        loss = SelfRegLoss(spec.ifd_groups, {}, lambda_scr=0.0, lambda_ifd=1.0)
    total, _ = loss(feats, feats[spec.final])
    total.backward()
    for path in spec.paths[:-1]:
        for name, p in net.get_submodule(path).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{path}.{name}"
    if term == "scr":  # F_final is the detached teacher: its producer and the head get nothing
        assert all(p.grad is None for p in net.up.parameters())
        assert all(p.grad is None for p in net.norm_up.parameters())
        assert net.output.weight.grad is None


def test_misspelled_tap_fails_with_the_available_names():
    net = tiny()
    with pytest.raises(ValueError) as err:
        FeatureTaps(net, ["layers.0.blocks.0", "layers.0.blokcs.1"])
    message = str(err.value)
    assert "did you mean 'layers.0.blocks.1'" in message and "layers_up.3.blocks.1" in message


def test_bad_sizes_and_arguments_fail_clearly():
    net = tiny()
    with pytest.raises(ValueError, match=r"expects input \(B, 3 or 1, 32, 32\), found \(1, 1, 48, 48\)"):
        net(torch.zeros(1, 1, 48, 48))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"`img_size` \(100, 100\).*multiple of .* = 224, e.g. img_size=224"):
        SwinUnet(img_size=100)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match=r"num_heads\[1\]"):
        tiny(num_heads=(1, 5, 4, 8))
    with pytest.raises(ValueError, match="depths"):
        tiny(depths=(2,), num_heads=(1,))


def test_encoder_names_match_microsoft_swin_checkpoints():
    own = tiny().state_dict()
    assert [k for k in MICROSOFT_KEYS if k not in own] == []


def _microsoft_checkpoint(path, **kwargs):
    """A fabricated Microsoft-format Swin checkpoint: the encoder of a tiny SwinUnet plus an ImageNet head."""
    torch.manual_seed(1)
    source = tiny(**kwargs)
    state = {k: v.clone() for k, v in source.state_dict().items() if k.startswith(("patch_embed.", "layers.", "norm."))}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 96), torch.randn(1000)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)  # derived buffers, ignored
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["layers.2.blocks.0.attn.relative_position_bias_table"] = torch.zeros(5, 5)  # wrong shape
    torch.save({"model": state}, path)
    return state


def test_load_pretrained_fills_encoder_and_mirrored_decoder(tmp_path, caplog):
    path = tmp_path / "swin_tiny.pth"
    state = _microsoft_checkpoint(path)
    torch.manual_seed(2)
    net = tiny()
    head_before = net.output.weight.clone()
    with caplog.at_level(logging.INFO, logger="lightning_selfreg.models.swin_unet"):
        report = net.load_pretrained(path)
    own = net.state_dict()
    for key in ("patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight", "layers.1.downsample.reduction.weight",
                "layers.3.blocks.1.mlp.fc2.weight", "norm.weight"):
        assert torch.equal(own[key], state[key]), key
    for i, k in ((0, 3), (1, 2), (2, 1)):  # encoder stage i -> decoder stage 3 - i
        for key in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "blocks.1.attn.relative_position_bias_table"):
            assert torch.equal(own[f"layers_up.{k}.{key}"], state[f"layers.{i}.{key}"]), (k, key)
    assert torch.equal(net.output.weight, head_before)
    assert sorted(report["skipped_shape"]) == ["layers.2.blocks.0.attn.relative_position_bias_table",
                                               "layers_up.1.blocks.0.attn.relative_position_bias_table"]
    assert {"head.weight", "head.bias", "layers_up.3.downsample.reduction.weight",
            "layers_up.0.blocks.0.attn.qkv.weight"} <= set(report["unexpected"])
    assert {"output.weight", "concat_back_dim.1.weight", "up.expand.weight",
            "layers_up.0.expand.weight"} <= set(report["missing"])
    assert not [k for v in report.values() for k in v if k.endswith(("attn_mask", "relative_position_index"))]
    assert len(report["loaded"]) == len(set(report["loaded"])) > 100
    assert [r.levelname for r in caplog.records] == ["INFO"] and "loaded" in caplog.records[0].getMessage()


def test_load_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny().load_pretrained(tmp_path / "nope.pth")


def test_short_fit_with_selfreg_reduces_the_loss(synapse_dir):
    pl.seed_everything(0)
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=(), transform=None)
    net = tiny(num_classes=9, drop_path_rate=0.0)
    module = SelfRegSegModule(net, 9, input_size=32, optimizer="adamw", lr=2e-3, lr_schedule="constant")
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm._train, batch_size=len(dm._train))))

    def seg_loss():
        net.eval()
        with torch.no_grad():
            loss = module.segmentation_loss(net(batch["image"]), batch["label"].long())[0].item()
        net.train()
        return loss

    before = seg_loss()
    selfreg = SelfReg(lambda_scr=0.1, lambda_ifd=0.1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=12, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[selfreg], log_every_n_steps=1)
    trainer.fit(module, dm)
    assert seg_loss() < 0.9 * before
    metrics = trainer.callback_metrics
    assert metrics["selfreg/scr"] > 0 and metrics["selfreg/ifd"] > 0
    assert all(not m._forward_hooks for m in net.modules())
