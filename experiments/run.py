"""Train and test a segmentation network with (or without) SelfReg: ``python -m experiments.run [flags]``.

With no flags it trains the paper's UNet + SelfReg on the CT sample bundled with the package (the preset
``experiments/configs/sample.yaml`` on a CPU, about a minute on 2 quiet cores; ``sample_gpu.yaml`` on a GPU), evaluates
the test patient per organ (Dice, HD95) and prints the table.

The command line is LightningCLI over the library's constructors (:mod:`experiments.cli`): ``--model.*``
(:class:`~lightning_selfreg.SelfRegSegModule`, ``--model.net`` any network by class path), ``--data.*`` (a
DataModule by class path), ``--selfreg.*`` (the SelfReg callback; ``--no-selfreg`` for the baseline),
``--trainer.*``, ``--run.*`` (:class:`~experiments.flags.RunOptions`), ``--seed_everything``; ``--config FILE`` (YAML
in the same keys; ``--print_config`` writes one that runs as is), and the short aliases of
:data:`experiments.flags.ALIASES` (``--gpus 4``, ``--dataset``, ``--data-dir``, ``--lambda-scr``, ...). Later flags
win over earlier ones and over the files.

Every run writes ``<run.output_dir>/<run.name>/`` (:mod:`experiments.run_folder` lists its files and rules):
``config.yaml`` (the resolved configuration), ``history.jsonl`` (starts, resumes with their changed settings,
interruptions), ``metrics.csv`` (every logged scalar, also beside W&B; appended on resume), ``checkpoints/``
(best by validation Dice when there is a validation split, and ``last.ckpt`` every epoch; each checkpoint carries
the configuration, so ``SelfRegSegModule.load_from_checkpoint(path)`` rebuilds the model), the W&B logs,
``plan.json`` (``--dataset nnunet``: :mod:`experiments.planning`), and, atomically, pictures to look at without
W&B: ``curves.png`` (loss terms, validation Dice per class), ``redundancy.png`` (channel redundancy per block,
first and last epoch), ``overlays/`` (every test case, lowest Dice first), then ``metrics.json`` and
``metrics.md`` (per-organ table with units, both protocols, per-case Dice, links to the pictures). The terminal
gets a start line, one line per epoch with the run's ETA (a bar on a terminal) and the per-organ table
(:mod:`experiments.terminal`). An existing run folder is never modified unless asked: ``--resume`` continues it
from ``last.ckpt`` (settings that would change the trained model must be the run's), ``--overwrite`` replaces it.
``--compare --seeds 0 1 2`` trains SelfReg and the baseline for every seed
(:mod:`experiments.compare`).

Exit status: 0 when the run finished; 2 for a bad setting, bad data, an existing run folder, an output that cannot
be written (a full disk, a read-only folder; the last complete checkpoint stays intact), each with one line on
stderr naming the file or setting; 143 after SIGTERM and 130 after SIGINT (Ctrl+C), having saved a resumable
checkpoint at the current step and printed the command that resumes it (see
:class:`~lightning_selfreg.callbacks.GracefulStop`; under SLURM, Lightning's auto-requeue also saves and
requeues, and the requeued job resumes by itself).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import lightning.pytorch as pl
import yaml

from experiments.cli import SelfRegCLI, run_labels
from experiments.flags import ConfigError, RunOptions, expand_aliases
from experiments.run_folder import RunFolder, checkpoint_step, plan_run_folder
from lightning_selfreg.utils.files import atomic_write_text


class ConfigInCheckpoint(pl.Callback):
    """Store the run's resolved configuration (its ``config.yaml``) in every checkpoint, under ``"config"``.

    The model's own hyper-parameters rebuild the network (``SelfRegSegModule.load_from_checkpoint``); this is the
    rest of the run: data and preprocessing, SelfReg on/off with its lambdas and taps, trainer, seed. A resume
    compares its settings with these (:func:`experiments.run_folder.plan_run_folder`).

    Args:
        config: The configuration as plain YAML-able data.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Add ``checkpoint["config"]``."""
        checkpoint["config"] = self.config


def dump_config(cli: SelfRegCLI) -> str:
    """The resolved configuration as YAML, with the unset (None) values (what ``config.yaml`` holds)."""
    return cli.parser.dump(cli.config, skip_unset=False)


def _is_ddp(config: Any) -> bool:
    trainer = config["trainer"]
    return "ddp" in str(trainer.get("strategy")) or (trainer.get("num_nodes") or 1) > 1


def run_callbacks(cli: SelfRegCLI, folder: RunFolder) -> tuple[list, Any, list, dict[str, Any]]:
    """The run's callbacks, loggers, checkpoint plugin and Trainer overrides, from ``cli``'s configuration.

    The ``run_parts`` of :class:`SelfRegCLI`, called when it builds the Trainer; decides the W&B mode
    (``cli.wandb_mode``, which may fall back to offline) but writes nothing. The loggers: ``metrics.csv`` always
    (:class:`~lightning_selfreg.tracking.csv_logger.MetricsCSVLogger`), and W&B unless ``run.wandb`` is
    ``disabled`` (the same W&B run id over resumes).
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    from lightning_selfreg.callbacks import (
        CurvesWriter,
        FiniteLossGuard,
        GracefulStop,
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
    from lightning_selfreg.tracking.csv_logger import MetricsCSVLogger
    from lightning_selfreg.tracking.report import settings_line
    from lightning_selfreg.tracking.wandb_mode import WandbUnavailable, resolve_wandb_mode
    from lightning_selfreg.utils.checkpoint import AtomicCheckpointIO

    options: RunOptions = cli.config_init["run"]
    trainer = cli.config["trainer"]
    run_dir = folder.path
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
    config = yaml.safe_load(dump_config(cli))
    stop = GracefulStop(folder.checkpoint)
    callbacks = [
        ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch}", monitor="val/dice", mode="max",
                        save_top_k=1, save_last=False) if has_val else None,
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        enable_version_counter=False),
        # mid-epoch saves to the same file (a separate callback: one ModelCheckpoint has one trigger)
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        every_n_train_steps=options.checkpoint_every_n_steps, enable_version_counter=False)
        if options.checkpoint_every_n_steps else None,
        stop,
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
    loggers: list = [MetricsCSVLogger(run_dir / "metrics.csv")]
    if mode != "disabled":
        loggers.insert(0, WandbLogger(project=options.wandb_project, name=folder.name, save_dir=str(run_dir),
                                      offline=mode == "offline", id=folder.wandb_id, resume="allow",
                                      config=config))
    # default_root_dir: where Lightning's SLURM auto-requeue writes hpc_ckpt_<n>.ckpt (and looks for it)
    extra: dict[str, Any] = {"default_root_dir": str(run_dir)}
    if not has_val:
        extra.update(limit_val_batches=0, num_sanity_val_steps=0)
    cli.run_dir, cli.wandb_mode, cli.resume_from, cli.has_validation = run_dir, mode, folder.resume_from, has_val
    cli.graceful_stop = stop
    return [c for c in callbacks if c is not None], loggers, [AtomicCheckpointIO()], extra


def train_and_test(cli: SelfRegCLI, folder: RunFolder) -> dict[str, Any] | None:
    """Start (or continue) the run folder, fit, test; returns the ``metrics.json`` content on rank 0 (else None)."""
    from lightning.pytorch.loggers import WandbLogger

    from experiments.terminal import end_report, start_line
    from lightning_selfreg.tracking.environment import log_run_environment

    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    run_dir = folder.path
    wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if trainer.is_global_zero:
        print(start_line(cli), flush=True)
        environment = log_run_environment(None)
        folder.start(dump_config(cli), environment)
        if folder.replaced is not None:
            print(f"--overwrite: the previous run folder was moved to {folder.replaced}; it is deleted when this run "
                  "has finished", file=sys.stderr)
        if folder.requeued:
            print(f"SLURM requeue: resuming {run_dir} from {folder.resume_from} (step {folder.resume_step})",
                  file=sys.stderr)
        if getattr(cli, "plan", None) is not None:  # nnU-Net: what was planned, and what the user's flags overrode
            from experiments.planning import plan_record

            record = plan_record(cli.plan, cli.config)
            print(record["line"] + (f"; overridden by your flags: {record['overridden']}" if record["overridden"]
                                    else ""), flush=True)
            atomic_write_text(run_dir / "plan.json", json.dumps(record, indent=2) + "\n")
        if wandb is not None:
            wandb.log_hyperparams({"env": environment})
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(folder.resume_from) if folder.resume_from else None)
    best = "best" if cli.has_validation and not trainer.fast_dev_run else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    if not trainer.is_global_zero:
        if wandb is not None:
            wandb.experiment.finish()
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(end_report(cli, metrics), flush=True)  # the per-organ table with units, the run folder, W&B in a line
    if wandb is not None:
        wandb.experiment.finish()  # close the run so that a later run in this process starts its own
    folder.finish()
    return metrics


def _error_line(err: BaseException, argv: list[str]) -> str:
    """One line for ``err``, a setting named as the user typed it in ``argv``."""
    from lightning_selfreg.data import DataError

    if isinstance(err, DataError):  # about a file under --data-dir, or about the setting `err.parameter`
        err = ConfigError(f"data.{err.parameter}", str(err))
    if isinstance(err, ConfigError):
        return err.line(argv)
    return str(err).strip("'\"").splitlines()[0] if str(err) else type(err).__name__


def _last_checkpoint(folder: RunFolder | None) -> str:
    """`` (the last complete checkpoint <path>, step N, is intact)`` when the run has one."""
    if folder is None or not folder.checkpoint.is_file():
        return ""
    step = checkpoint_step(folder.checkpoint)
    return f"; the last complete checkpoint {folder.checkpoint} (step {step}) is intact"


def _interrupted(cli: SelfRegCLI | None, folder: RunFolder, signum: int | None) -> int:
    """Report an interrupted run in one line (where it stopped, what was saved, the command that resumes it)."""
    stop = getattr(cli, "graceful_stop", None)
    signum = signum or (stop.signal if stop is not None else None) or signal.SIGTERM
    name = signal.Signals(signum).name
    stage = stop.stage if stop is not None else None
    kept = folder.checkpoint if folder.checkpoint.is_file() else None
    step = stop.saved_step if stop is not None and stop.saved_step is not None else \
        checkpoint_step(kept) if kept is not None else None
    if stop is not None and stop.saved_path is not None:
        what = f"saved {stop.saved_path} at step {stop.saved_step}; resume with: {folder.command()}"
    elif stage == "test":
        what = f"training had finished ({kept}, step {step}); test it with: {folder.command()}"
    elif kept is not None:
        during = " during validation" if stage == "validate" else ""
        what = f"stopped{during}; the last checkpoint {kept} (step {step}) is kept; resume with: {folder.command()}"
    else:
        what = f"stopped before the first checkpoint, nothing to resume; start again with: " \
               f"{folder.command(resume=False, overwrite=folder.path.exists())}"
    first = cli is None or getattr(cli, "trainer", None) is None or cli.trainer.is_global_zero
    if first and folder.path.is_dir():
        try:
            folder.record("interrupted", signal=name, stage=stage, step=step,
                          checkpoint=str(stop.saved_path or kept) if stop is not None else str(kept))
        except OSError:
            pass
    if first:  # one line for the run, not one per DDP rank
        print(f"interrupted by {name}: {what}", file=sys.stderr)
    return 128 + int(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one experiment (or a comparison, ``--compare``); returns the process exit status."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from experiments.terminal import quiet_framework

    quiet_framework()  # Lightning's tips and known-harmless notices; real warnings still show
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:
        from experiments import compare

        return compare.main([a for a in argv if a != "--compare"])
    from lightning_selfreg.data import DataError

    folder: RunFolder | None = None
    cli: SelfRegCLI | None = None
    try:
        from experiments.planning import plan_arguments

        args, plan = plan_arguments(expand_aliases(argv))  # --dataset nnunet: planned from the data and device
        parsed = SelfRegCLI(args, instantiate=False)  # every setting checked, nothing built: fast
        config = yaml.safe_load(dump_config(parsed))
        folder = plan_run_folder(config, argv, _is_ddp(config))  # an existing run is refused before the data
        cli = SelfRegCLI([*args, "--run.name", folder.name], run_parts=lambda c: run_callbacks(c, folder))
        cli.plan = plan
        train_and_test(cli, folder)
    except SIGTERMException:
        return _interrupted(cli, folder, None)
    except SystemExit as exit_:  # a second Ctrl+C: Lightning stops at once and exits with status 1
        stop = getattr(cli, "graceful_stop", None)
        if folder is not None and stop is not None and stop.signal == signal.SIGINT:
            return _interrupted(cli, folder, signal.SIGINT)
        raise exit_
    except KeyboardInterrupt:
        if folder is not None and cli is not None and getattr(cli, "trainer", None) is not None:
            return _interrupted(cli, folder, signal.SIGINT)
        print("interrupted by SIGINT before the run started: nothing was written", file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, ImportError) as err:
        print(f"error: {_error_line(err, argv)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder: the write's one line, the state of the checkpoints
        print(f"error: {_error_line(err, argv)}{_last_checkpoint(folder)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
