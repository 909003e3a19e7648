"""``compare.png``: a forest plot of the paired Dice difference SelfReg − baseline per class and on the mean.

One row per class, the mean at the bottom: each seed's difference as a dot (colour = seed), the mean difference
with its 95 % Student-t interval (black), and the two-stage bootstrap interval over seeds and cases (grey, below)
when the summary has one; a line at 0 (no effect) and a dotted line at +3.5 pp (the paper's gain on Synapse). The
numbers are printed at the right; an interval beyond the possible +-100 pp (few seeds) is cut there, with an arrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_selfreg.tracking.report import MEAN_ROW

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure_inches", "plot_comparison"]

PAPER_GAIN_PP = 3.5  # SelfReg's mean Dice gain for the UNet on Synapse in the paper
_SEED_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")


def figure_inches(num_rows: int) -> tuple[float, float]:
    """``(width, height)`` of the plot for ``num_rows`` rows (classes + mean)."""
    return 9.0, 1.6 + 0.5 * num_rows


def _label(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}".replace("-", "−")


LIMIT_PP = 100.0  # a Dice difference lies in [-100, +100] pp: longer intervals (few seeds) are cut there, with arrows


def _clipped_line(ax: Any, low: float, high: float, y: float, **style: Any) -> None:
    """A horizontal interval in pp, cut at +-LIMIT_PP with an arrow head where it goes on."""
    a, b = max(low, -LIMIT_PP), min(high, LIMIT_PP)
    ax.plot([a, b], [y, y], **style)
    for cut, end, marker in ((low < -LIMIT_PP, a, "<"), (high > LIMIT_PP, b, ">")):
        if cut:
            ax.plot(end, y, marker=marker, color=style.get("color", "black"), markersize=7)


def plot_comparison(summary: Mapping[str, Any]) -> Figure:
    """Draw the forest plot of a comparison summary's Dice differences (see the module docstring).

    Args:
        summary: :func:`lightning_selfreg.tracking.compare.summarize_comparison`'s result, with ``dice``.

    Returns:
        A figure of :func:`figure_inches` inches, not attached to pyplot.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = list(summary["classes"])
    seeds = list(summary["seeds"])
    fig = Figure(figsize=figure_inches(len(rows)), layout="constrained")
    ax = fig.subplots(1, 1)
    bootstrap = summary.get("bootstrap") or {}
    spread = max(1, len(seeds) - 1)
    for y, name in enumerate(rows):
        d = summary["difference"][name]["dice"]
        for seed, value in zip(d["seeds"], d["values"], strict=True):
            offset = 0.25 * (seeds.index(seed) / spread - 0.5) if len(seeds) > 1 else 0.0
            ax.plot(100 * value, y + offset, "o", color=_SEED_COLOURS[seeds.index(seed) % len(_SEED_COLOURS)],
                    markersize=5, alpha=0.8, zorder=2)
        if d["mean"] is not None:
            if d["ci95"] is not None:
                _clipped_line(ax, 100 * d["ci95"][0], 100 * d["ci95"][1], y, color="black", linewidth=2.2, zorder=3)
            ax.plot(100 * d["mean"], y, "D", color="black", markersize=7 if name == MEAN_ROW else 6, zorder=4)
        b = bootstrap.get(name)
        if b is not None:
            _clipped_line(ax, 100 * b["ci95"][0], 100 * b["ci95"][1], y + 0.3, color="0.55", linewidth=1.6,
                          zorder=1)
        text = _label(d["mean"]) + (f" [{_label(d['ci95'][0])}, {_label(d['ci95'][1])}]" if d["ci95"] else "")
        ax.annotate(text + (" pp" if d["mean"] is not None else ""), xy=(1.01, y), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8, fontweight="bold" if name == MEAN_ROW else "normal")
    low, high = ax.get_xlim()
    ax.set_xlim(max(low, -LIMIT_PP - 5), min(high, LIMIT_PP + 5))
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.axvline(PAPER_GAIN_PP, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_yticks(range(len(rows)), [f"{n}" for n in rows])
    for tick, name in zip(ax.get_yticklabels(), rows, strict=True):
        if name == MEAN_ROW:
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.4, -0.6)  # the first class at the top, the mean at the bottom
    ax.set_xlabel("Δ Dice, SelfReg − baseline (percentage points)")
    ax.grid(axis="x", alpha=0.3)
    context = ", ".join(str(summary[k]) for k in ("dataset", "backbone", "eval_protocol") if summary.get(k))
    ax.set_title(f"Does SelfReg help? {context} — {len(seeds)} seed(s), paired by seed", fontsize=10)
    handles = [Line2D([], [], marker="o", linestyle="", color=_SEED_COLOURS[i % len(_SEED_COLOURS)],
                      label=f"seed {s}") for i, s in enumerate(seeds)]
    handles += [Line2D([], [], marker="D", color="black", linewidth=2.2, label="mean, 95 % t interval")]
    if any(v is not None for v in bootstrap.values()):
        handles.append(Line2D([], [], color="0.55", linewidth=1.6, label="95 % bootstrap (seeds, cases)"))
    handles.append(Line2D([], [], color="0.4", linestyle=":", label=f"+{PAPER_GAIN_PP} pp (paper, Synapse)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return fig
