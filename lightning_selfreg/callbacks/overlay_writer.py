"""``OverlayWriter``: a picture of every test case (image, ground truth, prediction), the lowest Dice first."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch import Tensor

from lightning_selfreg.data.sampling import is_padding
from lightning_selfreg.metrics.overlap import class_dice
from lightning_selfreg.segmentation.inference import step_prediction
from lightning_selfreg.tracking.figures import save_figure
from lightning_selfreg.tracking.overlays import plot_case, radiological, to_label_grid
from lightning_selfreg.tracking.wandb_logging import image_and_label
from lightning_selfreg.utils.checks import check_int
from lightning_selfreg.utils.distributed import gather_lists

__all__ = ["OverlayWriter"]


def _file_stem(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case).strip("._") or "case"


def display_image(image: Tensor, label_shape: tuple[int, ...], spatial_dims: int) -> np.ndarray:
    """A test case's image as ``(D, H, W)`` grey (first channel) or ``(D, H, W, 3)`` RGB at the label's grid.

    ``image`` is ``(D', C, H', W')`` or ``(D', H', W')`` for a slice-wise network, ``(C, D', H', W')`` for a 3D one.
    """
    image = image.detach().float().cpu()
    if spatial_dims == 3:
        image = image.transpose(0, 1)  # (D', C, H', W')
    elif image.ndim == 3:
        image = image[:, None]
    rgb = image.shape[1] == 3 and label_shape[0] == 1
    array = image.permute(0, 2, 3, 1).numpy() if rgb else image[:, 0].numpy()
    return to_label_grid(array, label_shape)


class OverlayWriter(pl.Callback):
    """Write ``<dirpath>/<rank>_<case>.png`` for each test case, ranked by mean Dice, the lowest first.

    Each picture is :func:`~lightning_selfreg.tracking.overlays.plot_case` of the case's image, ground truth and
    the test step's prediction (``outputs["prediction"]``, at the label's grid, as
    :class:`~lightning_selfreg.SelfRegSegModule` returns it): a 2D image whole, a volume as the three orthogonal
    planes through each organ, in the radiological layout when the case has its NIfTI ``affine``. The rank
    (``001`` = the lowest mean Dice over the classes present) is known once every case is scored, so the pictures
    are drawn into ``<dirpath>.partial/`` during the test and moved into a new ``dirpath`` at its end, which then
    replaces the earlier folder (a re-test of the run); a reader sees the old set or the new one. Every rank draws
    its own cases; the ranking is gathered over ranks and rank 0 moves them.

    Args:
        dirpath: The folder of the pictures (e.g. ``<run>/overlays``).
        max_organs: Most organs drawn per volume (the lowest Dice first).
        max_cases: Draw only the first this many test cases (None = all; their pictures cost about a second
            each).

    Example:
        >>> trainer = pl.Trainer(callbacks=[OverlayWriter("runs/x/overlays")])  # doctest: +SKIP
    """

    def __init__(self, dirpath: str | os.PathLike, max_organs: int = 8, max_cases: int | None = None) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.max_organs = check_int(max_organs, "max_organs", 1)
        self.max_cases = None if max_cases is None else check_int(max_cases, "max_cases", 1)
        self._cases: list[dict[str, Any]] = []
        self.pictures: dict[str, Path] = {}  # case -> its picture, lowest mean Dice first (after the test)

    @property
    def partial(self) -> Path:
        """The folder the pictures are drawn into during the test."""
        return self.dirpath.with_name(self.dirpath.name + ".partial")

    def _rank_dir(self, trainer: pl.Trainer) -> Path:
        return self.partial / f"rank{trainer.global_rank}"

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start an empty folder for this rank's pictures (left-overs of a killed test are removed)."""
        self._cases = []
        shutil.rmtree(self._rank_dir(trainer), ignore_errors=True)
        self._rank_dir(trainer).mkdir(parents=True, exist_ok=True)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the case (Dice per class) and draw its picture."""
        prediction = step_prediction(outputs)
        pair = image_and_label(batch)
        if prediction is None or pair is None or is_padding(batch):
            return
        if self.max_cases is not None and len(self._cases) >= self.max_cases:
            return
        image, label = pair
        label = label if label.ndim == 3 else label.reshape(1, *label.shape[-2:])
        prediction = prediction.reshape(label.shape)
        names = list(getattr(pl_module, "class_names", None) or [])
        num_classes = len(names) + 1
        dice = class_dice(prediction, label, num_classes)
        finite = dice[np.isfinite(dice)]
        mean = float(finite.mean()) if finite.size else math.nan
        case = str(batch.get("case", f"case{batch_idx}")) if isinstance(batch, Mapping) else f"case{batch_idx}"
        spacing = batch.get("spacing") if isinstance(batch, Mapping) else None
        spacing = None if spacing is None else [float(v) for v in np.asarray(spacing.cpu()).reshape(-1)]
        spatial_dims = int(getattr(pl_module.hparams, "spatial_dims", 2) or 2)
        shown = display_image(image, tuple(label.shape), spatial_dims)
        label_np, pred_np = label.cpu().numpy(), prediction.cpu().numpy()
        affine = batch.get("affine") if isinstance(batch, Mapping) else None
        if affine is not None and label_np.ndim == 3 and label_np.shape[0] > 1:  # NIfTI: the radiological layout
            axes, flips = radiological(np.asarray(affine.cpu()))
            flipped = [i for i, f in enumerate(flips) if f]
            shown = np.flip(shown.transpose(*axes, *range(3, shown.ndim)), flipped)
            label_np, pred_np = (np.flip(a.transpose(axes), flipped) for a in (label_np, pred_np))
            spacing = None if spacing is None else [spacing[a] for a in axes]
        stem = _file_stem(case)
        fig = plot_case(shown, label_np, pred_np, names, spacing, dice,
                        title=f"{case}: mean Dice {100 * mean:.1f} % (solid: ground truth, dashed: prediction)"
                        if math.isfinite(mean) else case, max_organs=self.max_organs)
        save_figure(fig, self._rank_dir(trainer) / f"{stem}.png")
        self._cases.append({"case": case, "stem": stem, "rank_dir": str(self._rank_dir(trainer)), "mean": mean})

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather the cases of every rank."""
        self._cases = gather_lists(trainer, self._cases)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0: move the pictures into a new ``dirpath``, named by rank (lowest mean Dice first)."""
        if not trainer.is_global_zero:
            return
        order = sorted(self._cases, key=lambda c: (not math.isfinite(c["mean"]),
                                                   c["mean"] if math.isfinite(c["mean"]) else 0.0, c["case"]))
        digits = max(3, len(str(len(order))))
        fresh = self.dirpath.with_name(self.dirpath.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        self.pictures = {}
        for rank, case in enumerate(order, start=1):
            name = f"{rank:0{digits}d}_{case['stem']}.png"
            os.replace(Path(case["rank_dir"]) / f"{case['stem']}.png", fresh / name)
            self.pictures[case["case"]] = self.dirpath / name
        old = self.dirpath.with_name(self.dirpath.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dirpath.exists():
            os.replace(self.dirpath, old)
        os.replace(fresh, self.dirpath)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.partial, ignore_errors=True)
