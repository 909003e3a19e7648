"""Save and restore the global random number generators (Python ``random``, NumPy's legacy global RNG, torch).

One helper for every place that must leave the global generators as it found them, or carry them over a restart:

- :func:`get_rng_states` / :func:`set_rng_states`: the states as plain types and tensors (what a checkpoint can
  hold and ``torch.load(weights_only=True)`` can read back), e.g.
  :class:`~lightning_selfreg.callbacks.RNGStateCheckpoint`.
- :func:`seeded_rngs`: a context manager that seeds the three generators from one seed and restores them on
  exit, e.g. a per-sample transform that draws from the global generators.

To leave the generators as they were around a block, use Lightning's
:func:`~lightning.pytorch.utilities.seed.isolate_rng` (``include_cuda=False`` in DataLoader workers); it restores
them when the block ends normally, so catch an expected exception inside the block.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng

__all__ = ["get_rng_states", "seeded_rngs", "set_rng_states"]


def get_rng_states(cuda: bool = True) -> dict[str, Any]:
    """The current states of the Python, NumPy and torch CPU generators (and CUDA's, when asked and available).

    Args:
        cuda: Also save every CUDA device's generator (when CUDA is available).

    Returns:
        ``{"python": tuple, "numpy": {"kind", "keys" (624,) int64 tensor, "pos", "has_gauss", "cached_gaussian"},
        "torch": uint8 tensor[, "cuda": [uint8 tensor per device]]}``: plain types and tensors only, so the dict
        can be stored in a checkpoint that loads with ``torch.load(weights_only=True)``.

    Example:
        >>> states = get_rng_states()
        >>> a = torch.rand(1)
        >>> set_rng_states(states)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_states` (a ``"cuda"`` entry only when CUDA is available)."""
    random.setstate(states["python"])
    numpy = states["numpy"]
    keys = numpy["keys"].numpy() if isinstance(numpy["keys"], torch.Tensor) else np.asarray(numpy["keys"])
    np.random.set_state((numpy["kind"], keys.astype(np.uint32), int(numpy["pos"]), int(numpy["has_gauss"]),
                         float(numpy["cached_gaussian"])))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the Python, NumPy (``seed % 2**32``) and torch CPU generators from ``seed``; restore them after the block.

    Lightning's ``isolate_rng`` restores them when the block ends normally; an exception inside it is not caught
    (it ends the data loading, so the generators' state no longer matters). The CUDA generators are left alone
    (this runs in DataLoader workers, where CUDA must not be initialised).

    Args:
        seed: A non-negative integer.

    Example:
        >>> with seeded_rngs(3):
        ...     a = torch.rand(1)
        >>> with seeded_rngs(3):
        ...     torch.equal(a, torch.rand(1))
        True
    """
    with isolate_rng(include_cuda=False):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        yield
