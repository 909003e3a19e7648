"""Atomic checkpoint writing: a killed run never leaves a half-written ``.ckpt`` behind."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_selfreg.io import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file in the target folder and renames it into place.

    ``os.replace`` is atomic on POSIX and Windows, so a checkpoint path holds either the previous complete file or
    the new complete file, never a partial one (e.g. when the job is killed during the write).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                       storage_options))
