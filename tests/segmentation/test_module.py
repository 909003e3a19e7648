import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_selfreg import AuxiliaryLoss, SelfReg, SelfRegSegModule
from lightning_selfreg.data import DataError, SynapseDataModule
from lightning_selfreg.models import UNet


def make(synapse_dir, val_cases=(), **module_kwargs):
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=val_cases)
    net = UNet(1, 9, base_channels=4, depth=2)
    module = SelfRegSegModule(net, 9, input_size=32, **module_kwargs)
    return dm, module


def trainer(callbacks=(), **kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_steps=2, num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class ConstantTerm(AuxiliaryLoss):
    def auxiliary_loss(self, pl_module, batch, logits):
        value = logits.new_tensor(5.0)
        return value, {"aux/const": value}


def test_auxiliary_loss_callback_adds_its_term(synapse_dir):
    pl.seed_everything(0)
    dm, module = make(synapse_dir, lr_schedule="constant")
    t = trainer([ConstantTerm()], max_steps=1, log_every_n_steps=1)
    t.fit(module, dm)
    metrics = t.callback_metrics
    seg = 0.4 * metrics["train/ce"] + 0.6 * metrics["train/dice"]
    assert metrics["aux/const"] == 5.0
    assert torch.allclose(metrics["train/loss"], seg + 5.0, atol=1e-5)


def test_selfreg_callback_fit_test_and_logs(synapse_dir):
    pl.seed_everything(0)
    dm, module = make(synapse_dir)
    selfreg = SelfReg(lambda_scr=0.5, lambda_ifd=0.25)
    t = trainer([selfreg], max_steps=3, log_every_n_steps=1)
    t.fit(module, dm)
    metrics = t.callback_metrics
    for key in ("selfreg/scr", "selfreg/ifd", "selfreg/total", "train/ce", "train/dice", "train/loss"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert torch.allclose(metrics["selfreg/total"], 0.5 * metrics["selfreg/scr"] + 0.25 * metrics["selfreg/ifd"])
    assert selfreg._taps is None, "hooks must be removed at teardown"
    assert all(not m._forward_hooks for m in module.net.modules())
    t.test(module, dm, verbose=False)
    results = module.test_results
    assert set(results) == {"num_cases", "dice_mean", "iou_mean", "hd95_mean", "per_class"}
    assert results["num_cases"] == 1
    assert set(module.test_results_by_protocol) == {"strict", "transunet"}
    assert module.test_results_by_protocol["strict"] is results
    assert list(results["per_class"]) == [f"class_{i}" for i in range(1, 9)]
    assert results["per_class"]["class_5"]["dice"] is not None  # the only organ in the test volume
    assert results["per_class"]["class_1"]["dice"] is None or results["per_class"]["class_1"]["dice"] == 0.0


class RecordingSelfReg(SelfReg):
    def __init__(self):
        super().__init__()
        self.captured_outside_training = []

    def on_validation_batch_end(self, *args, **kwargs):
        self.captured_outside_training.append(len(self._taps._features))


def test_nothing_is_captured_during_validation(synapse_dir):
    pl.seed_everything(0)
    dm, module = make(synapse_dir, val_cases=["case0001"])
    cb = RecordingSelfReg()
    t = trainer([cb], max_steps=2, limit_val_batches=None, val_check_interval=1, check_val_every_n_epoch=None)
    t.fit(module, dm)
    assert cb.captured_outside_training and set(cb.captured_outside_training) == {0}
    assert "val/dice" in t.callback_metrics and "val/dice/class_1" in t.callback_metrics


def test_selfreg_state_is_checkpointed_and_restored(synapse_dir, tmp_path):
    pl.seed_everything(0)
    dm, module = make(synapse_dir)
    cb = SelfReg()
    t = trainer([cb], max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, dm)
    ckpt = torch.load(t.checkpoint_callback.best_model_path or t.checkpoint_callback.last_model_path,
                      weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SelfReg"))
    assert state["seed"] == cb.seed and torch.equal(state["generator_state"], cb._generator.get_state())
    restored = SelfReg()
    restored.load_state_dict(state)
    g = restored._get_generator(torch.device("cpu"))
    assert torch.equal(torch.randperm(50, generator=g), torch.randperm(50, generator=cb._generator))


def test_selfreg_needs_a_tap_spec(synapse_dir):
    dm, _ = make(synapse_dir)
    module = SelfRegSegModule(nn.Sequential(nn.Conv2d(1, 9, 1)), 9)
    with pytest.raises(ValueError, match="no `tap_spec`"):
        trainer([SelfReg()]).fit(module, dm)


def test_selfreg_with_explicit_taps_on_a_foreign_network(synapse_dir):
    net = nn.Sequential()
    net.add_module("enc", nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    net.add_module("dec", nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()))
    net.add_module("head", nn.Conv2d(4, 9, 1))
    dm, _ = make(synapse_dir)
    module = SelfRegSegModule(net, 9, input_size=32)
    t = trainer([SelfReg(taps={"encoder": ["enc"], "decoder": [], "final": "dec"})], log_every_n_steps=1)
    t.fit(module, dm)  # an empty decoder list is dropped from the IFD groups
    assert t.callback_metrics["selfreg/ifd"] > 0
    t = trainer([SelfReg(taps={"final": "dec", "ifd_groups": {"enc": ["enc"]}, "scr_groups": {"all": ["enc"]}})],
                log_every_n_steps=1)
    t.fit(module, dm)
    assert t.callback_metrics["selfreg/scr"] > 0


def test_bad_module_options():
    net = UNet(1, 3, base_channels=4, depth=2)
    with pytest.raises(ValueError, match="optimizer"):
        SelfRegSegModule(net, 3, optimizer="lbfgs")
    with pytest.raises(ValueError, match="foreground"):
        SelfRegSegModule(net, 3, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="warmup_steps"):
        SelfReg(warmup_steps=-1)
    with pytest.raises(ValueError, match="pairing"):
        SelfReg(pairing="nope")


def test_warmup_ramp():
    cb = SelfReg(warmup_steps=10)
    assert [cb.lambda_scale(s) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]


def test_poly_schedule_matches_the_authors_formula(synapse_dir):
    dm, module = make(synapse_dir, lr=0.1, lr_schedule="poly")
    t = trainer(max_steps=-1, max_epochs=2)
    t.fit(module, dm)
    total = t.estimated_stepping_batches
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * (1 - t.global_step / total) ** 0.9)


class StepRecorder(pl.Callback):
    """Per optimizer step: the learning rate it used and the logged SelfReg terms."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append({"step": trainer.global_step - 1, "lr": self.lr,
                          **{k: float(v) for k, v in metrics.items() if k.startswith(("selfreg/", "train/"))}})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lr = optimizer.param_groups[0]["lr"]


def test_poly_power_shapes_every_step_of_the_schedule(synapse_dir):
    """lr_t = lr * (1 - t / T) ** poly_power at every step t (a power other than the default 0.9)."""
    dm, module = make(synapse_dir, lr=0.1, lr_schedule="poly", poly_power=2.0)
    recorder = StepRecorder()
    t = trainer([recorder], max_steps=-1, max_epochs=2)
    t.fit(module, dm)
    total = t.estimated_stepping_batches
    assert len(recorder.rows) == total >= 4
    for row in recorder.rows:
        assert row["lr"] == pytest.approx(0.1 * (1 - row["step"] / total) ** 2.0), row


def test_selfreg_warmup_ramps_the_term_that_is_trained_on(synapse_dir):
    """In fit, SelfReg's term at step t is min(1, t / warmup_steps) x its full weight, in the loss and in the logs."""
    dm, module = make(synapse_dir)
    recorder = StepRecorder()
    t = trainer([SelfReg(warmup_steps=4), recorder], max_steps=6, log_every_n_steps=1)
    t.fit(module, dm)
    assert [r["step"] for r in recorder.rows] == list(range(6))
    for row in recorder.rows:
        scale = min(1.0, row["step"] / 4)
        full = 0.015 * row["selfreg/scr"] + 0.015 * row["selfreg/ifd"]
        assert full > 0, row
        assert row["selfreg/total"] == pytest.approx(scale * full, rel=1e-5, abs=1e-9), row
        assert row["selfreg/lambda_scr"] == pytest.approx(0.015 * scale)
        # the trained loss holds the ramped term: the segmentation loss plus it
        assert row["train/loss"] == pytest.approx(0.4 * row["train/ce"] + 0.6 * row["train/dice"] +
                                                  row["selfreg/total"], rel=1e-5), row


# ---------------------------------------------------------------- test metrics of a known prediction


class FixedPrediction(nn.Module):
    """A 'network' that returns stored logits: slice ``d`` of the test image is filled with the value ``d``."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)  # (D, K, h, w), at the module's input size

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].round().long()]


def score_known_prediction(logits, label, spacing=(3.0, 0.8, 0.6)):
    """Test metrics by protocol of one case whose network outputs ``logits`` (D, K, h, w) at input size (h, w)."""
    d, k, h, w = logits.shape
    image = torch.arange(d, dtype=torch.float32)[:, None, None, None].expand(d, 1, *label.shape[-2:]).clone()
    case = {"image": image, "label": label, "case": "case0001", "spacing": torch.tensor(spacing)}
    module = SelfRegSegModule(FixedPrediction(logits), k, input_size=(h, w))
    trainer().test(module, torch.utils.data.DataLoader([case], batch_size=None), verbose=False)
    return module.test_results_by_protocol


def one_hot_logits(mask, k):
    """Logits (D, K, h, w) of a label mask (D, h, w): 10 for its class, 0 for the others."""
    return 10.0 * torch.nn.functional.one_hot(mask, k).permute(0, 3, 1, 2).float()


def upsample2(mask):
    """Nearest-neighbour x2 in-plane (what the transunet protocol's nearest resize does at an integer factor)."""
    return mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def per_class(results, key):
    return [v[key] for v in results["per_class"].values()]


@pytest.mark.parametrize("depth", [3, 1])  # a volume, and a 2D image (D = 1: the UCTransNet rules)
def test_perfect_prediction_scores_dice_1_hd95_0_in_both_protocols(depth):
    small = torch.zeros(depth, 6, 8, dtype=torch.long)  # input size (6, 8), native (12, 16)
    small[:, 1:3, 1:4] = 1
    small[:, 3:5, 2:6] = 2  # touches class 1
    small[-1, 0:2, 5:8] = 3
    results = score_known_prediction(one_hot_logits(small, 4), upsample2(small))
    for protocol in ("strict", "transunet"):
        assert per_class(results[protocol], "dice") == [1.0, 1.0, 1.0], protocol
        assert per_class(results[protocol], "hd95") == [0.0, 0.0, 0.0], protocol


def test_shifted_prediction_scores_the_hand_computed_hd95():
    # gt: a 4 x 6 rectangle on both slices of a 2-slice volume, so every voxel is a surface voxel (z border);
    # prediction: the same rectangle 2 native columns (1 input pixel) to the right.
    small = torch.zeros(2, 4, 8, dtype=torch.long)
    small[:, 1:3, 1:4] = 1
    gt = upsample2(small)
    results = score_known_prediction(one_hot_logits(torch.roll(small, 1, dims=-1), 2), gt, spacing=(3.0, 0.8, 0.6))
    # per row of 6 voxels each way: 4 at distance 0, one at 1 column, one at 2 columns; both directions pooled over
    # 8 rows: 64 zeros, 16 ones, 16 twos -> p95 (position 0.95 * 95 = 90.25) = 2 columns; Dice = 2 * 4 / 12
    for protocol, column in (("strict", 0.6), ("transunet", 1.0)):  # mm (x spacing 0.6) / voxels
        assert results[protocol]["per_class"]["class_1"]["hd95"] == pytest.approx(2 * column), protocol
        assert results[protocol]["per_class"]["class_1"]["dice"] == pytest.approx(2 / 3), protocol


@pytest.mark.parametrize(("depth", "strict_hd95"), [(2, 0.8), (1, 1.0)])
def test_each_protocol_scores_its_own_prediction(depth, strict_hd95):
    """strict: bilinear logits at native size; transunet: argmax at input size, resized with nearest neighbour."""
    small = torch.zeros(depth, 4, 8, dtype=torch.long)
    small[:, 1:3, 2:4] = 1
    gt = upsample2(small)  # a 4 x 4 square per slice
    # class-1 logit +5 inside, -1 outside (background 0): the bilinear x2 upsampling is positive one native pixel
    # beyond each edge (0.75 * -1 + 0.25 * 5), so the strict prediction is the square grown by one pixel on each
    # side (corners excluded, 16 + 16 pixels), while the nearest-resized argmax is the square itself.
    logits = torch.zeros(depth, 2, 4, 8)
    logits[:, 1] = torch.where(small == 1, 5.0, -1.0)
    results = score_known_prediction(logits, gt, spacing=(3.0, 0.8, 0.6))
    transunet, strict = results["transunet"]["per_class"]["class_1"], results["strict"]["per_class"]["class_1"]
    assert (transunet["dice"], transunet["hd95"]) == (1.0, 0.0)
    assert strict["dice"] == pytest.approx(2 * 16 / (16 + 32))
    # 2 slices (mm): every voxel is a surface voxel (z border); the 16 grown voxels are 0.8 (rows) or 0.6 mm
    # (columns) from the square, all others at 0: 64 zeros, 16 x 0.6, 16 x 0.8 -> p95 (position 90.25) = 0.8.
    # 1 slice (a 2D image, voxels): pred surface = the 16 grown pixels, all at 1; gt surface = 12 pixels at 1 ->
    # 28 ones -> 1.
    assert strict["hd95"] == pytest.approx(strict_hd95)


def test_missed_and_spurious_organs_are_scored_as_each_protocol_defines():
    # class 1 right, class 2 predicted but absent from gt, class 3 in gt but missed, class 4 in neither
    small_gt = torch.zeros(2, 4, 8, dtype=torch.long)
    small_gt[:, 0:2, 0:3] = 1
    small_gt[1, 2:4, 5:8] = 3
    small_pred = small_gt.clone()
    small_pred[small_pred == 3] = 0
    small_pred[0, 3, 0:2] = 2
    spacing = (3.0, 0.8, 0.6)
    results = score_known_prediction(one_hot_logits(small_pred, 5), upsample2(small_gt), spacing)
    # transunet (calculate_metric_percase): pred-only -> (1, 0); empty prediction -> (0, 0), missed or not
    assert per_class(results["transunet"], "dice") == [1.0, 1.0, 0.0, 0.0]
    assert per_class(results["transunet"], "hd95") == [0.0, 0.0, 0.0, 0.0]
    assert results["transunet"]["dice_mean"] == pytest.approx(0.5)
    # strict: present in exactly one volume -> Dice 0 and the worst case (field-of-view diagonal, mm); neither ->
    # excluded (None), and left out of the class means
    worst = math.sqrt((2 * 3.0) ** 2 + (8 * 0.8) ** 2 + (16 * 0.6) ** 2)
    assert per_class(results["strict"], "dice") == [1.0, 0.0, 0.0, None]
    assert per_class(results["strict"], "hd95") == [0.0, pytest.approx(worst), pytest.approx(worst), None]
    assert results["strict"]["dice_mean"] == pytest.approx(1 / 3)
    assert results["strict"]["hd95_mean"] == pytest.approx(2 * worst / 3)


# ---------------------------------------------------------------- data errors


def _rewrite(path, **arrays):
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((24, 20), np.float32)}, "missing key"),
        ({"image": np.zeros((24, 20), np.float32), "label": np.zeros((24, 21), np.uint8)}, "does not match"),
        ({"image": np.full((24, 20), np.nan, np.float32), "label": np.zeros((24, 20), np.uint8)}, "NaN"),
        ({"image": np.zeros((24, 20), np.float32), "label": np.full((24, 20), 9, np.uint8)}, r"\[0, 9\)"),
    ],
)
def test_bad_slice_files_are_named_in_the_error(synapse_dir, arrays, message):
    bad = synapse_dir / "train_npz" / "case0001_slice001.npz"
    _rewrite(bad, **arrays)
    dm = SynapseDataModule(synapse_dir, image_size=32, val_cases=())
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    index = [item.path for item in dataset.items].index(bad)
    with pytest.raises(DataError, match=message) as err:
        dataset[index]
    assert str(bad) in str(err.value)


def test_layout_errors(synapse_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        SynapseDataModule(tmp_path / "nowhere").check_layout()
    (synapse_dir / "lists" / "test_vol.txt").unlink()
    with pytest.raises(DataError, match="no folder with train.txt and test_vol.txt .* found lists/ holds train.txt"):
        SynapseDataModule(synapse_dir, val_cases=()).check_layout()
    (synapse_dir / "lists" / "test_vol.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        SynapseDataModule(synapse_dir, val_cases=()).setup("test")
    with pytest.raises(DataError, match="`val_cases` case9999 is not among"):
        SynapseDataModule(synapse_dir, val_cases=["case9999"]).setup("fit")
    (synapse_dir / "test_vol_h5" / "case0100.npy.h5").write_bytes(b"not hdf5")
    (synapse_dir / "lists" / "test_vol.txt").write_text("case0100\n")
    dm = SynapseDataModule(synapse_dir, val_cases=())
    dm.setup("test")
    with pytest.raises(DataError, match="case0100.npy.h5: cannot be read as HDF5"):
        dm.test_dataloader().dataset[0]


# ---------------------------------------------------------------- predictions on disk, hyper-parameters


def threshold_net():
    """A 1x1 convolution predicting class 1 where the image is above 0.5."""
    net = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -5.0]))
    return net


def test_prediction_writer_writes_test_and_predict_outputs_at_the_native_grid(tmp_path):
    pytest.importorskip("nibabel")
    import nibabel as nib
    from PIL import Image

    from lightning_selfreg.callbacks import TestPredictionWriter

    volume = torch.zeros(3, 6, 5, dtype=torch.long)
    volume[1:, 2:5, 1:4] = 1
    affine = torch.tensor([[0.0, 0.0, 2.5, 10.0], [0.0, 0.7, 0.0, -3.0], [0.8, 0.0, 0.0, 1.0], [0, 0, 0, 1.0]])
    image_2d = torch.zeros(1, 4, 7, dtype=torch.long)
    image_2d[0, 1:3, 2:6] = 1
    spacing = torch.tensor([2.5, 0.7, 0.8])
    cases = [{"image": volume[:, None].float(), "label": volume, "case": "vol", "spacing": spacing, "affine": affine},
             {"image": image_2d[:, None].float(), "label": image_2d, "case": "img"}]
    loader = torch.utils.data.DataLoader(cases, batch_size=None)
    module = SelfRegSegModule(threshold_net(), 2)
    trainer([TestPredictionWriter(tmp_path / "test")]).test(module, loader, verbose=False)
    trainer([TestPredictionWriter(tmp_path / "predict")]).predict(module, loader)
    for folder in ("test", "predict"):
        image = nib.load(tmp_path / folder / "vol.nii.gz")
        written = np.asarray(image.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)
        assert np.array_equal(written, volume.numpy()) and np.allclose(image.affine, affine.numpy()), folder
        mask = np.asarray(Image.open(tmp_path / folder / "img.png"))
        assert np.array_equal(mask, image_2d[0].numpy() * 255), folder  # binary: 0 / 255
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["img.png", "vol.nii.gz"]


CLI_ARGS = ["--model.net", "lightning_selfreg.models.UNet", "--model.net.init_args.in_channels", "1",
            "--model.net.init_args.num_classes", "3", "--model.net.init_args.base_channels", "4",
            "--model.net.init_args.depth", "2", "--model.num_classes", "3"]


def cli_checkpoint(tmp_path, args, monkeypatch):
    """A LightningCLI-built module and the checkpoint it saves (without training)."""
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli"])  # `args` only, not pytest's command line
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path))
    cli = LightningCLI(SelfRegSegModule, run=False, args=args, trainer_defaults=defaults,
                       save_config_callback=None, seed_everything_default=False)
    cli.trainer.strategy.connect(cli.model)
    path = tmp_path / "cli.ckpt"
    cli.trainer.save_checkpoint(path)
    return cli.model, path


def test_checkpoint_of_a_lightning_cli_module_alone_rebuilds_the_network(tmp_path, monkeypatch):
    module, path = cli_checkpoint(tmp_path, CLI_ARGS, monkeypatch)
    assert module.hparams["net"]["class_path"] == "lightning_selfreg.models.UNet"
    restored = SelfRegSegModule.load_from_checkpoint(path)  # no `net=`: built from the stored class_path config
    assert isinstance(restored.net, UNet) and restored.net.in_channels == 1
    assert restored.hparams["net"] == module.hparams["net"]  # kept: a re-saved checkpoint rebuilds it as well
    expected = module.state_dict()
    assert restored.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in restored.state_dict().items())
    plain = SelfRegSegModule(UNet(1, 3, base_channels=4, depth=2), 3)  # built in Python: weights only
    assert "net" not in plain.hparams and "net" not in plain.hparams_initial
    assert plain.hparams == plain.hparams_initial


def test_a_cli_network_config_keeps_only_the_arguments_its_class_takes(tmp_path, monkeypatch):
    """LightningCLI writes every applied link into the `net` config (here `img_size`, which a UNet refuses)."""
    from lightning.pytorch.cli import LightningCLI

    class Data(pl.LightningDataModule):
        input_size = 32

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.input_size", "model.net.init_args.img_size", apply_on="instantiate")

    monkeypatch.setattr("sys.argv", ["cli"])
    cli = CLI(SelfRegSegModule, Data, run=False, args=CLI_ARGS, save_config_callback=None,
              seed_everything_default=False, trainer_defaults=dict(accelerator="cpu", logger=False))
    assert cli.model.hparams["net"]["init_args"] == {"in_channels": 1, "num_classes": 3, "base_channels": 4,
                                                     "depth": 2, "spatial_dims": 2}
    assert cli.model.hparams_initial["net"] == cli.model.hparams["net"]
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(tmp_path / "linked.ckpt")
    assert isinstance(SelfRegSegModule.load_from_checkpoint(tmp_path / "linked.ckpt").net, UNet)


def test_cli_checkpoint_of_a_pretrained_swinunet_loads_without_the_pretrained_file(tmp_path, monkeypatch):
    from lightning_selfreg.models import SwinUnet

    tiny = dict(img_size=32, patch_size=2, in_chans=1, num_classes=3, embed_dim=12, num_heads=[1, 2, 4, 8],
                window_size=4)
    weights = tmp_path / "swin.pth"
    torch.save({"model": SwinUnet(**tiny).state_dict()}, weights)
    args = ["--model.net", "lightning_selfreg.models.SwinUnet", "--model.num_classes", "3", "--model.input_size",
            "32", *(f"--model.net.init_args.{k}={v}" for k, v in {**tiny, "pretrained": weights}.items())]
    module, path = cli_checkpoint(tmp_path, args, monkeypatch)
    assert torch.equal(module.net.patch_embed.proj.weight, torch.load(weights)["model"]["patch_embed.proj.weight"])
    weights.unlink()  # the checkpoint alone: the initialisation file is gone
    restored = SelfRegSegModule.load_from_checkpoint(path)
    assert restored.hparams["net"]["init_args"]["pretrained"] is None
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in restored.state_dict().items())
