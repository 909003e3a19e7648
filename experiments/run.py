"""Train and test a segmentation network with (or without) SelfReg: ``python -m experiments.run [flags]``.

With no flags it trains the paper's UNet + SelfReg on the CT sample bundled with the package (a reduced preset
on the CPU that finishes in about 3 minutes on 2 cores; the paper's UNet at 96 px on a GPU), evaluates the
test patient per organ (Dice, HD95) and prints the table. Settings come from, in increasing priority: the
defaults, the preset of the dataset and device, a YAML file (``--config``, keys = the flag names with ``_``),
the flags.

Every run writes ``<output-dir>/<run-name>/config.yaml`` (resolved settings), ``checkpoints/`` (best by
validation Dice when there is a validation split, and ``last.ckpt`` every epoch), the W&B (or CSV) logs, and at
the end, atomically, ``metrics.json`` and ``metrics.md``. ``--resume`` continues a killed run from its
``last.ckpt``. ``--compare --seeds 0 1 2`` trains SelfReg and the baseline for every seed (one subprocess per
run, so ``--gpus N`` works) and writes ``summary.json`` / ``summary.md`` with mean +- std and paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lightning_selfreg.io import atomic_write_text

RUN_NAME_ENV = "LIGHTNING_SELFREG_RUN_NAME"  # shared with the DDP worker processes Lightning re-launches
DATASETS = ("sample", "synapse", "acdc", "glas", "monuseg", "nnunet")
BACKBONES = ("unet", "swinunet", "monai-basicunet", "monai-dynunet", "monai-swinunetr", "smp-unet")
BACKBONES_2D_ONLY = ("swinunet", "smp-unet")  # no `spatial_dims` keyword (see models.create_model)


class ConfigError(ValueError):
    """A setting has a bad value; the message names it and says what is expected."""


def _bounded(kind: type, low: float, strict: bool) -> Callable[[Any], Any]:
    """A parser of ``kind`` values that are > ``low`` (``strict``) or >= ``low``."""

    def check(value: Any) -> Any:
        value = kind(value)
        if value < low or (strict and value == low):
            raise ValueError(f"must be {'>' if strict else '>='} {low}")
        return value

    check.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
    return check


def _positive(kind: type) -> Callable[[Any], Any]:
    return _bounded(kind, 0, strict=True)


def _non_negative(kind: type) -> Callable[[Any], Any]:
    return _bounded(kind, 0, strict=False)


def _cases(value: Any) -> list[str]:
    """Case names from a list, or from one string of names separated by spaces or commas (YAML)."""
    values = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    return [str(v) for v in values]


def _sizes(value: Any) -> list[int]:
    """Positive ints from a list, one int, or a string of ints separated by spaces or commas (YAML)."""
    values = value.replace(",", " ").split() if isinstance(value, str) else value
    values = [int(v) for v in (values if isinstance(values, list | tuple) else [values])]
    if not values or min(values) < 1:
        raise ValueError("must be positive integers")
    return values


def _seeds(value: Any) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    return [int(v) for v in values]


# name -> (parser of a value, allowed choices or None, help)
OPTIONS: dict[str, tuple[Callable[[Any], Any], tuple | None, str]] = {
    "dataset": (str, DATASETS, "dataset to train and test on"),
    "data_dir": (str, None, "dataset root (required except for `sample` and `nnunet`, which default to the bundled "
                 "sample / its nnU-Net copy)"),
    "backbone": (str, BACKBONES, "network (monai-* need `pip install .[monai]`)"),
    "pretrained": (str, None, "local ImageNet Swin-T checkpoint for --backbone swinunet (nothing is downloaded)"),
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
    "augment": (str, ("paper", "none"), "per-sample augmentation of the real datasets (paper: rot90/flip/rotate)"),
    "fold": (_non_negative(int), None, "validate on this fold of the training cases (k-fold cross-validation)"),
    "num_folds": (_positive(int), None, "number of folds for --fold"),
    "configuration": (str, ("2d", "3d"), "nnunet: 2d (slices, in-plane resampling) or 3d (patches, sliding window)"),
    "patch_size": (_sizes, None, "nnunet: training patch, D H W (3d) or H W (2d); default from the median shape"),
    "samples_per_epoch": (_positive(int), None, "nnunet: training patches per epoch (default 250 x batch size)"),
    "intensity_shift": (_non_negative(float), None, "nnunet: max additive intensity jitter of training patches, in "
                        "normalised units (0 = off; stands in for contrast-phase differences)"),
    "val_cases": (_cases, None, "training cases held out for validation, the alternative to --fold (Synapse "
                  "default: case0006 case0010 case0026 case0031; --val-cases with no name: no validation)"),
    "list_dir": (str, None, "folder with the list files of synapse / acdc (default: searched under --data-dir, "
                 "e.g. TransUNet's lists/lists_Synapse)"),
    "num_workers": (_non_negative(int), None, "DataLoader workers (default: 0 on CPU, 8 on GPU)"),
    "cache": (bool, None, "keep decoded training samples in RAM"),
    "precision": (str, ("32", "32-true", "16-mixed", "bf16-mixed"), "Lightning precision"),
    "gpus": (_non_negative(int), None, "number of GPUs (0 = CPU; >1 = DDP); default: 1 if CUDA is available"),
    "num_nodes": (_positive(int), None, "number of nodes for multi-node DDP (with a cluster launcher)"),
    "sync_batchnorm": (bool, None, "SyncBatchNorm under DDP"),
    "seed": (int, None, "random seed"),
    "output_dir": (str, None, "folder that receives the run folder"),
    "run_name": (str, None, "run folder / W&B run name (default: dataset-backbone-arm-seed-time)"),
    "resume": (bool, None, "continue the run --run-name from its checkpoints/last.ckpt"),
    "checkpoint_every_n_steps": (_non_negative(int), None, "also write last.ckpt every N steps (0 = per epoch only)"),
    "wandb": (str, ("auto", "offline", "online", "disabled"),
              "W&B mode; auto = online if W&B credentials are set and the server answers within 3 s, else offline"),
    "wandb_project": (str, None, "W&B project"),
    "redundancy_every_n_epochs": (_non_negative(int), None, "log channel-redundancy heatmaps every N epochs (0=off)"),
    "eval_protocol": (str, ("strict", "transunet"), "protocol reported as `test` (both are always computed)"),
    "save_predictions": (bool, None, "write test predictions (NIfTI / PNG) to <run>/predictions"),
    "channels_last": (bool, None, "channels_last memory format for CNN backbones (faster convolutions)"),
    "fast_dev_run": (bool, None, "one batch of each stage, for a smoke test (no logger, no checkpoint)"),
    "compare": (bool, None, "train SelfReg and the baseline for every seed in --seeds and summarise"),
    "seeds": (_seeds, None, "seeds for --compare"),
}

DEFAULTS: dict[str, Any] = {
    "dataset": "sample", "data_dir": None, "backbone": "unet", "pretrained": None, "selfreg": True,
    "lambda_scr": 0.015, "lambda_ifd": 0.015, "pairing": "random", "warmup_steps": 0,
    "lr_schedule": "poly", "optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4, "ce_weight": 0.4,
    "dice_weight": 0.6, "width": 64, "image_size": 224, "batch_size": 24, "max_epochs": 150, "augment": "paper",
    "fold": None, "num_folds": 5, "num_workers": None, "cache": False, "precision": "32", "gpus": None,
    "val_cases": None, "list_dir": None, "configuration": "3d", "patch_size": None, "samples_per_epoch": None,
    "intensity_shift": 0.0,
    "num_nodes": 1, "sync_batchnorm": False, "seed": 0, "output_dir": "runs", "run_name": None, "resume": False,
    "checkpoint_every_n_steps": 0, "wandb": "auto", "wandb_project": "lightning_selfreg",
    "redundancy_every_n_epochs": 10, "eval_protocol": "strict", "save_predictions": False, "channels_last": False,
    "fast_dev_run": False, "compare": False, "seeds": [0, 1, 2],
}

# Dataset x device presets. Sample (measured, ../shared/reference/sample.md and benchmarks/README.md): a width-16
# UNet at 96 px with Adam 1e-3 learns the large organs in ~150 s on 2 CPU cores; no flips. Real datasets: the
# authors' recipes (paper.md §5: Synapse SGD 0.01 poly 150 epochs 0.4/0.6; ACDC AdamW 1e-4 constant 400 epochs
# batch 12 0.3/0.7) and UCTransNet's for GlaS / MoNuSeg (Adam 1e-3, cosine, batch 4).
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("sample", "cpu"): {"width": 16, "image_size": 96, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                        "lr_schedule": "constant", "weight_decay": 0.0, "max_epochs": 85, "channels_last": True},
    # GPU: the paper's UNet (width 64), but at 96 px. The sample is 3 mm CT (122 x 101 px per slice): at 224 px
    # the training slices are upsampled 2x while the 512 px test slices are shrunk, and on an H200 the paper's
    # UNet at 224 px scored Dice 0 on every test organ (also after 40 epochs); at 96 px: liver 0.80, spleen 0.80
    # (width 16 at 96 px on the GPU: 0.94 / 0.89; width 16 at 224 px: 0.68 / 0). Real datasets keep 224 px.
    ("sample", "gpu"): {"width": 64, "image_size": 96, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                        "lr_schedule": "constant", "weight_decay": 0.0, "max_epochs": 150, "channels_last": True},
    ("acdc", "any"): {"optimizer": "adamw", "lr": 1e-4, "lr_schedule": "constant", "batch_size": 12,
                      "max_epochs": 400, "ce_weight": 0.3, "dice_weight": 0.7},
    ("glas", "any"): {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "batch_size": 4, "max_epochs": 300,
                      "ce_weight": 0.5, "dice_weight": 0.5},
    ("monuseg", "any"): {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "batch_size": 4,
                         "max_epochs": 300, "ce_weight": 0.5, "dice_weight": 0.5},
    # nnU-Net's trainer: batch 2, Dice + CE with equal weights, SGD 0.01 poly (the defaults); 250 patches x batch
    # per epoch (samples_per_epoch); nnU-Net trains 1000 such epochs
    ("nnunet", "any"): {"batch_size": 2, "ce_weight": 0.5, "dice_weight": 0.5},
}
NULLABLE = {"data_dir", "gpus", "run_name", "pretrained", "fold", "num_workers", "val_cases", "list_dir",
            "patch_size", "samples_per_epoch"}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option defaults to "not given" so presets and the YAML file can fill it."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file with settings (keys = flag names with _)")
    for name, (kind, choices, help_text) in OPTIONS.items():
        flag = f"--{name.replace('_', '-')}"
        if kind is bool:  # --selfreg / --no-selfreg, --channels-last / --no-channels-last, ...
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "val_cases":
            parser.add_argument(flag, dest=name, nargs="*", metavar="CASE", help=help_text)
        elif name == "seeds":
            parser.add_argument(flag, dest=name, type=int, nargs="+", metavar="SEED", help=help_text)
        elif name == "patch_size":
            parser.add_argument(flag, dest=name, type=int, nargs="+", metavar="SIZE", help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices,
                                metavar=None if choices else name.upper(), help=help_text)
    return parser


def _coerce(name: str, value: Any) -> Any:
    if name not in OPTIONS:
        raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(OPTIONS)}")
    kind, choices, _ = OPTIONS[name]
    if value is None and name in NULLABLE:
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
    preset = {**PRESETS.get((dataset, "any"), {}), **PRESETS.get((dataset, "gpu" if gpus > 0 else "cpu"), {})}
    config = {**DEFAULTS, **preset, **chosen, "gpus": gpus}
    config = {k: _coerce(k, v) for k, v in config.items()}
    if config["dataset"] not in ("sample", "nnunet") and not config["data_dir"]:
        raise ConfigError(f"--data-dir is required for --dataset {config['dataset']} (nothing is downloaded)")
    if config["resume"] and not config["run_name"]:
        raise ConfigError("--resume needs --run-name (the run folder to continue)")
    if config["val_cases"] is not None and config["fold"] is not None:
        raise ConfigError("give --val-cases or --fold / --num-folds, not both")
    if config["val_cases"] is not None and config["dataset"] == "sample":
        raise ConfigError("--val-cases: the sample has one training patient and no validation split")
    if config["list_dir"] is not None and config["dataset"] not in ("synapse", "acdc"):
        raise ConfigError(f"--list-dir is only used by --dataset synapse and acdc, not {config['dataset']}")
    nnunet_only = [k for k in ("configuration", "patch_size", "samples_per_epoch", "intensity_shift")
                   if chosen.get(k) is not None]
    if nnunet_only and config["dataset"] != "nnunet":
        raise ConfigError(f"--{nnunet_only[0].replace('_', '-')} is only used by --dataset nnunet")
    if config["dataset"] == "nnunet" and config["configuration"] == "3d" and config["backbone"] in BACKBONES_2D_ONLY:
        raise ConfigError(f"--backbone: {config['backbone']} is 2D only; --configuration 3d needs one of "
                          f"{[b for b in BACKBONES if b not in BACKBONES_2D_ONLY]} (or --configuration 2d)")
    if config["fold"] is not None and config["fold"] >= config["num_folds"]:
        raise ConfigError(f"--fold must be < --num-folds ({config['num_folds']}), found {config['fold']}")
    if config["pretrained"] and config["backbone"] != "swinunet":
        raise ConfigError("--pretrained is only used by --backbone swinunet")
    if config["num_workers"] is None:
        config["num_workers"] = 8 if gpus > 0 else 0
    return config


def _wandb_mode(mode: str, run_dir: Path) -> str:
    """The W&B mode this machine allows (see :func:`lightning_selfreg.wandb_mode.resolve_wandb_mode`)."""
    from lightning_selfreg.wandb_mode import WandbUnavailable, resolve_wandb_mode

    try:
        return resolve_wandb_mode(mode, sync_hint=str(run_dir / "wandb" / "offline-run-*"))
    except WandbUnavailable as err:
        raise ConfigError(f"--wandb {mode}: {err}") from err


def _run_name(config: dict[str, Any]) -> str:
    name = config["run_name"] or os.environ.get(RUN_NAME_ENV)
    if not name:
        arm = "selfreg" if config["selfreg"] else "baseline"
        name = f"{config['dataset']}-{config['backbone']}-{arm}-seed{config['seed']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config["gpus"] > 1 or config["num_nodes"] > 1:
        os.environ[RUN_NAME_ENV] = name  # the DDP workers Lightning launches re-run this script: same folder
    return name


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of per-class Dice (%), IoU (%) and HD95, with the means."""
    rows = ["| class | Dice (%) | IoU (%) | HD95 |", "|---|---|---|---|"]
    for name, values in results["per_class"].items():
        rows.append(f"| {name} | {_fmt(values['dice'], 100)} | {_fmt(values.get('iou'), 100)} | "
                    f"{_fmt(values['hd95'])} |")
    rows.append(f"| **mean** | {_fmt(results['dice_mean'], 100)} | {_fmt(results.get('iou_mean'), 100)} | "
                f"{_fmt(results['hd95_mean'])} |")
    return "\n".join(rows)


def format_paper_table(by_protocol: dict[str, dict[str, Any]], volumetric: bool) -> str:
    """One row per protocol in the layout of the papers' tables.

    Volumes (Synapse, ACDC): per-class DSC (%), then mean DSC and mean HD95; 2D images (GlaS, MoNuSeg): Dice and
    IoU (%).
    """
    if not volumetric:
        rows = ["| protocol | Dice (%) | IoU (%) |", "|---|---|---|"]
        for protocol, r in by_protocol.items():
            rows.append(f"| {protocol} | {_fmt(r['dice_mean'], 100)} | {_fmt(r['iou_mean'], 100)} |")
        return "\n".join(rows)
    names = list(next(iter(by_protocol.values()))["per_class"])
    rows = ["| protocol | " + " | ".join(names) + " | DSC | HD95 |", "|---" * (len(names) + 3) + "|"]
    for protocol, r in by_protocol.items():
        cells = [_fmt(r["per_class"][n]["dice"], 100) for n in names]
        rows.append(f"| {protocol} | " + " | ".join(cells) + f" | {_fmt(r['dice_mean'], 100)} | "
                    f"{_fmt(r['hd95_mean'])} |")
    return "\n".join(rows)


def build_datamodule(config: dict[str, Any]):
    """The DataModule of ``config["dataset"]``."""
    from lightning_selfreg.data import (
        SAMPLE_DIR,
        ACDCDataModule,
        GlaSDataModule,
        MoNuSegDataModule,
        SampleCTDataModule,
        SynapseDataModule,
    )

    if config["dataset"] == "sample":
        return SampleCTDataModule(image_size=config["image_size"], batch_size=config["batch_size"],
                                  data_dir=config["data_dir"] or SAMPLE_DIR)
    if config["dataset"] == "nnunet":
        from lightning_selfreg.data import SAMPLE_NNUNET_DIR, NnUNetDataModule

        return NnUNetDataModule(config["data_dir"] or SAMPLE_NNUNET_DIR, configuration=config["configuration"],
                                patch_size=config["patch_size"], batch_size=config["batch_size"],
                                samples_per_epoch=config["samples_per_epoch"], num_workers=config["num_workers"],
                                fold=config["fold"], val_cases=config["val_cases"],
                                intensity_shift=config["intensity_shift"])
    cls = {"synapse": SynapseDataModule, "acdc": ACDCDataModule, "glas": GlaSDataModule,
           "monuseg": MoNuSegDataModule}[config["dataset"]]
    layout = {"list_dir": config["list_dir"]} if config["dataset"] in ("synapse", "acdc") else {}
    return cls(config["data_dir"], image_size=config["image_size"], batch_size=config["batch_size"],
               num_workers=config["num_workers"], transform="paper" if config["augment"] == "paper" else None,
               cache=config["cache"], fold=config["fold"], num_folds=config["num_folds"],
               val_cases=config["val_cases"], **layout)


def net_config(config: dict[str, Any], in_channels: int, num_classes: int) -> dict[str, Any]:
    """Arguments of :func:`lightning_selfreg.models.create_model` for the configured backbone."""
    kwargs: dict[str, Any] = {"name": config["backbone"], "in_channels": in_channels, "num_classes": num_classes}
    if config["backbone"] == "unet":
        kwargs["base_channels"] = config["width"]
    elif config["backbone"] == "swinunet":
        kwargs["img_size"] = config["image_size"]
        if config["pretrained"]:
            kwargs["pretrained"] = config["pretrained"]
    return kwargs


def train_and_test(config: dict[str, Any]) -> dict[str, Any] | None:
    """Fit, test, write the run folder; returns the ``metrics.json`` content on rank 0 (else None)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_selfreg import SelfReg, SelfRegSegModule
    from lightning_selfreg.callbacks import FiniteLossGuard, RNGStateCheckpoint
    from lightning_selfreg.checkpoint import AtomicCheckpointIO, CheckpointError, check_checkpoint_file
    from lightning_selfreg.io import remove_orphaned_temp_files
    from lightning_selfreg.models import create_model
    from lightning_selfreg.tracking import (
        RedundancyMonitor,
        SegmentationPanels,
        TestResultsTable,
        ThroughputMonitor,
        log_run_environment,
    )

    pl.seed_everything(config["seed"], workers=True, verbose=False)
    datamodule = build_datamodule(config)
    datamodule.validate()
    has_val = datamodule.has_validation
    run_name = _run_name(config)
    run_dir = Path(config["output_dir"]) / run_name
    resume_from = run_dir / "checkpoints" / "last.ckpt"
    if config["resume"] and not resume_from.is_file():
        raise FileNotFoundError(f"--resume: {resume_from} does not exist")
    if config["resume"]:
        try:
            check_checkpoint_file(resume_from)  # empty / truncated / corrupt: named now, not mid-setup
        except CheckpointError as err:
            raise ConfigError(f"--resume: {err}") from err
    mode = _wandb_mode(config["wandb"], run_dir)  # before anything is written: may fall back to offline
    if config["resume"]:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        different = {k for k in ("dataset", "backbone", "selfreg", "seed", "width", "image_size")
                     if saved.get(k) != config[k]}
        if different:
            raise ConfigError(f"--resume: settings {sorted(different)} differ from {run_dir / 'config.yaml'}")
    build = net_config(config, datamodule.in_channels, datamodule.num_classes)
    # nnU-Net data: the network runs at the preprocessed grid (no resize), 3D with a sliding window of the patch
    spatial_dims = getattr(datamodule, "spatial_dims", 2)
    grid = {"input_size": config["image_size"]}
    if config["dataset"] == "nnunet":
        grid = {"input_size": None, "spatial_dims": spatial_dims,
                "roi_size": datamodule.patch_size if spatial_dims == 3 else None}
        if spatial_dims == 3:
            build["spatial_dims"] = 3
    net = create_model(**build)
    module = SelfRegSegModule(
        net, datamodule.num_classes, datamodule.class_names, ce_weight=config["ce_weight"],
        dice_weight=config["dice_weight"], optimizer=config["optimizer"], lr=config["lr"],
        weight_decay=config["weight_decay"], lr_schedule=config["lr_schedule"], **grid,
        eval_protocol=config["eval_protocol"],
        channels_last=config["channels_last"] and config["backbone"] == "unet" and spatial_dims == 2,
        prediction_dir=str(run_dir / "predictions") if config["save_predictions"] else None, net_config=build,
    )
    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch}", monitor="val/dice", mode="max",
                        save_top_k=1, save_last=False) if has_val else None,
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        enable_version_counter=False),
        # mid-epoch saves to the same file (a separate callback: one ModelCheckpoint has one trigger)
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, save_last=False,
                        every_n_train_steps=config["checkpoint_every_n_steps"], enable_version_counter=False)
        if config["checkpoint_every_n_steps"] else None,
        RNGStateCheckpoint(),
        FiniteLossGuard(),
        ThroughputMonitor(),
        SegmentationPanels(),
        TestResultsTable(),
    ]
    if not config["fast_dev_run"]:  # fast_dev_run has no logger
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if config["redundancy_every_n_epochs"]:
        callbacks.append(RedundancyMonitor(every_n_epochs=config["redundancy_every_n_epochs"]))
    if config["selfreg"]:
        callbacks.append(SelfReg(lambda_scr=config["lambda_scr"], lambda_ifd=config["lambda_ifd"],
                                 pairing=config["pairing"], warmup_steps=config["warmup_steps"]))
    if mode == "disabled":
        logger = CSVLogger(save_dir=run_dir, name="csv", version="")
    else:
        logger = WandbLogger(project=config["wandb_project"], name=run_name, save_dir=str(run_dir),
                             offline=mode == "offline", config=config, id=run_name.replace("/", "-"),
                             resume="allow")
    gpus = config["gpus"]
    trainer = pl.Trainer(
        accelerator="gpu" if gpus > 0 else "cpu",
        devices=max(gpus, 1),
        num_nodes=config["num_nodes"],
        strategy="ddp" if gpus > 1 or config["num_nodes"] > 1 else "auto",
        sync_batchnorm=config["sync_batchnorm"] and gpus > 1,
        precision=config["precision"],
        max_epochs=config["max_epochs"],
        logger=logger,
        callbacks=[c for c in callbacks if c is not None],
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=None if has_val else 0,
        fast_dev_run=config["fast_dev_run"],
        benchmark=gpus > 0,
        log_every_n_steps=5,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, checkpoint_dir):  # temporary files of writes killed in an earlier run here
            remove_orphaned_temp_files(folder)
        if not config["resume"]:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        log_run_environment(logger)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if config["resume"] else None)
    best = "best" if has_val and not config["fast_dev_run"] else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    if not trainer.is_global_zero:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
        return None
    metrics = {
        "dataset": config["dataset"], "backbone": config["backbone"], "selfreg": config["selfreg"],
        "seed": config["seed"], "eval_protocol": config["eval_protocol"], "test": module.test_results,
        "protocols": module.test_results_by_protocol,
        "checkpoint": best and trainer.checkpoint_callback and str(trainer.checkpoint_callback.best_model_path),
    }
    volumetric = config["dataset"] in ("sample", "synapse", "acdc", "nnunet")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(run_dir / "metrics.md", format_paper_table(module.test_results_by_protocol, volumetric) + "\n")
    print(f"\nTest results ({config['dataset']}, {config['backbone']}, "
          f"{'SelfReg' if config['selfreg'] else 'baseline'}, protocol {config['eval_protocol']}):")
    print(format_table(module.test_results))
    print("\nBoth protocols, in the layout of the papers' tables:")
    print(format_paper_table(module.test_results_by_protocol, volumetric))
    print(f"\nrun folder: {run_dir}\ncheckpoints: {checkpoint_dir}\nmetrics: {run_dir / 'metrics.json'}")
    if isinstance(logger, WandbLogger):
        print(f"W&B run: {Path(logger.experiment.dir).parent}" +
              (" (offline: `wandb sync` that folder)" if mode == "offline" else ""))
        logger.experiment.finish()  # close the run so that a later run in this process starts its own
    return metrics


def compare(config: dict[str, Any], argv: list[str]) -> int:
    """Run SelfReg and the baseline for every seed (a subprocess each) and write the paired summary."""
    from lightning_selfreg.compare import (
        format_comparison_markdown,
        load_results,
        summarize_comparison,
        write_comparison,
    )

    base = config["run_name"] or f"compare-{config['dataset']}-{config['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(config["output_dir"]) / base
    passthrough = [a for a in argv if a not in ("--compare",)]
    # drop --seeds/--run-name/--selfreg values given on the command line; each child gets its own
    cleaned, skip = [], 0
    for arg in passthrough:
        if skip:
            if arg.startswith("--"):
                skip = 0
            else:
                continue
        if arg in ("--seeds", "--run-name", "--output-dir"):
            skip = 1
            continue
        if arg in ("--selfreg", "--no-selfreg", "--no-compare"):
            continue
        cleaned.append(arg)
    mode = _wandb_mode(config["wandb"], out_dir)  # of the summary run; each child run decides its own
    runs = []
    for seed in config["seeds"]:
        for arm in ("baseline", "selfreg"):
            name = f"{arm}-seed{seed}"
            cmd = [sys.executable, "-m", "experiments.run", *cleaned, "--seed", str(seed), "--no-compare",
                   "--selfreg" if arm == "selfreg" else "--no-selfreg", "--output-dir", str(out_dir),
                   "--run-name", name]
            print(f"[compare] {' '.join(cmd[2:])}", flush=True)
            env = {k: v for k, v in os.environ.items() if k != RUN_NAME_ENV}
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                print(f"error: run {name} failed with status {proc.returncode}", file=sys.stderr)
                return proc.returncode
            runs.append(out_dir / name)
    summary = summarize_comparison(load_results(runs))
    write_comparison(summary, out_dir)
    markdown = format_comparison_markdown(summary)
    print(markdown)
    print(f"\nsummary: {out_dir / 'summary.md'}")
    if mode != "disabled":
        import wandb

        run = wandb.init(project=config["wandb_project"], name=base, dir=str(out_dir), mode=mode,
                         job_type="compare", config={k: v for k, v in config.items() if k != "compare"})
        run.log({"compare/summary": wandb.Html(f"<pre>{markdown}</pre>")})
        run.summary.update({"compare": summary})
        run.finish()
        print(f"W&B comparison run: {run.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one experiment (or a comparison); returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = resolve_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config["compare"]:
        try:
            return compare(config, argv)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from lightning_selfreg.data import DataError

    try:
        train_and_test(config)
    except (DataError, ConfigError, FileNotFoundError, ImportError, KeyError) as err:
        message = str(err).strip("'\"").splitlines()[0] if str(err) else type(err).__name__
        flag = ""
        if isinstance(err, DataError):  # about a file under --data-dir, or about the flag of `err.argument`
            flag = f"--{err.argument.replace('_', '-')}: " if getattr(err, "argument", None) else "--data-dir: "
        print(f"error: {flag}{message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
