"""The command line of ``experiments.run``: LightningCLI over the library's typed constructors.

Every setting is a constructor parameter of one of these, under its key:

=================  ==========================================================================================
key                class (its signature is the setting's type, choices, default and help)
=================  ==========================================================================================
``model``          :class:`~lightning_selfreg.SelfRegSegModule`; ``model.net`` = any ``nn.Module`` by class path
``data``           a DataModule by class path (``lightning_selfreg.data.SynapseDataModule``, ...)
``selfreg``        the :class:`~lightning_selfreg.SelfReg` callback, ``null`` for the baseline
``redundancy``     the :class:`~lightning_selfreg.callbacks.RedundancyMonitor` callback, ``null`` for none
``trainer``        ``lightning.pytorch.Trainer`` (``--trainer.devices``, ``--trainer.precision``, ...)
``run``            :class:`RunOptions`: where the run is written and how it is tracked
``seed_everything``  the seed of every random draw (data order, augmentation, SelfReg's pairing)
=================  ==========================================================================================

The DataModule decides what the model must match: its ``in_channels``, ``num_classes``, ``class_names``,
``spatial_dims``, ``input_size`` and ``roi_size`` are linked into ``model`` and ``model.net`` when the classes are
instantiated (a link to a parameter the network does not have is skipped), so they are never written twice.

The short flags users type (``--gpus 4``, ``--dataset``, ``--lambda-scr``, ...) are aliases of the full keys,
listed in :data:`ALIASES`; ``--dataset NAME`` (and no ``--config``) loads the preset ``experiments/configs`` holds
for that dataset and device (:data:`PRESETS`), ``--backbone NAME`` the network file in ``configs/backbones/``.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentError, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from experiments.settings import (
    SettingsError,
    check_config_files,
    check_settings,
    meta_forward_error,
    smallest_valid_size,
)
from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import RedundancyMonitor
from lightning_selfreg.data import SegDataModule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RUN_NAME_ENV = "LIGHTNING_SELFREG_RUN_NAME"  # shared with the DDP worker processes Lightning re-launches

# --dataset NAME -> preset file (per device where the recipe differs), in CONFIG_DIR
PRESETS: dict[str, dict[str, str]] = {
    "sample": {"cpu": "sample.yaml", "gpu": "sample_gpu.yaml"},
    "synapse": {"any": "synapse_unet.yaml"},
    "acdc": {"any": "acdc_unet.yaml"},
    "glas": {"any": "glas_unet.yaml"},
    "monuseg": {"any": "monuseg_unet.yaml"},
    "nnunet": {"any": "nnunet_3d.yaml"},
}
# --backbone NAME -> network file in CONFIG_DIR / "backbones"
BACKBONES = ("unet", "swinunet", "monai-basicunet", "monai-dynunet", "monai-swinunetr", "smp-unet")


@dataclass
class RunOptions:
    """Where the run is written and how it is tracked (settings of the script, not of a library class).

    Args:
        output_dir: Folder that receives the run folder.
        name: Run folder and W&B run name; default ``<dataset>-<network>-<selfreg|baseline>-seed<seed>-<time>``.
        resume: Continue the run ``name`` from its ``checkpoints/last.ckpt``; only the settings that do not change
            the trained model may differ (:data:`experiments.run_folder.RESUMABLE`), and are recorded.
        overwrite: Replace an existing run folder ``name`` (it is moved aside when the new run starts and deleted
            when the new run has finished); without it an existing run folder is an error.
        wandb: W&B mode; ``auto`` = online when W&B credentials are set and the server answers within 3 s, else
            offline; ``disabled`` logs to CSV.
        wandb_project: W&B project.
        checkpoint_every_n_steps: Also write ``last.ckpt`` every N optimizer steps (0 = at the end of each epoch
            only).
        save_predictions: Write the test predictions (NIfTI volumes / PNG images) to ``<run>/predictions``.
    """

    output_dir: str = "runs"
    name: str | None = None
    resume: bool = False
    overwrite: bool = False
    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"
    wandb_project: str = "lightning_selfreg"
    checkpoint_every_n_steps: int = 0
    save_predictions: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint_every_n_steps < 0:
            raise ValueError(f"`checkpoint_every_n_steps` must be >= 0, found {self.checkpoint_every_n_steps}.")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"`name` must be a folder name (no '/'), found {self.name!r}.")
        if self.resume and not self.name:
            raise ValueError("`resume` needs `name`, the run folder to continue (--run-name).")
        if self.resume and self.overwrite:
            raise ValueError("`overwrite` replaces the run folder that `resume` continues: give one of them, "
                             "found both.")


class ConfigError(ValueError):
    """A setting has a bad value; the message names its key, what was expected and what was found."""


# Documented short flags -> full keys. "value": one value; "list": the values up to the next flag, as a list;
# "true"/"false": a switch; a full "--key value" pair list for the special ones (see expand_aliases).
ALIASES: dict[str, tuple[str, str]] = {
    "--data-dir": ("data.data_dir", "value"),
    "--lambda-scr": ("selfreg.lambda_scr", "value"),
    "--lambda-ifd": ("selfreg.lambda_ifd", "value"),
    "--pairing": ("selfreg.pairing", "value"),
    "--warmup-steps": ("selfreg.warmup_steps", "value"),
    "--seed": ("seed_everything", "value"),
    "--max-epochs": ("trainer.max_epochs", "value"),
    "--precision": ("trainer.precision", "value"),
    "--num-nodes": ("trainer.num_nodes", "value"),
    "--fast-dev-run": ("trainer.fast_dev_run", "true"),
    "--batch-size": ("data.batch_size", "value"),
    "--image-size": ("data.image_size", "value"),
    "--num-workers": ("data.num_workers", "value"),
    "--val-cases": ("data.val_cases", "list"),
    "--fold": ("data.fold", "value"),
    "--num-folds": ("data.num_folds", "value"),
    "--list-dir": ("data.list_dir", "value"),
    "--configuration": ("data.configuration", "value"),
    "--patch-size": ("data.patch_size", "list"),
    "--samples-per-epoch": ("data.samples_per_epoch", "value"),
    "--intensity-shift": ("data.intensity_shift", "value"),
    "--lr": ("model.lr", "value"),
    "--optimizer": ("model.optimizer", "value"),
    "--lr-schedule": ("model.lr_schedule", "value"),
    "--weight-decay": ("model.weight_decay", "value"),
    "--ce-weight": ("model.ce_weight", "value"),
    "--dice-weight": ("model.dice_weight", "value"),
    "--eval-protocol": ("model.eval_protocol", "value"),
    "--channels-last": ("model.channels_last", "true"),
    "--no-channels-last": ("model.channels_last", "false"),
    "--width": ("model.net.init_args.base_channels", "value"),
    "--pretrained": ("model.net.init_args.pretrained", "value"),
    "--output-dir": ("run.output_dir", "value"),
    "--run-name": ("run.name", "value"),
    "--resume": ("run.resume", "true"),
    "--overwrite": ("run.overwrite", "true"),
    "--cache-dir": ("data.cache_dir", "value"),
    "--wandb": ("run.wandb", "value"),
    "--wandb-project": ("run.wandb_project", "value"),
    "--checkpoint-every-n-steps": ("run.checkpoint_every_n_steps", "value"),
    "--save-predictions": ("run.save_predictions", "true"),
}


def as_typed(line: str, argv: list[str]) -> str:
    """``line`` with a leading full key replaced by the alias the user typed for it.

    For example ``--data-dir: ...``, not ``--data.data_dir: ...``, when the user typed ``--data-dir``.
    """
    found = re.match(r"--([\w.]+)", line)
    if found is None:
        return line
    typed = {a.split("=", 1)[0] for a in argv}
    for flag, (key, _) in ALIASES.items():
        if key == found.group(1) and flag in typed:
            return flag + line[found.end():]
    return line


def _values(argv: list[str], i: int, flag: str, many: bool) -> tuple[list[str], int]:
    """The value(s) after ``argv[i]`` (``flag`` or ``flag=value``) and the index after them."""
    if "=" in argv[i]:
        return [argv[i].split("=", 1)[1]], i + 1
    j = i + 1
    while j < len(argv) and (not argv[j].startswith("--") or re.fullmatch(r"-?\d+(\.\d*)?", argv[j])):
        j += 1
        if not many:
            break
    if j == i + 1 and not many:
        raise ConfigError(f"{flag}: expected a value, found none")
    return argv[i + 1:j], j


def requested_gpus(argv: list[str]) -> int | None:
    """The N of ``--gpus N`` in ``argv`` (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--gpus" or arg.startswith("--gpus="):
            value = _values(argv, i, "--gpus", many=False)[0][0]
            try:
                gpus = int(value)
            except ValueError:
                raise ConfigError(f"--gpus: expected a number of GPUs (an int >= 0), found {value!r}") from None
            if gpus < 0:
                raise ConfigError(f"--gpus: expected a number of GPUs (an int >= 0), found {gpus}")
            return gpus
    return None


def _preset(dataset: str, gpu: bool) -> Path:
    if dataset not in PRESETS:
        raise ConfigError(f"--dataset: expected one of {', '.join(PRESETS)}, found {dataset!r}")
    files = PRESETS[dataset]
    return CONFIG_DIR / files.get("gpu" if gpu else "cpu", files.get("any", ""))


def _selfreg_setting(arg: str) -> bool:
    flag = arg.split("=", 1)[0]
    return flag.startswith("--selfreg.") or (flag in ALIASES and ALIASES[flag][0].startswith("selfreg."))


def without_selfreg_settings(argv: list[str]) -> list[str]:
    """``argv`` without the flags that configure SelfReg (``--lambda-scr 0.1``, ``--selfreg.pairing=random``, ...).

    The baseline arm of a comparison runs the shared flags with ``--no-selfreg``, which conflicts with them.
    """
    out, i = [], 0
    while i < len(argv):
        if _selfreg_setting(argv[i]):
            i += 1 if "=" in argv[i] else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _check_selfreg_intent(argv: list[str]) -> None:
    """``--no-selfreg`` (or ``--selfreg null``) beside a flag that configures SelfReg: conflicting intent, named."""
    off = next((a for i, a in enumerate(argv) if a == "--no-selfreg" or (
        a in ("--selfreg", "--selfreg=null") and (a.endswith("=null") or (
            i + 1 < len(argv) and argv[i + 1].lower() in ("null", "none"))))), None)
    if off is None:
        return
    setting = next((a.split("=", 1)[0] for a in argv if _selfreg_setting(a)), None)
    if setting is not None:
        raise ConfigError(f"{off if off.startswith('--no') else '--selfreg null'}: conflicts with {setting}, which "
                          "configures SelfReg; give --no-selfreg for the baseline or the SelfReg settings, not both")


def expand_aliases(argv: list[str], cuda_available: bool | None = None) -> list[str]:
    """Translate the short flags into full keys; put the dataset's preset first unless ``--config`` is given.

    Pure and idempotent for a given ``argv`` and machine: Lightning's DDP launcher re-runs the script with the
    same ``sys.argv`` in every rank, which expands to the same configuration.

    Args:
        argv: The command line, without the program.
        cuda_available: Whether a GPU preset applies when ``--gpus`` is absent (default:
            ``torch.cuda.is_available()``).

    Returns:
        The command line in full keys, for :class:`SelfRegCLI`.

    Raises:
        ConfigError: For a missing value, an unknown ``--dataset`` / ``--backbone``, or a negative ``--gpus``.
    """
    _check_selfreg_intent(argv)
    gpus = requested_gpus(argv)
    if gpus is None and cuda_available is None:
        cuda_available = torch.cuda.is_available()
    gpu = gpus > 0 if gpus is not None else bool(cuda_available)
    out: list[str] = []
    dataset = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        if flag in ALIASES:
            key, kind = ALIASES[flag]
            if kind in ("true", "false"):
                out += [f"--{key}", kind]
                i += 1
                continue
            values, i = _values(argv, i, flag, many=kind == "list")
            out += [f"--{key}", f"[{', '.join(values)}]" if kind == "list" else values[0]]
        elif flag == "--gpus":
            _, i = _values(argv, i, flag, many=False)
            out += ["--trainer.accelerator", "gpu" if gpus else "cpu", "--trainer.devices", str(max(gpus, 1))]
            if gpus > 1:
                out += ["--trainer.strategy", "ddp"]
        elif flag == "--dataset":
            values, i = _values(argv, i, flag, many=False)
            dataset = values[0]
        elif flag == "--backbone":
            values, i = _values(argv, i, flag, many=False)
            if values[0] not in BACKBONES:
                raise ConfigError(f"--backbone: expected one of {', '.join(BACKBONES)}, found {values[0]!r}")
            out += ["--config", str(CONFIG_DIR / "backbones" / f"{values[0].replace('-', '_')}.yaml")]
        elif flag == "--no-selfreg":
            out += ["--selfreg", "null"]
            i += 1
        elif flag == "--selfreg" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            i += 1  # the SelfReg arm: the preset's SelfReg, as configured
        elif flag == "--augment":  # the paper's per-sample augmentation, or none
            values, i = _values(argv, i, flag, many=False)
            out += ["--data.transform", "null" if values[0] == "none" else values[0]]
        elif flag == "--sync-batchnorm":
            out += ["--trainer.sync_batchnorm", "true"]
            i += 1
        else:
            out.append(arg)
            i += 1
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    if dataset is not None or not has_config:
        out = ["--config", str(_preset(dataset or "sample", gpu)), *out]
    return out


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _readable_type(text: str) -> str:
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def format_parse_error(err: BaseException) -> str:
    """The parser's (possibly nested) error as one line: ``--<key>: expected <type>, found <value>``.

    jsonargparse reports a bad value inside a class as a tree (the subclass key, the class path, the parameter,
    the alternatives of a union); the line names the innermost key and its first reason.
    """
    message = str(err)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    unrecognized = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unrecognized:
        return f"unknown setting {unrecognized.group(1).split()[0]!r} (see --help; full keys look like --model.lr)"
    required = re.search(r"the following arguments are required: ([\w, ]+)", message)
    if required:
        key = next(iter(re.findall(r'Parser key "([^"]+)"', message)), "")
        names = [n.strip() for n in required.group(1).split(",")]
        return f"--{key + '.' if key else ''}{names[0]}: required, found no value" + \
            (" (the dataset folder: nothing is downloaded)" if names[0] == "data_dir" else "")
    unknown = re.search(r"Option '([^']+)' is not accepted|does not accept nested key '([^']+)'", message)
    keys: list[str] = []
    for line in lines:
        found = re.match(r'Parser key "([^"]+)"', line)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    key = ".".join(keys)
    for line in lines:  # a constructor's own check: "- `name` must be ..."
        check = re.match(r"-?\s*(`(\w+)`.*)", line)
        if check:
            return f"--{key + '.' if key else ''}{check.group(2)}: {check.group(1)}"
    expected = [line for line in lines if line.lstrip("- ").startswith("Expected a") and "NoneType" not in line]
    got = re.findall(r"Got value: (.*)", message) or [v for v in re.findall(r"Given value: (.*)", message)
                                                       if not v.startswith(("NestedArg", "Namespace"))]
    if expected:
        what = _readable_type(re.sub(r"\. Got value: .*", "", expected[-1].lstrip("- "))[len("Expected a "):])
        return f"--{key}: expected {what}, found {got[0].strip() if got else 'another value'}"
    if unknown:
        return f"--{key}: unknown setting {unknown.group(1) or unknown.group(2)!r}"
    detail = " ".join(line for line in lines if not line.startswith(("Parser key", "Given value")))
    return f"--{key}: {detail}" if key else _one_line(message)


# parameters of the network that the DataModule sets (see _add_arguments): an error there is about the data key
LINKED_NET_ARGS = {"img_size": "data.image_size", "spatial_dims": "data", "in_channels": "data", "in_chans": "data",
                   "num_classes": "data", "out_channels": "data", "classes": "data"}


def instantiation_error(err: BaseException, keys: dict[type, str]) -> str:
    """One line naming the key of a constructor's ``ValueError`` (the class in the traceback gives the prefix)."""
    prefix, owner_name = None, None
    chain, cause = [], err
    while cause is not None and cause not in chain:  # jsonargparse re-raises: the constructor is in the cause
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for exc in reversed(chain):
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = frame.f_locals.get("self") if frame.f_code.co_name in ("__init__", "__post_init__") else None
            key = next((key for cls, key in keys.items() if isinstance(owner, cls)), None)  # most specific class
            if key is not None:  # the outermost constructor: SelfReg, not the SelfRegLoss it builds
                prefix, owner_name = key, type(owner).__name__
                break
            tb = tb.tb_next
        if prefix is not None:
            break
    text = str(chain[-1])
    check = re.search(r"`(\w+)`[^\n]*", text)  # the constructor's own message names its parameter
    if check is None:
        return f"--{prefix}: {_one_line(text)}" if prefix else _one_line(text)
    name, message = check.group(1), check.group(0).rstrip()
    if prefix == "model.net" and name in LINKED_NET_ARGS:
        return f"--{LINKED_NET_ARGS[name]}: {owner_name}: {message} (set from the DataModule)"
    return f"--{prefix}.{name}: {message}" if prefix else message


def _label(class_path: Any, suffix: str = "") -> str:
    name = str(class_path).rsplit(".", 1)[-1]
    return (name[: -len(suffix)] if suffix and name.endswith(suffix) else name).lower()


def run_labels(config: Any) -> dict[str, Any]:
    """``{"dataset", "backbone", "selfreg", "seed"}`` of a parsed configuration (for names and metrics.json)."""
    return {"dataset": _label(config["data"]["class_path"], "DataModule"),
            "backbone": _label(config["model"]["net"]["class_path"]),
            "selfreg": config.get("selfreg") is not None, "seed": config["seed_everything"]}


def run_name(config: Any, ddp: bool) -> str:
    """The run folder's name: ``run.name``, or the one rank 0 chose (DDP), or a new one from the labels + time."""
    name = config["run"]["name"] or os.environ.get(RUN_NAME_ENV)
    if not name:
        labels = run_labels(config)
        arm = "selfreg" if labels["selfreg"] else "baseline"
        name = f"{labels['dataset']}-{labels['backbone']}-{arm}-seed{labels['seed']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if ddp:
        os.environ[RUN_NAME_ENV] = name  # the DDP workers Lightning launches re-run this script: same folder
    return name


def _aliases_help() -> str:
    """The short flags, for ``--help``."""
    pairs = [f"{flag} = --{key}" + (f" {kind}" if kind in ("true", "false") else "") for flag, (key, kind) in
             ALIASES.items()]
    return ("Short flags (aliases of the full keys): --gpus N = --trainer.accelerator gpu --trainer.devices N "
            "(+ --trainer.strategy ddp if N > 1; 0 = CPU); --dataset NAME = the preset configs/<preset of NAME>.yaml "
            f"({', '.join(PRESETS)}); --backbone NAME = configs/backbones/NAME.yaml ({', '.join(BACKBONES)}); "
            "--no-selfreg = --selfreg null; --augment none = --data.transform null; " + "; ".join(pairs) + ".")


def _as_int(value: Any) -> Any:
    return value if value is None or isinstance(value, int) else int(tuple(value)[0])


def _add_arguments(parser: LightningArgumentParser) -> None:
    """The keys beside ``model``, ``data`` and ``trainer``, and the data -> model links."""
    for key, cls in (("selfreg", SelfReg), ("redundancy", RedundancyMonitor)):  # on by default, `null` = off
        parser.add_argument(f"--{key}", type=cls | None, default=lazy_instance(cls),
                            help=f"{cls.__name__} callback (class_path + init_args), or null for none")
    parser.add_class_arguments(RunOptions, "run")
    for source, targets, compute in (
        ("num_classes", ["model.num_classes", "model.net.init_args.num_classes", "model.net.init_args.out_channels",
                         "model.net.init_args.classes"], None),
        ("class_names", ["model.class_names"], list),
        ("in_channels", ["model.net.init_args.in_channels", "model.net.init_args.in_chans"], None),
        ("spatial_dims", ["model.spatial_dims", "model.net.init_args.spatial_dims"], None),
        ("input_size", ["model.input_size"], None),
        ("input_size", ["model.net.init_args.img_size"], _as_int),
        ("roi_size", ["model.roi_size"], lambda v: None if v is None else list(v)),
    ):
        for target in targets:
            parser.link_arguments(f"data.{source}", target, compute_fn=compute, apply_on="instantiate")


class SelfRegCLI(LightningCLI):
    """LightningCLI over :class:`SelfRegSegModule`, a DataModule, :class:`SelfReg` and the Trainer.

    Instantiating it parses and checks every setting, builds the DataModule and the model, runs the data's
    pre-flight and builds the Trainer (with the run's callbacks, logger and plugins from ``run_parts``); it writes
    nothing. A bad setting raises :class:`ConfigError` with one line naming its key.

    Args:
        args: The command line in full keys (see :func:`expand_aliases`).
        instantiate: False to parse and check only (``config`` is set; no class is built).
        run_parts: ``f(cli) -> (callbacks, logger, plugins, trainer overrides)`` of the run
            (:func:`experiments.run.run_callbacks`); None builds the Trainer of ``trainer.*`` alone.
    """

    def __init__(self, args: list[str], instantiate: bool = True,
                 run_parts: Callable[[SelfRegCLI], tuple[list, Any, list, dict[str, Any]]] | None = None) -> None:
        self._instantiate = instantiate
        self._run_parts = run_parts
        try:
            check_config_files(args)  # missing, empty, not a mapping, YAML syntax: named with the file and line
        except SettingsError as err:
            raise ConfigError(str(err)) from err
        try:
            with warnings.catch_warnings():
                # `args` is the expanded sys.argv, not a second command line
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                super().__init__(
                    SelfRegSegModule, SegDataModule, subclass_mode_data=True, run=False, args=args,
                    save_config_callback=None, auto_configure_optimizers=False, seed_everything_default=0,
                    trainer_defaults={"log_every_n_steps": 5}, parser_kwargs={
                        "exit_on_error": False, "prog": "python -m experiments.run", "epilog": _aliases_help()},
                )
        except ArgumentError as err:
            raise ConfigError(format_parse_error(err)) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """SelfReg, the redundancy monitor, the run options and the links (:func:`_add_arguments`)."""
        _add_arguments(parser)

    def _set_seed(self) -> None:
        try:  # right after parsing: the seed and the Trainer's settings (experiments.settings)
            check_settings(self.config)
        except SettingsError as err:
            raise ConfigError(str(err)) from err
        if self._instantiate:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        """Build the DataModule, the model, the callbacks and the Trainer; constructor errors name their key."""
        if not self._instantiate:
            return
        precision = str(self.config["trainer"].get("precision"))
        accelerator = str(self.config["trainer"].get("accelerator"))
        if precision.startswith("16") and (accelerator == "cpu" or (accelerator == "auto"
                                                                  and not torch.cuda.is_available())):
            # Lightning would silently train in bf16 instead
            raise ConfigError(f"--trainer.precision: expected 32, 32-true or bf16-mixed on a CPU, found {precision} "
                              "(float16 AMP needs a GPU)")
        keys = {SegDataModule: "data", SelfRegSegModule: "model", SelfReg: "selfreg",
                RedundancyMonitor: "redundancy", RunOptions: "run", nn.Module: "model.net"}
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ArgumentError as err:
            raise ConfigError(format_parse_error(err)) from err
        except (ValueError, TypeError) as err:
            raise ConfigError(instantiation_error(err, keys)) from err
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        _drop_unused_links(self.model)
        check_network(self.datamodule, self.model)  # shapes only: before the data is read
        self.datamodule.validate()  # the pre-flight of the data: every file named here, before the Trainer
        self.extra_callbacks = [c for c in (self.config_init.get("selfreg"), self.config_init.get("redundancy"))
                                if c is not None]
        try:
            self.trainer = self.instantiate_trainer()
        except ConfigError:
            raise
        except (MisconfigurationException, ValueError, RuntimeError) as err:
            raise ConfigError(trainer_error(err)) from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer of ``trainer.*``, with the run's callbacks, logger and plugins added (see ``run_parts``)."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [*(config.pop("callbacks", None) or []), *self.extra_callbacks]
        if self._run_parts is not None:
            run_callbacks, logger, plugins, extra = self._run_parts(self)
            config = {**config, **extra, "logger": logger, "plugins": [*(config.get("plugins") or []), *plugins]}
            callbacks += run_callbacks
        return self.trainer_class(**{**config, "callbacks": callbacks})


def check_network(datamodule: SegDataModule, module: SelfRegSegModule) -> None:
    """Run the network on a shape-only (meta) copy at the DataModule's input size, before any data is read.

    Catches a size the backbone cannot take (too small for its depth, not a multiple of its patch or window), in
    evaluation (one sample) and in training (a batch of ``datamodule.batch_size``: BatchNorm on a 1 x 1 x 1
    bottleneck of one sample, InstanceNorm on a single voxel), naming the smallest size the network takes
    (:func:`~experiments.settings.smallest_valid_size`), and an output that is not ``num_classes`` channels, at
    no cost (no memory, no arithmetic).
    """
    size = datamodule.roi_size or datamodule.input_size or getattr(datamodule, "patch_size", None)
    if size is None:
        return
    dims = datamodule.spatial_dims
    size = (size,) * dims if isinstance(size, int) else tuple(int(v) for v in size)
    channels = datamodule.in_channels
    shape = (1, channels, *size)
    try:
        net = copy.deepcopy(module.net).to("meta").eval()  # eval: BatchNorm takes a 1 x 1 map of one sample
    except (NotImplementedError, RuntimeError):
        return
    key = "--data.patch_size" if datamodule.roi_size or not datamodule.input_size else "--data.image_size"
    batch = int(getattr(datamodule, "batch_size", 1) or 1)
    for train, batch_size in ((False, 1), (True, batch)):
        err = meta_forward_error(net, (batch_size, channels, *size), train)
        if err is None:
            continue
        message = " ".join(str(err).split()) or type(err).__name__
        smallest = smallest_valid_size(net, channels, size, batch_size, train)
        hint = f"; the smallest size from {list(size)} it takes is {list(smallest)}" if smallest else ""
        what = f"train on a batch of {batch_size} of shape" if train else "take inputs of shape"
        raise ConfigError(f"{key}: the network {type(module.net).__name__} cannot {what} {(batch_size, *shape[1:])} "
                          f"(the DataModule's size){hint}: {message[:300]}") from err
    net.eval()
    try:
        with torch.no_grad():
            logits = net(torch.empty(shape, device="meta"))
    except NotImplementedError:  # an operation without a meta kernel: the first batch will tell
        return
    expected = (1, datamodule.num_classes, *size)
    if tuple(logits.shape) != expected:
        raise ConfigError(f"--model.net: {type(module.net).__name__} maps inputs {shape} to {tuple(logits.shape)}; "
                          f"expected logits {expected} ({datamodule.num_classes} classes of "
                          f"{type(datamodule).__name__} at the input size)")


def _drop_unused_links(module: SelfRegSegModule) -> None:
    """Remove from the checkpointed ``net`` config the linked arguments its class does not take.

    Lightning records every applied link in the hyper-parameters (``img_size`` for a UNet too), and
    ``load_from_checkpoint`` would then pass them to the network's constructor.
    """
    net = module.hparams.get("net")
    if not isinstance(net, dict) or not isinstance(net.get("init_args"), dict):
        return
    parameters = inspect.signature(type(module.net)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for hparams in (module.hparams, module._hparams_initial):
        init_args = hparams["net"]["init_args"]
        for name in [n for n in init_args if n not in parameters]:
            del init_args[name]


def trainer_error(err: BaseException) -> str:
    """One line for a Trainer that cannot be built (devices, precision, strategy), naming the likely key."""
    message = _one_line(err)
    lowered = message.lower()
    key = ("trainer.precision" if "precision" in lowered else "trainer.devices" if "device" in lowered or "gpu"
           in lowered else "trainer.strategy" if "strategy" in lowered else "trainer")
    return f"--{key}: {message}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m experiments.run")
