"""Checkpoint files: atomic writing (a killed run never leaves a half-written ``.ckpt``) and checked reading."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_selfreg.utils.files import WriteError, atomic_write, remove_orphaned_temp_files, write_error

__all__ = ["AtomicCheckpointIO", "CheckpointError", "check_checkpoint_file", "load_checkpoint"]

EXPECTED = "expected a PyTorch checkpoint (the zip archive torch.save writes)"


class CheckpointError(ValueError):
    """A checkpoint file is empty, truncated or not a checkpoint; the message names the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file in the target folder and renames it into place.

    ``os.replace`` is atomic on POSIX and Windows, so a checkpoint path holds either the previous complete file or
    the new complete file, never a partial one (e.g. when the job is killed during the write). A kill during the
    write leaves the temporary ``.tmp<pid>.<name>`` behind; the first save into a folder removes such files of
    processes that no longer run (:func:`~lightning_selfreg.utils.files.remove_orphaned_temp_files`), and
    ``experiments.run`` already does so when a run starts or resumes.

    A write that fails (a full disk, a read-only folder) raises a
    :class:`~lightning_selfreg.utils.files.WriteError` naming the file and the cause, and the previous checkpoint
    under that name stays as it was.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        folder = Path(path).parent.resolve()
        if folder not in self._cleaned:
            self._cleaned.add(folder)
            # another save of this process (e.g. an async checkpoint thread) may be in flight: keep our own pid's
            remove_orphaned_temp_files(folder, include_own=False)
        try:
            atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                           storage_options))
        except WriteError:
            raise
        except RuntimeError as err:  # torch's stream writer reports a failed write (e.g. ENOSPC) as RuntimeError;
            raise write_error(path, err) from err  # the message keeps its cause, without reading its text


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Check cheaply that ``path`` is a complete ``torch.save`` file, before anything is built from it.

    Reads the zip directory and verifies the CRC of every member (one sequential read of the file, no
    unpickling), which catches empty, truncated and corrupted files. A file in torch's legacy (pre-1.6,
    non-zip) format is left to :func:`torch.load`.

    Raises:
        CheckpointError: Naming the file, what was expected and what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: {EXPECTED}, found an empty file (0 bytes)")
    with path.open("rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a pickle stream: torch's legacy format
        return
    try:
        if not zipfile.is_zipfile(path):
            what = "the start of a zip archive without its end: truncated (was its write interrupted?)" \
                if head == b"PK\x03\x04" else "no zip archive"
            raise CheckpointError(f"{path}: {EXPECTED}, found {size} bytes holding {what}")
        with zipfile.ZipFile(path) as archive:
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                raise CheckpointError(f"{path}: {EXPECTED}, found a zip archive without a data.pkl member")
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: {EXPECTED}, found a damaged zip archive ({err})") from err
    if corrupt is not None:
        raise CheckpointError(f"{path}: {EXPECTED}, found a damaged archive (member {corrupt} fails its CRC check)")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint after :func:`check_checkpoint_file`.

    Args:
        path: The ``.ckpt`` file.
        map_location: Passed to :func:`torch.load`.

    Returns:
        The checkpoint dictionary (it has a ``state_dict``).

    Raises:
        CheckpointError: If the file is not a complete checkpoint or holds no ``state_dict``.
    """
    import torch

    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, AttributeError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: {EXPECTED}, found a file torch.load cannot read ({message})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = f"a dict with keys {sorted(checkpoint)[:8]}" if isinstance(checkpoint, dict) else \
            type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected a Lightning checkpoint (a dict with `state_dict`), found {found}")
    return checkpoint
