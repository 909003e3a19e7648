"""Report tables, formatted in one place: a run's test results and the SelfReg-vs-baseline comparison.

- :func:`format_table`: one run's per-class Dice, IoU and HD95 with the means (the chosen protocol).
- :func:`format_paper_table`: one row per evaluation protocol, in the layout of the papers' tables (what a run
  writes as ``metrics.md``, see :class:`~lightning_selfreg.callbacks.MetricsWriter`).
- :func:`format_comparison_markdown`: the paired comparison of
  :func:`lightning_selfreg.tracking.compare.summarize_comparison`.

Example:
    >>> results = {"dice_mean": 0.8, "iou_mean": 0.7, "hd95_mean": 3.0,
    ...            "per_class": {"liver": {"dice": 0.8, "iou": 0.7, "hd95": 3.0}}}
    >>> print(format_paper_table({"strict": results}, volumetric=True))
    | protocol | liver | DSC | HD95 |
    |---|---|---|---|
    | strict | 80.00 | 80.00 | 3.00 |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ARMS", "MEAN_ROW", "format_comparison_markdown", "format_paper_table", "format_table"]

ARMS = ("baseline", "selfreg")  # the arms of a comparison summary, in table order
MEAN_ROW = "mean"  # the comparison summary's row of the runs' own class means
_LABELS = {"dice": ("Dice", 100.0, "%"), "iou": ("IoU", 100.0, "%"), "hd95": ("HD95", 1.0, "")}


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


def _fmt(value: float | None, scale: float = 1.0, sign: bool = False) -> str:
    """``value * scale`` with 2 decimals (and a sign), or ``n/a`` for None."""
    if value is None:
        return "n/a"
    return f"{value * scale:+.2f}" if sign else f"{value * scale:.2f}"


def format_comparison_markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`summarize_comparison`'s result, to paste into a report.

    One row per class and a bold mean row; per metric three columns: baseline and SelfReg as ``mean ± std``
    over seeds, and the paired difference ``Δ`` with its 95 % CI (``(n=1)`` when there is none; ``n=k`` when
    fewer seeds than run entered a cell). Dice and IoU in percent (Δ in percentage points), HD95 as logged.

    Raises:
        ValueError: If ``summary`` lacks the keys of :func:`summarize_comparison`'s result.
    """
    required = ("metrics", "classes", "arms", "difference", "seeds")
    missing = [k for k in required if k not in summary]
    if missing:
        raise ValueError(f"`summary` lacks {missing}: pass the result of summarize_comparison().")
    seeds, metrics = summary["seeds"], summary["metrics"]
    context = ", ".join(f"{k} `{summary[k]}`" for k in ("dataset", "backbone", "eval_protocol") if summary.get(k))
    lines = [f"**SelfReg vs baseline**{' (' + context + ')' if context else ''}: {len(seeds)} seed(s) "
             f"({', '.join(map(str, seeds))})", ""]
    header, rule = ["class"], ["---"]
    for m in metrics:
        label, _, unit = _LABELS.get(m, (m, 1.0, ""))
        suffix = f" ({unit})" if unit else ""
        delta_unit = " (pp)" if unit == "%" else ""
        header += [f"{label} baseline{suffix}", f"{label} SelfReg{suffix}", f"Δ {label}{delta_unit} [95 % CI]"]
        rule += ["---:"] * 3
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for name in summary["classes"]:
        cells = [f"**{name}**" if name == MEAN_ROW else name]
        for m in metrics:
            scale = _LABELS.get(m, (m, 1.0, ""))[1]
            for arm in ARMS:
                s = summary["arms"][arm][name][m]
                text = _fmt(s["mean"], scale)
                if s["std"] is not None:
                    text += f" ± {_fmt(s['std'], scale)}"
                if 0 < s["n"] < len(seeds):
                    text += f" (n={s['n']})"
                cells.append(text)
            d = summary["difference"][name][m]
            text = _fmt(d["mean"], scale, sign=True)
            if d["ci95"] is not None:
                text += f" [{_fmt(d['ci95'][0], scale, True)}, {_fmt(d['ci95'][1], scale, True)}]"
            if d["n"] == 1:
                text += " (n=1)"
            elif 0 < d["n"] < len(seeds):
                text += f" (n={d['n']})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds. Δ = SelfReg − baseline, paired by seed, with a 95 % "
        "Student-t confidence interval; n = seeds with a value (a class absent from a run's test cases is "
        "skipped for that seed). Lower HD95 is better (mm under the strict protocol, voxels under transunet).",
    ]
    return "\n".join(lines) + "\n"
