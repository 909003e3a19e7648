"""What a user sees: a one-screen --help, one line per epoch with the run's ETA, W&B in one line, the end table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import flags, run
from lightning_selfreg import SelfReg
from lightning_selfreg.callbacks.progress import EpochLines, RunProgressBar, format_duration, run_eta
from tests.tracking.test_tracking import make, trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--batch-size", "16", "--max-epochs", "2"]


def test_help_fits_a_screen_and_names_every_short_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 80 and max(map(len, lines)) <= 120
    for flag in [*flags.ALIASES, "--gpus", "--dataset", "--backbone", "--no-selfreg", "--compare", "--seeds",
                 "--help-all", "--print_config", "--model.net.help"]:
        assert flag in text, flag
    assert [line.rstrip(":") for line in lines if line.endswith(":")] == ["data", "model", "SelfReg", "training",
                                                                          "run", "comparison", "every setting"]
    with pytest.raises(SystemExit):
        run.main(["--help-all"])
    assert "--trainer.max_epochs" in capsys.readouterr().out  # the full keys, Lightning's included


def test_eta_and_durations():
    assert run_eta(60.0, 0.25) == 180.0 and run_eta(60.0, 0.5, start=0.25) == 120.0  # resumed at a quarter
    assert run_eta(5.0, 0.0) is None
    assert [format_duration(s) for s in (44.6, 185, 7620)] == ["45 s", "3 min 05 s", "2 h 07 min"]


def test_epoch_lines_are_the_epochs_means_with_the_runs_eta(synapse_dir, capsys):
    import io

    dm, module = make(synapse_dir)
    stream = io.StringIO()
    lines = EpochLines(file=stream)
    trainer([SelfReg(), lines], enable_progress_bar=True, max_epochs=3).fit(module, dm)
    written = stream.getvalue().splitlines()
    assert len(written) == 3 and "\r" not in stream.getvalue()
    pattern = (r"epoch (\d)/3  loss [\d.e+-]+ \(CE [\d.e+-]+, Dice [\d.e+-]+, SCR [\d.e+-]+, IFD [\d.e+-]+, "
               r"SelfReg [\d.e+-]+\)  val Dice [\d.]+ %  \| \d+ s elapsed, ETA .+")
    assert [int(re.fullmatch(pattern, line).group(1)) for line in written] == [1, 2, 3], written
    assert written[-1].endswith("ETA 0 s")
    bar = RunProgressBar()
    assert trainer([bar], enable_progress_bar=True).progress_bar_callback is bar  # replaces Lightning's bar


@pytest.mark.slow
def test_a_run_logged_to_a_file_reads_line_by_line(tmp_path):
    """The default job's plumbing, output to a file (a cluster job): no \\r spam, no banners, W&B in one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SILENT")}
    env.update({"WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                "WANDB_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "job.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "experiments.run", *TINY, "--wandb", "offline", "--output-dir",
                               str(tmp_path / "runs"), "--run-name", "job"], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    for banner in ("💡", "litlogger", "LeafSpec", "GPU available", "Seed set to", "FLOPs", "| Name", "wandb:",
                   "Trainer.fit` stopped"):
        assert banner not in text, banner
    lines = text.splitlines()
    assert lines[0].startswith("run: SampleCT · UNet (base_channels=4) · SelfReg")
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"] and all("ETA" in line for line in epochs)
    assert "| organ | Dice (%) | IoU (%) | HD95 (mm) |" in lines and any(line.startswith("| **mean** |")
                                                                         for line in lines)
    assert f"run folder: {tmp_path / 'runs' / 'job'}" in lines
    (w,) = [line for line in lines if "W&B" in line or "wandb" in line.lower()]
    assert w.startswith("W&B (offline): ") and "`wandb sync " in w
    assert len(lines) <= 30, text
