"""Train and test a segmentation network with (or without) SelfReg: ``python -m experiments.run [flags]``.

With no flags it trains the paper's UNet + SelfReg on the CT sample bundled with the package (a reduced preset
on the CPU that finishes in about 3 minutes on 2 cores; the paper's UNet at 224x224 on a GPU), evaluates the
test patient per organ (Dice, HD95) and prints the table. Settings come from, in increasing priority: the
preset for the dataset and device, a YAML file (``--config``, keys = the flag names with ``_``), the flags.

Every run writes ``<output-dir>/<run-name>/config.yaml`` (resolved settings), ``metrics.json`` (written
atomically at the end), ``checkpoints/`` and the W&B (or CSV) logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RUN_NAME_ENV = "LIGHTNING_SELFREG_RUN_NAME"  # shared with the DDP worker processes Lightning re-launches


class ConfigError(ValueError):
    """A setting has a bad value; the message names it and says what is expected."""


def _positive(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        value = kind(value)
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    check.__name__ = f"positive {kind.__name__}"
    return check


def _non_negative(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        value = kind(value)
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    check.__name__ = f"non-negative {kind.__name__}"
    return check


def _optional_path(value: Any) -> str | None:
    return None if value is None else str(value)


# name -> (parser of a value, allowed choices or None, help)
OPTIONS: dict[str, tuple[Callable[[Any], Any], tuple | None, str]] = {
    "dataset": (str, ("sample",), "dataset to train and test on"),
    "data_dir": (_optional_path, None, "dataset root (default for `sample`: the copy bundled with the package)"),
    "backbone": (str, ("unet",), "network"),
    "selfreg": (bool, None, "add the SelfReg losses (--no-selfreg trains the baseline)"),
    "lambda_scr": (_non_negative(float), None, "SCR weight (paper: 0.015)"),
    "lambda_ifd": (_non_negative(float), None, "IFD weight (paper: 0.015)"),
    "pairing": (str, ("random", "ordered"), "SCR channel pairing (authors' code: random)"),
    "warmup_steps": (_non_negative(int), None, "linear warm-up of the SelfReg weights, in steps"),
    "max_epochs": (_positive(int), None, "training epochs"),
    "batch_size": (_positive(int), None, "training batch size (per GPU)"),
    "lr": (_positive(float), None, "base learning rate"),
    "optimizer": (str, ("sgd", "adam", "adamw"), "optimizer"),
    "lr_schedule": (str, ("poly", "cosine", "constant"), "learning-rate schedule (per step)"),
    "weight_decay": (_non_negative(float), None, "weight decay"),
    "ce_weight": (_non_negative(float), None, "cross-entropy weight (authors' Synapse recipe: 0.4)"),
    "dice_weight": (_non_negative(float), None, "Dice weight (authors' Synapse recipe: 0.6)"),
    "width": (_positive(int), None, "UNet base channels (paper: 64)"),
    "image_size": (_positive(int), None, "training / inference side in pixels (paper: 224)"),
    "precision": (str, ("32", "32-true", "16-mixed", "bf16-mixed"), "Lightning precision"),
    "gpus": (_non_negative(int), None, "number of GPUs (0 = CPU; >1 = DDP); default: 1 if CUDA is available"),
    "sync_batchnorm": (bool, None, "SyncBatchNorm under DDP"),
    "seed": (int, None, "random seed"),
    "output_dir": (str, None, "folder that receives the run folder"),
    "run_name": (str, None, "run folder / W&B run name (default: dataset-backbone-arm-seed-time)"),
    "wandb": (str, ("auto", "offline", "online", "disabled"), "W&B mode; auto = online if WANDB_API_KEY is set"),
    "wandb_project": (str, None, "W&B project"),
    "eval_protocol": (str, ("strict", "transunet"), "test metric protocol"),
    "channels_last": (bool, None, "channels_last memory format for CNN backbones (faster convolutions)"),
    "fast_dev_run": (bool, None, "one batch of each stage, for a smoke test (no logger, no checkpoint)"),
}

DEFAULTS: dict[str, Any] = {
    "dataset": "sample",
    "data_dir": None,
    "backbone": "unet",
    "selfreg": True,
    "lambda_scr": 0.015,
    "lambda_ifd": 0.015,
    "pairing": "random",
    "warmup_steps": 0,
    "lr_schedule": "poly",
    "optimizer": "sgd",
    "lr": 0.01,
    "weight_decay": 1e-4,
    "ce_weight": 0.4,
    "dice_weight": 0.6,
    "width": 64,
    "image_size": 224,
    "batch_size": 24,
    "max_epochs": 150,
    "precision": "32",
    "gpus": None,
    "sync_batchnorm": False,
    "seed": 0,
    "output_dir": "runs",
    "run_name": None,
    "wandb": "auto",
    "wandb_project": "lightning_selfreg",
    "eval_protocol": "strict",
    "channels_last": False,
    "fast_dev_run": False,
}

# Dataset x device presets (measured on the bundled sample, see ../shared/reference/sample.md): a width-16
# UNet at 128 px with Adam 1e-3 learns the large organs in ~150 s on 2 CPU cores; flips are not used.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("sample", "cpu"): {"width": 16, "image_size": 96, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                        "lr_schedule": "constant", "weight_decay": 0.0, "max_epochs": 85, "channels_last": True},
    ("sample", "gpu"): {"width": 64, "image_size": 224, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                        "lr_schedule": "constant", "weight_decay": 0.0, "max_epochs": 150},
}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option defaults to "not given" so presets and the YAML file can fill it."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file with settings (keys = flag names with _)")
    for name, (kind, choices, help_text) in OPTIONS.items():
        flag = f"--{name.replace('_', '-')}"
        if kind is bool:  # --selfreg / --no-selfreg, --channels-last / --no-channels-last, ...
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        parser.add_argument(flag, dest=name, type=kind, choices=choices,
                            metavar=None if choices else name.upper(), help=help_text)
    return parser


def _coerce(name: str, value: Any) -> Any:
    if name not in OPTIONS:
        raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(OPTIONS)}")
    kind, choices, _ = OPTIONS[name]
    if value is None and name in ("data_dir", "gpus", "run_name"):
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name!r} must be true or false, found {value!r}")
        return value
    try:
        value = kind(value)
    except (TypeError, ValueError) as err:
        expected = getattr(kind, "__name__", kind)
        raise ConfigError(f"setting {name!r} expects a {expected}, found {value!r} ({err})") from err
    if choices is not None and value not in choices:
        raise ConfigError(f"setting {name!r} must be one of {', '.join(map(str, choices))}, found {value!r}")
    return value


def resolve_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Merge defaults, the dataset/device preset, the YAML file and the flags; validate every value.

    Raises:
        ConfigError: For an unknown key or a bad value in the YAML file, or inconsistent settings.
    """
    args = vars(build_parser().parse_args(argv))
    from_file: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"--config {config_path}: file not found")
        try:
            from_file = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {config_path}: not valid YAML ({err})") from err
        if not isinstance(from_file, dict):
            raise ConfigError(f"--config {config_path}: expected a mapping of settings, found {type(from_file)}")
        from_file = {k.replace("-", "_"): _coerce(k.replace("-", "_"), v) for k, v in from_file.items()}
    chosen = {**from_file, **args}
    dataset = chosen.get("dataset", DEFAULTS["dataset"])
    gpus = chosen.get("gpus")
    import torch

    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    elif gpus > 0 and torch.cuda.device_count() < gpus:
        raise ConfigError(f"--gpus {gpus} requested but {torch.cuda.device_count()} CUDA device(s) are available")
    preset = PRESETS.get((dataset, "gpu" if gpus > 0 else "cpu"), {})
    config = {**DEFAULTS, **preset, **chosen, "gpus": gpus}
    return {k: _coerce(k, v) for k, v in config.items()}


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _run_name(config: dict[str, Any]) -> str:
    name = config["run_name"] or os.environ.get(RUN_NAME_ENV)
    if not name:
        arm = "selfreg" if config["selfreg"] else "baseline"
        name = f"{config['dataset']}-{config['backbone']}-{arm}-seed{config['seed']}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ[RUN_NAME_ENV] = name
    return name


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of per-class Dice (%) and HD95 (mm), with the means."""
    rows = ["| class | Dice (%) | HD95 |", "|---|---|---|"]

    def fmt(value: float | None, scale: float = 1.0) -> str:
        return "n/a" if value is None else f"{value * scale:.2f}"

    for name, values in results["per_class"].items():
        rows.append(f"| {name} | {fmt(values['dice'], 100)} | {fmt(values['hd95'])} |")
    rows.append(f"| **mean** | {fmt(results['dice_mean'], 100)} | {fmt(results['hd95_mean'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; returns the process exit status."""
    try:
        config = resolve_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_selfreg import SelfReg, SelfRegSegModule
    from lightning_selfreg.data import SAMPLE_DIR, DataError, SampleCTDataModule
    from lightning_selfreg.models import UNet

    pl.seed_everything(config["seed"], workers=True, verbose=False)
    try:
        data_dir = config["data_dir"] or SAMPLE_DIR
        datamodule = SampleCTDataModule(image_size=config["image_size"], batch_size=config["batch_size"],
                                        data_dir=data_dir)
        datamodule.check_layout()
    except DataError as err:
        print(f"error: --data-dir: {err}", file=sys.stderr)
        return 2

    run_name = _run_name(config)
    run_dir = Path(config["output_dir"]) / run_name
    net = UNet(1, datamodule.num_classes, base_channels=config["width"])
    module = SelfRegSegModule(
        net, datamodule.num_classes, datamodule.class_names, ce_weight=config["ce_weight"],
        dice_weight=config["dice_weight"], optimizer=config["optimizer"], lr=config["lr"],
        weight_decay=config["weight_decay"], lr_schedule=config["lr_schedule"], input_size=config["image_size"],
        eval_protocol=config["eval_protocol"], channels_last=config["channels_last"],
    )
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0 if not
                        datamodule.has_validation else 1, monitor="val/dice" if datamodule.has_validation else None,
                        mode="max"),
    ]
    if config["selfreg"]:
        callbacks.append(SelfReg(lambda_scr=config["lambda_scr"], lambda_ifd=config["lambda_ifd"],
                                 pairing=config["pairing"], warmup_steps=config["warmup_steps"]))
    mode = _wandb_mode(config["wandb"])
    if mode == "disabled":
        logger = CSVLogger(save_dir=run_dir, name="csv", version="")
    else:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        logger = WandbLogger(project=config["wandb_project"], name=run_name, save_dir=str(run_dir),
                             offline=mode == "offline", config=config)
    gpus = config["gpus"]
    trainer = pl.Trainer(
        accelerator="gpu" if gpus > 0 else "cpu",
        devices=max(gpus, 1),
        strategy="ddp" if gpus > 1 else "auto",
        sync_batchnorm=config["sync_batchnorm"] and gpus > 1,
        precision=config["precision"],
        max_epochs=config["max_epochs"],
        logger=logger,
        callbacks=callbacks,
        limit_val_batches=None if datamodule.has_validation else 0,
        num_sanity_val_steps=None if datamodule.has_validation else 0,
        fast_dev_run=config["fast_dev_run"],
        benchmark=gpus > 0,
        log_every_n_steps=5,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    trainer.fit(module, datamodule=datamodule)
    best = "best" if datamodule.has_validation and not config["fast_dev_run"] else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    if trainer.is_global_zero:
        results = module.test_results
        metrics = {
            "dataset": config["dataset"], "backbone": config["backbone"], "selfreg": config["selfreg"],
            "seed": config["seed"], "eval_protocol": config["eval_protocol"], "test": results,
        }
        _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(f"\nTest results ({config['dataset']}, {config['backbone']}, "
              f"{'SelfReg' if config['selfreg'] else 'baseline'}, protocol {config['eval_protocol']}):")
        print(format_table(results))
        print(f"\nrun folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
