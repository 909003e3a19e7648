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
instantiated (:data:`LINKS`; a link to a parameter the network does not have is skipped), so they are never written
twice.

The short flags users type (``--gpus 4``, ``--dataset``, ``--lambda-scr``, ...) are aliases of the full keys,
listed in :data:`ALIASES`; ``--dataset NAME`` (and no ``--config``) loads the preset ``experiments/configs`` holds
for that dataset and device (:data:`PRESETS`), ``--backbone NAME`` the network file in ``configs/backbones/``.

**Errors.** A bad setting ends in a :class:`ConfigError` that holds its key as data; :meth:`ConfigError.line`
names it as the user typed it. Nothing here reads an error message: a value the parser rejects is found by parsing
the command line again flag by flag (:func:`locate_parse_error`), and what was expected comes from the owning
constructor's type hints; a constructor's own check raises a
:class:`~lightning_selfreg.utils.checks.SettingError` that names its parameter, and jsonargparse's
``instantiate(..., instantiators=...)`` tells which key's class raised it.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentError, Namespace, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng

from experiments.settings import (
    SettingsError,
    check_config_files,
    check_settings,
    meta_forward_error,
    smallest_valid_size,
)
from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import RedundancyMonitor
from lightning_selfreg.data import DataError, SegDataModule
from lightning_selfreg.models import list_models
from lightning_selfreg.utils.checks import SettingError, check_int

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
# --backbone NAME -> network file CONFIG_DIR / "backbones" / NAME.yaml ("-" written "_"): the registry's names
BACKBONES: tuple[str, ...] = tuple(list_models())


def backbone_file(name: str) -> Path:
    """The network file of ``--backbone NAME``: ``configs/backbones/<name with _ for ->.yaml``."""
    return CONFIG_DIR / "backbones" / f"{name.replace('-', '_')}.yaml"


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
        check_int(self.checkpoint_every_n_steps, "checkpoint_every_n_steps", 0)
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise SettingError("name", f"`name` must be a folder name (no '/'), found {self.name!r}.")
        if self.resume and not self.name:
            raise SettingError("resume", "`resume` needs `name`, the run folder to continue (--run-name).")
        if self.resume and self.overwrite:
            raise SettingError("overwrite", "`overwrite` replaces the run folder that `resume` continues: give one of "
                                            "them, found both.")


class ConfigError(ValueError):
    """A setting has a bad value: :attr:`key` names it, :attr:`detail` says what was expected and what was found.

    The key is a full key such as ``model.lr``, or a flag such as ``dataset``.

    Args:
        key: The setting, without the leading ``--``.
        detail: One line.
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"--{key}: {detail}")
        self.key, self.detail = key, detail

    def __reduce__(self) -> tuple:
        return type(self), (self.key, self.detail)

    def line(self, argv: Sequence[str] = ()) -> str:
        """The one-line message, the setting named as the user typed it in ``argv`` (``--lr`` for ``model.lr``)."""
        return f"{typed_flag(self.key, argv)}: {self.detail}"


# Documented short flags -> full keys. "value": one value; "list": the values up to the next flag, as a list;
# "true"/"false": a switch; a full "--key value" pair list for the special ones (see command_items).
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


@dataclass(frozen=True)
class Item:
    """One flag of the command line: as the user typed it, and the full-key tokens it stands for.

    Args:
        typed: The flag as typed (``--lr``, ``--gpus``, ``--model.lr``; ``--dataset`` for the preset).
        tokens: Its tokens for the parser, in full keys (``("--model.lr", "0.1")``).
        value: The value as typed, if any.
    """

    typed: str
    tokens: tuple[str, ...]
    value: str | None = None


def _is_flag(arg: str) -> bool:
    return arg.startswith("--") and not re.fullmatch(r"-?\d+(\.\d*)?", arg)


def _values(argv: Sequence[str], i: int, flag: str, many: bool) -> tuple[list[str], int]:
    """The value(s) after ``argv[i]`` (``flag`` or ``flag=value``) and the index after them."""
    if "=" in argv[i]:
        return [argv[i].split("=", 1)[1]], i + 1
    j = i + 1
    while j < len(argv) and not _is_flag(argv[j]):
        j += 1
        if not many:
            break
    if j == i + 1 and not many:
        raise ConfigError(flag[2:], "expected a value, found none")
    return list(argv[i + 1:j]), j


def _gpus(value: str) -> int:
    try:
        gpus = int(value)
    except ValueError:
        raise ConfigError("gpus", f"expected a number of GPUs (an int >= 0), found {value!r}") from None
    if gpus < 0:
        raise ConfigError("gpus", f"expected a number of GPUs (an int >= 0), found {gpus}")
    return gpus


def requested_gpus(argv: Sequence[str]) -> int | None:
    """The N of ``--gpus N`` in ``argv``, the last one when given twice (None when absent)."""
    gpus = None
    for i, arg in enumerate(argv):
        if arg == "--gpus" or arg.startswith("--gpus="):
            gpus = _gpus(_values(argv, i, "--gpus", many=False)[0][0])
    return gpus


def _preset(dataset: str, gpu: bool) -> Path:
    if dataset not in PRESETS:
        raise ConfigError("dataset", f"expected one of {', '.join(PRESETS)}, found {dataset!r}")
    files = PRESETS[dataset]
    return CONFIG_DIR / files.get("gpu" if gpu else "cpu", files.get("any", ""))


def _selfreg_setting(arg: str) -> bool:
    flag = arg.split("=", 1)[0]
    return flag.startswith("--selfreg.") or (flag in ALIASES and ALIASES[flag][0].startswith("selfreg."))


def without_selfreg_settings(argv: Sequence[str]) -> list[str]:
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


def _check_selfreg_intent(argv: Sequence[str]) -> None:
    """``--no-selfreg`` (or ``--selfreg null``) beside a flag that configures SelfReg: conflicting intent, named."""
    off = next((a for i, a in enumerate(argv) if a == "--no-selfreg" or (
        a in ("--selfreg", "--selfreg=null") and (a.endswith("=null") or (
            i + 1 < len(argv) and argv[i + 1].lower() in ("null", "none"))))), None)
    if off is None:
        return
    setting = next((a.split("=", 1)[0] for a in argv if _selfreg_setting(a)), None)
    if setting is not None:
        raise ConfigError("no-selfreg" if off == "--no-selfreg" else "selfreg",
                          f"{'' if off == '--no-selfreg' else 'null '}conflicts with {setting}, which configures "
                          "SelfReg; give --no-selfreg for the baseline or the SelfReg settings, not both")


def command_items(argv: Sequence[str], cuda_available: bool | None = None) -> list[Item]:
    """The command line as :class:`Item` s: each short flag with the full-key tokens it stands for, the preset first.

    Args:
        argv: The command line, without the program.
        cuda_available: Whether a GPU preset applies when ``--gpus`` is absent (default:
            ``torch.cuda.is_available()``).

    Raises:
        ConfigError: For a missing value, an unknown ``--dataset`` / ``--backbone``, or a negative ``--gpus``.
    """
    argv = list(argv)
    _check_selfreg_intent(argv)
    gpus = requested_gpus(argv)
    if gpus is None and cuda_available is None:
        cuda_available = torch.cuda.is_available()
    gpu = gpus > 0 if gpus is not None else bool(cuda_available)
    items: list[Item] = []
    dataset = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        start = i
        if flag in ALIASES:
            key, kind = ALIASES[flag]
            if kind in ("true", "false"):
                items.append(Item(flag, (f"--{key}", kind)))
                i += 1
                continue
            values, i = _values(argv, i, flag, many=kind == "list")
            value = f"[{', '.join(values)}]" if kind == "list" else values[0]
            items.append(Item(flag, (f"--{key}", value), " ".join(values)))
        elif flag == "--gpus":
            values, i = _values(argv, i, flag, many=False)
            n = _gpus(values[0])
            tokens = ["--trainer.accelerator", "gpu" if n else "cpu", "--trainer.devices", str(max(n, 1))]
            if n > 1:
                tokens += ["--trainer.strategy", "ddp"]
            items.append(Item(flag, tuple(tokens), values[0]))
        elif flag == "--dataset":
            values, i = _values(argv, i, flag, many=False)
            dataset = values[0]
        elif flag == "--backbone":
            values, i = _values(argv, i, flag, many=False)
            if values[0] not in BACKBONES:
                raise ConfigError("backbone", f"expected one of {', '.join(BACKBONES)}, found {values[0]!r}")
            items.append(Item(flag, ("--config", str(backbone_file(values[0]))), values[0]))
        elif flag == "--no-selfreg":
            items.append(Item(flag, ("--selfreg", "null")))
            i += 1
        elif flag == "--selfreg" and (i + 1 == len(argv) or _is_flag(argv[i + 1])):
            i += 1  # the SelfReg arm: the preset's SelfReg, as configured
        elif flag == "--augment":  # the paper's per-sample augmentation, or none
            values, i = _values(argv, i, flag, many=False)
            items.append(Item(flag, ("--data.transform", "null" if values[0] == "none" else values[0]), values[0]))
        elif flag == "--sync-batchnorm":
            items.append(Item(flag, ("--trainer.sync_batchnorm", "true")))
            i += 1
        else:  # a full key (or --config, --print_config, ...) and its values, passed on as they are
            i += 1
            while i < len(argv) and not _is_flag(argv[i]):
                i += 1
            tokens = tuple(argv[start:i])
            value = arg.split("=", 1)[1] if "=" in arg else " ".join(tokens[1:]) or None
            items.append(Item(flag, tokens, value))
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    if dataset is not None or not has_config:
        items.insert(0, Item("--dataset", ("--config", str(_preset(dataset or "sample", gpu))), dataset or "sample"))
    return items


def expand_aliases(argv: Sequence[str], cuda_available: bool | None = None) -> list[str]:
    """Translate the short flags into full keys; put the dataset's preset first unless ``--config`` is given.

    Pure and idempotent for a given ``argv`` and machine: Lightning's DDP launcher re-runs the script with the
    same ``sys.argv`` in every rank, which expands to the same configuration.

    Args:
        argv: The command line, without the program.
        cuda_available: Whether a GPU preset applies when ``--gpus`` is absent (default:
            ``torch.cuda.is_available()``).

    Returns:
        The command line in full keys, for :class:`SelfRegCLI` (the tokens of :func:`command_items`).

    Raises:
        ConfigError: For a missing value, an unknown ``--dataset`` / ``--backbone``, or a negative ``--gpus``.
    """
    return [token for item in command_items(argv, cuda_available) for token in item.tokens]


def typed_flag(key: str, argv: Sequence[str]) -> str:
    """``--<key>`` as the user typed it in ``argv``.

    That is the last flag whose tokens set ``key`` (``--lr`` for ``model.lr``, ``--gpus`` for
    ``trainer.devices``), else ``--<key>``.
    """
    try:
        items = command_items(argv, cuda_available=False)
    except ConfigError:
        items = []
    full = f"--{key}"
    for item in reversed(items):
        if any(token == full or token.startswith(f"{full}=") for token in item.tokens):
            return item.typed
    return full


def _one_line(text: Any) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _as_int(value: Any) -> Any:
    return value if value is None or isinstance(value, int) else int(tuple(value)[0])


# DataModule attribute -> the model / network arguments it sets, with the conversion (see _add_arguments)
LINKS: tuple[tuple[str, tuple[str, ...], Callable[[Any], Any] | None], ...] = (
    ("num_classes", ("model.num_classes", "model.net.init_args.num_classes", "model.net.init_args.out_channels",
                     "model.net.init_args.classes"), None),
    ("class_names", ("model.class_names",), list),
    ("in_channels", ("model.net.init_args.in_channels", "model.net.init_args.in_chans"), None),
    ("spatial_dims", ("model.spatial_dims", "model.net.init_args.spatial_dims"), None),
    ("input_size", ("model.input_size",), None),
    ("input_size", ("model.net.init_args.img_size",), _as_int),
    ("roi_size", ("model.roi_size",), lambda v: None if v is None else list(v)),
)
LINK_SOURCE: dict[str, str] = {target: source for source, targets, _ in LINKS for target in targets}
# a DataModule size attribute -> the DataModule arguments that set it, in order of preference
_SIZE_SETTINGS = {"input_size": ("image_size", "patch_size"), "roi_size": ("patch_size",)}


def _import(class_path: str) -> Any:
    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parameters(cls: Any) -> dict[str, inspect.Parameter] | None:
    """The constructor parameters of ``cls`` (None when it takes ``**kwargs`` or has no readable signature)."""
    try:
        parameters = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return parameters


def _hints(cls: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls if inspect.isfunction(cls) or hasattr(cls, "__dataclass_fields__")
                                     else cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type to show, the message says so
        return {}


def readable(hint: Any) -> str:
    """A type hint in words: ``"an int"``, ``"one of 'sgd', 'adam'"``, ``"a float or null"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys("null" if a is type(None) else readable(a) for a in args))
    if hint is bool:
        return "true or false"
    if origin is not None:
        inner = ", ".join(readable(a) for a in args if a is not Ellipsis)
        name = "list" if origin in (list, tuple, Sequence) or getattr(origin, "__name__", "") == "Sequence" else \
            getattr(origin, "__name__", str(origin))
        return f"a {name}" + (f" of {inner}" if inner else "")
    names = {int: "an int", float: "a float", str: "a string", Path: "a path", type(None): "null"}
    if hint in names:
        return names[hint]
    name = getattr(hint, "__name__", str(hint))
    return f"a {name} (class_path + init_args)" if inspect.isclass(hint) else f"a {name}"


def _node(config: Any, parts: Sequence[str]) -> Any:
    """The value at ``parts`` of a parsed configuration, stepping into the ``init_args`` of class_path nodes."""
    node = config
    for part in parts:
        if hasattr(node, "get") and node.get("class_path") and part != "init_args":
            node = node.get("init_args")
        node = node.get(part) if hasattr(node, "get") else None
    return node


TOP_LEVEL: dict[str, Any] = {"model": SelfRegSegModule, "trainer": pl.Trainer, "run": RunOptions,
                             "data": SegDataModule, "selfreg": SelfReg, "redundancy": RedundancyMonitor}


def _owner(key: str, config: Any) -> tuple[Any, str] | None:
    """``(class, parameter)`` of a full key: the class that takes the key's last part.

    A class_path's class is imported from ``config`` (the parse before the failing flag). None for a key outside
    every class.
    """
    parts = [p for p in key.split(".") if p != "init_args"]
    if parts == ["seed_everything"]:
        return pl.seed_everything, "seed"
    if parts[0] not in TOP_LEVEL or len(parts) < 2:
        return None
    cls: Any = TOP_LEVEL[parts[0]]
    for i in range(1, len(parts)):  # the class that owns parts[i]
        node = _node(config, parts[:i])
        if hasattr(node, "get") and node.get("class_path"):
            try:
                cls = _import(node["class_path"])
            except (ImportError, AttributeError):
                return None
        elif i > 1:
            hint = _hints(cls).get(parts[i - 1])
            if not inspect.isclass(hint):
                return None
            cls = hint
    return cls, parts[-1]


def _value_error(key: str, value: Any, config: Any) -> ConfigError:
    """The line for a value the parser rejected at ``key``, from the owning constructor's signature."""
    if key in LINK_SOURCE:
        return ConfigError(key, f"expected no value (it is set from the DataModule's {LINK_SOURCE[key]}), "
                                f"found {value!r}")
    owner = _owner(key, config)
    if owner is None:
        return ConfigError(key, f"expected a setting listed by --help (full keys look like --model.lr), found "
                                f"the unknown key --{key}")
    cls, name = owner
    parameters = _parameters(cls)
    if parameters is not None and name not in parameters:
        close = difflib.get_close_matches(name, list(parameters), n=1)
        return ConfigError(key, f"expected a parameter of {getattr(cls, '__name__', cls)}"
                                f"{f' such as {close[0]!r}' if close else ''}, found {name!r}")
    hint = _hints(cls).get(name)
    expected = readable(hint) if hint is not None else f"a value {getattr(cls, '__name__', cls)} takes"
    return ConfigError(key, f"expected {expected}, found {value!r}")


def _flags(args: Sequence[str]) -> list[list[str]]:
    """``args`` cut into flags with their values."""
    chunks: list[list[str]] = []
    for arg in args:
        if _is_flag(arg) or not chunks:
            chunks.append([arg])
        else:
            chunks[-1].append(arg)
    return chunks


def _config_leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _config_leaves(value, (*path, str(key)))
    elif path:
        yield path


def _parses(parser: LightningArgumentParser, args: list[str]) -> Any:
    """The configuration of ``args``, or None when the parser rejects them."""
    try:
        return parser.parse_args(args)
    except ArgumentError:
        return None


def _config_file_error(parser: LightningArgumentParser, before: list[str], path: str, after: list[str]
                       ) -> ConfigError | None:
    """The setting of a ``--config`` file the parser rejects: the one leaf whose removal lets the line parse."""
    file = Path(path)
    if not file.is_file():
        return ConfigError("config", f"expected a YAML file, found {path!r} (no such file)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        return ConfigError("config", f"expected a YAML file, found {path!r}, which is not YAML ({_one_line(err)})")
    for leaf in _config_leaves(data):
        trimmed = copy.deepcopy(data)
        node = trimmed
        for part in leaf[:-1]:
            node = node[part]
        value = node.pop(leaf[-1])
        config = _parses(parser, [*before, "--config", yaml.safe_dump(trimmed), *after])  # the YAML text itself
        if config is not None:
            error = _value_error(".".join(leaf), value, config)
            return ConfigError(error.key, f"{error.detail} (in {path})")
    return None


def locate_parse_error(parser: LightningArgumentParser, args: Sequence[str], err: ArgumentError) -> ConfigError:
    """The setting at fault when ``parser`` rejects ``args``, found without reading the parser's message.

    The line is parsed again (with the public ``parser.parse_args``) without one flag at a time, then without one
    setting of each ``--config`` file at a time: the one whose removal lets the line parse is at fault. Its value
    is what was found; what was expected is the type hint of the parameter in the constructor that owns the key
    (the class of a ``class_path`` taken from the line that parsed). jsonargparse's own words are only the last
    resort, when no single setting is at fault.
    """
    chunks = [c for c in _flags(args) if c[0].split("=", 1)[0] not in ("--print_config", "--help", "-h")]
    is_config = [c[0].split("=", 1)[0] == "--config" for c in chunks]
    for i, chunk in enumerate(chunks):  # the flags first, then the files (the presets last: ours)
        if is_config[i]:
            continue
        config = _parses(parser, [t for c in chunks[:i] + chunks[i + 1:] for t in c])
        if config is not None:
            flag, _, inline = chunk[0].partition("=")
            return _value_error(flag[2:], inline or " ".join(chunk[1:]), config)
    for i in reversed([i for i, c in enumerate(is_config) if c]):
        flag, _, inline = chunks[i][0].partition("=")
        path = inline or (chunks[i][1] if len(chunks[i]) > 1 else "")
        found = _config_file_error(parser, [t for c in chunks[:i] for t in c], path,
                                   [t for c in chunks[i + 1:] for t in c])
        if found is not None:
            return found
    return ConfigError("config", _one_line(err))


def _add_arguments(parser: LightningArgumentParser) -> None:
    """The keys beside ``model``, ``data`` and ``trainer``, and the data -> model links (:data:`LINKS`)."""
    for key, cls in (("selfreg", SelfReg), ("redundancy", RedundancyMonitor)):  # on by default, `null` = off
        parser.add_argument(f"--{key}", type=cls | None, default=lazy_instance(cls),
                            help=f"{cls.__name__} callback (class_path + init_args), or null for none")
    parser.add_class_arguments(RunOptions, "run")
    for source, targets, compute in LINKS:
        for target in targets:
            parser.link_arguments(f"data.{source}", target, compute_fn=compute, apply_on="instantiate")


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


class InstantiationError(Exception):
    """The constructor of the class under :attr:`key` raised :attr:`error` (raised by :func:`_tagger`).

    Args:
        key: The configuration key whose class was being built (``"data"``, ``"model.net"``, ...).
        cls: That class.
        error: What its constructor raised.
        links: The link targets applied to it (jsonargparse's ``applied_instantiation_links``).
    """

    def __init__(self, key: str, cls: type, error: BaseException, links: dict[str, Any]) -> None:
        super().__init__(f"{key}: {error}")
        self.key, self.cls, self.error, self.links = key, cls, error, links


def _tagger(key: str) -> Callable[..., Any]:
    """A jsonargparse instantiator that builds a class and tags a constructor error with ``key``."""

    def instantiate(cls: type, *args: Any, applied_instantiation_links: dict | None = None, **kwargs: Any) -> Any:
        try:
            return cls(*args, **kwargs)
        except (ValueError, TypeError) as err:
            raise InstantiationError(key, cls, err, applied_instantiation_links or {}) from err

    return instantiate


def _class_nodes(node: Any, key: str = "") -> Iterator[tuple[str, type]]:
    """``(key, class)`` of every ``class_path`` in a parsed configuration, outermost first."""
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _class_nodes(item, f"{key}.{i}")
        return
    fields = node if isinstance(node, dict) else vars(node) if isinstance(node, Namespace) else None
    if not fields:
        return
    if fields.get("class_path"):
        try:
            yield key, _import(fields["class_path"])
        except (ImportError, AttributeError):
            pass
        yield from _class_nodes(fields.get("init_args"), key)
        return
    for name, value in fields.items():
        yield from _class_nodes(value, f"{key}.{name}" if key else name)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes (Python's ``__cause__`` / ``__context__`` links), outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _data_setting(config: Any, attribute: str) -> str | None:
    """The DataModule argument behind a linked attribute (``data.image_size`` for ``input_size``), if it has one."""
    try:
        parameters = _parameters(_import(config["data"]["class_path"])) or {}
    except (ImportError, AttributeError, KeyError, TypeError):
        parameters = {}
    for name in (attribute, *_SIZE_SETTINGS.get(attribute, ())):
        if name in parameters:
            return f"data.{name}"
    return None


def _linked_error(config: Any, target: str, owner: str, message: str) -> ConfigError:
    """A bad value that came from the DataModule through the link to ``target``: named by its data key."""
    attribute = LINK_SOURCE[target]
    setting = _data_setting(config, attribute)
    passed = target.rsplit(".", 1)[-1]
    if setting is not None:
        return ConfigError(setting, f"{owner}: {message} (passed on as its `{passed}`)")
    return ConfigError("data", f"{owner}: {message} (`{passed}` is the DataModule's {attribute})")


def instantiation_error(err: BaseException, config: Any) -> ConfigError:
    """The setting at fault when building the classes of ``config`` failed with ``err``.

    The class is the one whose instantiator tagged the error (:class:`InstantiationError`), or the model (the one
    class LightningCLI builds itself); the parameter is the :class:`SettingError`'s. A linked value is named by
    the DataModule key it comes from.
    """
    tag = next((e for e in reversed(list(_chain(err))) if isinstance(e, InstantiationError)), None)
    if tag is not None:
        key, cls, cause, links = tag.key, tag.cls, tag.error, tag.links
    else:
        key, cls, links = "model", SelfRegSegModule, {}
        cause = next((e for e in _chain(err) if isinstance(e, SettingError)), err)
    parameter = getattr(cause, "parameter", None)
    message = _one_line(cause) or type(cause).__name__
    parameters = _parameters(cls)
    if parameter is None or (parameters is not None and parameter not in parameters):
        return ConfigError(key, f"{cls.__name__}: {message}")
    target = f"{key}.init_args.{parameter}" if key == "model.net" else f"{key}.{parameter}"
    if target in LINK_SOURCE and (key == "model" or target in links):
        return _linked_error(config, target, cls.__name__, message)
    return ConfigError(target, message)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (``GPU available: ...``) off, e.g. for a Trainer built only to test settings."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


TRAINER_HARDWARE = ("accelerator", "devices", "strategy", "num_nodes", "precision", "sync_batchnorm")


def trainer_error(err: BaseException, trainer_config: dict[str, Any]) -> ConfigError:
    """The ``trainer.*`` setting at fault when the Trainer cannot be built (devices, precision, strategy).

    Each hardware setting that differs from the Trainer's default is put back to its default in turn; the first
    one that lets a bare Trainer build is named.
    """
    defaults = {k: p.default for k, p in inspect.signature(pl.Trainer).parameters.items()}
    given = {k: trainer_config[k] for k in TRAINER_HARDWARE if k in trainer_config}
    for key, value in given.items():
        if value == defaults[key]:
            continue
        try:
            with _quiet_lightning(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pl.Trainer(**{**given, key: defaults[key]}, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
        except (MisconfigurationException, ValueError, RuntimeError, TypeError):
            continue
        return ConfigError(f"trainer.{key}", f"{_one_line(err)} (found {value!r})")
    return ConfigError("trainer", _one_line(err))


@contextmanager
def _no_global_seed() -> Iterator[None]:
    """Undo what ``seed_everything`` changes in this process (RNG states, its environment variables)."""
    saved = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        with isolate_rng():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class SelfRegCLI(LightningCLI):
    """LightningCLI over :class:`SelfRegSegModule`, a DataModule, :class:`SelfReg` and the Trainer.

    Instantiating it parses and checks every setting, builds the DataModule and the model, runs the data's
    pre-flight and builds the Trainer (with the run's callbacks, logger and plugins from ``run_parts``); it writes
    nothing. A bad setting raises :class:`ConfigError` naming its key.

    Args:
        args: The command line in full keys (see :func:`expand_aliases`).
        instantiate: False to parse and check only (``config`` is set; no class is built and the process's
            random state is left as it was).
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
            raise ConfigError(err.key, err.detail) from err
        # LightningCLI seeds the process after parsing; a parse-only CLI leaves the random state as it found it
        with warnings.catch_warnings(), nullcontext() if instantiate else _no_global_seed():
            # `args` is the expanded sys.argv, not a second command line
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                SelfRegSegModule, SegDataModule, subclass_mode_data=True, run=False, args=args,
                save_config_callback=None, auto_configure_optimizers=False, seed_everything_default=0,
                trainer_defaults={"log_every_n_steps": 5, "enable_model_summary": False}, parser_kwargs={
                    "exit_on_error": False, "prog": "python -m experiments.run", "epilog": _aliases_help(),
                    "add_help": False},  # -h/--help: experiments/help.py
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """SelfReg, the redundancy monitor, the run options and the links (:func:`_add_arguments`); the help flags."""
        from experiments.help import add_help_flags

        _add_arguments(parser)
        add_help_flags(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``; a value the parser rejects raises :class:`ConfigError` (:func:`locate_parse_error`)."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise locate_parse_error(parser, args, err) from err
        try:  # right after parsing, before the seed is set: the seed and the Trainer's settings
            check_settings(self.config)
        except SettingsError as err:
            raise ConfigError(err.key, err.detail) from err

    def instantiate_classes(self) -> None:
        """Build the DataModule, the model, the callbacks and the Trainer; constructor errors name their key."""
        if not self._instantiate:
            return
        precision = str(self.config["trainer"].get("precision"))
        accelerator = str(self.config["trainer"].get("accelerator"))
        if precision.startswith("16") and (accelerator == "cpu" or (accelerator == "auto"
                                                                  and not torch.cuda.is_available())):
            # Lightning would silently train in bf16 instead
            raise ConfigError("trainer.precision", f"expected 32, 32-true or bf16-mixed on a CPU, found {precision} "
                                                   "(float16 AMP needs a GPU)")
        # every class the configuration names by class path, and the run options, tagged with their key; the model
        # is left to LightningCLI's own instantiator (it records the configuration in the model's hyper-parameters)
        instantiators = [(_tagger(key), cls, False) for key, cls in _class_nodes(self.config) if key != "model"]
        instantiators.append((_tagger("run"), RunOptions, False))
        try:
            self.config_init = self.parser.instantiate(self.config, instantiators=instantiators)
        except (InstantiationError, ValueError, TypeError, ArgumentError) as err:
            raise instantiation_error(err, self.config) from err
        self.datamodule = self.config_init["data"]
        self.model = self.config_init["model"]
        check_network(self.datamodule, self.model, self.config)  # shapes only: before the data is read
        try:
            self.datamodule.validate()  # the pre-flight of the data: every file named here, before the Trainer
        except DataError as err:
            raise ConfigError(f"data.{err.parameter}", str(err)) from err
        self.extra_callbacks = [c for c in (self.config_init.get("selfreg"), self.config_init.get("redundancy"))
                                if c is not None]
        try:
            self.trainer = self.instantiate_trainer()
        except ConfigError:
            raise
        except DataError as err:
            raise ConfigError(f"data.{err.parameter}", str(err)) from err
        except (MisconfigurationException, ValueError, RuntimeError) as err:
            raise trainer_error(err, dict(self.config["trainer"])) from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer of ``trainer.*``, with the run's callbacks, logger and plugins added (see ``run_parts``)."""
        config = {**(self.config_init.get("trainer") or {}), **kwargs}
        callbacks = [*(config.pop("callbacks", None) or []), *self.extra_callbacks]
        if self._run_parts is not None:
            run_callbacks, logger, plugins, extra = self._run_parts(self)
            config = {**config, **extra, "logger": logger, "plugins": [*(config.get("plugins") or []), *plugins]}
            callbacks += run_callbacks
        return self.trainer_class(**{**config, "callbacks": callbacks})


def check_network(datamodule: SegDataModule, module: SelfRegSegModule, config: Any = None) -> None:
    """Run the network on a shape-only (meta) copy at the DataModule's input size, before any data is read.

    Catches a size the backbone cannot take (too small for its depth, not a multiple of its patch or window), in
    evaluation (one sample) and in training (a batch of ``datamodule.batch_size``: BatchNorm on a 1 x 1 x 1
    bottleneck of one sample, InstanceNorm on a single voxel), naming the smallest size the network takes
    (:func:`~experiments.settings.smallest_valid_size`), and an output that is not ``num_classes`` channels, at
    no cost (no memory, no arithmetic).

    Raises:
        ConfigError: Naming the DataModule's size setting, or ``model.net``.
    """
    attribute = "roi_size" if datamodule.roi_size else "input_size" if datamodule.input_size else None
    size = getattr(datamodule, attribute) if attribute else getattr(datamodule, "patch_size", None)
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
    key = (_data_setting(config, attribute or "roi_size") if config is not None else None) or "data"
    batch = int(getattr(datamodule, "batch_size", 1) or 1)
    for train, batch_size in ((False, 1), (True, batch)):
        err = meta_forward_error(net, (batch_size, channels, *size), train)
        if err is None:
            continue
        message = _one_line(err) or type(err).__name__
        smallest = smallest_valid_size(net, channels, size, batch_size, train)
        hint = f"; the smallest size from {list(size)} it takes is {list(smallest)}" if smallest else ""
        what = f"train on a batch of {batch_size} of shape" if train else "take inputs of shape"
        raise ConfigError(key, f"the network {type(module.net).__name__} cannot {what} {(batch_size, *shape[1:])} "
                               f"(the DataModule's size){hint}: {message[:300]}") from err
    net.eval()
    try:
        with torch.no_grad():
            logits = net(torch.empty(shape, device="meta"))
    except NotImplementedError:  # an operation without a meta kernel: the first batch will tell
        return
    expected = (1, datamodule.num_classes, *size)
    if tuple(logits.shape) != expected:
        raise ConfigError("model.net", f"{type(module.net).__name__} maps inputs {shape} to {tuple(logits.shape)}; "
                                       f"expected logits {expected} ({datamodule.num_classes} classes of "
                                       f"{type(datamodule).__name__} at the input size)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m experiments.run")
