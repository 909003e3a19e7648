"""SelfReg against the baseline over seeds: ``python -m experiments.compare --seeds 0 1 2 [run flags]``.

Also ``python -m experiments.run --compare --seeds 0 1 2 [run flags]``. The run flags are those of
:mod:`experiments.run` (checked once, up front, before any training); each of the ``2 x len(seeds)`` runs is a
subprocess of ``experiments.run`` with the same flags plus its seed, its arm (``--no-selfreg`` for the baseline)
and its run folder ``<run.output_dir>/<run.name or compare-...>/<arm>-seed<seed>``, so ``--gpus N`` works as in a
single run and both arms see the same batches (the data draws derive from the seed alone). At the end
``summary.json`` / ``summary.md`` hold the mean +- std of both arms and the paired differences
(:func:`lightning_selfreg.tracking.compare.summarize_comparison`), and a W&B run of job type ``compare`` holds the
table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.cli import RUN_NAME_ENV, ConfigError, SelfRegCLI, expand_aliases, run_labels, without_selfreg_settings


def split_seeds(argv: list[str]) -> tuple[list[int], list[str]]:
    """``(seeds, the other flags)``; ``--seeds`` defaults to 0 1 2.

    Raises:
        ConfigError: For a seed that is not an integer, or ``--seeds`` without a value.
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
    return seeds, argv[:i] + argv[j:]


def main(argv: list[str] | None = None) -> int:
    """Run both arms for every seed and write the paired summary; returns the exit status."""
    from lightning_selfreg.tracking.compare import (
        format_comparison_markdown,
        load_results,
        summarize_comparison,
        write_comparison,
    )
    from lightning_selfreg.tracking.wandb_mode import WandbUnavailable, resolve_wandb_mode

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        seeds, flags = split_seeds(argv)
        flags = [a for a in flags if a != "--no-selfreg"]  # each run gets its arm
        config = SelfRegCLI(expand_aliases(flags), instantiate=False).config  # every setting checked up front
        if config.get("selfreg") is None:
            raise ConfigError("selfreg", "--compare needs a SelfReg configuration (found `selfreg: null`)")
        labels = run_labels(config)
        base = config["run"]["name"] or f"compare-{labels['dataset']}-{labels['backbone']}-" \
                                        f"{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path(config["run"]["output_dir"]) / base
        try:  # of the summary run; each run decides its own
            mode = resolve_wandb_mode(config["run"]["wandb"], sync_hint=str(out_dir / "wandb" / "offline-run-*"))
        except WandbUnavailable as err:
            raise ConfigError("run.wandb", str(err)) from err
    except ConfigError as err:
        print(f"error: {err.line(argv)}", file=sys.stderr)
        return 2
    runs = []
    plan = [(seed, arm) for seed in seeds for arm in ("baseline", "selfreg")]
    for k, (seed, arm) in enumerate(plan, start=1):
        name = f"{arm}-seed{seed}"
        # later flags win: the run's own seed, arm and folder after the shared flags
        shared = without_selfreg_settings(flags) if arm == "baseline" else flags  # they conflict with --no-selfreg
        cmd = [sys.executable, "-m", "experiments.run", *shared, "--seed", str(seed),
               *(["--no-selfreg"] if arm == "baseline" else []), "--output-dir", str(out_dir), "--run-name", name]
        print(f"[compare] run {k}/{len(plan)}: {arm}, seed {seed} -> {out_dir / name}", flush=True)
        env = {key: value for key, value in os.environ.items() if key != RUN_NAME_ENV}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            print(f"error: run {k}/{len(plan)} ({name}) failed with status {proc.returncode}", file=sys.stderr)
            return proc.returncode
        runs.append(out_dir / name)
    summary = summarize_comparison(load_results(runs))
    write_comparison(summary, out_dir)
    markdown = format_comparison_markdown(summary)
    print(markdown)
    print(f"\nsummary: {out_dir / 'summary.md'}")
    if mode != "disabled":
        import wandb

        run = wandb.init(project=config["run"]["wandb_project"], name=base, dir=str(out_dir), mode=mode,
                         job_type="compare", config={"seeds": seeds, "flags": flags})
        run.log({"compare/summary": wandb.Html(f"<pre>{markdown}</pre>")})
        run.summary.update({"compare": summary})
        run.finish()
        print(f"W&B comparison run: {run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
