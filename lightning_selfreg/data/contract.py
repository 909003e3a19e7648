"""The data contract: what a sample, a case and a DataModule argument must be, and the error that says they are not.

:class:`DataError` is the one error for bad data (a file or folder that does not match the layout or content);
:class:`Item` names one sample or case; the ``check_*`` functions validate constructor arguments (a
:class:`~lightning_selfreg.utils.checks.SettingError` naming the argument) and image/label arrays
(:class:`DataError` naming the file).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.utils.checks import SettingError, check_int, check_num_classes, label_problem

__all__ = [
    "DataError",
    "Item",
    "check_arrays",
    "check_cases",
    "check_fold",
    "check_image_size",
    "check_int",
    "check_num_classes",
]


class DataError(SettingError):
    """A data file or folder does not match the expected layout or content; the message names the file.

    The message is always one line. A DataError raised in a DataLoader worker comes back to the main process
    re-created from the worker's formatted traceback ("Caught DataError in DataLoader worker process 0. ..."); the
    original one-line message is recovered from its last line.

    Args:
        message: What is wrong, naming the file or argument, what was expected and what was found.
        parameter: The DataModule argument the problem is about (a DataError is a
            :class:`~lightning_selfreg.utils.checks.SettingError`): ``"data_dir"`` (a file or folder under it)
            unless another argument is at fault (e.g. ``"val_cases"``, ``"list_dir"``); a command line names that
            flag.
    """

    def __init__(self, message: str = "", parameter: str = "data_dir") -> None:
        message = str(message)
        if message.startswith("Caught DataError") and "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("DataError: ", 1)[-1]
        super().__init__(parameter, " ".join(line.strip() for line in message.splitlines() if line.strip()))

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.parameter)


@dataclass(frozen=True)
class Item:
    """One sample or case: its ``case`` name (for splits), the file(s) holding it and an optional key."""

    case: str
    path: Path
    label_path: Path | None = None
    name: str = ""

    @property
    def display(self) -> str:
        """Name used in errors and outputs."""
        return self.name or self.path.name


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_image_size(image_size: Any) -> int | tuple[int, int]:
    """``image_size`` as a positive int or an ``(H, W)`` pair of positive ints; SettingError naming it otherwise."""
    if _is_int(image_size) and image_size > 0:
        return int(image_size)
    if (isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2
            and all(_is_int(s) and s > 0 for s in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise SettingError("image_size", f"`image_size` must be a positive int or an (H, W) pair of positive ints, found "
                     f"{image_size!r}.")


def check_cases(cases: Any, name: str = "val_cases") -> tuple[str, ...] | None:
    """A list of case names as a tuple (``None`` stays ``None``); a bare string is an error, not ``list(str)``."""
    if cases is None:
        return None
    if isinstance(cases, str | bytes):
        raise SettingError(name, f"`{name}` must be a list of case names, found the string {cases!r} "
                         f"(for one case write [{cases!r}]).")
    if not isinstance(cases, Sequence | set | frozenset) or not all(isinstance(c, str) and c for c in cases):
        raise SettingError(name, f"`{name}` must be a list of non-empty case-name strings, found {cases!r}.")
    return tuple(cases)


def check_fold(fold: Any, num_folds: Any) -> None:
    """``num_folds`` an int >= 2 and ``fold`` None or an int in ``[0, num_folds)``; SettingError naming them."""
    if not _is_int(num_folds) or num_folds < 2:
        raise SettingError("num_folds", f"`num_folds` must be an int >= 2, found {num_folds!r}.")
    if fold is not None and (not _is_int(fold) or not 0 <= fold < num_folds):
        raise SettingError("fold", f"`fold` must be None or an int in [0, {num_folds}) (`num_folds`={num_folds}), "
                         f"found {fold!r}.")


def check_arrays(source: Any, image: np.ndarray, label: np.ndarray, num_classes: int, image_ndim: Sequence[int],
                 label_ndim: int) -> None:
    """Check one image/label pair; raise :class:`DataError` naming ``source`` and the problem.

    Args:
        source: File name(s) for the message.
        image: Image array, ``label`` shape plus an optional trailing channel axis.
        label: Integer (or integer-valued float) label array.
        num_classes: Labels must lie in ``[0, num_classes)``.
        image_ndim: Allowed image dimensionalities.
        label_ndim: Required label dimensionality.
    """
    check_num_classes(num_classes)
    if image.ndim not in image_ndim:
        raise DataError(f"{source}: image must have {' or '.join(map(str, image_ndim))} dimensions, "
                        f"found shape {image.shape}.")
    if label.ndim != label_ndim or image.shape[:label_ndim] != label.shape:
        raise DataError(f"{source}: image shape {image.shape} does not match label shape {label.shape}.")
    if not np.issubdtype(image.dtype, np.number):
        raise DataError(f"{source}: expected a numeric image, found dtype {image.dtype}.")
    finite = np.isfinite(image)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DataError(f"{source}: expected finite image values, found {int(finite.size - finite.sum())} "
                        f"NaN/infinite value(s) (first at index {first}).")
    problem = label_problem(label, num_classes)
    if problem is not None:
        raise DataError(f"{source}: label: {problem}.")
