import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lightning_selfreg.utils.files
from lightning_selfreg.tracking.compare import (
    format_comparison_markdown,
    load_results,
    summarize_comparison,
    write_comparison,
)

# Hand-made runs: 3 seeds per arm, two classes, liver HD95 missing (None) for baseline seed 1.
BASELINE = {0: (0.80, 10.0, 0.70), 1: (0.82, None, 0.72), 2: (0.84, 14.0, 0.74)}  # aorta dice, liver hd95, mean
SELFREG = {0: (0.83, 9.0, 0.75), 1: (0.84, 11.0, 0.76), 2: (0.88, 12.0, 0.77)}
T_975 = {1: 12.706204736174707, 2: 4.302652729749464}  # scipy.stats.t.ppf(0.975, df)


def run(selfreg, seed, aorta, liver_hd, mean, dataset="synapse"):
    return {
        "dataset": dataset, "backbone": "unet", "selfreg": selfreg, "seed": seed, "eval_protocol": "strict",
        "test": {"num_cases": 12, "dice_mean": mean, "hd95_mean": 20.0 + seed,
                 "per_class": {"aorta": {"dice": aorta, "hd95": 5.0}, "liver": {"dice": 0.9, "hd95": liver_hd}}},
    }


def runs():
    return [run(False, s, *v) for s, v in BASELINE.items()] + [run(True, s, *v) for s, v in SELFREG.items()]


def test_three_seeds_by_hand():
    summary = summarize_comparison(runs())
    assert summary["seeds"] == [0, 1, 2] and summary["num_seeds"] == 3
    assert summary["metrics"] == ["dice", "hd95"] and summary["classes"] == ["aorta", "liver", "mean"]
    assert (summary["dataset"], summary["backbone"], summary["eval_protocol"]) == ("synapse", "unet", "strict")

    base, reg = summary["arms"]["baseline"]["aorta"]["dice"], summary["arms"]["selfreg"]["aorta"]["dice"]
    assert base["n"] == 3 and base["mean"] == pytest.approx(0.82) and base["std"] == pytest.approx(0.02)
    assert reg["mean"] == pytest.approx(0.85) and reg["std"] == pytest.approx(math.sqrt(0.0007))
    diff = summary["difference"]["aorta"]["dice"]  # 0.03, 0.02, 0.04
    half = T_975[2] * 0.01 / math.sqrt(3)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.03) and diff["std"] == pytest.approx(0.01)
    assert diff["ci95"] == pytest.approx([0.03 - half, 0.03 + half]) and diff["note"] is None

    # None is skipped for that seed: baseline liver HD95 has 2 values, the paired difference 2 seeds (0 and 2)
    base_hd = summary["arms"]["baseline"]["liver"]["hd95"]
    assert base_hd["n"] == 2 and base_hd["seeds"] == [0, 2] and base_hd["mean"] == pytest.approx(12.0)
    assert base_hd["std"] == pytest.approx(math.sqrt(8.0))
    assert summary["arms"]["selfreg"]["liver"]["hd95"]["mean"] == pytest.approx(32 / 3)
    diff_hd = summary["difference"]["liver"]["hd95"]  # -1, -2
    half = T_975[1] * math.sqrt(0.5) / math.sqrt(2)
    assert diff_hd["seeds"] == [0, 2] and diff_hd["mean"] == pytest.approx(-1.5)
    assert diff_hd["ci95"] == pytest.approx([-1.5 - half, -1.5 + half])

    mean_diff = summary["difference"]["mean"]["dice"]  # run-level dice_mean: 0.05, 0.04, 0.03
    assert mean_diff["mean"] == pytest.approx(0.04) and mean_diff["std"] == pytest.approx(0.01)
    assert summary["difference"]["aorta"]["hd95"]["std"] == 0.0
    assert summary["difference"]["aorta"]["hd95"]["ci95"] == [0.0, 0.0]


def test_markdown_table_and_atomic_write(tmp_path):
    summary = summarize_comparison(runs())
    table = format_comparison_markdown(summary)
    assert "| class | Dice baseline (%) | Dice SelfReg (%) | Δ Dice (pp) [95 % CI] | HD95 baseline |" in table
    assert "| aorta | 82.00 ± 2.00 | 85.00 ± 2.65 | +3.00 [+0.52, +5.48] |" in table
    assert "| liver | 90.00 ± 0.00 | 90.00 ± 0.00 | +0.00 [+0.00, +0.00] | 12.00 ± 2.83 (n=2) |" in table
    assert "-1.50 [-7.85, +4.85] (n=2) |" in table
    assert table.count("\n| ") == 4 and "| **mean** | 72.00 ± 2.00 | 76.00 ± 1.00 | +4.00" in table

    paths = write_comparison(summary, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == summary
    assert table.rstrip("\n") in paths["markdown"].read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.png", "summary.json", "summary.md"]


def test_a_write_failing_midway_keeps_the_previous_summary(tmp_path, monkeypatch):
    """Rewriting a summary whose write fails half-way leaves the old files whole and no temporary file."""
    paths = write_comparison(summarize_comparison(runs()), tmp_path / "out")
    before = {key: path.read_bytes() for key, path in paths.items()}
    real_write_text = Path.write_text

    def write_half_then_fail(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    other = summarize_comparison([run(False, 7, 0.8, 10.0, 0.7), run(True, 7, 0.9, 8.0, 0.8)])
    with pytest.raises(OSError, match="No space left"):
        write_comparison(other, tmp_path / "out")
    monkeypatch.undo()
    assert {key: path.read_bytes() for key, path in paths.items()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.png", "summary.json", "summary.md"]


# A writer killed (SIGKILL) in the middle of an atomic write: it has written part of the new text when it says so.
# lightning_selfreg/utils/files.py is loaded on its own (it needs the standard library only), sparing the child the
# torch import.
KILLED_WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("selfreg_io", sys.argv[2])
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    atomic_write = io.atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"partial": ')
            f.flush()
            print("writing", flush=True)
            time.sleep(120)

    atomic_write(sys.argv[1], write)
""")


def test_a_writer_killed_midway_leaves_the_previous_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text('{"complete": true}\n')
    io_path = Path(lightning_selfreg.utils.files.__file__)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(io_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert target.read_text() == '{"complete": true}\n'
    # what the kill leaves is the temporary file, named .tmp<pid>.<name> (the pattern the run test looks for)
    assert [p.name for p in tmp_path.glob(".tmp*")] == [f".tmp{proc.pid}.summary.json"]


def test_one_seed_has_no_interval():
    summary = summarize_comparison([run(False, 7, 0.8, 10.0, 0.7), run(True, 7, 0.9, 8.0, 0.8)])
    diff = summary["difference"]["aorta"]["dice"]
    assert diff["n"] == 1 and diff["mean"] == pytest.approx(0.1)
    assert diff["std"] is None and diff["ci95"] is None and "n=1" in diff["note"]
    assert summary["arms"]["selfreg"]["aorta"]["dice"]["std"] is None
    assert "+10.00 (n=1)" in format_comparison_markdown(summary)


def test_arms_must_share_seeds_and_runs_must_agree():
    with pytest.raises(ValueError, match=r"missing from baseline: \[2\]; missing from selfreg: \[1\]"):
        summarize_comparison([run(False, 0, *BASELINE[0]), run(False, 1, *BASELINE[1]),
                              run(True, 0, *SELFREG[0]), run(True, 2, *SELFREG[2])])
    with pytest.raises(ValueError, match="no selfreg run"):
        summarize_comparison([run(False, 0, *BASELINE[0])])
    with pytest.raises(ValueError, match="two runs with seed 0"):
        summarize_comparison(runs() + [run(True, 0, *SELFREG[0])])
    with pytest.raises(ValueError, match="different `dataset`"):
        summarize_comparison(runs() + [run(True, 3, *SELFREG[0], dataset="acdc")])
    with pytest.raises(ValueError, match=r"`results\[0\]` lacks"):
        summarize_comparison([{"seed": 0, "test": {}}])
    with pytest.raises(ValueError, match="`results`"):
        summarize_comparison([])


def test_load_results_reads_files_and_run_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(run(False, 0, *BASELINE[0])))
    (tmp_path / "b.json").write_text(json.dumps(run(True, 0, *SELFREG[0])))
    loaded = load_results([tmp_path / "a", tmp_path / "b.json"])
    assert [r["selfreg"] for r in loaded] == [False, True]
    with pytest.raises(FileNotFoundError, match="nope"):
        load_results([tmp_path / "nope"])


# --- the comparison as evidence: verdicts, power, per-case pairs, bootstrap, the forest plot ------------------------

def with_cases(result, per_case):
    """``result`` with per-case aorta Dice ``per_case`` (``{case: dice}``), liver 0.9 everywhere."""
    cases = [{"case": c, "mean_dice": (d + 0.9) / 2, "dice": {"aorta": d, "liver": 0.9}} for c, d in per_case.items()]
    return {**result, "cases": cases}


def test_power_is_the_rejection_rate_of_a_paired_t_test():
    from scipy import stats

    from lightning_selfreg.tracking.evidence import power, seeds_for_power

    rng = np.random.default_rng(0)
    differences = rng.normal(0.035, 0.02, size=(20000, 5))  # 5 seeds, true gain 3.5 pp, spread 2 pp
    rejected = (stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05).mean()
    assert power(5, 0.02, 0.035) == pytest.approx(rejected, abs=0.01)
    n = seeds_for_power(0.02, 0.035)
    assert n == 5 and power(n - 1, 0.02, 0.035) < 0.8 <= power(n, 0.02, 0.035)
    assert seeds_for_power(0.1, 0.01) == 787  # (1.96 + 0.84)^2 / 0.1^2 + the t correction
    assert seeds_for_power(None, 0.01) is None and seeds_for_power(0.0, 0.01) is None  # no spread to plan from
    assert seeds_for_power(10.0, 0.01) is None  # more than 1000 seeds
    assert power(40, 0.005, 0.01) == 1.0  # scipy's non-central t gives NaN this far in the tail


def naive_bootstrap(groups, resamples, rng):
    """The two-stage bootstrap written as loops, for comparison."""
    out = []
    for _ in range(resamples):
        values = []
        for g in rng.integers(0, len(groups), len(groups)):
            values += [groups[g][i] for i in rng.integers(0, len(groups[g]), len(groups[g]))]
        out.append(np.mean(values))
    return np.percentile(out, (2.5, 97.5))


def test_bootstrap_resamples_seeds_then_cases_reproducibly():
    from lightning_selfreg.tracking.evidence import bootstrap_interval

    groups = {0: [0.05, 0.01, -0.02, 0.04], 1: [0.00, 0.02], 2: [0.08, 0.03, 0.06]}
    result = bootstrap_interval(groups, resamples=4000, seed=3)
    assert result == bootstrap_interval(groups, resamples=4000, seed=3)  # seeded
    assert result["mean"] == pytest.approx(np.mean([v for g in groups.values() for v in g]))
    assert (result["n_seeds"], result["n_cases"]) == (3, 9)
    reference = naive_bootstrap(list(groups.values()), 4000, np.random.default_rng(11))
    assert result["ci95"] == pytest.approx(list(reference), abs=0.006)
    assert bootstrap_interval({0: [0.1, 0.2]}) is None  # one seed: no spread between training runs
    assert bootstrap_interval({0: [0.02, 0.02], 1: [0.02]})["ci95"] == pytest.approx([0.02, 0.02])


def test_summary_has_verdicts_power_bootstrap_and_per_case_pairs(tmp_path):
    per_case = {0: ({"a": 0.80, "b": 0.70}, {"a": 0.84, "b": 0.75}),
                1: ({"a": 0.82, "b": 0.72}, {"a": 0.83, "b": 0.74}),
                2: ({"a": 0.84, "b": 0.74}, {"a": 0.90, "b": 0.76})}
    results = []
    for seed, (base, reg) in per_case.items():
        results += [with_cases(run(False, seed, *BASELINE[seed]), base),
                    with_cases(run(True, seed, *SELFREG[seed]), {**reg, "only-selfreg": 0.5})]
    summary = summarize_comparison(results)
    cases = summary["cases"]
    assert [(c["seed"], c["case"]) for c in cases] == [(s, c) for s in (0, 1, 2) for c in ("a", "b")]  # paired
    assert cases[0]["difference"]["aorta"] == pytest.approx(0.04) and cases[0]["difference"]["liver"] == 0.0
    assert cases[0]["baseline"]["mean"] == pytest.approx(0.85) and cases[0]["selfreg"]["mean"] == pytest.approx(0.87)
    boot = summary["bootstrap"]["aorta"]
    assert boot["n_seeds"] == 3 and boot["n_cases"] == 6 and boot["ci95"][0] <= boot["mean"] <= boot["ci95"][1]
    assert summary["power"]["aorta"]["seeds_for"] == {"+1 pp": 10, "+3.5 pp": 3}  # sd 1 pp: d = 1 needs 10 (G*Power)
    assert summary["verdicts"]["aorta"].startswith("+3.0 pp [+0.5, +5.5]: SelfReg better")
    assert summary["verdicts"]["liver"] == "+0.0 pp [+0.0, +0.0]: not distinguishable from no effect with 3 seeds; " \
        "the seeds gave identical differences: no spread to plan more seeds from"  # liver 0.9 in every run
    paths = write_comparison(summary, tmp_path)
    text = paths["markdown"].read_text()
    assert "![SelfReg − baseline, Dice per class](compare.png)" in text
    assert "- **mean**: +4.0 pp" in text and "| aorta | 1.0 | 10 | 3 |" in text
    assert "## Bootstrap over seeds and test cases" in text
    assert "| aorta | +3.3 |" in text  # the mean per-case difference: 4, 5, 1, 2, 6, 2 pp
    from PIL import Image

    from lightning_selfreg.tracking.forest import figure_inches

    with Image.open(paths["plot"]) as image:
        assert image.size == tuple(round(v * 100) for v in figure_inches(3))
    assert json.loads(paths["json"].read_text())["cases"][0]["case"] == "a"


@pytest.mark.parametrize(("ci", "words"), [([0.005, 0.055], "SelfReg better"), ([-0.055, -0.005], "SelfReg worse"),
                                           ([-0.01, 0.07], "not distinguishable from no effect"),
                                           (None, "no interval")])
def test_verdict_words(ci, words):
    from lightning_selfreg.tracking.report import verdict_sentence

    assert words in verdict_sentence({"n": 3 if ci else 1, "mean": 0.03, "ci95": ci})


def test_forest_plot_cuts_intervals_at_the_possible_range():
    from lightning_selfreg.tracking.forest import plot_comparison

    wide = [run(False, 0, 0.1, 1.0, 0.5), run(False, 1, 0.9, 1.0, 0.5), run(True, 0, 0.9, 1.0, 0.5),
            run(True, 1, 0.1, 1.0, 0.5)]  # aorta: +80 and -80 pp with 2 seeds: t interval about +-1000 pp
    summary = summarize_comparison(wide)
    assert summary["difference"]["aorta"]["dice"]["ci95"][1] > 5
    ax = plot_comparison(summary).axes[0]
    low, high = ax.get_xlim()
    assert -106 <= low and high <= 106  # a Dice difference is within +-100 pp
    assert {line.get_marker() for line in ax.get_lines()} >= {"<", ">"}  # the cut interval goes on
