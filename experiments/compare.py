"""SelfReg against the baseline over seeds: ``python -m experiments.compare --seeds 0 1 2 [run flags]``.

Also ``python -m experiments.run --compare --seeds 0 1 2 [run flags]``. The run flags are those of
:mod:`experiments.run` (checked once, up front, before any training); each of the ``2 x len(seeds)`` runs is a
subprocess of ``experiments.run`` with the same flags plus its seed, its arm (``--no-selfreg`` for the baseline)
and its run folder ``<run.output_dir>/<run.name or compare-...>/<arm>-seed<seed>``, so ``--gpus N`` works as in a
single run and both arms see the same batches (the data draws derive from the seed alone).

- Progress: ``[compare] run k/N`` with the elapsed time and the ETA of the whole comparison (from the mean time
  of the runs done so far).
- Resume: the comparison folder keeps its flags in ``compare.json``; running the same command with
  ``--run-name <folder>`` again keeps the finished runs (those with a ``metrics.json``), continues an interrupted
  one from its ``last.ckpt`` (``--resume``), moves a run folder that died before its first checkpoint aside
  (``<arm>-seed<seed>.incomplete-<k>``, never deleted) and starts the rest. Other flags are refused (exit 2);
  more seeds are welcome (``--seeds 0 1 2 3 4``: the power analysis may ask for them). ``--overwrite`` is
  refused (a comparison keeps its finished runs), as is a ``--run-name`` folder that holds no comparison.
- Interrupt: Ctrl+C or SIGTERM reaches the running child once (it has its own process group, see
  :func:`run_child`), which saves a checkpoint at its step; the driver exits with the child's 130 / 143.
- W&B: every run of one comparison is in the W&B group ``<folder>`` with its arm as job type and tags
  ``<arm>``, ``seed<seed>`` (``WANDB_RUN_GROUP``, ``WANDB_JOB_TYPE``, ``WANDB_TAGS`` of the child runs), so W&B's
  grouping shows the two arms side by side; a run of job type ``compare`` in the same group gets the summary
  table and the forest plot.
- At the end ``summary.json``, ``summary.md`` and ``compare.png``
  (:func:`lightning_selfreg.tracking.compare.write_comparison`): per class the paired difference with its t
  interval, a plain-words verdict, the seeds that would detect +1 pp and +3.5 pp with 80 % power, a bootstrap
  interval over seeds and cases, and the per-case paired differences.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.cli import SelfRegCLI, run_labels
from experiments.flags import RUN_NAME_ENV, ConfigError, expand_aliases, without_selfreg_settings
from experiments.settings import SEED_RANGE
from lightning_selfreg.callbacks.progress import format_duration
from lightning_selfreg.utils.files import atomic_write_text

ARMS = ("baseline", "selfreg")
STATE_FILE = "compare.json"  # the comparison's flags, for resuming it


def split_seeds(argv: list[str]) -> tuple[list[int], list[str]]:
    """``(seeds, the other flags)``; ``--seeds`` defaults to 0 1 2.

    Raises:
        ConfigError: For a seed that is not an integer in the seed range, a repeated seed, or ``--seeds`` without a
            value.
    """
    if "--seeds" not in argv:
        return [0, 1, 2], list(argv)
    i = argv.index("--seeds")
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    try:
        seeds = [int(v) for v in argv[i + 1:j]]
    except ValueError:
        raise ConfigError("seeds", f"expected integers, found {' '.join(argv[i + 1:j])}") from None
    if not seeds:
        raise ConfigError("seeds", "expected one or more integers, found none")
    low, high = SEED_RANGE
    if any(not low <= seed <= high for seed in seeds):
        raise ConfigError("seeds", f"expected integers in [{low}, {high}], found {' '.join(map(str, seeds))}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"expected distinct seeds (the pairs are per seed), found "
                                   f"{' '.join(map(str, seeds))}")
    return seeds, argv[:i] + argv[j:]


def _check_state(out_dir: Path, flags: list[str]) -> None:
    """Record the comparison's flags in ``out_dir``, or check them against those of the run being resumed."""
    state = out_dir / STATE_FILE
    if out_dir.exists() and not state.is_file():
        raise ConfigError("run.name", f"{out_dir} exists and holds no comparison ({STATE_FILE}); expected a new "
                                      "--run-name or the name of a comparison to resume")
    if state.is_file():
        before = json.loads(state.read_text()).get("flags")
        if before != flags:
            raise ConfigError("run.name", f"the comparison in {out_dir} was started with the flags {before}, found "
                                          f"{flags}; resume it with the same flags or choose another --run-name")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, json.dumps({"flags": flags}, indent=2) + "\n")


def _prepare_run(run_dir: Path) -> tuple[str, list[str]]:
    """What to do with one run's folder: ``("kept" | "resume" | "start", extra flags)``.

    A folder without ``metrics.json`` or ``checkpoints/last.ckpt`` (killed before its first checkpoint) is moved
    aside, not deleted.
    """
    if (run_dir / "metrics.json").is_file():
        return "kept", []
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume", ["--resume"]
    if run_dir.exists():
        k = 1
        while run_dir.with_name(f"{run_dir.name}.incomplete-{k}").exists():
            k += 1
        aside = run_dir.with_name(f"{run_dir.name}.incomplete-{k}")
        os.replace(run_dir, aside)
        print(f"[compare] {run_dir.name} died before its first checkpoint: moved aside to {aside.name}", flush=True)
    return "start", []


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run one arm's ``experiments.run`` and return its exit status.

    The child has its own process group, so a Ctrl+C at the terminal reaches this process alone, and this process
    passes every SIGINT and SIGTERM on to the child, once, and waits for it: the child saves a resumable checkpoint
    at its current step and exits with 130 / 143 (a second Ctrl+C stops it at once, as in a single run).
    """
    proc = subprocess.Popen(cmd, env=env, process_group=0)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log_to_wandb(config: Any, base: str, out_dir: Path, mode: str, seeds: list[int], flags: list[str],
                  summary: dict[str, Any], paths: dict[str, Any]) -> None:
    """The comparison's W&B run (job type ``compare``, in the comparison's group): table, plot, summary values."""
    import wandb

    run = wandb.init(project=config["run"]["wandb_project"], name=f"{base}-summary", group=base, dir=str(out_dir),
                     mode=mode, job_type="compare", tags=["compare"], config={"seeds": seeds, "flags": flags},
                     settings=wandb.Settings(silent=True))
    columns = ["class", "baseline dice", "selfreg dice", "delta dice", "t ci low", "t ci high", "bootstrap low",
               "bootstrap high", "seeds for +1 pp", "seeds for +3.5 pp", "verdict"]
    rows = []
    for name in summary["classes"]:
        if "dice" not in summary["metrics"]:
            break
        d = summary["difference"][name]["dice"]
        b = summary["bootstrap"].get(name) or {}
        power = summary["power"][name]["seeds_for"]
        rows.append([name, summary["arms"]["baseline"][name]["dice"]["mean"],
                     summary["arms"]["selfreg"][name]["dice"]["mean"], d["mean"], *(d["ci95"] or [None, None]),
                     *(b.get("ci95") or [None, None]), *power.values(), summary["verdicts"][name]])
    values: dict[str, Any] = {"compare/table": wandb.Table(columns=columns, data=rows),
                              "compare/summary": wandb.Html(f"<pre>{paths['markdown'].read_text()}</pre>")}
    if paths.get("plot") is not None:
        values["compare/plot"] = wandb.Image(str(paths["plot"]))
    run.log(values)
    run.summary.update({"compare": {k: v for k, v in summary.items() if k != "cases"}})
    run.finish()
    where = Path(run.dir).parent
    print(f"W&B comparison run: {where}" + (f" (offline: upload with `wandb sync {where}`)" if mode == "offline"
                                            else ""))


def main(argv: list[str] | None = None) -> int:
    """Run both arms for every seed (keeping finished runs) and write the paired summary; returns the exit status."""
    from lightning_selfreg.tracking.compare import load_results, summarize_comparison, write_comparison
    from lightning_selfreg.tracking.wandb_mode import WandbUnavailable, resolve_wandb_mode

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        seeds, flags = split_seeds(argv)
        flags = [a for a in flags if a != "--no-selfreg"]  # each run gets its arm
        config = SelfRegCLI(expand_aliases(flags), instantiate=False).config  # every setting checked up front
        if config.get("selfreg") is None:
            raise ConfigError("selfreg", "--compare needs a SelfReg configuration (found `selfreg: null`)")
        if config["run"]["resume"]:
            raise ConfigError("resume", "a comparison resumes by itself; run it again with the same --run-name")
        if config["run"]["overwrite"]:
            raise ConfigError("overwrite", "a comparison keeps its finished runs; expected a new --run-name (or "
                                           "delete the comparison folder yourself), found --overwrite")
        labels = run_labels(config)
        base = config["run"]["name"] or f"compare-{labels['dataset']}-{labels['backbone']}-" \
                                        f"{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path(config["run"]["output_dir"]) / base
        try:  # of the summary run; each run decides its own
            mode = resolve_wandb_mode(config["run"]["wandb"], sync_hint=str(out_dir / "wandb" / "offline-run-*"))
        except WandbUnavailable as err:
            raise ConfigError("run.wandb", str(err)) from err
        _check_state(out_dir, flags)
    except ConfigError as err:
        print(f"error: {err.line(argv)}", file=sys.stderr)
        return 2
    plan = [(seed, arm) for seed in seeds for arm in ARMS]
    print(f"[compare] {len(plan)} runs ({len(seeds)} seeds x SelfReg and baseline) in {out_dir}; interrupted, it "
          f"resumes with the same command and --run-name {base}", flush=True)
    runs, durations, start = [], [], time.monotonic()
    for k, (seed, arm) in enumerate(plan, start=1):
        name = f"{arm}-seed{seed}"
        action, extra = _prepare_run(out_dir / name)
        runs.append(out_dir / name)
        if action == "kept":
            print(f"[compare] run {k}/{len(plan)}: {arm}, seed {seed}: finished earlier, kept", flush=True)
            continue
        remaining = sum(1 for s, a in plan[k - 1:] if not (out_dir / f"{a}-seed{s}" / "metrics.json").is_file())
        mean = sum(durations) / len(durations) if durations else None
        eta = f"ETA of the comparison {format_duration(remaining * mean)}" if mean else "ETA after this run"
        print(f"[compare] run {k}/{len(plan)}: {arm}, seed {seed}{' (resumed)' if action == 'resume' else ''} -> "
              f"{out_dir / name} (elapsed {format_duration(time.monotonic() - start)}, {eta})", flush=True)
        # later flags win: the run's own seed, arm and folder after the shared flags
        shared = without_selfreg_settings(flags) if arm == "baseline" else flags  # they conflict with --no-selfreg
        cmd = [sys.executable, "-m", "experiments.run", *shared, "--seed", str(seed),
               *(["--no-selfreg"] if arm == "baseline" else []), "--output-dir", str(out_dir), "--run-name", name,
               *extra]
        env = {key: value for key, value in os.environ.items() if key != RUN_NAME_ENV}
        env.update({"WANDB_RUN_GROUP": base, "WANDB_JOB_TYPE": arm, "WANDB_TAGS": f"{arm},seed{seed}"})
        began = time.monotonic()
        status = run_child(cmd, env)
        if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            print(f"[compare] interrupted in run {k}/{len(plan)} ({name}); the comparison resumes from there with "
                  f"the same command and --run-name {base}", file=sys.stderr)
            return status
        if status != 0:
            print(f"error: run {k}/{len(plan)} ({name}) failed with status {status}; the comparison "
                  f"resumes from there with the same command and --run-name {base}", file=sys.stderr)
            return status
        durations.append(time.monotonic() - began)
    summary = summarize_comparison(load_results(runs))
    paths = write_comparison(summary, out_dir)
    verdicts = sorted(summary["verdicts"].items(), key=lambda kv: kv[0] != "mean")  # the mean first, as summary.md
    print("\n" + "\n".join(f"{name}: {text}" for name, text in verdicts))
    print(f"\ncomparison folder: {out_dir} (summary.md, compare.png, summary.json; "
          f"{format_duration(time.monotonic() - start)})")
    if mode != "disabled":
        _log_to_wandb(config, base, out_dir, mode, seeds, flags, summary, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
