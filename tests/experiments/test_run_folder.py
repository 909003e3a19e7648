"""The run folder is the user's work: never modified unless asked, resumed only with settings that keep the model,
curves appended, full disks and unwritable folders named with the last good checkpoint intact (issue 21, §1)."""

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from experiments import run
from experiments.run_folder import RESUMABLE, RunFolder, config_changes
from lightning_selfreg.tracking.csv_logger import MetricsCSVLogger
from lightning_selfreg.utils.files import WriteError, atomic_write_text

TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--batch-size", "16", "--redundancy", "null",
        "--wandb", "disabled", "--lr-schedule", "constant", "--trainer.log_every_n_steps", "2"]


def snapshot(folder):
    """Every file of a folder with its bytes: a folder equal to its snapshot was not touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run (1 epoch of the sample, 4 steps): ``(output dir, argv)``; tests work on copies."""
    out = tmp_path_factory.mktemp("runs")
    argv = [*TINY, "--max-epochs", "1", "--output-dir", str(out), "--run-name", "r"]
    assert run.main(argv) == 0
    return out, argv


@pytest.fixture
def copy(finished, tmp_path):
    out, argv = finished
    shutil.copytree(out / "r", tmp_path / "r")
    return tmp_path / "r", [a if a != str(out) else str(tmp_path) for a in argv]


def test_a_new_run_in_an_existing_folder_is_refused_and_names_the_ways_on(copy, capsys):
    folder, argv = copy
    before = snapshot(folder)
    assert run.main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --run-name: the run folder {folder} already exists (a finished run with "
                           "metrics.json, checkpoints/last.ckpt at step 4)")
    assert "--resume" in line and "another --run-name" in line and "--overwrite" in line
    assert snapshot(folder) == before
    assert run.main([*argv, "--resume", "--overwrite"]) == 2
    assert "`overwrite` replaces the run folder that `resume` continues" in error_line(capsys)
    assert snapshot(folder) == before


@pytest.mark.parametrize("flags, listed", [
    (["--lr", "0.5"], ["model.lr: 0.001 -> 0.5"]),
    (["--seed", "3", "--lambda-scr", "0.1"], ["seed_everything: 0 -> 3", "selfreg.init_args.lambda_scr: 0.015 -> 0.1"]),
    (["--no-selfreg"], ["selfreg.class_path: lightning_selfreg.SelfReg -> null"]),
    (["--image-size", "48", "--max-epochs", "3"], ["data.init_args.image_size: 32 -> 48"]),
])
def test_a_resume_that_would_change_the_model_is_refused_and_touches_nothing(copy, capsys, flags, listed):
    folder, argv = copy
    before = snapshot(folder)
    assert run.main([*argv, "--resume", *flags]) == 2
    line = error_line(capsys)
    assert "would change the trained model" in line and all(key in line for key in listed), line
    assert "max_epochs" not in line  # an allowed change is not listed among the refused ones
    assert snapshot(folder) == before


def test_an_allowed_change_on_resume_is_applied_recorded_and_the_curves_are_kept(copy, capsys):
    folder, argv = copy
    old_rows = csv_rows(folder / "metrics.csv")
    assert old_rows and {"step", "epoch", "train/loss", "selfreg/scr"} <= set(old_rows[0])
    assert run.main([*argv, "--resume", "--max-epochs", "2", "--checkpoint-every-n-steps", "3"]) == 0
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["run"]["checkpoint_every_n_steps"] == 3
    events = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finished", "resume", "finished"]
    changed = events[2]["changed"]
    assert changed.pop("run.output_dir")[1] == str(folder.parent)  # this copy of the run lives elsewhere: recorded
    assert changed == {"run.checkpoint_every_n_steps": [0, 3], "trainer.max_epochs": [1, 2]}
    assert events[2]["step"] == 4 and events[2]["wandb_id"] == events[0]["wandb_id"]  # the same W&B run
    assert step(folder / "checkpoints" / "last.ckpt") == 8
    rows = csv_rows(folder / "metrics.csv")
    kept = [{k: v for k, v in row.items() if v} for row in rows[: len(old_rows)]]
    assert kept == [{k: v for k, v in row.items() if v} for row in old_rows]  # appended, never truncated
    assert any(int(row["step"]) > 4 and row.get("train/loss") for row in rows[len(old_rows):])


def test_resumable_settings_are_those_that_keep_the_model():
    old = {"trainer": {"max_epochs": 1, "devices": 1, "precision": None}, "model": {"lr": 0.01, "sw_overlap": 0.5},
           "data": {"class_path": "A", "init_args": {"num_workers": 0, "batch_size": 2}}, "run": {"wandb": "auto"}}
    new = {"trainer": {"max_epochs": 5, "devices": 2, "precision": "bf16-mixed"},
           "model": {"lr": 0.01, "sw_overlap": 0.25},
           "data": {"class_path": "A", "init_args": {"num_workers": 8, "batch_size": 4}}, "run": {"wandb": "offline"}}
    changes = config_changes(old, new)
    allowed = sorted(k for k in changes if any(k == p or k.startswith(p + ".") for p in RESUMABLE))
    assert allowed == ["data.init_args.num_workers", "model.sw_overlap", "run.wandb", "trainer.devices",
                       "trainer.max_epochs"]
    assert sorted(set(changes) - set(allowed)) == ["data.init_args.batch_size", "trainer.precision"]
    other = config_changes(old, {**old, "data": {"class_path": "B", "init_args": {"x": 1}}})
    assert other == {"data.class_path": ("A", "B")}  # another class: its class, not its arguments


def test_overwrite_moves_the_old_run_aside_until_the_new_one_has_finished(copy, capsys, monkeypatch):
    folder, argv = copy
    before = snapshot(folder)

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(pl.Trainer, "fit", crash)  # the new run fails after it started
    with pytest.raises(Crash):
        run.main([*argv, "--overwrite"])
    (aside,) = folder.parent.glob("r.replaced-*")
    assert snapshot(aside) == before  # the old run, whole, beside the new one
    shutil.rmtree(folder)
    aside.rename(folder)  # what the user does to get it back
    monkeypatch.undo()
    assert run.main([*argv, "--overwrite"]) == 0
    assert "--overwrite: the previous run folder was moved to" in capsys.readouterr().err
    assert not list(folder.parent.glob("r.replaced-*"))  # deleted once the new run had finished
    events = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finished"] and events[0]["replaced"].startswith(str(folder))


def test_a_resumed_overwrite_deletes_the_old_run_when_it_finishes_and_nothing_else(tmp_path):
    """The folder an --overwrite moved aside is named in history.jsonl: the resumed run (a new RunFolder, after an
    interruption) deletes it at its end; a recorded path that is not this run's aside folder is left alone."""
    for recorded, deleted in (("r.replaced-20261206-101010", True), ("someone-elses-folder", False)):
        aside = tmp_path / recorded
        (aside / "checkpoints").mkdir(parents=True)
        started = RunFolder(tmp_path / "r", "r", [])
        started.path.mkdir(exist_ok=True)
        started.record("start", replaced=str(aside))
        started.record("interrupted")
        resumed = RunFolder(tmp_path / "r", "r", [], resume_from=tmp_path / "r" / "checkpoints" / "last.ckpt")
        resumed.record("resume")
        resumed.finish()
        assert aside.exists() is not deleted, recorded
        (tmp_path / "r" / "history.jsonl").unlink()


# ---------------------------------------------------------------- metrics.csv


def test_metrics_csv_is_appended_on_resume_and_widened_atomically(tmp_path, caplog):
    path = tmp_path / "metrics.csv"
    first = MetricsCSVLogger(path)
    first.log_metrics({"train/loss": torch.tensor(0.5), "epoch": 0}, step=4)
    first.log_metrics({"train/loss": 0.25, "epoch": 0}, step=9)
    resumed = MetricsCSVLogger(path)  # a resumed run: a new logger on the same file
    resumed.log_metrics({"train/loss": 0.125, "epoch": 1}, step=14)
    resumed.log_metrics({"val/dice": 0.75, "epoch": 1}, step=14)  # a new column: the header widens
    rows = csv_rows(path)
    assert list(rows[0]) == ["step", "epoch", "train/loss", "val/dice"]
    assert [(r["step"], r["train/loss"], r["val/dice"]) for r in rows] == [
        ("4", "0.5", ""), ("9", "0.25", ""), ("14", "0.125", ""), ("14", "", "0.75")]
    with path.open("a") as f:
        f.write("19,1,0.0")  # a row cut short by a killed append
    with caplog.at_level("WARNING"):
        MetricsCSVLogger(path).log_metrics({"train/loss": 0.0625, "epoch": 2}, step=24)
    assert "dropped its last row" in caplog.text
    assert [r["step"] for r in csv_rows(path)] == ["4", "9", "14", "14", "24"]


def test_metrics_csv_on_a_full_disk_names_it_and_keeps_the_rows(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    logger = MetricsCSVLogger(path)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    before = path.read_bytes()
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if self == path and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(WriteError, match=rf"cannot write {path}: no space left on the device"):
        logger.log_metrics({"train/loss": 0.25}, step=2)
    assert path.read_bytes() == before


# ---------------------------------------------------------------- unwritable output


def test_an_output_dir_that_is_a_file_or_read_only_is_named_before_anything(tmp_path, capsys, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("a file")
    assert run.main([*TINY, "--output-dir", str(target)]) == 2
    assert error_line(capsys) == f"error: --output-dir: expected a folder, found the file {target}"
    assert run.main([*TINY, "--output-dir", str(target / "runs")]) == 2
    assert error_line(capsys) == (f"error: --output-dir: expected a folder, found the file {target} "
                                  f"({target / 'runs'} is inside it)")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    assert run.main([*TINY, "--output-dir", str(read_only / "runs")]) == 2
    assert error_line(capsys) == (f"error: --output-dir: expected a writable folder, found {read_only} read-only "
                                  f"(no write permission or a read-only file system) (the runs would go to "
                                  f"{read_only / 'runs'})")
    assert target.read_text() == "a file" and list(read_only.iterdir()) == []


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "is on a read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, cause):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}')

    def fail(tmp):
        Path(tmp).write_text('{"new": ')  # half written
        raise OSError(code, os.strerror(code))

    from lightning_selfreg.utils.files import atomic_write

    with pytest.raises(WriteError, match=rf"cannot write {path}: .*{cause}"):
        atomic_write(path, fail)
    assert path.read_text() == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'new' / 'x.md'}: .*{cause}"):
        atomic_write_text(tmp_path / "new" / "x.md", "text")


def test_a_full_disk_during_training_exits_2_and_keeps_the_last_checkpoint(copy, capsys, monkeypatch):
    folder, argv = copy
    last = folder / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    original = TorchCheckpointIO.save_checkpoint

    def disk_full(self, checkpoint, path, storage_options=None):  # half the bytes reach the disk, then ENOSPC
        original(self, checkpoint, path, storage_options)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    assert run.main([*argv, "--resume", "--max-epochs", "2"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write {last}: no space left on the device") and \
        line.endswith(f"; the last complete checkpoint {last} (step 4) is intact")
    assert last.read_bytes() == before and not list(last.parent.glob(".tmp*"))
