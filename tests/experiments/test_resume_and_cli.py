import json
import os
import shlex
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


class SendSignal(pl.Callback):
    """Send ``signum`` to this process when training step ``at`` starts (as a scheduler or Ctrl+C would)."""

    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            self.at = None
            os.kill(os.getpid(), self.signum)


def _fit_sample(ckpt_dir, ckpt_path=None, every_n_steps=None, stop=None):
    """3 epochs of a tiny UNet + SelfReg on the sample (4 steps per epoch); returns the final state dict.

    ``stop=(step, signal, path)``: that signal arrives at that step; ``GracefulStop(path)`` saves there, and the
    stopped fit returns its ``GracefulStop``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_selfreg.callbacks import GracefulStop
    from lightning_selfreg.utils.checkpoint import AtomicCheckpointIO

    pl.seed_everything(3)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)  # poly LR per step
    callbacks = [RNGStateCheckpoint(), SelfReg()]
    if every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every_n_steps,
                                         save_top_k=-1))
    if stop is not None:
        graceful = GracefulStop(stop[2])
        callbacks += [graceful, SendSignal(stop[0], stop[1])]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(every_n_steps), callbacks=callbacks,
                         plugins=[AtomicCheckpointIO()])
    try:
        trainer.fit(module, SampleCTDataModule(image_size=32, batch_size=16), ckpt_path=ckpt_path)
    except SIGTERMException:
        assert stop is not None
        return graceful
    assert stop is None
    assert trainer.num_training_batches == 4 and trainer.global_step == 12
    return module.state_dict()


def test_a_run_stopped_by_sigterm_or_sigint_resumes_to_the_same_weights(tmp_path):
    """SIGTERM mid-epoch (step 5 of 4 per epoch), SIGINT on the last step of an epoch: the checkpoint written at the
    current step resumes to the weights of an uninterrupted run."""
    reference = _fit_sample(None)
    for at, signum, saved_at in ((5, signal.SIGTERM, 6), (3, signal.SIGINT, 4)):
        path = tmp_path / f"{signum.name}.ckpt"
        stopped = _fit_sample(None, stop=(at, signum, path))
        assert (stopped.signal, stopped.stage, stopped.saved_step, stopped.saved_path) == (signum, "train", saved_at,
                                                                                           path)
        assert torch.load(path, weights_only=False)["global_step"] == saved_at
        resumed = _fit_sample(None, ckpt_path=str(path))
        for key, value in reference.items():
            assert torch.equal(value, resumed[key]), (signum.name, key)


def test_a_signal_during_validation_keeps_the_last_checkpoint(synapse_dir, tmp_path):
    """Mid-validation the state would not resume exactly: nothing is written, the last checkpoint stays."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_selfreg.callbacks import GracefulStop

    class SignalInValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, *args):
            if not trainer.sanity_checking:
                os.kill(os.getpid(), signal.SIGTERM)

    path = tmp_path / "last.ckpt"
    stop = GracefulStop(path)
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=["case0001"], transform=None)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         callbacks=[stop, SignalInValidation()])
    with pytest.raises(SIGTERMException):
        trainer.fit(module, dm)
    assert (stop.signal, stop.stage, stop.saved_step) == (signal.SIGTERM, "validate", None) and not path.exists()


def test_sigterm_exits_143_with_the_command_that_resumes(tmp_path, capsys, monkeypatch):

    from experiments import run

    original = run.run_callbacks

    def with_signal(cli, folder):
        callbacks, *rest = original(cli, folder)
        return [*callbacks, SendSignal(2, signal.SIGTERM)], *rest

    monkeypatch.setattr(run, "run_callbacks", with_signal)
    out = tmp_path / "runs"
    argv = [*TINY, "--max-epochs", "2", "--output-dir", str(out)]  # no --run-name: the command must add it
    assert run.main(argv) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    (folder,) = out.iterdir()
    last = folder / "checkpoints" / "last.ckpt"
    assert err.startswith(f"interrupted by SIGTERM: saved {last} at step 3; resume with: python -m experiments.run ")
    assert torch.load(last, weights_only=False)["global_step"] == 3 and not (folder / "metrics.json").exists()
    events = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == "SIGTERM" and events[-1]["step"] == 3
    command = shlex.split(err.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "experiments.run"] and command[-3:] == ["--run-name", folder.name,
                                                                                  "--resume"]
    monkeypatch.setattr(run, "run_callbacks", original)
    assert run.main(command[3:]) == 0  # the printed command, as typed
    assert torch.load(last, weights_only=False)["global_step"] == 8 and (folder / "metrics.json").is_file()


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
    """SIGKILL a run right after a mid-epoch step checkpoint, resume it, SIGTERM the resumed run, resume it with the
    command it printed, compare with an uninterrupted run."""
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
    # the resumed run is stopped by SIGTERM (a scheduler's pre-emption) once it has trained on: it saves at that
    # step, exits 143 and prints the command that resumes it, which then runs the run to its end
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *cli, "--max-epochs", str(final_epochs),
                             "--output-dir", str(out), "--run-name", "killed", "--resume"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if torch.load(last, map_location="cpu", weights_only=False)["global_step"] > saved["global_step"]:
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"interrupted by SIGTERM: saved {last} at step ") and "resume with: " in line
    stopped_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert line.split(" at step ")[1].startswith(f"{stopped_at};")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "experiments.run"] and command[-1] == "--resume"
    # the printed command (as typed) and an uninterrupted reference run, side by side
    resumed, reference = run_clis_in_parallel(
        command[3:], [*cli, "--max-epochs", str(final_epochs), "--output-dir", str(out), "--run-name", "ref"])
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


def test_under_slurm_the_requeue_signal_saves_and_requeues_and_the_requeued_job_resumes(tmp_path, capsys,
                                                                                       monkeypatch):
    """Lightning's own SLURM auto-requeue (SIGUSR1: hpc checkpoint + `scontrol requeue`), then the scheduler's
    SIGTERM: a checkpoint at that step and status 143; the requeued job (same script, SLURM_RESTART_COUNT=1) finds
    its folder by the job id and resumes without --resume."""
    from experiments import run

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
                       "SLURM_NODELIST": "localhost", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODEID": "0",
                       "SLURM_NTASKS_PER_NODE": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}.items():
        monkeypatch.setenv(key, value)

    class Scheduler(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step in (1, 2):  # the requeue signal, then the kill
                os.kill(os.getpid(), signal.SIGUSR1 if trainer.global_step == 1 else signal.SIGTERM)

    original = run.run_callbacks
    monkeypatch.setattr(run, "run_callbacks", lambda cli, folder: (lambda parts: ([*parts[0], Scheduler()],
                                                                                 *parts[1:]))(original(cli, folder)))
    out = tmp_path / "runs"
    argv = [*TINY, "--max-epochs", "1", "--output-dir", str(out)]
    assert run.main(argv) == 143
    folder = out / "samplect-unet-selfreg-seed0-slurm4242"  # named after the job: the requeued job finds it
    assert calls.read_text().split() == ["requeue", "4242"]
    assert torch.load(folder / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 1  # when it came
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    capsys.readouterr()
    monkeypatch.setattr(run, "run_callbacks", original)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run.main(argv) == 0  # the same command: resumed from the newest checkpoint, not refused
    assert f"SLURM requeue: resuming {folder} from {folder / 'checkpoints' / 'last.ckpt'} (step 3)" in \
        capsys.readouterr().err
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in history] == ["start", "interrupted", "resume", "finished"]
    assert (folder / "metrics.json").is_file()
    # the finished run's last.ckpt supersedes the requeue's checkpoint: it is removed, and the history says so
    assert not (folder / "hpc_ckpt_1.ckpt").exists() and history[-1]["removed"] == ["hpc_ckpt_1.ckpt"]
    monkeypatch.setenv("SLURM_JOB_ID", "4343")  # another job with that folder's name: an error, not a resume
    assert run.main([*argv, "--run-name", folder.name]) == 2
