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
instantiated (:data:`~experiments.cli_errors.LINKS`; a link to a parameter the network does not have is skipped),
so they are never written twice.

The short flags users type (``--gpus 4``, ``--dataset``, ``--lambda-scr``, ...), the presets, ``--run.*`` and
:class:`~experiments.flags.ConfigError` are :mod:`experiments.flags`.

**Errors.** A bad setting ends in a :class:`~experiments.flags.ConfigError` that holds its key as data;
:meth:`~experiments.flags.ConfigError.line` names it as the user typed it. How the key is found without reading
any error message: :mod:`experiments.cli_errors`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentError, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng

from experiments.cli_errors import (
    LINKS,
    InstantiationError,
    check_network,
    class_nodes,
    instantiation_error,
    locate_parse_error,
    tagger,
    trainer_error,
)
from experiments.flags import RUN_NAME_ENV, ConfigError, RunOptions
from experiments.settings import (
    SettingsError,
    check_config_files,
    check_settings,
)
from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import RedundancyMonitor
from lightning_selfreg.data import DataError, SegDataModule


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
                    "exit_on_error": False, "prog": "python -m experiments.run", "add_help": False,  # help.py
                    "epilog": "The short flags (--gpus, --dataset, --lr, ...) and presets: --help."},
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
        instantiators = [(tagger(key), cls, False) for key, cls in class_nodes(self.config) if key != "model"]
        instantiators.append((tagger("run"), RunOptions, False))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m experiments.run")
