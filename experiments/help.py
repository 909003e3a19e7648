"""``python -m experiments.run --help``: the short flags grouped on one screen; ``--help-all``: every full key.

The groups come from :data:`experiments.flags.ALIASES` (each short flag and the full key it stands for), so a new
alias appears here by itself; the few flags that are not plain aliases are described in :data:`SPECIAL`.
"""

from __future__ import annotations

import argparse
from typing import Any

from experiments.flags import ALIASES, BACKBONES, PRESETS

__all__ = ["add_help_flags", "short_help"]

GROUPS = (("data", ("data.",)), ("model", ("model.",)), ("SelfReg", ("selfreg.",)),
          ("training", ("trainer.", "seed_everything")), ("run", ("run.",)))
# flags that are not plain aliases of one key: (group, flag with its value, what it does)
SPECIAL = (
    ("data", "--dataset NAME", f"preset for a dataset: {', '.join(PRESETS)} (default sample)"),
    ("data", "--augment none", "no per-sample augmentation (= --data.transform null)"),
    ("model", "--backbone NAME", "the network of configs/backbones/NAME.yaml, one of"),
    ("model", "", ", ".join(BACKBONES)),
    ("SelfReg", "--no-selfreg", "the baseline: no SelfReg (= --selfreg null)"),
    ("training", "--gpus N", "N GPUs (0 = CPU; N > 1 trains with DDP)"),
    ("training", "--sync-batchnorm", "= --trainer.sync_batchnorm true"),
)
COMPARE = (
    ("--compare", "SelfReg and the baseline for each seed, the other flags shared: summary.md,"),
    ("", "compare.png (paired difference per class, 95 % CI, seeds needed), summary.json"),
    ("--seeds S ...", "seeds of --compare (default 0 1 2); the same --run-name again resumes"),
)
COLUMN = 32


def _row(flag: str, text: str) -> str:
    return f"  {flag:<{COLUMN - 2}}{text}" if len(flag) < COLUMN - 2 else f"  {flag}\n{' ' * COLUMN}{text}"


def _flag(flag: str, key: str, kind: str) -> str:
    metavar = key.rsplit(".", 1)[-1].upper()
    if len(flag) + len(metavar) > COLUMN - 8:
        metavar = "V"
    return {"true": flag, "false": flag, "list": f"{flag} {metavar} ..."}.get(kind, f"{flag} {metavar}")


def short_help(prog: str = "python -m experiments.run") -> str:
    """The grouped short flags, the comparison, the presets and the ways to every full key (under 80 lines)."""
    lines = [f"usage: {prog} [flags]",
             f"       {prog} --compare [--seeds 0 1 2] [flags]",
             "No flags: the paper's UNet + SelfReg on the CT sample bundled with the package",
             "(the CPU preset on a machine without a GPU). Each short flag stands for a full key (after '=');",
             "later flags win over earlier ones and over --config files."]
    for group, prefixes in GROUPS:
        lines += ["", f"{group}:"]
        lines += [_row(flag, text) for g, flag, text in SPECIAL if g == group]
        lines += [_row(_flag(flag, key, kind), f"= --{key}" + (f" {kind}" if kind in ("true", "false") else ""))
                  for flag, (key, kind) in ALIASES.items() if key.startswith(prefixes)]
    lines += ["", "comparison:", *(_row(flag, text) for flag, text in COMPARE)]
    lines += ["", "every setting:",
              _row("--config FILE", "YAML in the full keys (--print_config writes one that runs as is)"),
              _row("--help-all", "every full key with its type and default (Lightning's Trainer too)"),
              _row("--model.net.help CLASS", "the keys of one class (also --data.help, --selfreg.help),"),
              _row("", "e.g. --model.net.help lightning_selfreg.models.UNet")]
    return "\n".join(lines)


class _ShortHelp(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(short_help(parser.prog))
        parser.exit()


class _FullHelp(_ShortHelp):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser.print_help()
        parser.exit()


def add_help_flags(parser: Any) -> None:
    """``-h/--help`` (:func:`short_help`) and ``--help-all`` (the parser's full help) on a parser built without help."""
    parser.add_argument("-h", "--help", action=_ShortHelp, help="the short flags, grouped (this screen)")
    parser.add_argument("--help-all", action=_FullHelp, help="every full key with its type and default")
