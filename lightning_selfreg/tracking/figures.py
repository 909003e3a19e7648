"""What the pictures of a run folder share: class colours and an atomic PNG write.

Every picture is a ``matplotlib.figure.Figure`` built without pyplot (no display, no global state, safe in
worker threads and on machines without a screen) and written with :func:`save_figure`, which renders with the
Agg backend to a temporary file and renames it into place (:func:`~lightning_selfreg.utils.files.atomic_write`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_selfreg.utils.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["class_colour", "save_figure"]

# Foreground class k (1-based) gets colour k - 1: matplotlib's tab10, then tab20's light shades, then cycled.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


def class_colour(label: int) -> str:
    """The colour of foreground class ``label`` (1-based), the same in every picture of the package."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` with the Agg backend to the PNG ``path``, atomically; returns the path.

    The picture is ``fig.get_size_inches() * dpi`` pixels (without ``bbox_inches``, so its size is known
    beforehand).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the Agg canvas: savefig renders without any pyplot backend
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return path
