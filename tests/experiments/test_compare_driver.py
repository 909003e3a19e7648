"""The comparison driver (experiments.compare) with faked child runs: progress, ETA, resume, W&B grouping."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments import compare


def last(cmd, flag):
    """The value of the last ``flag`` in ``cmd`` (later flags win, as in the CLI)."""
    return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]


class FakeRuns:
    """Stands in for compare.run_child: writes the child's metrics.json (with per-case Dice), records its call."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cmd, env):
        out = Path(last(cmd, "--output-dir")) / last(cmd, "--run-name")
        self.calls.append({"name": out.name, "resume": "--resume" in cmd, "env": env})
        if len(self.calls) == self.fail_at:  # killed after its first checkpoint
            (out / "checkpoints").mkdir(parents=True)
            (out / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
            return 1
        out.mkdir(parents=True, exist_ok=True)
        seed, selfreg = int(last(cmd, "--seed")), "--no-selfreg" not in cmd
        dice = 0.8 + 0.01 * seed + (0.02 if selfreg else 0.0)
        metrics = {"dataset": "sample", "backbone": "unet", "selfreg": selfreg, "seed": seed,
                   "test": {"dice_mean": dice, "hd95_mean": 5.0, "per_class": {"liver": {"dice": dice, "hd95": 5.0}}},
                   "cases": [{"case": "c0", "mean_dice": dice, "dice": {"liver": dice}}]}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 0


FLAGS = ["--gpus", "0", "--wandb", "disabled", "--run-name", "cmp"]


def test_an_interrupted_comparison_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    first = FakeRuns(fail_at=3)
    monkeypatch.setattr(compare, "run_child", first)
    assert compare.main([*FLAGS, "--output-dir", str(tmp_path), "--seeds", "0", "1"]) == 1
    err = capsys.readouterr().err
    assert "run 3/4 (baseline-seed1) failed" in err and "--run-name cmp" in err
    (tmp_path / "cmp" / "selfreg-seed1").mkdir()  # a folder that died before its first checkpoint
    (tmp_path / "cmp" / "selfreg-seed1" / "config.yaml").write_text("x")

    again = FakeRuns()
    monkeypatch.setattr(compare, "run_child", again)
    assert compare.main([*FLAGS, "--output-dir", str(tmp_path), "--seeds", "0", "1"]) == 0
    assert [(c["name"], c["resume"]) for c in again.calls] == [("baseline-seed1", True), ("selfreg-seed1", False)]
    assert (tmp_path / "cmp" / "selfreg-seed1.incomplete-1" / "config.yaml").read_text() == "x"  # kept aside
    out = capsys.readouterr().out
    assert "run 1/4: baseline, seed 0: finished earlier, kept" in out
    assert "run 3/4: baseline, seed 1 (resumed)" in out and "ETA after this run" in out
    assert "run 4/4: selfreg, seed 1 -> " in out and "ETA of the comparison" in out
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["difference"]["liver"]["dice"]["mean"] == pytest.approx(0.02)
    assert "liver: +2.0 pp [+2.0, +2.0]: SelfReg better" in out
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.*")) == ["compare.json", "compare.png",
                                                                     "selfreg-seed1.incomplete-1", "summary.json",
                                                                     "summary.md"]
    # W&B: one group per comparison, the arm as job type, arm and seed as tags (read by wandb.init in the child)
    env = again.calls[0]["env"]
    assert (env["WANDB_RUN_GROUP"], env["WANDB_JOB_TYPE"], env["WANDB_TAGS"]) == ("cmp", "baseline",
                                                                                   "baseline,seed1")

    # more seeds: only the new ones run; other flags: refused before anything runs
    more = FakeRuns()
    monkeypatch.setattr(compare, "run_child", more)
    assert compare.main([*FLAGS, "--output-dir", str(tmp_path), "--seeds", "0", "1", "2"]) == 0
    assert [c["name"] for c in more.calls] == ["baseline-seed2", "selfreg-seed2"]
    assert compare.main([*FLAGS, "--output-dir", str(tmp_path), "--lr", "0.1"]) == 2
    assert "was started with the flags" in capsys.readouterr().err and len(more.calls) == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", "0", "-1"], "--seeds: expected integers in [0, 4294967295], found 0 -1"),
    (["--seeds", "0", "0"], "--seeds: expected distinct seeds (the pairs are per seed), found 0 0"),
    (["--overwrite"], "--overwrite: a comparison keeps its finished runs"),
    (["--run-name", "single"], "holds no comparison (compare.json)"),
])
def test_a_bad_comparison_is_refused_before_any_run(tmp_path, monkeypatch, capsys, flags, message):
    runs = FakeRuns()
    monkeypatch.setattr(compare, "run_child", runs)
    (tmp_path / "single").mkdir()  # an ordinary run folder of that name
    (tmp_path / "single" / "metrics.json").write_text("{}")
    assert compare.main([*FLAGS, "--output-dir", str(tmp_path), *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert runs.calls == [] and sorted(p.name for p in (tmp_path / "single").iterdir()) == ["metrics.json"]


CHILD = """
import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)  # a checkpoint takes a moment
    pathlib.Path(sys.argv[1]).write_text(f"saved on {signum}")
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_comparison_reaches_the_running_child_and_waits_for_its_checkpoint(tmp_path, sig):
    saved, ready = tmp_path / "saved", tmp_path / "ready"

    def send():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)  # Ctrl+C at the terminal, or the scheduler's SIGTERM, to the driver

    threading.Thread(target=send, daemon=True).start()
    status = compare.run_child([sys.executable, "-c", CHILD, str(saved), str(ready)], dict(os.environ))
    assert status == 128 + sig and saved.read_text() == f"saved on {int(sig)}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the driver's handlers are put back


def test_the_child_runs_are_grouped_in_wandb(tmp_path):
    """A fresh process (as each child run is) with the environment the driver sets: W&B reads group, type, tags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                "WANDB_RUN_GROUP": "cmp", "WANDB_JOB_TYPE": "selfreg", "WANDB_TAGS": "selfreg,seed2"})
    code = (f"import wandb; r = wandb.init(project='p', dir={str(tmp_path)!r}); "
            "print(r.group, r.job_type, ','.join(r.tags)); r.finish()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["cmp", "selfreg", "selfreg,seed2"], out.stderr[-2000:]
