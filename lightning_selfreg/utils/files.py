"""Atomic file writes: a killed or failed write never leaves a half-written file under the target name."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "remove_orphaned_temp_files"]

log = logging.getLogger(__name__)
TEMP_NAME = re.compile(r"\.tmp(?P<pid>\d+)\.(?P<name>.+)")  # the temporary names of atomic_write: .tmp<pid>.<name>


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".tmp{pid}.{path.name}")  # keeps the suffix: writers that infer the format work


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary path next to ``path``, then rename it into place.

    ``os.replace`` is atomic, so readers see the old complete file or the new complete file, never a partial one,
    and a failed or killed write leaves no half-written ``path``. The temporary file is ``.tmp<pid>.<name>``; a
    failed write removes it, a killed one (SIGKILL, power loss) cannot: :func:`remove_orphaned_temp_files` does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, os.getpid())
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):  # not a valid pid here
        return False
    return True


def remove_orphaned_temp_files(folder: str | os.PathLike, include_own: bool = True) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder`` (not recursive).

    A write killed between creating its ``.tmp<pid>.<name>`` file and renaming it leaves that file behind (a
    checkpoint's is as large as the checkpoint). Only files of exactly that name pattern are considered, and only
    those whose writer process no longer exists on this machine: a live process may still be writing its file.
    A file carrying this process's own pid is an orphan of an earlier process that had the same pid (containers
    and job restarts reuse pids) as long as this process has not started writing there; ``include_own=False``
    keeps such files, for calls made while this process may have writes in flight in that folder.

    Args:
        folder: The folder to clean; a missing folder is fine.
        include_own: Also delete files carrying this process's pid.

    Returns:
        The deleted paths (each is also logged at INFO level).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match["pid"])
        if (pid == os.getpid() and not include_own) or (pid != os.getpid() and _process_alive(pid)):
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        log.info("removed %s (%d bytes), left by an interrupted write of %s", entry, size, match["name"])
        removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
