"""The run folder's rules: an existing run is never modified unless asked, and a resume never changes the model.

A run folder ``<run.output_dir>/<run.name>/`` holds::

    config.yaml        the resolved configuration of the latest start (a resume records its allowed changes here)
    history.jsonl      one JSON line per event: "start" (time, command, W&B run id, SLURM job, environment),
                       "resume" (time, command, checkpoint and step, the changed settings with old and new values),
                       "interrupted" (signal, step, checkpoint written or kept), "finished"
    metrics.csv        every logged scalar (see lightning_selfreg.tracking.csv_logger), appended on resume
    checkpoints/       last.ckpt (every epoch, every run.checkpoint_every_n_steps steps, and on SIGTERM / SIGINT),
                       best-epoch=<n>.ckpt (best validation Dice)
    metrics.json, metrics.md   the test results, written at the end
    wandb/             the W&B run (online or offline)
    predictions/       with run.save_predictions

The rules (:func:`plan_run_folder`, before any data is read or anything is written):

* **A new run** needs a free name: an existing, non-empty run folder ends the command with exit status 2 naming it
  and the ways on (``--resume`` to continue it, a new ``--run-name``, or ``--overwrite`` to replace it).
* **``--overwrite``** replaces it, never losing it before the new run can start: once the new run is set up (every
  setting and data file checked), the old folder is renamed to ``<name>.replaced-<time>`` beside it (one atomic
  rename), the new run starts in a fresh folder, and the old one is deleted only when the new run has finished
  (``metrics.json`` written). An interrupted or failed new run leaves it there, to be renamed back.
* **``--resume``** continues from ``checkpoints/last.ckpt`` (or a newer ``hpc_ckpt_<n>.ckpt`` that Lightning wrote on
  a SLURM requeue signal). The configuration is compared with the one stored in that checkpoint: the settings in
  :data:`RESUMABLE` (those that do not change the trained model: ``max_epochs`` to extend the run, devices and
  strategy, data-loader workers, W&B mode and project, logging and checkpoint frequency, evaluation-only settings)
  may change and are recorded (``config.yaml`` gets the new values, ``history.jsonl`` lists each change with its
  old and new value); any other difference ends with exit status 2, listing every such key with both values, and
  leaves the folder byte for byte as it was. Changing the devices changes the global batch (per-device batch x
  devices) from that step on; ``max_epochs`` with the ``poly`` schedule changes the remaining learning rates.
* **A SLURM requeue** of the same job (``SLURM_RESTART_COUNT`` > 0 and the job id recorded at the start) resumes
  the run without ``--resume``: the requeued job runs the unchanged batch script. Without ``--run-name`` a run
  under SLURM is named after its job id (not the time), so that the requeued job finds its folder. When the run
  finishes, the requeues' ``hpc_ckpt_<n>.ckpt`` files (a full checkpoint each) that ``checkpoints/last.ckpt``
  supersedes are removed, and ``history.jsonl`` names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.cli import run_labels, run_name
from experiments.flags import ConfigError, RunOptions
from lightning_selfreg.utils.checks import SettingError

__all__ = ["RESUMABLE", "RunFolder", "check_output_dir", "config_changes", "plan_run_folder", "slurm_job"]

# Settings that may differ on --resume (a key or a key prefix of the configuration): they do not change the trained
# weights. Every other difference between the checkpoint's configuration and the new one refuses the resume. The
# validation settings among them (how often and on how much data, the sliding-window overlap) can change which
# `best-*.ckpt` is kept and tested: the change is recorded in history.jsonl.
RESUMABLE: tuple[str, ...] = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.min_epochs", "trainer.min_steps",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.enable_checkpointing", "trainer.profiler", "trainer.default_root_dir", "trainer.logger",
    "trainer.num_sanity_val_steps", "trainer.check_val_every_n_epoch", "trainer.val_check_interval",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.limit_predict_batches",
    "trainer.detect_anomaly", "trainer.enable_autolog_hparams", "trainer.model_registry",
    "data.init_args.num_workers", "data.init_args.cache", "data.init_args.cache_dir", "data.init_args.progress",
    "model.eval_protocol", "model.slice_batch_size", "model.sw_batch_size", "model.sw_overlap",
    "redundancy", "run",
)
HISTORY = "history.jsonl"
CHECKPOINT = Path("checkpoints") / "last.ckpt"


def slurm_job() -> str | None:
    """The SLURM job id of this process (``<array job>_<task>`` for an array task), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def first_process() -> bool:
    """Whether this is the first process of the run (not a DDP worker started by Lightning, srun or torchrun)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID",
                                                                     "NODE_RANK", "GROUP_RANK"))


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; a ``class_path`` node keeps its class under ``<key>.class_path``."""
    if not isinstance(config, Mapping) or not config:
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two configurations, as ``{dotted key: (old, new)}``.

    When a ``class_path`` differs (another network, DataModule or callback class), that key is reported and the
    arguments under it are not (they belong to different classes). A key present on one side only is reported
    with ``None`` on the other.
    """
    a, b = _flatten(old), _flatten(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    replaced = [k[: -len("class_path")] for k in changed if k.endswith("class_path")]
    return {k: v for k, v in changed.items()
            if not any(k.startswith(prefix) and not k.endswith("class_path") for prefix in replaced)}


def _resumable(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` (``--run.output_dir``) unless the run folders can be created under ``output_dir``.

    ``output_dir`` and every existing folder above it must be folders (not files), and the nearest existing one
    writable.
    """
    path = Path(output_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                inside = f" ({path} is inside it)" if parent != path else ""
                raise ConfigError("run.output_dir", f"expected a folder, found the file {parent}{inside}")
            if not os.access(parent, os.W_OK | os.X_OK):
                below = "" if parent == path else f" (the runs would go to {path})"
                raise ConfigError("run.output_dir", f"expected a writable folder, found {parent} read-only (no write "
                                                    f"permission or a read-only file system){below}")
            return


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short cannot happen (atomic rewrites), but never fail on the record
    return events


def checkpoint_step(path: Path) -> int | None:
    """``global_step`` stored in a checkpoint (memory-mapped read; None when the file cannot be read)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable file means "unknown"
        return None


def _describe(run_dir: Path) -> str:
    """What an existing run folder holds, for the message: finished / checkpoint at step N / empty of results."""
    parts = []
    if (run_dir / "metrics.json").is_file():
        parts.append("a finished run with metrics.json")
    last = run_dir / CHECKPOINT
    if last.is_file():
        step = checkpoint_step(last)
        parts.append(f"{CHECKPOINT} at step {step}" if step is not None else str(CHECKPOINT))
    if not parts:
        parts.append(f"{len(list(run_dir.iterdir()))} entries, no checkpoint")
    return ", ".join(parts)


def _wandb_id(name: str) -> str:
    """A W&B run id for a new run: the name (W&B's allowed characters) and a suffix unique to this start."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:100]
    suffix = hashlib.sha1(f"{name}{time.time_ns()}{os.getpid()}".encode()).hexdigest()[:8]
    return f"{safe}-{suffix}"


@dataclass
class RunFolder:
    """The run folder a command will write, decided (and checked) before anything is read or written.

    Attributes:
        path: ``<run.output_dir>/<run.name>``.
        name: ``run.name`` (given, or chosen: labels + time, or labels + SLURM job id).
        argv: The command line as typed (for the resume command and the history).
        resume_from: The checkpoint to continue from (``--resume`` or a SLURM requeue), else None.
        resume_step: Its ``global_step``.
        changes: On resume, the allowed settings that changed: ``{key: (old, new)}``.
        replace: ``--overwrite`` of an existing folder: it is moved aside when the run starts.
        replaced: Where it was moved (set by :meth:`start`).
        wandb_id: The W&B run id (kept over resumes).
        requeued: Resumed automatically as a SLURM requeue of the same job.
    """

    path: Path
    name: str
    argv: list[str]
    resume_from: Path | None = None
    resume_step: int | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    replace: bool = False
    replaced: Path | None = None
    wandb_id: str = ""
    requeued: bool = False

    @property
    def checkpoint(self) -> Path:
        """``checkpoints/last.ckpt`` of the run."""
        return self.path / CHECKPOINT

    def command(self, resume: bool = True, overwrite: bool = False) -> str:
        """The command that continues this run (``--resume``), or starts it again (``overwrite``)."""
        argv = [a for a in self.argv if a not in ("--resume", "--overwrite", "--run.resume=true",
                                                  "--run.overwrite=true")]
        names = ("--run-name", "--run.name")
        if not any(a in names or a.split("=", 1)[0] in names for a in argv):
            argv += ["--run-name", self.name]
        argv += ["--resume"] if resume else ["--overwrite"] if overwrite else []
        return "python -m experiments.run " + shlex.join(argv)

    def record(self, event: str, **values: Any) -> None:
        """Append one event to ``history.jsonl`` (the whole file is rewritten atomically)."""
        from lightning_selfreg.utils.files import atomic_write_text

        path = self.path / HISTORY
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        line = json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **values}, default=str)
        atomic_write_text(path, old + line + "\n")

    def start(self, config_text: str, environment: Mapping[str, Any]) -> None:
        """Create (or continue) the folder: move a replaced one aside, write ``config.yaml``, record the start."""
        from lightning_selfreg.utils.files import atomic_write_text, remove_orphaned_temp_files

        if self.replace and self.path.exists():
            aside = self.path.with_name(f"{self.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)  # one atomic rename: the old run stays whole until the new one finishes
            self.replaced = aside
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.path / "checkpoints"):  # temporary files of writes killed in an earlier run
            remove_orphaned_temp_files(folder)
        atomic_write_text(self.path / "config.yaml", config_text)
        common = {"command": self.command(resume=False), "argv": self.argv, "wandb_id": self.wandb_id,
                  "slurm_job": slurm_job()}
        if self.resume_from is None:
            self.record("start", **common, replaced=str(self.replaced) if self.replaced else None,
                        environment=dict(environment))
        else:
            self.record("resume", **common, checkpoint=str(self.resume_from), step=self.resume_step,
                        requeued=self.requeued, changed={k: list(v) for k, v in self.changes.items()},
                        environment=dict(environment))

    def finish(self) -> None:
        """Record the end; delete what the finished run supersedes.

        That is the folder a ``--overwrite`` moved aside (also when the run was interrupted and resumed since), and
        the ``hpc_ckpt_<n>.ckpt`` files of SLURM requeues
        (one full checkpoint per requeue, Lightning's naming) at or before the step of the final
        ``checkpoints/last.ckpt``: the run can continue from that one alone.
        """
        last = checkpoint_step(self.checkpoint) if self.checkpoint.is_file() else None
        steps = {p: checkpoint_step(p) for p in sorted(self.path.glob("hpc_ckpt_*.ckpt"))}
        superseded = [p for p, step in steps.items() if None not in (step, last) and step <= last]
        for path in superseded:
            path.unlink()
        self.record("finished", removed=[p.name for p in superseded])
        replaced = self.replaced or self._replaced_at_start()  # a resumed run: the start recorded it
        if replaced is not None and replaced.exists():
            shutil.rmtree(replaced)

    def _replaced_at_start(self) -> Path | None:
        """The folder the ``--overwrite`` that started this run moved aside (from ``history.jsonl``), or None."""
        starts = [e for e in _read_history(self.path) if e.get("event") == "start"]
        aside = starts[-1].get("replaced") if starts else None
        if not aside or not Path(aside).name.startswith(f"{self.name}.replaced-"):
            return None
        return Path(aside)


def _saved_config(run_dir: Path, checkpoint: Path) -> tuple[dict[str, Any] | None, str]:
    """The configuration the checkpoint was trained with (stored in it), else the folder's ``config.yaml``."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False).get("config")
    except Exception:  # noqa: BLE001 - check_checkpoint_file has already named a broken file
        saved = None
    if isinstance(saved, dict):
        return saved, str(checkpoint)
    path = run_dir / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path)
    return None, ""


def _newest_checkpoint(run_dir: Path) -> tuple[Path, int | None]:
    """``checkpoints/last.ckpt``, or a newer ``hpc_ckpt_<n>.ckpt`` (Lightning's SLURM requeue save) in the folder."""
    last = run_dir / CHECKPOINT
    candidates = [p for p in [last, *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))] if p.is_file()]
    steps = {p: checkpoint_step(p) for p in candidates}
    best = max(candidates, key=lambda p: -1 if steps[p] is None else steps[p], default=last)
    return best, steps.get(best)


def _format(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def plan_run_folder(config: Mapping[str, Any], argv: Sequence[str], ddp: bool = False) -> RunFolder:
    """Decide the run folder of a parsed configuration and check that the command may use it.

    Args:
        config: The parsed configuration (``SelfRegCLI(..., instantiate=False).config``).
        argv: The command line as typed.
        ddp: Whether the run is distributed (the chosen name is shared with the worker processes).

    Returns:
        The :class:`RunFolder`; nothing is written.

    Raises:
        ConfigError: An output folder that cannot be written; an existing run folder without ``--resume`` /
            ``--overwrite``; a resume without a complete checkpoint; a resume whose settings differ in a key
            outside :data:`RESUMABLE` (every such key is listed with its old and new value).
    """
    from lightning_selfreg.utils.checkpoint import CheckpointError, check_checkpoint_file

    run = config["run"]
    try:  # RunOptions' own checks (resume needs a name, not both resume and overwrite, ...) before the folder
        RunOptions(**run)
    except SettingError as err:
        raise ConfigError(f"run.{err.parameter}", str(err)) from err
    check_output_dir(run["output_dir"])
    name = run["name"]
    if not name and slurm_job():  # the requeued job must find this folder again
        labels = run_labels(config)
        name = f"{labels['dataset']}-{labels['backbone']}-{'selfreg' if labels['selfreg'] else 'baseline'}-" \
               f"seed{labels['seed']}-slurm{slurm_job()}"
    name = run_name({**config, "run": {**run, "name": name}}, ddp)
    run_dir = Path(run["output_dir"]) / name
    folder = RunFolder(run_dir, name, list(argv))
    history = _read_history(run_dir)
    started = next((e for e in history if e.get("event") == "start"), {})
    requeued = (not run["resume"] and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and slurm_job() is not None
                and started.get("slurm_job") == slurm_job())
    if not (run["resume"] or requeued):
        if first_process() and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            if not run_dir.is_dir():
                raise ConfigError("run.name", f"{run_dir} exists and is a file, not a run folder")
            if not run.get("overwrite"):
                raise ConfigError("run.name", f"the run folder {run_dir} already exists ({_describe(run_dir)}); "
                                              "continue it with --resume, start a new run with another --run-name, "
                                              "or replace it with --overwrite")
            folder.replace = True
        folder.wandb_id = _wandb_id(name)
        return folder
    where = "" if run["resume"] else f"(SLURM requeue of job {slurm_job()}) "
    if not run_dir.is_dir():
        raise ConfigError("run.resume", f"{where}the run folder {run_dir} does not exist, so {run_dir / CHECKPOINT} "
                                        "does not exist (start the run without --resume)")
    checkpoint, step = _newest_checkpoint(run_dir)
    if not checkpoint.is_file():
        raise ConfigError("run.resume", f"{where}{checkpoint} does not exist (the run stopped before its first "
                                        "checkpoint; start it again with --overwrite)")
    try:
        check_checkpoint_file(checkpoint)  # empty / truncated / corrupt: named now, not mid-setup
    except CheckpointError as err:
        raise ConfigError("run.resume", f"{where}{err}") from err
    saved, source = _saved_config(run_dir, checkpoint)
    now = {**config, "run": {**run, "name": name}}
    changes = config_changes(saved, now) if saved is not None else {}
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused:
        listed = "; ".join(f"{k}: {_format(a)} -> {_format(b)}" for k, (a, b) in refused.items())
        raise ConfigError("run.resume", f"{where}{len(refused)} setting(s) differ from the run's ({source}) and would "
                                        f"change the trained model: {listed}. Resume with the run's settings, or start "
                                        "a new run (another --run-name)")
    folder.resume_from, folder.resume_step, folder.requeued = checkpoint, step, requeued
    folder.changes = {k: v for k, v in changes.items() if k not in ("run.resume", "run.overwrite")}
    folder.wandb_id = started.get("wandb_id") or name.replace("/", "-")  # a folder of an older version: its id
    return folder
