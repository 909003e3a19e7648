"""``--dataset nnunet``: plan the configuration from the dataset and the device before the run is built.

:func:`plan_arguments` takes the command line in full keys (:func:`experiments.flags.expand_aliases`); when it
starts with an nnU-Net preset, it reads the dataset's headers, plans the patch size, batch size, network depth
(and on a CPU the width and the training length) with
:func:`lightning_selfreg.data.nnunet.planner.plan_configuration`, and inserts the plan's settings right after the
preset, so that every flag the user typed, and a ``--config`` file, still wins over the plan. The preset follows
``--configuration`` (``nnunet_2d.yaml`` or ``nnunet_3d.yaml``). The run prints the plan in one line and saves it
as ``plan.json`` in its folder (:func:`plan_record`), with the settings the user's flags overrode.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import yaml

from experiments.cli import SelfRegCLI
from experiments.flags import CONFIG_DIR
from lightning_selfreg.data.nnunet.planner import DeviceBudget, Plan, device_budget, plan_configuration

NNUNET_PRESETS = {"2d": CONFIG_DIR / "nnunet_2d.yaml", "3d": CONFIG_DIR / "nnunet_3d.yaml"}


def _import(class_path: str) -> Any:
    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _get(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return value


def run_device(trainer: Any) -> DeviceBudget:
    """The budget of the device the run's ``trainer.*`` settings select (``auto``: a GPU when one is present)."""
    import torch

    accelerator = str(_get(trainer, "accelerator") or "auto")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return device_budget("gpu", props.total_memory, f"{props.name} ({props.total_memory / 1024**3:.0f} GiB)",
                             num_cpus=cpus)
    return device_budget("cpu", num_cpus=cpus)


def plan_arguments(args: list[str]) -> tuple[list[str], Plan | None]:
    """The command line with the plan of an nnU-Net preset inserted after it, and the plan (None: no nnU-Net preset).

    Raises:
        DataError: The dataset cannot be read (named as the DataModule names it).
    """
    from lightning_selfreg.data.nnunet import NnUNetDataModule

    presets = {str(p) for p in NNUNET_PRESETS.values()}
    if len(args) < 2 or args[0] != "--config" or args[1] not in presets:
        return args, None
    config = SelfRegCLI(args, instantiate=False).config
    data_class = _import(_get(config, "data.class_path"))
    if not (isinstance(data_class, type) and issubclass(data_class, NnUNetDataModule)):
        return args, None
    init = _get(config, "data.init_args")
    configuration = init.get("configuration") or "3d"
    preset = NNUNET_PRESETS[configuration]
    if str(preset) != args[1]:  # --configuration 2d under the 3D preset: the 2D preset's settings instead
        config = SelfRegCLI(["--config", str(preset), *args[2:]], instantiate=False).config
        init = _get(config, "data.init_args")
    datamodule = NnUNetDataModule(data_dir=init.get("data_dir"), configuration=configuration,
                                  splits_file=init.get("splits_file"), target_spacing=init.get("target_spacing"),
                                  progress=False)  # reads dataset.json here, the image headers below
    base = _get(config, "model.net.init_args.base_channels")  # the width the run has without a plan (GPU)
    plan = plan_configuration(datamodule.dataset_shape(), configuration, run_device(config["trainer"]),
                              datamodule.in_channels, datamodule.num_classes, base)
    parameters = inspect.signature(_import(_get(config, "model.net.class_path"))).parameters
    plan.applied = plan.flags(net_has_depth="depth" in parameters, net_has_width="base_channels" in parameters)
    # preprocessing's progress bars are carriage-return updates: not into a log file (the user's flag still wins)
    quiet = [] if sys.stderr.isatty() else ["--data.progress", "false"]
    return ["--config", str(preset), *plan.applied, *quiet, *args[2:]], plan


def plan_record(plan: Plan, config: Any) -> dict[str, Any]:
    """``plan.json``: the plan, and ``overridden``: ``{key: the run's value}`` where the user's flags won."""
    flags = plan.applied
    overridden = {}
    for key, text in zip(flags[::2], flags[1::2], strict=True):
        key = key.removeprefix("--")
        head, _, rest = key.partition(".")  # --data.x is data.init_args.x in the parsed configuration
        final = _get(config, f"{head}.init_args.{rest}" if head == "data" else key)
        final = list(final) if isinstance(final, tuple) else final
        if final != yaml.safe_load(text):
            overridden[key] = final
    return {**plan.to_json(), "line": plan.line(), "overridden": overridden}
