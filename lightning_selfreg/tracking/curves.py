"""Training curves from a run's ``metrics.csv``: the loss terms and the validation Dice per class over epochs.

The file is Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` format: a header row ``epoch,step,<metric
names...>`` (in any order) and one row per log event, with empty cells for the metrics not logged at that row.
:func:`read_metrics_csv` reads it, :func:`epoch_means` averages one metric per epoch (the training terms are
logged per step) and :func:`plot_curves` draws ``curves.png``: on the left the training loss terms (total, CE,
Dice, SelfReg's SCR and IFD unweighted and its weighted term) on a log scale, on the right the validation Dice
per class and its mean (when the run has a validation split).

Example:
    >>> rows = [{"epoch": 0.0, "step": 4.0, "train/loss": 1.2}, {"epoch": 1.0, "step": 9.0, "train/loss": 0.8}]
    >>> epoch_means(rows, "train/loss")
    ([1, 2], [1.2, 0.8])
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_selfreg.tracking.figures import class_colour

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LOSS_TERMS", "epoch_means", "plot_curves", "read_metrics_csv"]

# logged name -> legend label of the training loss terms, in legend order (SelfRegSegModule, SelfReg)
LOSS_TERMS: dict[str, str] = {
    "train/loss": "total loss",
    "train/ce": "CE",
    "train/dice": "Dice loss",
    "selfreg/scr": "SCR (unweighted)",
    "selfreg/ifd": "IFD (unweighted)",
    "selfreg/total": "SelfReg (weighted)",
}
VAL_DICE = "val/dice"  # the mean over foreground classes; per class: val/dice/<class>
FIGURE_SIZE = (12.0, 4.5)  # inches; 1200 x 450 pixels at the default 100 dpi


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as ``{column: value}``, empty and non-numeric cells left out.

    Reads Lightning's ``CSVLogger`` files and the run folder's
    :class:`~lightning_selfreg.tracking.csv_logger.MetricsCSVLogger` file. After a resume the latter holds the steps
    between the resumed checkpoint and the interruption twice: of each ``(step, key)`` the last value is kept.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    rows = []
    with Path(path).open(newline="", encoding="utf-8") as file:
        for raw in csv.DictReader(file):
            row = {}
            for key, text in raw.items():
                if key is None or text in (None, ""):
                    continue
                try:
                    row[key] = float(text)
                except ValueError:
                    continue
            rows.append(row)
    last = {(row["step"], key): i for i, row in enumerate(rows) if "step" in row for key in row}
    return [{k: v for k, v in row.items() if k in ("step", "epoch") or "step" not in row or last[(row["step"], k)] == i}
            for i, row in enumerate(rows)]


def epoch_means(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Per-epoch mean of ``key`` over the rows that hold it: ``(epochs, 1-based; means)``, finite values only."""
    sums: dict[int, list[float]] = {}
    for row in rows:
        value, epoch = row.get(key), row.get("epoch")
        if value is None or epoch is None or not math.isfinite(value):
            continue
        sums.setdefault(int(epoch), []).append(value)
    epochs = sorted(sums)
    return [e + 1 for e in epochs], [math.fsum(sums[e]) / len(sums[e]) for e in epochs]


def _classes(rows: Sequence[Mapping[str, float]], class_names: Sequence[str] | None) -> list[tuple[int, str]]:
    """``(label, name)`` of each class with a validation Dice column, in label order.

    The label is the class's 1-based place in ``class_names``, so that it has its colour of the overlays; without
    them (or for a column they do not name), the columns' order.
    """
    prefix = VAL_DICE + "/"
    logged = list(dict.fromkeys(k[len(prefix):] for row in rows for k in row if k.startswith(prefix)))
    known = list(class_names or [])
    if not all(name in known for name in logged):
        return list(enumerate(logged, start=1))
    return sorted((known.index(name) + 1, name) for name in logged)


def plot_curves(rows: Sequence[Mapping[str, float]], title: str = "",
                class_names: Sequence[str] | None = None) -> Figure:
    """Draw the training loss terms and the validation Dice per class over epochs (see the module docstring).

    Args:
        rows: :func:`read_metrics_csv` of a run's ``metrics.csv``.
        title: Figure title (e.g. the run's settings).
        class_names: The foreground classes in label order (the module's ``class_names``): each class is drawn in
            its colour of the overlays and panels, in label order (``metrics.csv`` sorts its columns by name).

    Returns:
        A ``matplotlib.figure.Figure`` of :data:`FIGURE_SIZE` inches, not attached to pyplot.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZE, layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    drawn = 0
    for key, label in LOSS_TERMS.items():
        epochs, values = epoch_means(rows, key)
        positive = [(e, v) for e, v in zip(epochs, values, strict=True) if v > 0]  # log scale
        if positive:
            style = {"linewidth": 2.2, "color": "black"} if key == "train/loss" else {"linewidth": 1.4}
            loss_ax.plot(*zip(*positive, strict=True), marker="o" if len(positive) < 30 else None, markersize=3,
                         label=label, **style)
            drawn += 1
    loss_ax.set(title="training loss terms (mean per epoch)", xlabel="epoch", ylabel="loss")
    if drawn:
        loss_ax.set_yscale("log")
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, "no training loss logged yet", ha="center", va="center", transform=loss_ax.transAxes)
    classes = _classes(rows, class_names)
    for i, name in classes:
        epochs, values = epoch_means(rows, f"{VAL_DICE}/{name}")
        if epochs:
            dice_ax.plot(epochs, [100 * v for v in values], color=class_colour(i), linewidth=1.2, label=name,
                         marker="o" if len(epochs) < 30 else None, markersize=3)
    epochs, values = epoch_means(rows, VAL_DICE)
    if epochs:
        dice_ax.plot(epochs, [100 * v for v in values], color="black", linewidth=2.4, label="mean")
        dice_ax.set_ylim(0, 100)
        dice_ax.legend(fontsize=7, ncol=2 if len(classes) > 8 else 1)
    else:
        dice_ax.text(0.5, 0.5, "no validation split: no validation Dice\n(the test results are in metrics.md)",
                     ha="center", va="center", transform=dice_ax.transAxes)
    dice_ax.set(title="validation Dice per class", xlabel="epoch", ylabel="Dice (%)")
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
