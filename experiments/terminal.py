"""What ``experiments.run`` says on the terminal: a start line, one line per epoch, the end table, W&B in a line.

:func:`start_line` and :func:`end_report` are the run's first and last words; the epochs in between are
:class:`~lightning_selfreg.callbacks.progress.EpochLines` (output to a file) or
:class:`~lightning_selfreg.callbacks.progress.RunProgressBar` (a terminal). Framework tips and known-harmless
notices are silenced at their source (:func:`quiet_framework`, :func:`quiet_wandb`).

Silenced, each by its exact text on the logger or warning that emits it (everything else, real warnings included,
still shows):

- Lightning's start-up notices: the LitLogger tip, ``GPU/TPU/HPU available``, ``Seed set to``, ``Loading
  train_dataloader to estimate number of stepping batches``, ``Trainer.fit stopped: max_epochs reached`` (the run
  prints its own start line, one line per epoch and the end table);
- the ``isinstance(treespec, LeafSpec)`` deprecation that Lightning's pytree helper triggers in torch >= 2.10
  (Lightning's code, not the user's);
- W&B's banners, run history and summary (``wandb.Settings(silent=True)``, unless ``WANDB_SILENT`` is set): the
  run prints one line of its own, where the W&B run is and, offline, the ``wandb sync`` command.

The model summary is off by default (``trainer.enable_model_summary``: its FLOPs column is zeros for these
modules); the start line gives the network and its parameter count.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = ["HARMLESS", "end_report", "quiet_framework", "quiet_wandb", "start_line", "wandb_line"]

# message starts of Lightning's INFO notices that say nothing a user of this script needs
HARMLESS = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "Seed set to", "`Trainer.fit` stopped:",
            "Loading `train_dataloader` to estimate number of stepping batches")
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning.fabric.utilities.seed", "lightning_utilities.core.rank_zero")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage())).startswith(HARMLESS)


_FILTER = _DropHarmless()


def quiet_framework() -> None:
    """Install the filters (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def quiet_wandb(mode: str) -> None:
    """Make W&B silent for this process, unless ``WANDB_SILENT`` says otherwise.

    Args:
        mode: The run's W&B mode (``"online"`` / ``"offline"``): W&B's process-wide settings are fixed here, so
            they must carry it (an offline run would otherwise ask for a login).
    """
    if os.environ.get("WANDB_SILENT") is not None:
        return
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True, mode=mode))


def start_line(cli: Any) -> str:
    """The run in one line: its settings, the network's size, the device, the run folder."""
    from lightning_selfreg.tracking.report import settings_line

    config = yaml.safe_load(cli.parser.dump(cli.config, skip_unset=False))
    trainer, module = cli.trainer, cli.model
    parameters = sum(p.numel() for p in module.parameters())
    device = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower().replace("cuda", "gpu")
    devices = f"{trainer.num_devices} x {device}" if trainer.num_devices > 1 or trainer.num_nodes > 1 else device
    return (f"run: {settings_line(config)} | {type(module.net).__name__} {parameters / 1e6:.2f} M parameters | "
            f"{devices} | {cli.run_dir}")


def wandb_line(trainer: Any, mode: str) -> str | None:
    """Where the W&B run is (and the ``wandb sync`` command when it is offline), or None without W&B."""
    from lightning.pytorch.loggers import WandbLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is None:
        return None
    run = logger.experiment
    if mode == "offline":
        folder = Path(run.dir).parent
        return f"W&B (offline): {folder}; upload with `wandb sync {folder}`"
    return f"W&B: {getattr(run, 'url', None) or Path(run.dir).parent}"


def end_report(cli: Any, metrics: dict[str, Any]) -> str:
    """The end of a run: the per-organ table of the reported protocol with units, where the rest is, the folder."""
    from lightning_selfreg.tracking.report import format_organ_table

    protocol = metrics["eval_protocol"]
    results = metrics["protocols"]
    spacing_known = (metrics.get("hd95_units") or {}).get("strict") == "mm"
    arm = "SelfReg" if metrics.get("selfreg") else "baseline"
    lines = ["", f"Test results ({metrics.get('dataset')}, {metrics.get('backbone')}, {arm}, seed "
             f"{metrics.get('seed')}; protocol {protocol}, {results[protocol].get('num_cases')} case(s)):",
             format_organ_table(results, spacing_known, protocols=[protocol]), "",
             f"both protocols, per-case Dice and the pictures: {cli.run_dir / 'metrics.md'}",
             f"run folder: {cli.run_dir}"]
    line = wandb_line(cli.trainer, getattr(cli, "wandb_mode", "disabled"))
    if line:
        lines.append(line)
    return "\n".join(lines)
