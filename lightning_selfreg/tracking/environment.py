"""``log_run_environment``: git commit, library versions and GPU of a run, into its logger's config."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger

__all__ = ["log_run_environment"]


def _git(args: Sequence[str], cwd: str, timeout: float) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def log_run_environment(logger: Logger | None, cwd: str | os.PathLike | None = None,
                        timeout: float = 5.0) -> dict[str, Any]:
    """Record the code version and the software/hardware environment in the run's config.

    Collected (None where unknown): ``git_commit`` and ``git_dirty`` (tracked files modified) of the git
    repository at ``cwd``, the versions of python, torch, lightning, lightning_selfreg, CUDA and cuDNN as torch
    sees them, the GPU name and count, and the platform. git runs as a subprocess with a timeout; a missing git,
    a folder outside a repository or a timeout give None and never fail. The dict is logged as hyper-parameters
    under the key ``env`` (for a ``WandbLogger`` this updates the W&B run config; for a CSV or TensorBoard logger
    it goes to their hparams), from rank 0 only.

    Args:
        logger: A Lightning logger, or None to only collect the values.
        cwd: Folder whose git repository is recorded (default: the current directory).
        timeout: Seconds allowed for each git call.

    Returns:
        The collected values.

    Example:
        >>> info = log_run_environment(None)
        >>> sorted(info)[:3]
        ['cuda', 'cudnn', 'git_commit']
    """
    import lightning

    import lightning_selfreg

    folder = os.fspath(cwd) if cwd is not None else os.getcwd()
    commit = _git(["rev-parse", "HEAD"], folder, timeout)
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder, timeout) if commit else None
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    info = {
        "git_commit": commit or None,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, which YAML loggers would write as a Python object
        "lightning": str(lightning.__version__),
        "lightning_selfreg": str(lightning_selfreg.__version__),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "platform": f"{platform.system()}-{platform.machine()} ({sys.platform})",
    }
    if logger is not None:
        logger.log_hyperparams({"env": info})
    return info
