"""Every failure is named: killed checkpoint writes, broken checkpoints, W&B without a network, bad predict inputs,
bad batches and tap specs in the Python API (issue 10, sections 2 and 3)."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from experiments import predict, run
from lightning_selfreg import SelfRegSegModule
from lightning_selfreg.models import UNet, create_model
from lightning_selfreg.selfreg.taps import TapSpec
from lightning_selfreg.tracking.wandb_mode import WandbUnavailable, probe_server, resolve_wandb_mode
from lightning_selfreg.utils.checkpoint import AtomicCheckpointIO, CheckpointError, check_checkpoint_file
from lightning_selfreg.utils.files import remove_orphaned_temp_files

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--batch-size", "16", "--max-epochs", "1",
        "--redundancy", "null"]
NET = {"name": "unet", "in_channels": 1, "num_classes": 9, "base_channels": 4, "depth": 2}
NET_CONFIG = {"class_path": "lightning_selfreg.models.UNet", "init_args": {k: v for k, v in NET.items() if k != "name"}}

# A writer killed mid-write: loads lightning_selfreg/utils/files.py alone (fast), starts an atomic write of real
# checkpoint bytes, writes half of them, says so and blocks until it is killed.
KILLED_WRITER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("selfreg_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
payload = open(sys.argv[3], "rb").read()

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(payload[: len(payload) // 2])
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
        f.write(payload[len(payload) // 2:])

io.atomic_write(sys.argv[2], write)
"""


def free_port():
    with socket.socket() as s:  # bound, then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECORDS = {  # the preprocessing records of the tiny checkpoints: a Synapse-style CT model, an RGB 2D-image model,
    # a two-channel nnU-Net-style volume model, and a 3D one
    "ct": dict(spatial_dims=2, image_dims=3, channel_names=["CT"], intensity=[{"scheme": "window", "low": -125.0,
               "high": 275.0}], orientation=["L", "P", "S"]),
    "rgb": dict(spatial_dims=2, image_dims=2, channel_names=["R", "G", "B"], intensity=[{"scheme": "rgb_to_0_1"}] * 3),
    "two": dict(spatial_dims=2, image_dims=3, channel_names=["CT", "T2"], orientation=["R", "A", "S"],
                intensity=[{"scheme": "ct", "low": -200.0, "high": 300.0, "mean": 50.0, "std": 80.0},
                           {"scheme": "zscore"}]),
    "3d": dict(spatial_dims=3, image_dims=3, channel_names=["CT"], orientation=["R", "A", "S"],
               intensity=[{"scheme": "window", "low": -125.0, "high": 275.0}]),
    "resampling": dict(spatial_dims=2, image_dims=3, channel_names=["CT"], orientation=["R", "A", "S"],
                       spacing=[None, 0.8, 0.8],
                       intensity=[{"scheme": "ct", "low": -200.0, "high": 300.0, "mean": 50.0, "std": 80.0}]),
}


def tiny_checkpoint(path, in_channels=None, record="ct"):
    """A checkpoint as experiments.run writes it (state_dict + hyper-parameters with the network's class_path config,
    which LightningCLI's instantiator rebuilds, and the DataModule's preprocessing record), without training.
    ``record=None``: a checkpoint written before preprocessing records existed."""
    import lightning

    torch.manual_seed(0)
    fields = RECORDS[record or "ct"]
    in_channels = in_channels or len(fields["channel_names"])
    dims = fields["spatial_dims"]
    net = {**NET_CONFIG, "init_args": {**NET_CONFIG["init_args"], "in_channels": in_channels, "spatial_dims": dims}}
    grid = {"spatial_dims": 3, "roi_size": 8} if dims == 3 else {"input_size": 32}
    module = SelfRegSegModule(UNet(**net["init_args"]), 9, **grid)
    with torch.no_grad():  # a random head without bias: the prediction varies from voxel to voxel
        module.net.outc.weight.normal_(0, 3)
        module.net.outc.bias.zero_()
    hparams = {**dict(module.hparams), "net": net, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": hparams,
                  "pytorch-lightning_version": lightning.__version__}
    if record is not None:
        checkpoint["preprocessing"] = {**fields, "class_names": module.class_names, "version": 1}
    torch.save(checkpoint, path)
    return module


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- orphaned temporary files of killed writes


def test_a_write_killed_mid_way_leaves_an_orphan_that_the_next_run_removes(tmp_path, monkeypatch):
    checkpoints = tmp_path / "runs" / "r" / "checkpoints"
    checkpoints.mkdir(parents=True)
    last = checkpoints / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, last)  # the previous complete checkpoint
    payload = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 1024)}}, payload)  # 1 MiB of real checkpoint bytes
    files_py = ROOT / "lightning_selfreg" / "utils" / "files.py"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(files_py), str(last), str(payload)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    orphan = checkpoints / f".tmp{writer.pid}.last.ckpt"
    assert orphan.is_file() and 0 < orphan.stat().st_size < payload.stat().st_size  # really cut mid-write
    assert torch.equal(torch.load(last, weights_only=True)["state_dict"]["w"], torch.ones(3))  # still the old one
    with pytest.raises(CheckpointError, match="truncated"):
        check_checkpoint_file(orphan)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a writer that still runs
    try:
        in_flight = checkpoints / f".tmp{live.pid}.best-epoch=0.ckpt"
        unrelated = [checkpoints / ".tmpabc.last.ckpt", checkpoints / "notes.tmp", tmp_path / "runs" / "r" / "x.tmp"]
        for path in (in_flight, *unrelated):
            path.write_bytes(b"x")
        orphan_in_run_dir = tmp_path / "runs" / "r" / f".tmp{writer.pid}.metrics.json"
        orphan_in_run_dir.write_text("{")

        class Stop(Exception):
            pass

        def stop(*args, **kwargs):
            raise Stop

        monkeypatch.setattr(pl.Trainer, "fit", stop)  # the run has started in that folder: stop before training
        with pytest.raises(Stop):  # --resume: the folder exists (a new run there would be refused)
            run.main([*TINY, "--wandb", "disabled", "--output-dir", str(tmp_path / "runs"), "--run-name", "r",
                      "--resume"])
        assert not orphan.exists() and not orphan_in_run_dir.exists()
        assert in_flight.exists() and all(p.exists() for p in unrelated)
        assert torch.load(last, weights_only=True)["state_dict"]["w"].shape == (3,)
    finally:
        live.kill()
        live.wait()


def test_atomic_checkpoint_io_cleans_its_folder_on_the_first_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp{int(dead.stdout)}.last.ckpt"
    own = tmp_path / f".tmp{os.getpid()}.best.ckpt"  # this process may be writing it (async checkpointing)
    orphan.write_bytes(b"PK\x03\x04 half")
    own.write_bytes(b"PK\x03\x04 half")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "step=1.ckpt")
    assert not orphan.exists() and own.exists()
    check_checkpoint_file(tmp_path / "step=1.ckpt")
    assert remove_orphaned_temp_files(tmp_path) == [own]  # at the start of a run, our own pid's are orphans too


# ---------------------------------------------------------------- broken checkpoints


@pytest.mark.parametrize(("damage", "found"), [("empty", "empty file (0 bytes)"), ("truncated", "truncated"),
                                                ("text", "no zip archive")])
def test_broken_checkpoint_given_to_resume_is_named_before_training(tmp_path, capsys, damage, found):
    checkpoints = tmp_path / "r" / "checkpoints"
    checkpoints.mkdir(parents=True)
    last = checkpoints / "last.ckpt"
    tiny_checkpoint(last)
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        truncate(last)
    else:
        last.write_text("not a checkpoint\n")
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    assert run.main([*TINY, "--wandb", "disabled", "--output-dir", str(tmp_path), "--run-name", "r", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --resume: {last}: expected a PyTorch checkpoint") and found in line
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before  # nothing written


def test_corrupted_checkpoint_member_fails_its_crc(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the zip directory at the end is intact
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        check_checkpoint_file(path)


# ---------------------------------------------------------------- W&B without a network


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "https_proxy", "HTTPS_PROXY",
                 "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # closed: refused at once


def test_wandb_auto_falls_back_to_offline_within_seconds(no_wandb_login, monkeypatch, caplog):
    assert resolve_wandb_mode("auto") == "offline"  # no credentials: offline, silently
    assert not caplog.records
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="lightning_selfreg.tracking.wandb_mode"):
        assert resolve_wandb_mode("auto", sync_hint="runs/r/wandb/offline-run-*") == "offline"
    assert time.perf_counter() - start < 3
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "WANDB_API_KEY" in record.getMessage()
    assert "unreachable" in record.getMessage() and "`wandb sync runs/r/wandb/offline-run-*`" in record.getMessage()

    def hang(*args, **kwargs):  # no route: packets vanish, the connection attempt hangs
        time.sleep(2)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert "did not answer within 0.3 s" in probe_server(timeout=0.3)
    assert resolve_wandb_mode("auto", timeout=0.3) == "offline"
    assert time.perf_counter() - start < 2


def test_wandb_online_without_key_or_route_exits_2_before_the_run_folder(no_wandb_login, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "runs"
    assert run.main([*TINY, "--wandb", "online", "--output-dir", str(out), "--run-name", "r"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --wandb: W&B mode 'online'") and "WANDB_API_KEY" in line and "wandb login" in line
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.perf_counter()
    assert run.main([*TINY, "--wandb", "online", "--output-dir", str(out), "--run-name", "r"]) == 2
    assert time.perf_counter() - start < 5
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --wandb: W&B mode 'online'") and "127.0.0.1" in line and "unreachable" in line
    assert not out.exists()
    with pytest.raises(WandbUnavailable, match="unreachable"):
        resolve_wandb_mode("online")


@pytest.mark.parametrize(("env", "mode", "expected"), [
    ("offline", "auto", "offline"), ("dryrun", "auto", "offline"), ("DISABLED", "auto", "disabled"),
    ("offline", "online", "offline"), ("disabled", "offline", "offline"), ("offline", "disabled", "disabled"),
    ("online", "auto", "online"),
])
def test_wandb_mode_is_what_wandb_will_do_when_the_environment_forces_it(no_wandb_login, monkeypatch, env, mode,
                                                                           expected):
    """WANDB_MODE in the environment wins over an online run (Lightning's WandbLogger passes no mode to W&B):
    with credentials and a server that answers, `auto` used to report `online` while W&B stayed offline."""
    from lightning_selfreg.tracking import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setattr(wandb_mode, "probe_server", lambda **kwargs: None)  # the server answers
    assert resolve_wandb_mode(mode) == expected


# ---------------------------------------------------------------- experiments.predict


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    tiny_checkpoint(path)
    return path


def nifti(path, volume):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(volume), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path


def test_predict_writes_the_models_own_prediction(ckpt, tmp_path):
    """Positive control for the error tests below: a good input is segmented as the model itself does it, in the
    recorded orientation (LPS: the RAS file is flipped in x and y for the model, and the labels flipped back)."""
    hu = np.random.default_rng(0).integers(-1000, 400, size=(40, 36, 3)).astype(np.float32)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(nifti(tmp_path / "ct.nii.gz", hu)), "--output",
                         str(tmp_path / "seg.nii.gz"), "--device", "cpu", "--quiet"]) == 0
    import nibabel as nib

    from lightning_selfreg.segmentation.predictor import load_module

    module, _ = load_module(ckpt, "cpu")
    lps = np.ascontiguousarray(hu[::-1, ::-1].transpose(2, 1, 0))  # (D, H, W) of the LPS voxel order
    volume = torch.from_numpy(lps)
    expected = module.predict_volume((volume.clamp(-125, 275) + 125) / 400).numpy().transpose(2, 1, 0)[::-1, ::-1]
    assert len(np.unique(expected)) >= 3, np.unique(expected)  # a constant predictor cannot pass
    assert np.array_equal(np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj), expected)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nan", "expected finite intensities, found 2 NaN/inf voxel(s) (first in slice 1 of 3)"),
        ("window_equal", "--window LOW HIGH: expected finite values with LOW < HIGH, found 100 100"),
        ("window_reversed", "--window LOW HIGH: expected finite values with LOW < HIGH, found 275 -125"),
        ("window_for_unwindowed_model", "--window -100 200: expected a model with a windowed channel"),
        ("png_for_volume_model", "the model segments volumes (NIfTI, DICOM), found a 2D image"),
        ("volume_for_image_model", "the model segments 2D images (PNG/TIFF/BMP/JPEG), found a volume file"),
        ("rgb_for_grey_model", "the model takes 1-channel images (CT), found 3 (the image's channels)"),
        ("one_channel_for_two", "the model takes 2 channels (CT, T2); expected nnU-Net's channel files"),
        ("missing_channel", "case 'ct' has channel files [0], expected [0, 1]"),
        ("slice_for_3d_model", "the 3D model needs a volume, found a single slice"),
        ("truncated_nifti", "expected a complete NIfTI file, found a truncated or damaged one"),
        ("text_as_nifti", "cannot be read as NIfTI"),
        ("other_file_type", "expected a NIfTI volume (.nii/.nii.gz), a DICOM series folder"),
        ("empty_folder", "found no image file in the folder"),
        ("two_inputs_one_case", "expected one input per case name, found ct.nii.gz and ct_0000.nii.gz"),
        ("output_is_input", "resolves to the input file"),
        ("output_is_input_via_dotdot", "resolves to the input file"),
        ("output_is_input_via_symlink", "resolves to the input file"),
        ("output_folder_is_input_folder", "expected a folder other than the input folder"),
        ("output_exists", "exists; pass --overwrite to replace, or --continue to skip"),
        ("output_under_a_file", "expected a folder to write into, found the file"),
        ("output_not_writable", "expected a writable folder"),
        ("output_wrong_ending", "expected a .nii.gz (or .nii) file"),
        ("labels_missing", "expected a label for every case"),
        ("labels_are_the_output", "resolves to the reference label"),
        ("label_of_another_grid", "expected the grid of"),
        ("label_out_of_range", "expected class indices in [0, 9), found values in [0, 12]"),
        ("layout_for_a_resampling_model", "expected a NIfTI or DICOM image for a model trained on raw images"),
        ("cuda", "--device cuda: expected a CUDA GPU, found none"),
        ("bad_device", "--device gpu0: expected cpu, cuda or cuda:N, found an unknown device name"),
        ("empty_ckpt", "expected a PyTorch checkpoint (the zip archive torch.save writes), found an empty file"),
        ("truncated_ckpt", "truncated"),
        ("no_state_dict", "expected a Lightning checkpoint (a dict with `state_dict`)"),
        ("no_record", "expected the preprocessing record that checkpoints of this version carry"),
    ],
)
def test_bad_predict_inputs_exit_2_with_one_line(ckpt, tmp_path, capsys, monkeypatch, case, message):
    from PIL import Image

    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.zeros((20, 16, 3), np.float32)
    if case == "nan":
        volume[0, 0, 1], volume[3, 2, 2] = np.nan, np.inf
    image = nifti(inputs / "ct.nii.gz", volume)
    output = tmp_path / "out" / "seg.nii.gz"
    named = image  # the path the message must name
    extra = []
    if case == "window_equal":
        extra = ["--window", "100", "100"]
    elif case == "window_reversed":
        extra = ["--window", "275", "-125"]
    elif case == "window_for_unwindowed_model":
        tiny_checkpoint(ckpt, record="two")
        extra, named = ["--window", "-100", "200"], "--window -100 200"
        image = inputs
        nifti(inputs / "ct_0000.nii.gz", volume)
        nifti(inputs / "ct_0001.nii.gz", volume)
        image.joinpath("ct.nii.gz").unlink()
        output = tmp_path / "out"
    elif case == "png_for_volume_model":
        image = named = inputs / "slide.png"
        output = tmp_path / "out" / "mask.png"
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    elif case == "volume_for_image_model":
        tiny_checkpoint(ckpt, record="rgb")
    elif case == "rgb_for_grey_model":
        tiny_checkpoint(ckpt, in_channels=1, record="rgb")
        torch.save({**torch.load(ckpt, weights_only=False), "preprocessing": {
            **RECORDS["rgb"], "channel_names": ["CT"], "intensity": [{"scheme": "none"}],
            "class_names": [f"class_{i}" for i in range(1, 9)]}}, ckpt)
        image = named = inputs / "slide.png"
        output = tmp_path / "out" / "mask.png"
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    elif case == "one_channel_for_two":
        tiny_checkpoint(ckpt, record="two")
    elif case == "missing_channel":
        tiny_checkpoint(ckpt, record="two")
        image.rename(inputs / "ct_0000.nii.gz")
        image = named = inputs
        output = tmp_path / "out"
    elif case == "slice_for_3d_model":
        tiny_checkpoint(ckpt, record="3d")
        image = named = nifti(inputs / "slice.nii.gz", np.zeros((20, 16), np.float32))
    elif case == "truncated_nifti":
        image = named = nifti(inputs / "big.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 20)))
        truncate(image, 0.5)
    elif case == "text_as_nifti":
        image.write_text("not a NIfTI file\n")
    elif case == "other_file_type":
        image = named = inputs / "ct.mha"
        image.write_bytes(b"ObjectType = Image\n")
    elif case == "empty_folder":
        image.unlink()
        image = named = inputs
        output = tmp_path / "out"
    elif case == "two_inputs_one_case":
        nifti(inputs / "ct_0000.nii.gz", volume)
        image = named = inputs
        output = tmp_path / "out"
    elif case == "output_is_input":
        output = named = image
    elif case == "output_is_input_via_dotdot":
        output = named = tmp_path / "out" / ".." / "in" / "ct.nii.gz"
    elif case == "output_is_input_via_symlink":
        (tmp_path / "link").mkdir()
        output = named = tmp_path / "link" / "seg.nii.gz"
        output.symlink_to(image)
    elif case == "output_folder_is_input_folder":
        nifti(inputs / "ct2.nii.gz", volume)
        output = named = tmp_path / "out" / ".." / "in"
        image = inputs
    elif case == "output_exists":
        (tmp_path / "out").mkdir()
        output.write_bytes(b"earlier result")
        named = output
    elif case == "output_under_a_file":
        (tmp_path / "out").write_text("a file, not a folder")
        named = output
    elif case == "output_not_writable":
        (tmp_path / "out").mkdir(mode=0o500)
        named = output
        if os.geteuid() == 0:  # root writes into any folder: deny it the way a read-only mount would
            from lightning_selfreg.segmentation import predict_files

            access = os.access
            monkeypatch.setattr(predict_files.os, "access",
                                lambda p, mode: Path(p) != tmp_path / "out" and access(p, mode))
    elif case == "output_wrong_ending":
        output = named = tmp_path / "out" / "seg.png"
    elif case == "labels_missing":
        (tmp_path / "labels").mkdir()
        extra, named = ["--labels", str(tmp_path / "labels")], tmp_path / "labels"
    elif case == "labels_are_the_output":  # --overwrite must not make the references the predictions
        (tmp_path / "labels").mkdir()
        nifti(tmp_path / "labels" / "ct.nii.gz", np.zeros((20, 16, 3), np.uint8))
        output = tmp_path / "labels"
        extra, named = ["--labels", str(tmp_path / "labels"), "--overwrite"], tmp_path / "labels" / "ct.nii.gz"
    elif case in ("label_of_another_grid", "label_out_of_range"):  # named before any prediction is written
        (tmp_path / "labels").mkdir()
        label = np.zeros((20, 16, 3) if case == "label_out_of_range" else (20, 16, 4), np.uint8)
        label[0, 0, 0] = 12 if case == "label_out_of_range" else 1
        nifti(tmp_path / "labels" / "ct.nii.gz", label)
        nifti(inputs / "ct2.nii.gz", volume)  # a folder: the first case would be written before the second's turn
        image, output = inputs, tmp_path / "out"
        extra = ["--labels", str(tmp_path / "labels")]
        nifti(tmp_path / "labels" / "ct2.nii.gz", np.zeros((20, 16, 3), np.uint8))
        image.joinpath("ct.nii.gz").rename(inputs / "zz.nii.gz")  # the bad label's case comes last
        (tmp_path / "labels" / "ct.nii.gz").rename(tmp_path / "labels" / "zz.nii.gz")
        named = tmp_path / "labels" / "zz.nii.gz"
    elif case == "layout_for_a_resampling_model":  # TransUNet's arrays are normalised already: wrong for this model
        import h5py

        tiny_checkpoint(ckpt, record="resampling")
        image = named = inputs / "case0001.npy.h5"
        with h5py.File(image, "w") as f:
            f["image"], f["label"] = np.zeros((3, 16, 20), np.float32), np.zeros((3, 16, 20), np.uint8)
            f.attrs["spacing"] = (2.5, 0.8, 0.8)
    elif case == "cuda":
        extra = ["--device", "cuda"]
    elif case == "bad_device":
        extra = ["--device", "gpu0"]
    elif case == "empty_ckpt":
        ckpt.write_bytes(b"")
    elif case == "truncated_ckpt":
        truncate(ckpt, 0.9)
    elif case == "no_state_dict":
        torch.save({"weights": {}}, ckpt)
    elif case == "no_record":
        tiny_checkpoint(ckpt, record=None)
    if case.endswith("ckpt") or case in ("no_state_dict", "no_record"):
        named = ckpt
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(image), "--output", str(output), "--quiet",
                         *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line
    if not case.startswith(("window_equal", "window_reversed", "cuda", "bad_device")):
        assert str(named) in line, line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "output_exists":
        assert output.read_bytes() == b"earlier result"


def test_predict_takes_numbered_scans_as_cases_and_a_4d_file_as_the_channels(ckpt, tmp_path):
    """A one-channel model: scan_0001, scan_0002 are two scans (not channels of one case). A two-channel model: one
    4D file holding both channels is one case."""
    import nibabel as nib

    (tmp_path / "series").mkdir()
    for n in (1, 2):
        nifti(tmp_path / "series" / f"scan_{n:04d}.nii.gz", np.zeros((20, 16, 3), np.float32))
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "series"), "--output",
                         str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan_0001.nii.gz", "scan_0002.nii.gz"]
    tiny_checkpoint(ckpt, record="two")
    mr = nifti(tmp_path / "mr.nii.gz", np.random.default_rng(0).normal(size=(20, 16, 3, 2)).astype(np.float32))
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(mr), "--output", str(tmp_path / "mr_seg.nii.gz"),
                         "--quiet"]) == 0
    assert nib.load(tmp_path / "mr_seg.nii.gz").shape == (20, 16, 3)


def test_a_full_disk_mid_folder_ends_with_one_line_and_the_orphans_of_a_killed_run_go(ckpt, tmp_path, capsys,
                                                                                       monkeypatch):
    import errno

    import nibabel as nib

    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        nifti(tmp_path / "in" / f"{name}.nii.gz", np.zeros((20, 16, 3), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / ".tmp999999999.a.nii.gz"  # what a predict killed mid-write leaves (its pid no longer runs)
    orphan.write_bytes(b"half a file")
    save, calls = nib.save, []

    def full_disk(image, path):
        calls.append(path)
        if len(calls) == 2:  # the second case: the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(image, path)

    monkeypatch.setattr(nib, "save", full_disk)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(out),
                         "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {out / 'b.nii.gz'}: no space left on the device" in line
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]  # the orphan and the partial write are gone


# ---------------------------------------------------------------- Python API: bad batches and tap specs


def fit_on(module, image, label, datamodule=None):
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    if datamodule is not None:
        return trainer.fit(module, datamodule=datamodule)
    loader = DataLoader([{"image": image[i], "label": label[i]} for i in range(len(image))], batch_size=2)
    trainer.fit(module, train_dataloaders=loader)


def test_batch_with_the_wrong_channel_count_is_named():
    image, label = torch.rand(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    declared = SelfRegSegModule(create_model(**NET), 9)  # UNet declares in_channels
    with pytest.raises(ValueError, match=r"`batch\['image'\]` of the first train batch has 3 channels .* network "
                                         r"takes 1 \(`in_channels`\)"):
        fit_on(declared, image, label)
    plain = SelfRegSegModule(torch.nn.Sequential(torch.nn.Conv2d(1, 9, 3, padding=1)), 9)  # no declaration
    with pytest.raises(ValueError, match=r"first convolution `0` with 3 channels .* takes 1 \(`in_channels`\)"):
        fit_on(plain, image, label)


def test_datamodule_with_other_channels_than_the_network_is_named_at_setup(synapse_dir):
    from lightning_selfreg.data import SynapseDataModule

    build = {**NET, "in_channels": 3}
    module = SelfRegSegModule(create_model(**build), 9)
    with pytest.raises(ValueError, match=r"`datamodule.in_channels` of SynapseDataModule is 1.*takes 3-channel"):
        fit_on(module, None, None, SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=()))


@pytest.mark.parametrize("bad", [9, -1])
def test_labels_outside_num_classes_are_named_on_the_first_batch(bad):
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[1, 3, 4] = bad
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9)
    found = "0, 9" if bad == 9 else "-1, 0"
    with pytest.raises(ValueError, match=rf"`batch\['label'\]` of the first train batch: expected class indices in "
                                         rf"\[0, 9\), found values in \[{found}\] \(`num_classes`=9\)"):
        fit_on(module, torch.rand(2, 1, 16, 16), label)


@pytest.mark.parametrize("spec", [{"final": "up2"}, {"final": "up2", "encoder": [], "decoder": []},
                                  {"final": "up2", "scr_groups": {"all": []}}])
def test_tap_spec_with_final_but_no_student_taps(spec):
    with pytest.raises(ValueError, match=r"needs student taps besides `final` \('up2'\): `ifd_groups` and "
                                         r"`scr_groups` \(or `encoder` and `decoder`\) name no module path"):
        TapSpec.from_config(spec)
