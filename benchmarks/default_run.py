"""The README's default-run figures: ``python -m experiments.run`` (no flags) for several seeds, timed.

Runs the default job (UNet + SelfReg on the bundled CT sample, the CPU preset on a machine without a GPU) once
per seed, each as its own subprocess with ``--seed S --wandb disabled`` into ``--output-dir`` (default: a
temporary folder), one after the other, and reads each run's ``metrics.json``. Prints (and with ``--out`` writes,
atomically) a Markdown report: the machine (CPU model, cores, load average before and after, torch / Lightning /
Python versions, git commit, UTC date), one row per seed (Dice per organ under the reported protocol, mean Dice,
the last epoch's channel redundancy, wall time of the whole run) and the range over seeds, which is how the README
quotes the default run.

    python benchmarks/default_run.py                        # seeds 0 1 2
    python benchmarks/default_run.py --seeds 0 1 2 3 4 --out benchmarks/default_run.md
    python benchmarks/default_run.py --seeds 0 -- --max-epochs 1   # after --: extra flags for every run
    python benchmarks/default_run.py --out benchmarks/results/default_run_baseline.md -- --no-selfreg
    python benchmarks/default_run.py --seeds 0 --out benchmarks/results/nnunet_cpu_3d.md -- --dataset nnunet \
        --configuration 3d

What varies: between seeds, the initial weights, the batch order and augmentation draws and SelfReg's pairing
(all derived from the seed); between machines with the same seed, the scores only where the CPU kernels add in
another order (another CPU model or thread count may, and a small difference early in training can grow); the wall
time with the CPU and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """The facts a timing needs beside it."""
    import lightning
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu_model(), "cores": str(cores), "gpu": gpu, "torch": torch.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "commit": commit.stdout.strip() or "unknown",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict:
    """Run the default job with ``seed``; returns its metrics.json with ``wall_s`` and the load averages."""
    name = f"default-seed{seed}"
    cmd = [sys.executable, "-m", "experiments.run", "--seed", str(seed), "--wandb", "disabled", "--output-dir",
           str(out_dir), "--run-name", name, *extra]
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"error: seed {seed} failed with status {proc.returncode}:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out_dir / name / "metrics.json").read_text())
    return {**metrics, "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()[0],
            "redundancy": last_redundancy(out_dir / name / "metrics.csv")}


def last_redundancy(csv_path: Path) -> float | None:
    """The last ``redundancy/mean`` of a run's ``metrics.csv`` (the RedundancyMonitor's), or None."""
    from lightning_selfreg.tracking.curves import read_metrics_csv

    if not csv_path.is_file():
        return None
    values = [row["redundancy/mean"] for row in read_metrics_csv(csv_path) if "redundancy/mean" in row]
    return values[-1] if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def report(runs: list[dict], facts: dict[str, str], extra: list[str]) -> str:
    """The Markdown report: machine, one row per seed, the range over seeds."""
    organs = list(runs[0]["test"]["per_class"])
    protocol = runs[0].get("eval_protocol", "strict")
    command = "python -m experiments.run" + (" " + " ".join(extra) if extra else "")
    lines = [f"`{command}`, seeds {', '.join(str(r['seed']) for r in runs)}; Dice (%) per organ under the "
             f"`{protocol}` protocol on the bundled sample's test patient; wall time of the whole run (start-up, "
             "training, test).", "",
             f"Machine: {facts['cpu']}, {facts['cores']} cores, GPU {facts['gpu']}; torch {facts['torch']}, "
             f"Lightning {facts['lightning']}, Python {facts['python']}; commit {facts['commit']}; {facts['date']}.",
             "", "| seed | " + " | ".join(organs) + " | mean Dice | redundancy (last epoch) | wall time | load avg "
             "(before / after) |", "|---:|" + "---:|" * (len(organs) + 4)]
    for r in runs:
        cells = [_pct(r["test"]["per_class"][o]["dice"]) for o in organs]
        redundancy = "n/a" if r.get("redundancy") is None else f"{r['redundancy']:.3f}"
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {_pct(r['test']['dice_mean'])} | {redundancy} | "
                     f"{r['wall_s']:.0f} s | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    if len(runs) > 1:
        def span(values: list[float | None], scale: float = 100.0, unit: str = "") -> str:
            present = [v for v in values if v is not None]
            if not present:
                return "n/a"
            return f"{min(present) * scale:.1f}–{max(present) * scale:.1f}{unit}"

        cells = [span([r["test"]["per_class"][o]["dice"] for r in runs]) for o in organs]
        redundancy = [r.get("redundancy") for r in runs]
        redundancy_span = "n/a" if None in redundancy else f"{min(redundancy):.3f}–{max(redundancy):.3f}"
        lines.append("| **range** | " + " | ".join(cells) + f" | {span([r['test']['dice_mean'] for r in runs])} | "
                     f"{redundancy_span} | {span([r['wall_s'] for r in runs], 1.0, ' s')} | |")
    lines += ["", "n/a: the organ is in neither the test patient's ground truth nor the prediction. Redundancy: "
              "`redundancy/mean` of the run's `metrics.csv` at its last epoch (the RedundancyMonitor's mean "
              "off-diagonal |channel correlation| of the tapped blocks; n/a without the monitor)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the seeds and print (and write) the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lightning_selfreg.utils.files import atomic_write_text

    facts = machine()
    with tempfile.TemporaryDirectory(prefix="default_run_") as tmp:
        out_dir = args.output_dir or Path(tmp)
        runs = []
        for seed in args.seeds:
            print(f"seed {seed} ...", file=sys.stderr, flush=True)
            runs.append(run_seed(seed, out_dir, extra))
            print(f"seed {seed}: mean Dice {_pct(runs[-1]['test']['dice_mean'])} %, {runs[-1]['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    text = report(runs, facts, extra)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
