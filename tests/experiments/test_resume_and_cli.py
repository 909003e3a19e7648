import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selfreg import AuxiliaryLoss, SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import FiniteLossGuard, RNGStateCheckpoint
from lightning_selfreg.data import SampleCTDataModule, SynapseDataModule
from lightning_selfreg.models import UNet

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--batch-size", "16", "--wandb", "disabled",
        "--lr-schedule", "constant", "--redundancy", "null"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def run_clis_in_parallel(*commands, timeout=300):
    """``experiments.run`` with each argument list, all at once; the CompletedProcess of each (output in files:
    a full pipe would stall a run until the one before it is read)."""
    import tempfile

    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=ENV, text=True,
                              stdout=out, stderr=err) for args, (out, err) in zip(commands, logs, strict=True)]
    results = []
    for proc, args, (out, err) in zip(procs, commands, logs, strict=True):
        proc.wait(timeout=timeout)
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class NaNTerm(AuxiliaryLoss):
    def auxiliary_loss(self, pl_module, batch, logits):
        bad = logits.new_tensor(float("nan"))
        return bad, {"selfreg/bad_term": bad}


def test_non_finite_loss_stops_with_step_and_term(synapse_dir):
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=())
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NaNTerm(), FiniteLossGuard()])
    with pytest.raises(FloatingPointError, match=r"step 0 .*selfreg/bad_term"):
        trainer.fit(module, dm)


def _fit_sample(ckpt_dir, ckpt_path=None, every_n_steps=None):
    """3 epochs of a tiny UNet + SelfReg on the sample (4 steps per epoch); returns the final state dict."""
    pl.seed_everything(3)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)  # poly LR per step
    callbacks = [RNGStateCheckpoint(), SelfReg()]
    if every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every_n_steps,
                                         save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(every_n_steps), callbacks=callbacks)
    trainer.fit(module, SampleCTDataModule(image_size=32, batch_size=16), ckpt_path=ckpt_path)
    assert trainer.num_training_batches == 4 and trainer.global_step == 12
    return module.state_dict()


def test_resume_from_mid_epoch_and_end_of_epoch_checkpoints_is_exact(tmp_path):
    """Step checkpoints at 5, 10 (mid-epoch) and 4, 8, 12 (epoch ends): every resume ends on the same weights."""
    reference = _fit_sample(tmp_path, every_n_steps=5)
    _fit_sample(tmp_path, every_n_steps=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=10.ckpt", "step=12.ckpt", "step=4.ckpt",
                                                          "step=5.ckpt", "step=8.ckpt"]
    for ckpt in sorted(tmp_path.iterdir()):
        resumed = _fit_sample(None, ckpt_path=str(ckpt))
        for key, value in reference.items():
            assert torch.equal(value, resumed[key]), (ckpt.name, key)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a run right after a mid-epoch step checkpoint, resume it, compare with an uninterrupted run."""
    out = tmp_path / "runs"
    every = 3  # 4 steps per epoch: steps 3, 6, 9 are mid-epoch, 12 is not
    dm = SampleCTDataModule(image_size=32, batch_size=16)
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    assert steps_per_epoch % every != 0
    cli = [*TINY, "--checkpoint-every-n-steps", str(every)]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *cli, "--max-epochs", "200", "--output-dir",
                             str(out), "--run-name", "killed"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    saved = None
    while time.time() < deadline and saved is None and proc.poll() is None:
        time.sleep(0.2)
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] > every:
            proc.send_signal(signal.SIGSTOP)  # freeze, then check the file that is there now (written atomically)
            ckpt = torch.load(last, map_location="cpu", weights_only=False)
            if ckpt["global_step"] % steps_per_epoch:
                saved = ckpt
                proc.send_signal(signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait(timeout=30)
    assert saved is not None, "no mid-epoch checkpoint was caught in time"
    assert saved["SampleCTDataModule"]["train_loader"]["batches"] == saved["global_step"] % steps_per_epoch
    final_epochs = saved["epoch"] + 2
    # the resumed run and an uninterrupted reference run, side by side (each is deterministic on its own)
    resumed, reference = run_clis_in_parallel(
        [*cli, "--max-epochs", str(final_epochs), "--output-dir", str(out), "--run-name", "killed", "--resume"],
        [*cli, "--max-epochs", str(final_epochs), "--output-dir", str(out), "--run-name", "ref"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.returncode == 0, reference.stderr[-3000:]
    a, b = weights(out / "killed" / "checkpoints" / "last.ckpt"), weights(out / "ref" / "checkpoints" / "last.ckpt")
    assert torch.load(out / "ref" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == \
        final_epochs * steps_per_epoch  # the end-of-epoch save runs beside the step saves
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = json.loads((out / "killed" / "metrics.json").read_text())
    assert metrics["test"]["per_class"]["liver"]["dice"] is not None


def test_resume_errors(tmp_path, capsys):
    from experiments import run

    assert run.main([*TINY, "--resume", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "`resume` needs `name`" in err and "--run-name" in err
    assert run.main([*TINY, "--resume", "--run-name", "nothing", "--output-dir", str(tmp_path)]) == 2
    assert "last.ckpt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_compare_writes_the_paired_summary_of_real_runs(tmp_path, monkeypatch, capfd):
    """End to end with real child runs (one seed, both arms; the driver runs in this process, each run in its own
    as a user's would); the driver over several seeds is tested with faked runs in test_run.py and the
    statistics in test_compare.py."""
    from experiments import run

    monkeypatch.setenv("WANDB_MODE", "disabled")  # inherited by the child runs
    assert run.main([*TINY, "--max-epochs", "1", "--compare", "--seeds", "3", "--output-dir", str(tmp_path),
                     "--run-name", "cmp"]) == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert (tmp_path / "cmp" / "summary.md").is_file()
    assert "[compare] run 2/2: selfreg, seed 3" in capfd.readouterr().out
    for arm in ("baseline", "selfreg"):
        run = json.loads((tmp_path / "cmp" / f"{arm}-seed3" / "metrics.json").read_text())
        assert run["selfreg"] is (arm == "selfreg") and run["seed"] == 3
    assert "difference" in summary and "liver" in summary["difference"]


def test_predict_cli_on_a_user_nifti(tiny_run, tmp_path, capsys):
    import nibabel as nib

    from experiments import predict

    last = tiny_run[0] / "checkpoints" / "last.ckpt"  # a 1-epoch run of experiments.run (once per session)
    hu = np.random.default_rng(0).integers(-1000, 400, size=(40, 36, 3)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])  # RAS; the sample's arrays (and so the model) are LPS
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    record = checkpoint["preprocessing"]  # written by the run: what SampleCTDataModule does to a raw CT
    assert record["orientation"] == ["L", "P", "S"] and record["intensity"] == [
        {"scheme": "window", "low": -125.0, "high": 275.0}]
    low, high = -125.0, 275.0
    lps = np.ascontiguousarray(hu[::-1, ::-1].transpose(2, 1, 0)).astype(np.float32)  # (D, H, W) in LPS order
    windowed = (torch.from_numpy(lps).clamp(low, high) - low) / (high - low)
    # The tiny trained model predicts one class everywhere (its last features are nearly constant), which an
    # all-background predictor would match almost as well. Give it a random 1x1 head on the centred features
    # (bias = -W @ mean feature), so that its own prediction varies from voxel to voxel, and save that model.
    module = SelfRegSegModule.load_from_checkpoint(last, map_location="cpu")
    features = []
    hook = module.net.outc.register_forward_pre_hook(lambda _, args: features.append(args[0]))
    module.predict_volume(windowed)
    hook.remove()
    mean = torch.cat(features).mean((0, 2, 3))
    head = torch.randn(module.net.outc.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.net.outc.weight.copy_(head)
        module.net.outc.bias.copy_(-(head.flatten(1) @ mean))
    checkpoint["state_dict"] = module.state_dict()
    torch.save(checkpoint, tmp_path / "varied.ckpt")
    # the model's own slice-wise prediction of the LPS volume, flipped back to the file's (x, y, z)
    expected = module.predict_volume(windowed).numpy().transpose(2, 1, 0)[::-1, ::-1]
    assert len(np.unique(expected)) >= 3, np.unique(expected)  # a prediction no constant predictor matches

    res = subprocess.run([sys.executable, "-m", "experiments.predict", "--checkpoint", str(tmp_path / "varied.ckpt"),
                          "--input", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "seg.nii.gz")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == (40, 36, 3) and np.array_equal(seg.affine, nib.load(tmp_path / "ct.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(tmp_path / "no.ckpt"), "--input", str(tmp_path / "ct.nii.gz"),
                         "--output", str(tmp_path / "x.nii.gz")]) == 2  # the command line above, in this process
    assert "--checkpoint" in capsys.readouterr().err
