"""The command line's own vocabulary: the short flags users type, the presets, ``--run.*`` and :class:`ConfigError`.

The short flags (``--gpus 4``, ``--dataset``, ``--lambda-scr``, ...) are aliases of the full keys of
:mod:`experiments.cli`, listed in :data:`ALIASES`; ``--dataset NAME`` (and no ``--config``) loads the preset
``experiments/configs`` holds for that dataset and device (:data:`PRESETS`), ``--backbone NAME`` the network file in
``configs/backbones/`` (:func:`backbone_file`). :func:`expand_aliases` turns a command line into full keys, and
:func:`typed_flag` names a full key back as the user typed it, so that every error names the flag the user wrote.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lightning_selfreg.models import list_models
from lightning_selfreg.utils.checks import SettingError, check_int

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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


RUN_NAME_ENV = "LIGHTNING_SELFREG_RUN_NAME"  # shared with the DDP worker processes Lightning re-launches


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


def is_flag(arg: str) -> bool:
    """Whether a command-line token is a ``--flag`` (a negative number is a value, not a flag)."""
    return arg.startswith("--") and not re.fullmatch(r"-?\d+(\.\d*)?", arg)


def _values(argv: Sequence[str], i: int, flag: str, many: bool) -> tuple[list[str], int]:
    """The value(s) after ``argv[i]`` (``flag`` or ``flag=value``) and the index after them."""
    if "=" in argv[i]:
        return [argv[i].split("=", 1)[1]], i + 1
    j = i + 1
    while j < len(argv) and not is_flag(argv[j]):
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
        elif flag == "--selfreg" and (i + 1 == len(argv) or is_flag(argv[i + 1])):
            i += 1  # the SelfReg arm: the preset's SelfReg, as configured
        elif flag == "--augment":  # the paper's per-sample augmentation, or none
            values, i = _values(argv, i, flag, many=False)
            items.append(Item(flag, ("--data.transform", "null" if values[0] == "none" else values[0]), values[0]))
        elif flag == "--sync-batchnorm":
            items.append(Item(flag, ("--trainer.sync_batchnorm", "true")))
            i += 1
        else:  # a full key (or --config, --print_config, ...) and its values, passed on as they are
            i += 1
            while i < len(argv) and not is_flag(argv[i]):
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
