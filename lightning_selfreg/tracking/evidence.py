"""The statistics that turn a SelfReg-vs-baseline comparison into evidence: power, per-case pairs, bootstrap.

- :func:`seeds_for_power`: how many seeds a paired t-test needs to detect an effect with a given power, from the
  observed spread of the paired differences (the question "should I run more seeds?").
- :func:`case_differences`: the per-case paired differences SelfReg − baseline, per seed and class, from the
  ``cases`` of each run's ``metrics.json`` (both arms test the same cases).
- :func:`bootstrap_interval`: a two-stage bootstrap of the mean paired difference over seeds and, within each
  seed, over test cases (both sources of variation a reader cares about: the training run and the test set),
  seeded, so the interval is reproducible.

Example:
    >>> seeds_for_power(0.02, 0.035)  # sd of the paired differences 2 pp, effect 3.5 pp
    5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["EFFECTS", "bootstrap_interval", "case_differences", "power", "seeds_for_power"]

# effects to detect, as Dice fractions: 1 pp, and the paper's gain on Synapse (+3.5 pp for the UNet)
EFFECTS: dict[str, float] = {"+1 pp": 0.01, "+3.5 pp": 0.035}
MAX_SEEDS = 1000


def power(n: int, sd: float, effect: float, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test with ``n`` pairs, true mean difference ``effect`` and spread ``sd``.

    ``P(|T| > t_{1-alpha/2, n-1})`` for ``T`` non-central t with ``n - 1`` degrees of freedom and
    non-centrality ``effect / (sd / sqrt(n))``.
    """
    from scipy import stats

    if n < 2:
        return 0.0
    df = n - 1
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    shift = effect / (sd / math.sqrt(n))
    value = float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))
    if not math.isfinite(value):  # scipy's nct fails far in the tail: there the power is 1 (or alpha-ish, 0)
        return 1.0 if abs(shift) > critical else 0.0
    return value


def seeds_for_power(sd: float | None, effect: float, target: float = 0.8, alpha: float = 0.05) -> int | None:
    """The fewest seeds (pairs, >= 2) for which a paired t-test detects ``effect`` with power ``target``.

    Args:
        sd: Sample standard deviation of the paired differences (SelfReg − baseline per seed), as observed.
        effect: The true difference to detect (same unit as ``sd``), > 0.
        target: The power wanted.
        alpha: Two-sided significance level.

    Returns:
        The number of seeds; None when there is no spread to plan from (``sd`` None: fewer than 2 seeds; ``sd``
        0: the seeds gave identical differences, e.g. an organ both arms always miss) or when more than
        :data:`MAX_SEEDS` would be needed.
    """
    if sd is None or not math.isfinite(sd) or sd == 0:
        return None
    low, high = 2, MAX_SEEDS
    if power(high, sd, effect, alpha) < target:
        return None
    while low < high:  # power grows with n
        mid = (low + high) // 2
        if power(mid, sd, effect, alpha) >= target:
            high = mid
        else:
            low = mid + 1
    return low


def _case_values(run: Mapping[str, Any], name: str) -> dict[str, float]:
    """``{case: Dice of class name}`` of a run (``name = "mean"``: the case's mean over its classes)."""
    out = {}
    for case in run.get("cases") or []:
        value = case.get("mean_dice") if name == "mean" else (case.get("dice") or {}).get(name)
        if value is not None and math.isfinite(float(value)):
            out[str(case["case"])] = float(value)
    return out


def case_differences(selfreg: Mapping[Any, Mapping[str, Any]], baseline: Mapping[Any, Mapping[str, Any]],
                     classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per-case paired Dice of both arms: one row per seed and case that both arms scored.

    Args:
        selfreg: ``{seed: metrics.json}`` of the SelfReg arm (each with ``cases``: ``[{"case", "mean_dice",
            "dice": {class: value}}]``).
        baseline: The same for the baseline arm.
        classes: The classes to pair, ``"mean"`` for the case's mean Dice.

    Returns:
        ``[{"seed", "case", "baseline": {class: v}, "selfreg": {class: v}, "difference": {class: v}}]``; a class
        missing (None) in either arm is left out of that row's dicts.
    """
    rows = []
    for seed in selfreg:
        if seed not in baseline:
            continue
        per_class = {name: (_case_values(selfreg[seed], name), _case_values(baseline[seed], name))
                     for name in classes}
        cases = list(dict.fromkeys(str(c["case"]) for c in selfreg[seed].get("cases") or []))
        for case in cases:
            row: dict[str, Any] = {"seed": seed, "case": case, "baseline": {}, "selfreg": {}, "difference": {}}
            for name, (reg, base) in per_class.items():
                if case in reg and case in base:
                    row["selfreg"][name], row["baseline"][name] = reg[case], base[case]
                    row["difference"][name] = reg[case] - base[case]
            if row["difference"]:
                rows.append(row)
    return rows


def bootstrap_interval(differences: Mapping[Any, Sequence[float]], resamples: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Any] | None:
    """Two-stage percentile bootstrap of the mean paired difference over seeds and cases.

    Each resample draws the seeds with replacement and, within each drawn seed, its cases with replacement; the
    statistic is the mean over the drawn (seed, case) differences. The generator is
    ``numpy.random.default_rng(seed)``: the same input gives the same interval.

    Args:
        differences: ``{seed: per-case differences}``; seeds without a value are ignored.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        ``{"mean", "ci95": [low, high], "n_seeds", "n_cases", "resamples", "seed"}``, or None with fewer than
        2 seeds (the spread between training runs cannot be resampled from one).
    """
    groups = [np.asarray(v, dtype=np.float64) for v in differences.values() if len(v)]
    if len(groups) < 2:
        return None
    rng = np.random.default_rng(seed)
    num_seeds = len(groups)
    width = max(len(g) for g in groups)
    table = np.full((num_seeds, width), np.nan)  # seeds x cases, NaN-padded (seeds may have scored other cases)
    for i, g in enumerate(groups):
        table[i, : len(g)] = g
    sizes = np.array([len(g) for g in groups])
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // (num_seeds * width))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        drawn = rng.integers(0, num_seeds, size=(b, num_seeds))  # (b, S) seeds
        cases = (rng.random((b, num_seeds, width)) * sizes[drawn][..., None]).astype(np.int64)  # within each seed
        values = table[drawn[..., None], cases]
        counts = np.broadcast_to(sizes[drawn][..., None] > np.arange(width), values.shape)  # a seed's own cases
        stats[start:start + b] = np.where(counts, values, 0.0).sum((1, 2)) / counts.sum((1, 2))
    tail = (1 - level) / 2 * 100
    low, high = (float(v) for v in np.percentile(stats, (tail, 100 - tail)))
    everything = np.concatenate(groups)
    return {"mean": float(everything.mean()), "ci95": [low, high], "n_seeds": num_seeds,
            "n_cases": int(everything.size), "resamples": resamples, "seed": seed}
