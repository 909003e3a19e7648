"""Callbacks that feed experiment dashboards (Weights & Biases first, any Lightning logger second).

Every callback works with any logger, or none: scalars go through ``pl_module.log`` or ``logger.log_metrics``;
media (segmentation overlays, heat-maps, tables) are logged only to a
:class:`~lightning.pytorch.loggers.WandbLogger` among ``trainer.loggers``. Without one those parts are skipped
(nothing is computed for them), and nothing fails. Media and tables are logged from global rank 0 only.

- :class:`SegmentationPanels`: image / ground truth / prediction overlays (``wandb.Image`` masks) of validation
  slices and of test volumes.
- :class:`RedundancyMonitor`: channel redundancy of each tapped block (paper Fig. 1c) on a fixed batch of
  training images, as scalars and heat-maps, to watch SelfReg lower it.
- :class:`ThroughputMonitor`: training images per second.
- :class:`TestResultsTable`: the per-class test metrics of ``pl_module.test_results`` as a table and summary.
- :func:`log_run_environment`: git commit, library versions and GPU into the run config.
"""

from __future__ import annotations

import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_selfreg.callbacks import SelfReg
from lightning_selfreg.data.transforms import resize_image
from lightning_selfreg.diagnostics import block_correlations, collect_block_features, redundancy_score
from lightning_selfreg.taps import TapSpec

__all__ = [
    "RedundancyMonitor",
    "SegmentationPanels",
    "TestResultsTable",
    "ThroughputMonitor",
    "log_run_environment",
]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, found {value!r}.")
    return value


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """W&B loggers of the trainer, on global rank 0 only (the others must not log media)."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _log_to_wandb(trainer: pl.Trainer, loggers: Sequence[WandbLogger], values: Mapping[str, Any]) -> None:
    for logger in loggers:
        logger.log_metrics(dict(values), step=trainer.global_step)


def _backbone(pl_module: pl.LightningModule) -> torch.nn.Module:
    return getattr(pl_module, "net", pl_module)


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


def _image_and_label(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(image, label)`` from a ``{"image", "label"}`` dict or an ``(image, label, ...)`` sequence."""
    if isinstance(batch, Mapping) and "image" in batch and "label" in batch:
        return batch["image"], batch["label"]
    if isinstance(batch, Sequence) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]):
        return batch[0], batch[1]
    return None


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
        self.every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
        self.num_images = _positive_int(num_images, "num_images")
        self.on_test = on_test
        self._foreground: list[_Panel] = []
        self._background: list[_Panel] = []

    def _reset(self) -> None:
        self._foreground, self._background = [], []

    def _collected(self) -> list[_Panel]:
        return (self._foreground + self._background)[: self.num_images]

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str) -> None:
        panels = self._collected()
        loggers = _wandb_loggers(trainer)
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
        _log_to_wandb(trainer, loggers, {key: images})

    def _add(self, image: Tensor, label: Tensor, pred: Tensor, indices: Sequence[int], captions: Sequence[str],
             foreground: bool) -> None:
        target = self._foreground if foreground else self._background
        for i, caption in zip(indices, captions, strict=True):
            target.append(_Panel(image[i].float().cpu().numpy(), label[i].cpu().numpy(), pred[i].cpu().numpy(),
                                 caption))

    # --- validation -----------------------------------------------------------------------------------------

    def _val_enabled(self, trainer: pl.Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
                and bool(_wandb_loggers(trainer)))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a new set of panels."""
        self._reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep up to ``num_images`` slices of the batch (foreground first) with their predictions."""
        if not self._val_enabled(trainer) or len(self._foreground) >= self.num_images:
            return
        pair = _image_and_label(batch)
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
        if not self.on_test or not _wandb_loggers(trainer):
            return
        self._add_case(trainer, pl_module, outputs, batch, batch_idx)

    def _add_case(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                  batch_idx: int) -> None:
        """Add evenly spaced foreground slices of one whole case (test, or validation in 3D).

        The prediction is the step's ``outputs["prediction"]`` ``(D, H, W)`` at the label's grid when the module
        returns one (:class:`~lightning_selfreg.module.SelfRegSegModule` does), else ``predict_volume`` of the
        chosen slices. The image is shown at the label's grid: a 3D ``(C, D', H', W')`` or slice-wise
        ``(D', C, H', W')`` image at another (preprocessed) grid is sampled at the nearest depth and resized
        in-plane.
        """
        remaining = self.num_images - len(self._foreground)
        pair = _image_and_label(batch)
        if remaining <= 0 or pair is None or pair[0].ndim not in (3, 4):
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
        prediction = outputs.get("prediction") if isinstance(outputs, Mapping) else None
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


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders


def _item_image(item: Any) -> Tensor | None:
    if isinstance(item, Mapping):
        item = item.get("image")
    elif isinstance(item, Sequence) and item:
        item = item[0]
    return item if isinstance(item, Tensor) else None


class RedundancyMonitor(pl.Callback):
    """Log the channel redundancy of every tapped block on a fixed batch of training images.

    At the end of training epoch 0, every ``every_n_epochs``-th epoch after it and the last epoch, the tapped
    blocks are run on the same ``num_images`` training images in eval mode without gradients
    (:func:`~lightning_selfreg.diagnostics.collect_block_features`, with its own hooks, which are removed
    afterwards; the ``SelfReg`` callback's capture is untouched and the train mode is restored). For each block
    the :func:`~lightning_selfreg.diagnostics.channel_correlation` matrix (first ``max_channels`` channels) is
    reduced to its :func:`~lightning_selfreg.diagnostics.redundancy_score`, logged as ``redundancy/<block>`` with
    their mean as ``redundancy/mean`` (through ``pl_module.log``, so any logger records them). With a
    :class:`~lightning.pytorch.loggers.WandbLogger` and matplotlib installed, the heat-maps are logged as one
    image, ``redundancy/heatmaps``. Comparing a SelfReg run with a baseline run shows whether SelfReg lowers the
    redundancy the paper's IFD targets.

    The images are the training dataset's items at evenly spaced indices, read once when training starts (the
    global random states of ``random``, NumPy and torch are restored afterwards, so training draws the same
    numbers as without the monitor; a per-sample augmentation of the dataset is applied to them once, batched
    on-device augmentation is not), or the first training batch when the dataset cannot be indexed.

    Args:
        every_n_epochs: Interval in epochs.
        num_images: Number of training images in the fixed batch.
        max_channels: Channels per block entering the correlation (the first ones).
        taps: Tap spec; ``None`` takes the spec of the trainer's ``SelfReg`` callback if there is one, else
            ``pl_module.net.tap_spec``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[SelfReg(), RedundancyMonitor(every_n_epochs=5)])  # doctest: +SKIP
    """

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4, max_channels: int = 64,
                 taps: TapSpec | Mapping | None = None) -> None:
        super().__init__()
        self.every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
        self.num_images = _positive_int(num_images, "num_images")
        self.max_channels = _positive_int(max_channels, "max_channels")
        self.spec = TapSpec.from_config(taps) if taps is not None else None
        self.images: Tensor | None = None
        self._warned_plot = False

    def _resolve_spec(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TapSpec:
        for callback in trainer.callbacks:
            if isinstance(callback, SelfReg) and callback.spec is not None:
                return callback.spec
        net = _backbone(pl_module)
        spec = getattr(net, "tap_spec", None)
        if spec is None:
            raise ValueError(
                f"RedundancyMonitor got no `taps`, found no SelfReg callback and the backbone {type(net).__name__} has "
                "no `tap_spec` attribute. Pass RedundancyMonitor(taps={'encoder': [...], 'decoder': [...], "
                "'final': ...})."
            )
        return TapSpec.from_config(spec)

    def _dataset_images(self, trainer: pl.Trainer) -> Tensor | None:
        loader = _first_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        try:
            n = len(dataset)
            if n == 0:
                return None
            indices = torch.linspace(0, n - 1, min(self.num_images, n)).round().long().unique().tolist()
            images = [_item_image(dataset[i]) for i in indices]
        except (TypeError, KeyError, IndexError, NotImplementedError):
            return None
        finally:  # a per-sample augmentation drawing from the global generators must not shift training's draws
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
        if any(image is None for image in images):
            return None
        return torch.stack([image.detach().cpu() for image in images])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the tap spec and pick the fixed images."""
        if self.spec is None:
            self.spec = self._resolve_spec(trainer, pl_module)
        if self.images is None:
            self.images = self._dataset_images(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Fall back to the first training batch when the dataset could not be indexed."""
        if self.images is None:
            pair = _image_and_label(batch)
            image = pair[0] if pair is not None else batch if isinstance(batch, Tensor) else None
            if image is not None and image.ndim in (4, 5):
                self.images = image[: self.num_images].detach().cpu().clone()

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = (trainer.should_stop or (trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1)
                or (trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step))
        return epoch % self.every_n_epochs == 0 or last

    def compute(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Channel-correlation matrices ``{block: (C', C') CPU tensor}`` of the fixed images.

        Raises:
            RuntimeError: If no images have been picked yet (before training starts).
        """
        if self.images is None or self.spec is None:
            raise RuntimeError("RedundancyMonitor has no images yet; it picks them when training starts.")
        features = collect_block_features(_backbone(pl_module), self.spec, self.images)
        correlations = block_correlations(features, self.max_channels)
        return {block: corr for block, corr in correlations.items() if corr.shape[0] >= 2}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``redundancy/<block>``, ``redundancy/mean`` and, with W&B, ``redundancy/heatmaps``."""
        if self.images is None or not self._due(trainer):
            return
        correlations = self.compute(pl_module)
        if not correlations:
            return
        scores = {block: redundancy_score(corr) for block, corr in correlations.items()}
        for block, score in scores.items():
            pl_module.log(f"redundancy/{block}", score, on_step=False, on_epoch=True)
        pl_module.log("redundancy/mean", sum(scores.values()) / len(scores), on_step=False, on_epoch=True)
        loggers = _wandb_loggers(trainer)
        if loggers:
            heatmap = self._heatmap(correlations, trainer.current_epoch)
            if heatmap is not None:
                _log_to_wandb(trainer, loggers, {"redundancy/heatmaps": heatmap})

    def _heatmap(self, correlations: Mapping[str, Tensor], epoch: int) -> Any:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            from lightning_selfreg.diagnostics import plot_correlation_heatmaps
        except ImportError:
            if not self._warned_plot:
                rank_zero_warn("RedundancyMonitor: matplotlib is not installed, so no heat-maps are logged.")
                self._warned_plot = True
            return None
        import wandb

        fig = plot_correlation_heatmaps(correlations)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        return wandb.Image(pixels, caption=f"channel correlation after epoch {epoch}")


class ThroughputMonitor(pl.Callback):
    """Log training throughput in images per second, measured with ``time.perf_counter``.

    Images are counted with Lightning's ``extract_batch_size`` (the leading dimension of the first tensor in the
    batch). Time runs from the start of each training epoch to its last batch, data loading included, with
    validation runs inside the epoch left out.

    - ``train/images_per_sec``: per epoch (``pl_module.log`` at epoch end, so every logger records it).
    - ``train/images_per_sec_step``: over the last ``trainer.log_every_n_steps`` batches, logged at each step
      (Lightning writes it to the loggers every ``log_every_n_steps`` steps).

    Under DDP every rank counts its own batches and times its own loop; the logged value is the local rate times
    ``trainer.world_size``, i.e. the global rate when the ranks run in step (as DDP's gradient synchronisation
    forces). On a GPU the CUDA queue is not synchronised, so the per-step value may lag by a few steps; the per
    epoch value is exact up to the last step's kernels.
    """

    def __init__(self) -> None:
        super().__init__()
        self._paused_total = 0.0
        self._pause_start: float | None = None
        self._epoch_start = 0.0
        self._last_batch_end: float | None = None
        self._window: deque[tuple[float, int]] = deque()
        self.epoch_images = 0

    def _now(self) -> float:
        return time.perf_counter() - self._paused_total

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch clock."""
        self._epoch_start = self._now()
        self._last_batch_end = None
        self.epoch_images = 0
        self._window = deque([(self._epoch_start, 0)], maxlen=max(1, trainer.log_every_n_steps) + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the batch and log the windowed rate."""
        now = self._now()
        size = extract_batch_size(batch)
        self.epoch_images += size
        self._last_batch_end = now
        self._window.append((now, size))
        elapsed = now - self._window[0][0]
        if elapsed > 0:
            images = sum(n for _, n in list(self._window)[1:])
            pl_module.log("train/images_per_sec_step", images / elapsed * trainer.world_size, on_step=True,
                          on_epoch=False, prog_bar=True, batch_size=size)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop the clock during validation (all times are read on a clock that excludes the pauses)."""
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restart the clock."""
        if self._pause_start is not None:
            self._paused_total += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``train/images_per_sec`` of the epoch."""
        if self._last_batch_end is None or self.epoch_images == 0:
            return
        elapsed = self._last_batch_end - self._epoch_start
        if elapsed > 0:
            rate = self.epoch_images / elapsed * trainer.world_size
            pl_module.log("train/images_per_sec", rate, on_step=False, on_epoch=True)


class TestResultsTable(pl.Callback):
    """Log ``pl_module.test_results`` at the end of testing.

    ``test_results`` is the dict of :class:`~lightning_selfreg.module.SelfRegSegModule`: ``{"num_cases",
    "<metric>_mean", ..., "per_class": {name: {"<metric>": value}}}`` with metrics such as ``dice``, ``iou`` and
    ``hd95``, and None for a class absent from every case.

    - W&B: a ``wandb.Table`` ``test/per_class`` (columns ``class`` and one per metric, e.g. dice, iou, hd95; a last
      row "mean") and the run summary values ``test/num_cases``, ``test/<metric>_mean`` and
      ``test/<metric>/<class>`` (None values are left out of the summary and empty in the table).
    - Any other logger: the same scalars through ``log_metrics``.

    Nothing happens without a logger, on ranks other than 0, or when the module has no ``test_results``.
    """

    __test__ = False  # not a pytest test class despite the name

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the table and the summary values."""
        results = getattr(pl_module, "test_results", None)
        if not trainer.is_global_zero or not trainer.loggers or not isinstance(results, Mapping):
            return
        per_class = results.get("per_class") or {}
        metrics = list(dict.fromkeys(m for values in per_class.values() for m in values))
        scalars = {"test/num_cases": results.get("num_cases")}
        scalars.update({f"test/{m}_mean": results.get(f"{m}_mean") for m in metrics})
        for name, values in per_class.items():
            scalars.update({f"test/{m}/{name}": values.get(m) for m in metrics})
        scalars = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[name, *(values.get(m) for m in metrics)] for name, values in per_class.items()]
                rows.append(["mean", *(results.get(f"{m}_mean") for m in metrics)])
                logger.log_table("test/per_class", columns=["class", *metrics], data=rows, step=trainer.global_step)
                logger.experiment.summary.update(scalars)
            else:
                logger.log_metrics(scalars, step=trainer.global_step)
                logger.save()


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
