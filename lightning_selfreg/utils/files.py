"""Atomic file writes: a killed or failed write never leaves a half-written file under the target name.

A write that fails (a full disk, a read-only folder, a file where a folder should be) raises a
:class:`WriteError`: an ``OSError`` with a one-line message naming the file, the cause and that nothing under the
target name was changed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["WriteError", "atomic_folder", "atomic_write", "atomic_write_text", "named_write_errors",
           "remove_orphaned_temp_files", "write_error"]

log = logging.getLogger(__name__)
TEMP_NAME = re.compile(r"\.tmp(?P<pid>\d+)\.(?P<name>.+)")  # the temporary names of atomic_write: .tmp<pid>.<name>


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".tmp{pid}.{path.name}")  # keeps the suffix: writers that infer the format work


class WriteError(OSError):
    """A file or folder could not be written; the message (one line) names it and the cause.

    Raised by :func:`atomic_write` and :func:`atomic_folder` (and the checkpoint writer), whose target keeps its
    previous content. ``errno`` is the cause's, when it has one (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def write_error(path: str | os.PathLike, err: BaseException) -> WriteError:
    """A :class:`WriteError` for a failed write of ``path``: one line naming it, the cause and a diagnosis.

    The diagnosis says which folder on the way is a file, is read-only or lacks permission, or how much space is
    left on a full disk (``ENOSPC`` / ``EDQUOT``).
    """
    path = Path(path)
    code = getattr(err, "errno", None)
    blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        cause = f"{blocker} is a file, not a folder"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        folder = _existing_ancestor(path.parent)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        cause = "no space left on the device" + (f" ({free / 2**20:.1f} MiB free under {folder})"
                                                 if free is not None else "")
    elif code == errno.EROFS:
        cause = f"{_existing_ancestor(path.parent)} is on a read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied (the folder {_existing_ancestor(path.parent)} is not writable by this user)"
    else:
        text = (getattr(err, "strerror", None) or str(err) or type(err).__name__).strip().splitlines()
        cause = text[0] if text else type(err).__name__
        folder = _existing_ancestor(path.parent)
        try:  # a writer that reports no errno (torch's stream writer): say when the disk is (nearly) full
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < 16 * 2**20:
            cause += f" (the disk is full: {free / 2**20:.1f} MiB free under {folder})"
    return WriteError(f"cannot write {path}: {cause}", code)


@contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into the one-line :class:`WriteError` naming it.

    A :class:`WriteError` (already named) passes through unchanged; other exceptions are not touched.

    Example:
        >>> with named_write_errors("/no/such/folder/x.csv"):
        ...     open("/no/such/folder/x.csv", "w")
        Traceback (most recent call last):
        lightning_selfreg.utils.files.WriteError: cannot write /no/such/folder/x.csv: ...
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise write_error(Path(path), err) from err


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary path next to ``path``, then rename it into place.

    ``os.replace`` is atomic, so readers see the old complete file or the new complete file, never a partial one,
    and a failed or killed write leaves no half-written ``path``. The temporary file is ``.tmp<pid>.<name>``; a
    failed write removes it, a killed one (SIGKILL, power loss) cannot: :func:`remove_orphaned_temp_files` does.

    Raises:
        WriteError: The folder cannot be created or the write fails with an ``OSError`` (disk full, read-only,
            permission, a file in the way); ``path`` is unchanged.
    """
    path = Path(path)
    tmp = _temp_path(path, os.getpid())
    try:
        with named_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the folder could not be created
            pass


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on an empty temporary folder next to ``path``, then rename the folder into place.

    A folder of files appears complete or not at all (e.g. one preprocessed case): the rename of a folder is
    atomic. An existing ``path`` is replaced: renamed aside, the new folder renamed in, the old one deleted (a
    failed rename puts it back). A failed write removes the
    temporary folder; a killed one leaves ``.tmp<pid>.<name>/``, which :func:`remove_orphaned_temp_files` removes.

    Raises:
        WriteError: As :func:`atomic_write`.
    """
    path = Path(path)
    tmp = _temp_path(path, os.getpid())
    try:
        with named_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            write(tmp)
            if not path.exists():
                os.replace(tmp, path)
                return
            old = path.with_name(f".tmp{os.getpid()}.old.{path.name}")  # an orphan's name, if killed right here
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # aside, so that the old folder stays whole until the new one is in place
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Delete what killed :func:`atomic_write` / :func:`atomic_folder` calls left in ``folder`` (not recursive).

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
        if match is None or entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            continue
        pid = int(match["pid"])
        if (pid == os.getpid() and not include_own) or (pid != os.getpid() and _process_alive(pid)):
            continue
        if entry.is_dir():
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        else:
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
        log.info("removed %s (%d bytes), left by an interrupted write of %s", entry, size, match["name"])
        removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
