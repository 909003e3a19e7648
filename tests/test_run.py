import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--gpus", "0", "--width", "4", "--image-size", "32", "--max-epochs", "1", "--batch-size", "16"]


def read_metrics(out, name):
    return json.loads((out / name / "metrics.json").read_text())


def test_resolve_config_precedence(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lambda_scr: 0.1\nmax_epochs: 7\nselfreg: false\n")
    config = run.resolve_config(["--gpus", "0", "--config", str(cfg), "--max-epochs", "3"])
    assert config["lambda_scr"] == 0.1  # from the file
    assert config["max_epochs"] == 3  # flag beats file
    assert config["selfreg"] is False
    assert config["width"] == 16 and config["image_size"] == 96  # CPU preset of the sample
    assert run.resolve_config(["--gpus", "0", "--no-selfreg"])["selfreg"] is False


def test_gpu_preset_of_the_sample_is_the_papers_unet_at_96_px(monkeypatch):
    """At 224 px the paper's UNet scored Dice 0 on the sample's test patient (H200); 96 px was measured to work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = run.resolve_config(["--gpus", "1"])
    assert (config["width"], config["image_size"], config["channels_last"]) == (64, 96, True)
    assert run.resolve_config(["--gpus", "1", "--dataset", "synapse", "--data-dir", "."])["image_size"] == 224


@pytest.mark.parametrize(
    ("text", "message"),
    [("lambda_scr: -1\n", "lambda_scr"), ("colour: red\n", "unknown setting 'colour'"),
     ("precision: 8\n", "precision"), ("- a\n", "expected a mapping")],
)
def test_bad_yaml_values_are_named(tmp_path, text, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    with pytest.raises(run.ConfigError, match=message):
        run.resolve_config(["--gpus", "0", "--config", str(cfg)])


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run.main(["--lambda-scr", "-0.5"])
    assert err.value.code == 2
    assert "--lambda-scr" in capsys.readouterr().err
    assert run.main(["--gpus", "0", "--data-dir", str(tmp_path / "missing")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --data-dir") and "does not exist" in message and "\n" not in message
    assert run.main(["--gpus", "0", "--dataset", "nnunet", "--backbone", "swinunet"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --backbone: swinunet is 2D only") and "\n" not in message
    assert "monai-dynunet" in run.BACKBONES
    if not __import__("torch").cuda.is_available():
        assert run.main(["--gpus", "2"]) == 2
        assert "CUDA device" in capsys.readouterr().err


def test_run_writes_metrics_and_config(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run.main([*TINY, "--output-dir", str(out), "--run-name", "tiny", "--wandb", "disabled"]) == 0
    metrics = read_metrics(out, "tiny")
    assert metrics["dataset"] == "sample" and metrics["backbone"] == "unet" and metrics["selfreg"] is True
    assert metrics["seed"] == 0
    per_class = metrics["test"]["per_class"]
    assert list(per_class) == ["aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                               "spleen", "stomach"]
    assert all(set(v) == {"dice", "iou", "hd95"} for v in per_class.values())
    assert per_class["liver"]["dice"] is not None
    config = yaml.safe_load((out / "tiny" / "config.yaml").read_text())
    assert config["max_epochs"] == 1 and config["width"] == 4
    assert (out / "tiny" / "checkpoints" / "last.ckpt").is_file()
    assert not list((out / "tiny").rglob(".tmp*"))  # atomic_write's temporary files are .tmp<pid>.<name>
    printed = capsys.readouterr().out
    assert "| liver |" in printed and "| **mean** |" in printed


def test_run_baseline_with_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs" / "base"))
    out = tmp_path / "runs"
    assert run.main([*TINY, "--output-dir", str(out), "--run-name", "base", "--no-selfreg"]) == 0
    assert read_metrics(out, "base")["selfreg"] is False
    offline_runs = list((out / "base").rglob("offline-run-*"))
    assert offline_runs, "an offline W&B run folder must be written"
    assert list(offline_runs[0].glob("run-*.wandb"))


@pytest.mark.slow
def test_default_run_learns_the_liver(tmp_path):
    """The README's main job, as a user runs it: the liver must reach a clearly non-trivial Dice."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--gpus", "0", "--output-dir", str(tmp_path), "--run-name", "d",
         "--wandb", "disabled"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path, "d")
    per_class = metrics["test"]["per_class"]
    assert per_class["liver"]["dice"] >= 0.5, per_class  # sample.md: 16/16 reference runs >= 0.75
    assert per_class["kidney_left"]["dice"] is None or per_class["kidney_left"]["dice"] == 0.0
    assert "| liver |" in proc.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path, tmp_path):
    config = run.resolve_config(["--config", str(path), "--gpus", "0", "--data-dir", str(tmp_path)])
    written = yaml.safe_load(path.read_text())
    assert all(config[k] == v for k, v in written.items())


def test_compare_logs_the_summary_to_an_offline_wandb_run(tmp_path, monkeypatch, capsys):
    """The driver only: each child run is faked by writing its metrics.json."""

    def fake_run(cmd, env=None):
        out = Path(cmd[cmd.index("--output-dir") + 1]) / cmd[cmd.index("--run-name") + 1]
        out.mkdir(parents=True)
        seed, selfreg = int(cmd[cmd.index("--seed") + 1]), "--selfreg" in cmd
        dice = 0.8 + 0.01 * seed + (0.02 if selfreg else 0.0)
        metrics = {"dataset": "sample", "backbone": "unet", "selfreg": selfreg, "seed": seed,
                   "test": {"dice_mean": dice, "hd95_mean": 5.0, "per_class": {"liver": {"dice": dice, "hd95": 5.0}}}}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run.main(["--gpus", "0", "--compare", "--seeds", "0", "1", "--output-dir", str(tmp_path), "--run-name",
                     "cmp", "--wandb", "offline"]) == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["difference"]["liver"]["dice"]["mean"] == pytest.approx(0.02)
    assert list((tmp_path / "cmp").rglob("offline-run-*")), "the summary goes to an offline W&B run"
    assert "W&B comparison run" in capsys.readouterr().out
