"""Checks of the settings that no library constructor owns: the ``--config`` files, the seed and the Trainer's.

The library's own settings are checked by their constructors (``SelfRegSegModule(lr=...)``, the DataModules,
``SelfReg``); the Trainer and LightningCLI accept values that would train something other than what was asked
(``max_epochs=-1`` trains forever, ``max_epochs=0`` trains nothing, a seed out of NumPy's range is replaced by
Lightning, ``precision=64`` is not supported by the method's kernels). :func:`check_settings` names those before
anything is built; :func:`check_config_files` names a ``--config`` file that is missing, empty, not a mapping or
not YAML (with the line), before jsonargparse reads it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PRECISIONS", "SEED_RANGE", "check_config_files", "check_settings", "config_files"]

# the precisions the method supports (SelfReg's terms run in float32 under AMP): Lightning's names and aliases
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "32", "16", "bf16")
SEED_RANGE = (0, 2**32 - 1)  # what NumPy (and so Lightning's seed_everything) accepts


class SettingsError(ValueError):
    """A setting or a configuration file is bad.

    :attr:`key` names it (``trainer.max_epochs``, ``config``), :attr:`detail` says what was expected and what was
    found (one line).
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"--{key}: {detail}")
        self.key, self.detail = key, detail


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_settings(config: Mapping[str, Any]) -> None:
    """Check the seed and the Trainer settings of a parsed configuration.

    Args:
        config: The parsed configuration (``seed_everything``, ``trainer``).

    Raises:
        SettingsError: ``--<key>: expected ..., found ...`` for the first bad setting.
    """
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and seed is not None and (not _is_int(seed)
                                                            or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise SettingsError("seed_everything", f"expected an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (the range "
                            f"NumPy's generators accept), found {seed!r}")
    trainer = config.get("trainer") or {}
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        raise SettingsError("trainer.precision", f"expected one of 32-true, 16-mixed, bf16-mixed (or 32, 16, bf16), "
                            f"found {precision!r}")
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and (not _is_int(max_epochs) or max_epochs < 1):
        what = " (-1 would train forever)" if max_epochs == -1 else " (0 trains nothing)" if max_epochs == 0 else ""
        raise SettingsError("trainer.max_epochs", f"expected an integer >= 1, found {max_epochs!r}{what}")
    max_steps = trainer.get("max_steps")
    if max_steps is not None and (not _is_int(max_steps) or (max_steps < 1 and max_steps != -1)):
        raise SettingsError("trainer.max_steps", f"expected an integer >= 1, or -1 for no step limit, found "
                            f"{max_steps!r}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if key == "limit_train_batches" and value is not None and not isinstance(value, bool) and value <= 0:
            raise SettingsError(f"trainer.{key}", f"expected a fraction in (0, 1] or a number of batches >= 1, found "
                                f"{value!r} (no training batch)")
        if value is not None and not isinstance(value, bool) and value < 0:
            raise SettingsError(f"trainer.{key}", f"expected a fraction in [0, 1] or a number of batches >= 0, found "
                                f"{value!r}")
    for key in ("log_every_n_steps", "accumulate_grad_batches", "check_val_every_n_epoch"):
        value = trainer.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise SettingsError(f"trainer.{key}", f"expected an integer >= 1, found {value!r}")


def config_files(args: Sequence[str]) -> list[str]:
    """The files given to ``--config`` in a command line (``--config F`` and ``--config=F``), in order."""
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(args: Sequence[str]) -> None:
    """Check every ``--config`` file of a command line: it exists, is YAML and holds a mapping of settings.

    Raises:
        SettingsError: ``--config FILE: ...`` naming the file, and the line and column of a YAML syntax error.
    """
    for name in config_files(args):
        path = Path(name)
        if not path.exists():
            raise SettingsError("config", f"{name}: file not found")
        if not path.is_file():
            raise SettingsError("config", f"{name}: expected a YAML file, found a folder")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SettingsError("config", f"{name}: cannot be read ({err})") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
            if context and start is not None:
                problem += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
            raise SettingsError("config", f"{name}: YAML syntax error{where}: {problem}") from err
        if data is None:
            raise SettingsError("config", f"{name}: expected a mapping of settings (e.g. `trainer:` / "
                                f"`  max_epochs: 10`), found an empty file")
        if not isinstance(data, Mapping):
            raise SettingsError("config", f"{name}: expected a mapping of settings (key: value lines), found a "
                                f"{type(data).__name__} ({str(data)[:40]})")


def meta_forward_error(net: Any, shape: Sequence[int], train: bool) -> BaseException | None:
    """Run ``net`` (a copy on the ``meta`` device) on an input of ``shape``; the error it raises, or None.

    ``train=True`` runs it in training mode, where normalisation layers check what they get (BatchNorm needs more
    than one value per channel: ``batch x spatial > 1``; InstanceNorm more than one spatial element). An operation
    without a meta kernel (``NotImplementedError``) counts as no error: the first batch will tell.
    """
    import torch

    net.train(train)
    try:
        with torch.no_grad():
            net(torch.empty(tuple(shape), device="meta"))
    except NotImplementedError:
        return None
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        return err
    return None


def smallest_valid_size(net: Any, channels: int, size: Sequence[int], batch: int, train: bool,
                        largest: int = 512) -> tuple[int, ...] | None:
    """The smallest input size at or above ``size`` (per axis) that ``net`` takes, or None when none is found.

    Per axis, the smallest power of two the network takes when the other axes are large (its total stride along
    that axis, e.g. 16 for four poolings); ``size`` is rounded up to multiples of these, and the axis with the
    fewest multiples grows until the whole input passes (a 1 x 1 x 1 bottleneck needs a larger size for a
    normalisation layer in training mode). Every trial is a meta-device forward (shapes only, no memory).
    """
    dims = len(size)
    steps = []
    for axis in range(dims):
        for k in range(int(largest).bit_length()):
            trial = [largest] * dims
            trial[axis] = 2**k
            if meta_forward_error(net, (batch, channels, *trial), train) is None:
                steps.append(2**k)
                break
        else:
            return None
    candidate = [max(step, step * -(-int(s) // step)) for s, step in zip(size, steps, strict=True)]
    for _ in range(4 * dims):
        if meta_forward_error(net, (batch, channels, *candidate), train) is None:
            return tuple(candidate)
        axis = min(range(dims), key=lambda a: candidate[a] // steps[a])
        candidate[axis] += steps[axis]
    return None
