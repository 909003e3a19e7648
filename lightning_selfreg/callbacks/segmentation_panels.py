"""``SegmentationPanels``: image / ground truth / prediction overlays of validation slices and test cases in W&B."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_selfreg.data.sampling import is_padding
from lightning_selfreg.data.transforms import resize_image
from lightning_selfreg.segmentation.inference import step_prediction
from lightning_selfreg.tracking.wandb_logging import image_and_label, log_to_wandb, wandb_loggers
from lightning_selfreg.utils.checks import check_int

__all__ = ["SegmentationPanels"]


def _class_labels(pl_module: pl.LightningModule, num_classes: int) -> dict[int, str]:
    """``{0: "background", 1: first foreground name, ...}`` from ``pl_module.class_names`` (foreground only)."""
    names = list(getattr(pl_module, "class_names", None) or [])
    num_classes = max(num_classes, len(names) + 1, int(getattr(pl_module.hparams, "num_classes", 0) or 0))
    labels = {0: "background"}
    labels.update({i: names[i - 1] if i - 1 < len(names) else f"class_{i}" for i in range(1, num_classes)})
    return labels


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale one ``(H, W)`` slice or ``(H, W, 3)`` image to ``uint8``."""
    image = np.nan_to_num(image.astype(np.float32))
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (scaled * 255).round().astype(np.uint8)


def _displayable(images: Tensor) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` images to ``(N, H, W)`` (first channel) or ``(N, H, W, 3)`` (RGB)."""
    if images.ndim == 3:
        return images
    return images.permute(0, 2, 3, 1) if images.shape[1] == 3 else images[:, 0]


@dataclass
class _Panel:
    image: np.ndarray  # (H, W) or (H, W, 3) float
    label: np.ndarray  # (H, W) int
    pred: np.ndarray  # (H, W) int
    caption: str


def _spatial_dims(pl_module: pl.LightningModule) -> int:
    """2 for slice-wise networks, 3 for volumetric ones (``hparams.spatial_dims`` of the module, default 2)."""
    return int(getattr(getattr(pl_module, "hparams", None), "spatial_dims", 2) or 2)


class SegmentationPanels(pl.Callback):
    """Log image / ground truth / prediction overlays to W&B (``wandb.Image`` with ``masks``).

    - Validation: every ``every_n_epochs`` epochs (not during the sanity check), up to ``num_images`` validation
      slices, slices with foreground first, under the key ``val/segmentation``. Batches are ``{"image": (B, C, H,
      W), "label": (B, H, W)}`` dicts or ``(image, label)`` pairs; the prediction is ``pl_module(image).argmax(1)``.
    - Test (``on_test=True``): up to ``num_images`` slices that hold foreground, evenly spaced over the
      foreground slices of each test volume (the first volumes fill the quota), under ``test/segmentation``.
      Test batches are whole cases ``(D, C, H, W)`` or ``(D, H, W)`` (a 2D image is ``D = 1``); the prediction
      uses ``pl_module.predict_volume`` when the module has it (the test-time inference, at the native
      resolution). This also covers data without a validation split, such as the bundled sample.

    Images are min-max scaled per slice; 3-channel images are shown in RGB, others by their first channel. Class
    names come from ``pl_module.class_names`` (foreground names; 0 is "background"). Without a
    :class:`~lightning.pytorch.loggers.WandbLogger` the callback does nothing. Under DDP only rank 0's slices are
    shown.

    Args:
        every_n_epochs: Log validation panels every this many epochs.
        num_images: Slices per panel set.
        on_test: Also log panels of the test set.

    Example:
        >>> trainer = pl.Trainer(logger=WandbLogger(), callbacks=[SegmentationPanels(num_images=4)])  # doctest: +SKIP
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, on_test: bool = True) -> None:
        super().__init__()
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", 1)
        self.num_images = check_int(num_images, "num_images", 1)
        self.on_test = on_test
        self._foreground: list[_Panel] = []
        self._background: list[_Panel] = []

    def _reset(self) -> None:
        self._foreground, self._background = [], []

    def _collected(self) -> list[_Panel]:
        return (self._foreground + self._background)[: self.num_images]

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str) -> None:
        panels = self._collected()
        loggers = wandb_loggers(trainer)
        self._reset()
        if not panels or not loggers:
            return
        import wandb

        num_classes = max(int(max(p.label.max(), p.pred.max())) for p in panels) + 1
        class_labels = _class_labels(pl_module, num_classes)
        images = [
            wandb.Image(
                _to_uint8(p.image),
                masks={
                    "predictions": {"mask_data": p.pred.astype(np.uint8), "class_labels": class_labels},
                    "ground_truth": {"mask_data": p.label.astype(np.uint8), "class_labels": class_labels},
                },
                caption=p.caption,
            )
            for p in panels
        ]
        log_to_wandb(trainer, loggers, {key: images})

    def _add(self, image: Tensor, label: Tensor, pred: Tensor, indices: Sequence[int], captions: Sequence[str],
             foreground: bool) -> None:
        target = self._foreground if foreground else self._background
        for i, caption in zip(indices, captions, strict=True):
            target.append(_Panel(image[i].float().cpu().numpy(), label[i].cpu().numpy(), pred[i].cpu().numpy(),
                                 caption))

    # --- validation -----------------------------------------------------------------------------------------

    def _val_enabled(self, trainer: pl.Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
                and bool(wandb_loggers(trainer)))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a new set of panels."""
        self._reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep up to ``num_images`` slices of the batch (foreground first) with their predictions."""
        if not self._val_enabled(trainer) or len(self._foreground) >= self.num_images:
            return
        pair = image_and_label(batch)
        if pair is None:
            return
        if _spatial_dims(pl_module) == 3:  # whole validation cases: show the step's own native-grid prediction
            self._add_case(trainer, pl_module, outputs, batch, batch_idx)
            return
        if pair[0].ndim != 4:
            return
        image, label = pair
        has_fg = label.flatten(1).any(1).tolist()
        fg = [i for i, f in enumerate(has_fg) if f][: self.num_images - len(self._foreground)]
        bg = [i for i, f in enumerate(has_fg) if not f][: max(0, self.num_images - len(self._background))]
        chosen = fg + bg
        if not chosen:
            return
        with torch.no_grad():
            pred = pl_module(image[chosen]).argmax(1)
        image, label = _displayable(image[chosen]), label[chosen]
        position = {i: k for k, i in enumerate(chosen)}
        for indices, is_fg in ((fg, True), (bg, False)):
            rows = [position[i] for i in indices]
            captions = [f"epoch {trainer.current_epoch} batch {batch_idx} item {i}" for i in indices]
            self._add(image, label, pred, rows, captions, is_fg)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the validation panels as ``val/segmentation``."""
        if self._val_enabled(trainer):
            self._log(trainer, pl_module, "val/segmentation")
        self._reset()

    # --- test -----------------------------------------------------------------------------------------------

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a new set of panels."""
        self._reset()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Pick foreground slices of the volume (evenly spaced) and predict them."""
        if not self.on_test or not wandb_loggers(trainer):
            return
        self._add_case(trainer, pl_module, outputs, batch, batch_idx)

    def _add_case(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                  batch_idx: int) -> None:
        """Add evenly spaced foreground slices of one whole case (test, or validation in 3D).

        The prediction is the step's ``outputs["prediction"]`` ``(D, H, W)`` at the label's grid when the module
        returns one (:class:`~lightning_selfreg.SelfRegSegModule` does), else ``predict_volume`` of the
        chosen slices. The image is shown at the label's grid: a 3D ``(C, D', H', W')`` or slice-wise
        ``(D', C, H', W')`` image at another (preprocessed) grid is sampled at the nearest depth and resized
        in-plane. Padding items (``batch["padding"]``, a DDP rank without a case of its own) are skipped.
        """
        remaining = self.num_images - len(self._foreground)
        pair = image_and_label(batch)
        if remaining <= 0 or pair is None or is_padding(batch) or pair[0].ndim not in (3, 4):
            return
        image, label = pair
        if label.ndim == 2:
            label = label[None]
        if _spatial_dims(pl_module) == 3:
            image = image.transpose(0, 1)  # (C, D', H', W') -> (D', C, H', W')
        elif image.ndim == 3:
            image = image[:, None]
        slices = label.flatten(1).any(1).nonzero().flatten()
        if slices.numel() == 0:
            return
        slices = slices[torch.linspace(0, slices.numel() - 1, min(remaining, slices.numel())).round().long()]
        slices = slices.unique().tolist()
        depth = label.shape[0]
        rows = [min(image.shape[0] - 1, int((z + 0.5) * image.shape[0] / depth)) for z in slices]
        shown = image[rows]
        if tuple(shown.shape[-2:]) != tuple(label.shape[-2:]):
            shown = resize_image(shown.float(), tuple(label.shape[-2:]))
        prediction = step_prediction(outputs)
        if prediction is not None:
            pred = prediction.reshape(label.shape)[slices]
        elif tuple(image.shape[-2:]) == tuple(label.shape[-2:]) and image.shape[0] == depth:
            with torch.no_grad():
                if hasattr(pl_module, "predict_volume"):
                    pred = pl_module.predict_volume(image[slices])
                else:
                    pred = pl_module(image[slices].to(pl_module.device, torch.float32)).argmax(1)
        else:
            return  # no prediction at the label's grid to show
        case = batch.get("case", f"volume {batch_idx}") if isinstance(batch, Mapping) else f"volume {batch_idx}"
        captions = [f"{case} slice {z}" for z in slices]
        self._add(_displayable(shown), label[slices], pred, range(len(slices)), captions, True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the test panels as ``test/segmentation``."""
        if self.on_test:
            self._log(trainer, pl_module, "test/segmentation")
        self._reset()
