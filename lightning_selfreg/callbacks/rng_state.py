"""``RNGStateCheckpoint``: carry the global RNG states over a checkpoint and resume."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_selfreg.utils.rng import get_rng_states, set_rng_states

__all__ = ["RNGStateCheckpoint"]


class RNGStateCheckpoint(pl.Callback):
    """Save the Python, NumPy and torch (CPU and CUDA) RNG states in checkpoints and restore them on resume.

    The data pipeline does not need it: its draws derive from ``(seed, epoch, sample index)``
    (:func:`~lightning_selfreg.data.derive_seed`) and the :class:`~lightning_selfreg.data.ResumableDataLoader`
    restores the position in the epoch; SelfReg's pairing has its own generator in its own state. What it covers
    is everything else that draws from the global generators (dropout masks, a user's augmentation or callback),
    so that a resumed run continues them as an uninterrupted run of the same seed would, from an end-of-epoch or
    a mid-epoch checkpoint. The states are those of :func:`~lightning_selfreg.utils.rng.get_rng_states` (plain types and
    tensors, so checkpoints still load with ``torch.load(weights_only=True)``).
    """

    def state_dict(self) -> dict[str, Any]:
        """The current RNG states."""
        return get_rng_states(cuda=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the RNG states saved by :meth:`state_dict`."""
        set_rng_states(state_dict)
