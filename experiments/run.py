"""Train and test a segmentation network with (or without) SelfReg: ``python -m experiments.run [flags]``.

With no flags it trains the paper's UNet + SelfReg on the CT sample bundled with the package (the preset
``experiments/configs/sample.yaml`` on a CPU, about 1.5 minutes on 2 cores; ``sample_gpu.yaml`` on a GPU), evaluates
the test patient per organ (Dice, HD95) and prints the table.

The command line is LightningCLI over the library's constructors (:mod:`experiments.cli`): ``--model.*``
(:class:`~lightning_selfreg.SelfRegSegModule`, ``--model.net`` any network by class path), ``--data.*`` (a
DataModule by class path), ``--selfreg.*`` (the SelfReg callback; ``--no-selfreg`` for the baseline),
``--trainer.*``, ``--run.*`` (:class:`~experiments.cli.RunOptions`), ``--seed_everything``; ``--config FILE`` (YAML
in the same keys; ``--print_config`` writes one that runs as is), and the short aliases of
:data:`experiments.cli.ALIASES` (``--gpus 4``, ``--dataset``, ``--data-dir``, ``--lambda-scr``, ...). Later flags
win over earlier ones and over the files.

Every run writes ``<run.output_dir>/<run.name>/config.yaml`` (the resolved configuration), ``checkpoints/``
(best by validation Dice when there is a validation split, and ``last.ckpt`` every epoch; each checkpoint carries
the configuration, so ``SelfRegSegModule.load_from_checkpoint(path)`` rebuilds the model), the W&B (or CSV) logs,
``plan.json`` (``--dataset nnunet``: :mod:`experiments.planning`), and, atomically, pictures to look at without
W&B: ``curves.png`` (loss terms, validation Dice per class), ``redundancy.png`` (channel redundancy per block,
first and last epoch), ``overlays/`` (every test case, lowest Dice first), then ``metrics.json`` and
``metrics.md`` (per-organ table with units, both protocols, per-case Dice, links to the pictures). The terminal
gets a start line, one line per epoch with the run's ETA (a bar on a terminal) and the per-organ table
(:mod:`experiments.terminal`). ``--resume`` continues a killed run from its
``last.ckpt``. ``--compare --seeds 0 1 2`` trains SelfReg and the baseline for every seed
(:mod:`experiments.compare`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from experiments.cli import ConfigError, RunOptions, SelfRegCLI, expand_aliases, run_labels, run_name
from lightning_selfreg.utils.files import atomic_write_text

# identity of a run: a resume must not change these (the weights would not fit or the run would be another one)
RESUME_KEYS = ("model.net", "data.class_path", "selfreg", "seed_everything", "data.init_args.image_size")


def _get(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _check_resume(cli: SelfRegCLI, run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from, after checking it and the saved configuration."""
    from lightning_selfreg.utils.checkpoint import CheckpointError, check_checkpoint_file

    resume_from = run_dir / "checkpoints" / "last.ckpt"
    if not resume_from.is_file():
        raise ConfigError("run.resume", f"{resume_from} does not exist")
    try:
        check_checkpoint_file(resume_from)  # empty / truncated / corrupt: named now, not mid-setup
    except CheckpointError as err:
        raise ConfigError("run.resume", str(err)) from err
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = yaml.safe_load(cli.parser.dump(cli.config, skip_unset=False))
        different = [k for k in RESUME_KEYS if _get(saved, k) != _get(now, k)]
        if different:
            raise ConfigError("run.resume", f"settings {different} differ from {saved_path}")
    return resume_from


class ConfigInCheckpoint(pl.Callback):
    """Store the run's resolved configuration (its ``config.yaml``) in every checkpoint, under ``"config"``.

    The model's own hyper-parameters rebuild the network (``SelfRegSegModule.load_from_checkpoint``); this is the
    rest of the run: data and preprocessing, SelfReg on/off with its lambdas and taps, trainer, seed.

    Args:
        config: The configuration as plain YAML-able data.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Add ``checkpoint["config"]``."""
        checkpoint["config"] = self.config


def run_callbacks(cli: SelfRegCLI) -> tuple[list, Any, list, dict[str, Any]]:
    """The run's callbacks, logger, checkpoint plugin and Trainer overrides, from ``cli``'s configuration.

    The ``run_parts`` of :class:`SelfRegCLI`, called when it builds the Trainer; decides the run folder
    (``cli.run_dir``) and the W&B mode (``cli.wandb_mode``, which may fall back to offline) but writes nothing.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_selfreg.callbacks import (
        CurvesWriter,
        FiniteLossGuard,
        ImagesPerSecondMonitor,
        MetricsWriter,
        OverlayWriter,
        RedundancyFigure,
        RNGStateCheckpoint,
        SegmentationPanels,
        TestPredictionWriter,
        TestResultsTable,
    )
    from lightning_selfreg.callbacks.progress import EpochLines, RunProgressBar
    from lightning_selfreg.tracking.report import settings_line
    from lightning_selfreg.tracking.wandb_mode import WandbUnavailable, resolve_wandb_mode
    from lightning_selfreg.utils.checkpoint import AtomicCheckpointIO

    options: RunOptions = cli.config_init["run"]
    trainer = cli.config["trainer"]
    ddp = "ddp" in str(trainer.get("strategy")) or (trainer.get("num_nodes") or 1) > 1
    name = run_name(cli.config, ddp)
    run_dir = Path(options.output_dir) / name
    resume_from = _check_resume(cli, run_dir) if options.resume else None
    try:  # before anything is written: may fall back to offline
        mode = resolve_wandb_mode(options.wandb, sync_hint=str(run_dir / "wandb" / "offline-run-*"))
    except WandbUnavailable as err:
        raise ConfigError("run.wandb", str(err)) from err
    if mode != "disabled":
        from experiments.terminal import quiet_wandb

        quiet_wandb(mode)  # the run says in one line where its W&B run is (experiments.terminal.wandb_line)
    fast = bool(trainer.get("fast_dev_run"))
    has_val = cli.datamodule.has_validation
    checkpoint_dir = run_dir / "checkpoints"
    labels = run_labels(cli.config)
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_unset=False))
    callbacks = [
        ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch}", monitor="val/dice", mode="max",
                        save_top_k=1, save_last=False) if has_val else None,
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        enable_version_counter=False),
        # mid-epoch saves to the same file (a separate callback: one ModelCheckpoint has one trigger)
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        every_n_train_steps=options.checkpoint_every_n_steps, enable_version_counter=False)
        if options.checkpoint_every_n_steps else None,
        RNGStateCheckpoint(),
        FiniteLossGuard(),
        ImagesPerSecondMonitor(),
        SegmentationPanels(),
        TestResultsTable(),
        # the run folder's pictures (issue 22): curves.png, redundancy.png, overlays/ (before MetricsWriter, which
        # links them from metrics.md)
        CurvesWriter(run_dir / "curves.png", title=settings_line(config)),
        RedundancyFigure(run_dir / "redundancy.png"),
        OverlayWriter(run_dir / "overlays"),
        MetricsWriter(run_dir, info=labels, settings=settings_line(config)),
        TestPredictionWriter(run_dir / "predictions") if options.save_predictions else None,
        None if fast else LearningRateMonitor(logging_interval="step"),  # fast_dev_run has no logger
        ConfigInCheckpoint(config),
        # progress with the run's ETA: one line per epoch into a file, a bar on a terminal
        None if trainer.get("enable_progress_bar") is False else RunProgressBar() if sys.stdout.isatty()
        else EpochLines(),
    ]
    if mode == "disabled":
        logger = CSVLogger(save_dir=run_dir, name="csv", version="")
    else:
        logger = WandbLogger(project=options.wandb_project, name=name, save_dir=str(run_dir),
                             offline=mode == "offline", id=name.replace("/", "-"), resume="allow",
                             config=config)
    extra = {} if has_val else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    cli.run_dir, cli.wandb_mode, cli.resume_from, cli.has_validation = run_dir, mode, resume_from, has_val
    return [c for c in callbacks if c is not None], logger, [AtomicCheckpointIO()], extra


def train_and_test(cli: SelfRegCLI) -> dict[str, Any] | None:
    """Fit, test, write the run folder; returns the ``metrics.json`` content on rank 0 (else None)."""
    from lightning.pytorch.loggers import WandbLogger

    from experiments.terminal import end_report, start_line
    from lightning_selfreg.tracking.environment import log_run_environment
    from lightning_selfreg.utils.files import remove_orphaned_temp_files

    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    run_dir, checkpoint_dir = cli.run_dir, cli.run_dir / "checkpoints"
    if trainer.is_global_zero:
        print(start_line(cli), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, checkpoint_dir):  # temporary files of writes killed in an earlier run here
            remove_orphaned_temp_files(folder)
        if cli.resume_from is None:
            atomic_write_text(run_dir / "config.yaml", cli.parser.dump(cli.config, skip_unset=False))
        if getattr(cli, "plan", None) is not None:  # nnU-Net: what was planned, and what the user's flags overrode
            from experiments.planning import plan_record

            record = plan_record(cli.plan, cli.config)
            print(record["line"] + (f"; overridden by your flags: {record['overridden']}" if record["overridden"]
                                    else ""), flush=True)
            atomic_write_text(run_dir / "plan.json", json.dumps(record, indent=2) + "\n")
        log_run_environment(trainer.logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(cli.resume_from) if cli.resume_from else None)
    best = "best" if cli.has_validation and not trainer.fast_dev_run else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    logger = trainer.logger
    if not trainer.is_global_zero:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(end_report(cli, metrics), flush=True)  # the per-organ table with units, the run folder, W&B in a line
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # close the run so that a later run in this process starts its own
    return metrics


def _error_line(err: BaseException, argv: list[str]) -> str:
    """One line for ``err``, a setting named as the user typed it in ``argv``."""
    from lightning_selfreg.data import DataError

    if isinstance(err, DataError):  # about a file under --data-dir, or about the setting `err.parameter`
        err = ConfigError(f"data.{err.parameter}", str(err))
    if isinstance(err, ConfigError):
        return err.line(argv)
    return str(err).strip("'\"").splitlines()[0] if str(err) else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one experiment (or a comparison, ``--compare``); returns the process exit status."""
    from experiments.terminal import quiet_framework

    quiet_framework()  # Lightning's tips and known-harmless notices; real warnings still show
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:
        from experiments import compare

        return compare.main([a for a in argv if a != "--compare"])
    from lightning_selfreg.data import DataError

    try:
        from experiments.planning import plan_arguments

        args, plan = plan_arguments(expand_aliases(argv))  # --dataset nnunet: planned from the data and device
        cli = SelfRegCLI(args, run_parts=run_callbacks)
        cli.plan = plan
        train_and_test(cli)
    except (ConfigError, DataError, FileNotFoundError, ImportError) as err:
        print(f"error: {_error_line(err, argv)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
