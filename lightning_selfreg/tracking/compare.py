"""SelfReg vs baseline over seeds: per-class mean ± std of each arm and the paired difference with a 95 % CI.

Each run of ``python -m experiments.run`` writes ``metrics.json``::

    {"dataset": ..., "backbone": ..., "selfreg": true, "seed": 0, "eval_protocol": "strict",
     "test": {"dice_mean": ..., "hd95_mean": ..., "per_class": {"aorta": {"dice": ..., "hd95": ...}, ...}}}

:func:`load_results` reads such files, :func:`summarize_comparison` pairs the SelfReg and baseline runs by seed,
:func:`~lightning_selfreg.tracking.report.format_comparison_markdown` (in :mod:`lightning_selfreg.tracking.report`
with the other report tables; re-exported here) renders a table to paste into a report and :func:`write_comparison`
writes ``summary.json`` and ``summary.md``.

Example:
    >>> runs = [{"selfreg": arm, "seed": seed, "test": {"dice_mean": d, "per_class": {"liver": {"dice": d}}}}
    ...         for arm, seed, d in [(False, 0, 0.80), (False, 1, 0.82), (True, 0, 0.83), (True, 1, 0.84)]]
    >>> summary = summarize_comparison(runs)
    >>> round(summary["difference"]["liver"]["dice"]["mean"], 4)
    0.025
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_selfreg.tracking.evidence import EFFECTS, bootstrap_interval, case_differences, seeds_for_power
from lightning_selfreg.tracking.report import (
    ARMS,
    MEAN_ROW,
    format_comparison_markdown,
    format_comparison_report,
    verdict_sentence,
)
from lightning_selfreg.utils.files import atomic_write_text

__all__ = ["ARMS", "format_comparison_markdown", "load_results", "summarize_comparison", "write_comparison"]


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read ``metrics.json`` files (or run folders holding one).

    Raises:
        FileNotFoundError: If a path (or its ``metrics.json``) does not exist; the message names it.
        ValueError: If a file is not valid JSON; the message names it.
    """
    out = []
    for path in map(Path, paths):
        file = path / "metrics.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"`paths`: {file} does not exist.")
        try:
            out.append(json.loads(file.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"`paths`: {file} is not valid JSON ({err}).") from err
    return out


def _value(value: Any) -> float | None:
    """A finite float, or None for missing / None / NaN values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _sorted_seeds(seeds: Iterable[Any]) -> list[Any]:
    seeds = list(seeds)
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=str)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def _arm_stats(seeds: Sequence[Any], values: Sequence[float | None]) -> dict[str, Any]:
    kept = [(s, v) for s, v in zip(seeds, values, strict=True) if v is not None]
    mean, std = _mean_std([v for _, v in kept])
    return {"n": len(kept), "mean": mean, "std": std, "seeds": [s for s, _ in kept], "values": [v for _, v in kept]}


def _difference_stats(seeds: Sequence[Any], selfreg: Sequence[float | None],
                      baseline: Sequence[float | None]) -> dict[str, Any]:
    from scipy import stats

    pairs = [(s, a - b) for s, a, b in zip(seeds, selfreg, baseline, strict=True) if a is not None and b is not None]
    diffs = [d for _, d in pairs]
    mean, std = _mean_std(diffs)
    n, ci, note = len(diffs), None, None
    if n == 0:
        note = "no seed has a value in both arms"
    elif n == 1:
        note = "n=1: no standard deviation or confidence interval"
    else:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "note": note, "seeds": [s for s, _ in pairs],
            "values": diffs}


def _check_runs(results: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(results, Mapping) or not isinstance(results, Sequence) or not results:
        raise ValueError("`results` must be a non-empty list of metrics.json dicts.")
    for i, run in enumerate(results):
        if not isinstance(run, Mapping):
            raise ValueError(f"`results[{i}]` must be a metrics.json dict, found {type(run).__name__}.")
        missing = [k for k in ("selfreg", "seed", "test") if k not in run]
        if missing:
            raise ValueError(f"`results[{i}]` lacks the key(s) {missing}; found {sorted(run)}.")
        if not isinstance(run["selfreg"], bool):
            raise ValueError(f"`results[{i}]['selfreg']` must be true or false, found {run['selfreg']!r}.")
        if not isinstance(run["test"], Mapping) or not isinstance(run["test"].get("per_class", {}), Mapping):
            raise ValueError(f"`results[{i}]['test']` must be a dict with a `per_class` dict, found {run['test']!r}.")
    for key in ("dataset", "backbone", "eval_protocol"):
        found = {run[key] for run in results if key in run}
        if len(found) > 1:
            raise ValueError(f"`results` mix runs with different `{key}`: {sorted(map(str, found))}.")


def summarize_comparison(results: Sequence[Mapping[str, Any]],
                         metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare the SelfReg and baseline arms of a set of runs, paired by seed.

    For each arm, class and metric: the mean and sample standard deviation (``ddof=1``; None for one value) over
    seeds. For each class and metric: the paired difference SelfReg − baseline per seed, its mean, sample std
    and 95 % Student-t confidence interval ``mean ± t(0.975, n-1) * std / sqrt(n)`` (None, with a note, when
    ``n < 2``). The row ``"mean"`` uses each run's own ``<metric>_mean`` (the mean over its classes).

    A class whose value is None (absent from every test case under the strict protocol), NaN or missing in a run
    is skipped for that seed: the arm statistics use the remaining seeds, and the paired difference uses the
    seeds where both arms have a value; ``n`` says how many entered each number.

    Args:
        results: ``metrics.json`` dicts (see the module docstring): keys ``selfreg`` (bool), ``seed``, ``test``;
            ``dataset``, ``backbone`` and ``eval_protocol`` must agree where present.
        metrics: Metrics to compare; default: every metric found in the runs' ``per_class`` entries (e.g.
            ``dice``, ``iou``, ``hd95``).

    Returns:
        ``{"dataset", "backbone", "eval_protocol", "seeds", "num_seeds", "metrics", "classes",
        "arms": {"baseline" | "selfreg": {class: {metric: {"n", "mean", "std", "seeds", "values"}}}},
        "difference": {class: {metric: {"n", "mean", "std", "ci95": [low, high] | None, "note", "seeds",
        "values"}}}, "verdicts": {class: one sentence on the Dice difference}, "power": {class: {"sd",
        "seeds_for": {"+1 pp": n | None, "+3.5 pp": n | None}}}, "bootstrap": {class: {"mean", "ci95", "n_seeds",
        "n_cases", "resamples", "seed"} | None}, "cases": [per-case paired Dice, see
        :func:`~lightning_selfreg.tracking.evidence.case_differences`]}``, JSON serialisable; ``classes`` ends
        with ``"mean"``. ``power`` is the number of seeds a paired t-test needs to detect each effect of
        :data:`~lightning_selfreg.tracking.evidence.EFFECTS` with 80 % power given the observed spread of the Dice
        differences (None: fewer than 2 seeds, or more than 1000 needed); ``bootstrap`` the two-stage (seeds,
        then cases) bootstrap interval of the per-case Dice difference (None without per-case results in
        ``metrics.json`` or with fewer than 2 seeds).

    Raises:
        ValueError: If a run lacks a key, runs mix datasets/backbones/protocols, an arm has no run or repeats a
            seed, or the arms do not have the same seeds (the message names the missing seeds per arm).
    """
    _check_runs(results)
    by_arm: dict[str, dict[Any, Mapping[str, Any]]] = {arm: {} for arm in ARMS}
    runs: dict[str, dict[Any, Mapping[str, Any]]] = {arm: {} for arm in ARMS}
    for i, run in enumerate(results):
        arm = "selfreg" if run["selfreg"] else "baseline"
        if run["seed"] in by_arm[arm]:
            raise ValueError(f"`results[{i}]`: the {arm} arm has two runs with seed {run['seed']!r}.")
        by_arm[arm][run["seed"]] = run["test"]
        runs[arm][run["seed"]] = run
    empty = [arm for arm in ARMS if not by_arm[arm]]
    if empty:
        raise ValueError(f"`results` hold no {' and no '.join(empty)} run; both arms are needed.")
    missing = {arm: set(by_arm[other]) - set(by_arm[arm]) for arm, other in (("baseline", "selfreg"),
                                                                          ("selfreg", "baseline"))}
    if any(missing.values()):
        detail = "; ".join(f"missing from {arm}: {_sorted_seeds(seeds)}" for arm, seeds in missing.items() if seeds)
        raise ValueError(f"`results`: the SelfReg and baseline arms must have the same seeds ({detail}).")
    seeds = _sorted_seeds(by_arm["selfreg"])
    tests = [t for arm in ARMS for t in by_arm[arm].values()]
    classes = list(dict.fromkeys(name for t in tests for name in t.get("per_class", {})))
    if metrics is None:
        metrics = list(dict.fromkeys(m for t in tests for values in t.get("per_class", {}).values()
                                     if isinstance(values, Mapping) for m in values))
    else:
        metrics = list(metrics)
        if not metrics or not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"`metrics` must be a non-empty list of metric names, found {metrics!r}.")

    def column(arm: str, name: str, metric: str) -> list[float | None]:
        out = []
        for seed in seeds:
            test = by_arm[arm][seed]
            if name == MEAN_ROW:
                out.append(_value(test.get(f"{metric}_mean")))
            else:
                values = test.get("per_class", {}).get(name)
                out.append(_value(values.get(metric)) if isinstance(values, Mapping) else None)
        return out

    rows = [*classes, MEAN_ROW]
    arms = {arm: {name: {m: _arm_stats(seeds, column(arm, name, m)) for m in metrics} for name in rows}
            for arm in ARMS}
    difference = {
        name: {m: _difference_stats(seeds, column("selfreg", name, m), column("baseline", name, m)) for m in metrics}
        for name in rows
    }
    cases = case_differences({s: runs["selfreg"][s] for s in seeds}, runs["baseline"], rows)
    bootstrap = {name: bootstrap_interval({seed: [c["difference"][name] for c in cases if c["seed"] == seed
                                                  and name in c["difference"]] for seed in seeds})
                 for name in rows}
    power = {name: {"sd": difference[name]["dice"]["std"],
                    "seeds_for": {label: seeds_for_power(difference[name]["dice"]["std"], effect)
                                  for label, effect in EFFECTS.items()}}
             for name in rows} if "dice" in metrics else {}
    verdicts = {name: verdict_sentence(difference[name]["dice"], power[name]) for name in rows} \
        if "dice" in metrics else {}
    first = results[0]
    return {
        "dataset": first.get("dataset"),
        "backbone": first.get("backbone"),
        "eval_protocol": first.get("eval_protocol"),
        "seeds": seeds,
        "num_seeds": len(seeds),
        "metrics": metrics,
        "classes": rows,
        "arms": arms,
        "difference": difference,
        "verdicts": verdicts,
        "power": power,
        "bootstrap": bootstrap,
        "cases": cases,
    }


def write_comparison(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.json``, ``compare.png`` and ``summary.md`` into ``out_dir`` (created if needed), atomically.

    ``compare.png`` is the forest plot of :func:`~lightning_selfreg.tracking.forest.plot_comparison` (written only
    when the runs have Dice); ``summary.md`` is :func:`~lightning_selfreg.tracking.report.format_comparison_report`
    (verdicts, the table, power, bootstrap intervals, the plot). Each file is written to a temporary file in
    ``out_dir`` and moved into place with ``os.replace``, so a reader never sees a partial file.

    Returns:
        ``{"json": path, "markdown": path, "plot": path | None}``.
    """
    from lightning_selfreg.tracking.figures import save_figure
    from lightning_selfreg.tracking.forest import plot_comparison

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "plot": None}
    atomic_write_text(paths["json"], json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if "dice" in summary.get("metrics", ()):
        paths["plot"] = save_figure(plot_comparison(summary), out / "compare.png")
    markdown = format_comparison_report(summary, plot=paths["plot"].name if paths["plot"] else None)
    atomic_write_text(paths["markdown"], markdown)
    return paths
