"""Report tables, formatted in one place: a run's test results and the SelfReg-vs-baseline comparison.

- :func:`format_table`: one run's per-class Dice, IoU and HD95 with the means (the chosen protocol).
- :func:`format_paper_table`: one row per evaluation protocol, in the layout of the papers' tables (what a run
  writes as ``metrics.md``, see :class:`~lightning_selfreg.callbacks.MetricsWriter`).
- :func:`format_organ_table`: per organ Dice, IoU and HD95 of both protocols with their units (what a run prints
  at its end and writes at the top of ``metrics.md``).
- :func:`settings_line`: a run's settings in one line, from its resolved configuration.
- :func:`format_run_markdown`: a run's ``metrics.md``: settings, per-organ table, per-case Dice, the papers'
  layout and links to the run folder's pictures.
- :func:`format_comparison_markdown`: the paired comparison of
  :func:`lightning_selfreg.tracking.compare.summarize_comparison` as one table.
- :func:`verdict_sentence`: one class's Dice difference in plain words, with the seeds a clear answer needs.
- :func:`format_comparison_report`: a comparison's ``summary.md``: verdicts, the table, power, bootstrap intervals.

Example:
    >>> results = {"dice_mean": 0.8, "iou_mean": 0.7, "hd95_mean": 3.0,
    ...            "per_class": {"liver": {"dice": 0.8, "iou": 0.7, "hd95": 3.0}}}
    >>> print(format_paper_table({"strict": results}, volumetric=True))
    | protocol | liver | DSC | HD95 |
    |---|---|---|---|
    | strict | 80.00 | 80.00 | 3.00 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ARMS", "MEAN_ROW", "format_comparison_markdown", "format_comparison_report", "format_organ_table",
           "format_paper_table", "format_run_markdown", "format_table", "hd95_units", "settings_line",
           "verdict_sentence"]

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


def hd95_units(protocol: str, spacing_known: bool) -> str:
    """The unit of a protocol's HD95: mm under ``strict`` when the data carry a spacing, else voxels."""
    return "mm" if protocol == "strict" and spacing_known else "voxels"


def format_organ_table(by_protocol: Mapping[str, Mapping[str, Any]], spacing_known: bool,
                       protocols: Sequence[str] | None = None) -> str:
    """Markdown table: one row per organ (and the mean), Dice (%), IoU (%) and HD95 with units per protocol.

    Args:
        by_protocol: ``{protocol: results}`` as ``SelfRegSegModule.test_results_by_protocol`` (each with
            ``per_class`` and the ``<metric>_mean`` values).
        spacing_known: Whether the test data carry a voxel spacing (HD95 in mm under ``strict``).
        protocols: The protocols to show, in order (default: all of ``by_protocol``).

    Example:
        >>> r = {"dice_mean": 0.8, "iou_mean": 0.67, "hd95_mean": 3.0,
        ...      "per_class": {"liver": {"dice": 0.8, "iou": 0.67, "hd95": 3.0}}}
        >>> print(format_organ_table({"strict": r}, spacing_known=True))
        | organ | Dice (%) | IoU (%) | HD95 (mm) |
        |---|---:|---:|---:|
        | liver | 80.0 | 67.0 | 3.0 |
        | **mean** | 80.0 | 67.0 | 3.0 |
    """
    shown = list(protocols or by_protocol)
    several = len(shown) > 1
    header, rule = ["organ"], ["---"]
    for p in shown:
        tag = f" {p}" if several else ""
        header += [f"Dice{tag} (%)", f"IoU{tag} (%)", f"HD95{tag} ({hd95_units(p, spacing_known)})"]
        rule += ["---:"] * 3
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    names = list(dict.fromkeys(n for p in shown for n in by_protocol[p].get("per_class", {})))
    for name in [*names, None]:
        cells = [name if name is not None else "**mean**"]
        for p in shown:
            r = by_protocol[p]
            values = r.get("per_class", {}).get(name, {}) if name is not None else \
                {m: r.get(f"{m}_mean") for m in ("dice", "iou", "hd95")}
            cells += [_fmt1(values.get("dice"), 100), _fmt1(values.get("iou"), 100), _fmt1(values.get("hd95"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt1(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.1f}"


def _short(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def settings_line(config: Mapping[str, Any]) -> str:
    """A run's settings in one line, from its resolved configuration (the ``config.yaml`` of the run).

    Example:
        >>> settings_line({"seed_everything": 0, "data": {"class_path": "x.SampleCTDataModule",
        ...                "init_args": {"batch_size": 8}}, "model": {"net": {"class_path": "x.UNet",
        ...                "init_args": {"base_channels": 16}}, "optimizer": "adam", "lr": 0.001,
        ...                "lr_schedule": "constant"}, "selfreg": None, "trainer": {"max_epochs": 40}}).split(" · ")[:4]
        ['SampleCT', 'UNet (base_channels=16)', 'baseline (no SelfReg)', 'adam lr 0.001 constant']
    """
    data = config.get("data") or {}
    data_args = data.get("init_args") or {}
    model = config.get("model") or {}
    net = model.get("net") or {}
    net_args = net.get("init_args") or {}
    width = {k: net_args[k] for k in ("base_channels", "feature_size", "features", "encoder_name", "embed_dim")
             if net_args.get(k) is not None}
    network = _short(net.get("class_path", "?")) + (" (" + ", ".join(f"{k}={v}" for k, v in width.items()) + ")"
                                                     if width else "")
    dataset = _short(data.get("class_path", "?")).removesuffix("DataModule")
    if data_args.get("configuration"):
        dataset += f" {data_args['configuration']}"
    selfreg = config.get("selfreg")
    if selfreg:
        args = selfreg.get("init_args") or {}
        arm = (f"SelfReg λ_SCR={args.get('lambda_scr')} λ_IFD={args.get('lambda_ifd')}"
               + (f" ({args['pairing']} pairing)" if args.get("pairing") else ""))
    else:
        arm = "baseline (no SelfReg)"
    parts = [dataset, network, arm]
    if model.get("optimizer"):
        parts.append(f"{model['optimizer']} lr {model.get('lr')} {model.get('lr_schedule', '')}".strip())
    if data_args.get("batch_size") is not None:
        parts.append(f"batch {data_args['batch_size']}")
    size = data_args.get("patch_size") or data_args.get("image_size")
    if size is not None:
        parts.append(f"{'patch' if data_args.get('patch_size') else 'size'} {size}")
    epochs = (config.get("trainer") or {}).get("max_epochs")
    if epochs is not None:
        parts.append(f"{epochs} epochs")
    parts.append(f"seed {config.get('seed_everything')}")
    return " · ".join(str(p) for p in parts)


def format_run_markdown(metrics: Mapping[str, Any], spacing_known: bool, volumetric: bool, settings: str = "",
                        pictures: Mapping[str, str] | None = None, overlays: Mapping[str, str] | None = None) -> str:
    """A run's ``metrics.md``: settings, per-organ table of both protocols, per-case Dice, papers' layout, pictures.

    Args:
        metrics: The run's ``metrics.json`` content (``test``, ``protocols``, ``eval_protocol``, optional
            ``cases``: ``[{"case", "mean_dice", "dice": {class: value}}]``).
        spacing_known: Whether HD95 is in mm under ``strict``.
        volumetric: Whether the papers' table is the volume layout (see :func:`format_paper_table`).
        settings: The run's :func:`settings_line`.
        pictures: ``{caption: relative path}`` of the run folder's pictures that exist.
        overlays: ``{case: relative path}`` of the test-case pictures.
    """
    protocols = metrics["protocols"]
    lines = ["# Test results", ""]
    if settings:
        lines += [settings, ""]
    lines += [f"Reported protocol: `{metrics.get('eval_protocol')}`; {protocols[next(iter(protocols))]['num_cases']}"
              " test case(s).", "", format_organ_table(protocols, spacing_known), "",
              "Protocols: `strict` scores at the native grid, HD95 in mm when the data carry a spacing, a missed or "
              "spurious organ scores Dice 0 and the worst-case HD95, an organ absent from both is left out; "
              "`transunet` reproduces the TransUNet / SelfReg-UNet scripts (HD95 in voxels, a missed organ scores "
              "HD95 0).", ""]
    cases = metrics.get("cases") or []
    overlays = dict(overlays or {})
    if cases:
        lines += ["## Cases, lowest mean Dice first (strict Dice, %)", "", "| case | mean Dice (%) | picture |",
                  "|---|---:|---|"]
        for case in sorted(cases, key=lambda c: (c.get("mean_dice") is None, c.get("mean_dice") or 0.0)):
            path = overlays.get(case["case"])
            link = f"[{Path(path).name}]({path})" if path else ""
            lines.append(f"| {case['case']} | {_fmt1(case.get('mean_dice'), 100)} | {link} |")
        lines.append("")
    lines += ["## In the layout of the papers' tables", "", format_paper_table(protocols, volumetric), ""]
    if pictures or overlays:
        lines += ["## Pictures", ""]
        lines += [f"- [{caption}]({path})" for caption, path in (pictures or {}).items()]
        if overlays:
            folder = Path(next(iter(overlays.values()))).parent
            lines.append(f"- [{folder}/]({folder}/): each test case (image; ground truth solid, prediction dashed), "
                         "lowest Dice first")
        lines.append("")
    return "\n".join(lines)


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
        "skipped for that seed). Lower HD95 is better (mm under the strict protocol when the data carry a voxel "
        "spacing, else voxels; voxels under transunet).",
    ]
    return "\n".join(lines) + "\n"


def _pp(value: float, sign: bool = True) -> str:
    """A Dice fraction as percentage points with one decimal and a real minus sign: ``+1.5``, ``−9.9``."""
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text.replace("-", "−")


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def verdict_sentence(difference: Mapping[str, Any], power: Mapping[str, Any] | None = None) -> str:
    """One class's paired Dice difference (SelfReg − baseline) in plain words.

    Args:
        difference: The ``difference[class]["dice"]`` entry of a comparison summary (``n``, ``mean``, ``ci95``).
        power: The ``power[class]`` entry (``seeds_for``: seeds needed per effect), or None.

    Example:
        >>> verdict_sentence({"n": 3, "mean": 0.015, "ci95": [-0.099, 0.129]})
        '+1.5 pp [−9.9, +12.9]: not distinguishable from no effect with 3 seeds'
        >>> verdict_sentence({"n": 3, "mean": 0.03, "ci95": [0.005, 0.055]}, {"sd": 0.01, "seeds_for": {"+1 pp": 21}})
        '+3.0 pp [+0.5, +5.5]: SelfReg better (the 95 % interval excludes 0) with 3 seeds; +1 pp would need 21 seeds'
    """
    n, mean, ci = difference.get("n", 0), difference.get("mean"), difference.get("ci95")
    if not n or mean is None:
        return "no seed has a Dice in both arms"
    if ci is None:
        text = f"{_pp(mean)} pp with {_seeds(n)}: no interval (a paired comparison needs at least 2 seeds)"
    else:
        where = (f"{_pp(mean)} pp [{_pp(ci[0])}, {_pp(ci[1])}]")
        if ci[0] > 0:
            text = f"{where}: SelfReg better (the 95 % interval excludes 0) with {_seeds(n)}"
        elif ci[1] < 0:
            text = f"{where}: SelfReg worse (the 95 % interval excludes 0) with {_seeds(n)}"
        else:
            text = f"{where}: not distinguishable from no effect with {_seeds(n)}"
    if ci is None or not power:
        return text
    if not power.get("sd"):
        return text + "; the seeds gave identical differences: no spread to plan more seeds from"
    needs = [f"{label} would need {_seeds(seeds) if seeds else 'more than 1000 seeds'}"
             for label, seeds in (power.get("seeds_for") or {}).items()]
    return text + ("; " + ", ".join(needs) if needs else "")


def format_comparison_report(summary: Mapping[str, Any], plot: str | None = None) -> str:
    """A comparison's ``summary.md``: verdicts in plain words, the table, seeds needed, bootstrap intervals.

    Args:
        summary: The result of :func:`lightning_selfreg.tracking.compare.summarize_comparison`.
        plot: The forest plot's file name, relative to ``summary.md`` (None: no picture).
    """
    seeds = summary["seeds"]
    context = ", ".join(f"{k} `{summary[k]}`" for k in ("dataset", "backbone", "eval_protocol") if summary.get(k))
    lines = [f"# Does SelfReg help? {context}, {_seeds(len(seeds))} ({', '.join(map(str, seeds))})", ""]
    if plot:
        lines += [f"![SelfReg − baseline, Dice per class]({plot})", ""]
    verdicts = summary.get("verdicts") or {}
    if verdicts:
        lines += ["## Verdict: Dice, SelfReg − baseline, paired by seed (95 % Student-t interval)", ""]
        lines += [f"- **{name}**: {text}" if name == MEAN_ROW else f"- {name}: {text}"
                  for name, text in sorted(verdicts.items(), key=lambda kv: kv[0] != MEAN_ROW)]
        lines.append("")
    lines += ["## Per class", "", format_comparison_markdown(summary).rstrip("\n"), ""]
    power = summary.get("power") or {}
    if power:
        labels = list(next(iter(power.values()))["seeds_for"])
        lines += ["## How many seeds?", "",
                  "| class | sd of Δ Dice over seeds (pp) | " + " | ".join(f"seeds to detect {lb}" for lb in labels)
                  + " |", "|---|---:|" + "---:|" * len(labels)]
        for name, entry in power.items():
            counts = [str(v) if v else ("n/a" if not entry["sd"] else "> 1000") for v in entry["seeds_for"].values()]
            sd = "n/a" if entry["sd"] is None else _pp(entry["sd"], sign=False)
            lines.append(f"| {'**mean**' if name == MEAN_ROW else name} | {sd} | " + " | ".join(counts) + " |")
        lines += ["", "Seeds (pairs of runs) a two-sided paired t-test at the 5 % level needs for 80 % power, if the "
                  "paired differences spread as observed here (+3.5 pp: the paper's gain on Synapse). n/a: no "
                  "spread to plan from (fewer than 2 seeds, or identical differences).", ""]
    bootstrap = {k: v for k, v in (summary.get("bootstrap") or {}).items() if v is not None}
    if bootstrap:
        first = next(iter(bootstrap.values()))
        protocol = summary.get("eval_protocol") or "strict"
        lines += ["## Bootstrap over seeds and test cases (per-case Dice, strict protocol)", "",
                  *([f"The tables above follow the runs' `{protocol}` protocol; the per-case Dice of `metrics.json` "
                     "is scored under `strict`, so the two can differ.", ""] if protocol != "strict" else []),
                  "| class | Δ Dice (pp) | 95 % bootstrap interval (pp) | seeds | case pairs |",
                  "|---|---:|---:|---:|---:|"]
        for name, b in bootstrap.items():
            lines.append(f"| {'**mean**' if name == MEAN_ROW else name} | {_pp(b['mean'])} | "
                         f"[{_pp(b['ci95'][0])}, {_pp(b['ci95'][1])}] | {b['n_seeds']} | {b['n_cases']} |")
        lines += ["", f"Two-stage percentile bootstrap ({first['resamples']} resamples, numpy seed {first['seed']}): "
                  "seeds drawn with replacement, then each drawn seed's test cases; the statistic is the mean "
                  "per-case Dice difference. It adds the test set's variation to the seeds'; with few seeds it "
                  "understates the spread between training runs, so the t interval above is the answer to quote. "
                  "The per-case paired differences are in `summary.json` under `cases`.", ""]
    return "\n".join(lines)
