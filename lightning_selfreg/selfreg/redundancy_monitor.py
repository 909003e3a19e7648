"""``RedundancyMonitor``: the channel redundancy of every tapped block (paper Fig. 1c), as scalars and heat-maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_selfreg.selfreg.callback import SelfReg, _backbone
from lightning_selfreg.selfreg.redundancy import block_correlations, collect_block_features, redundancy_score
from lightning_selfreg.selfreg.taps import TapSpec, resolve_tap_spec
from lightning_selfreg.tracking.wandb_logging import image_and_label, log_to_wandb, wandb_loggers
from lightning_selfreg.utils.checks import SettingError, check_int

__all__ = ["RedundancyMonitor"]


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
    (:func:`~lightning_selfreg.selfreg.redundancy.collect_block_features`, with its own hooks, which are removed
    afterwards; the ``SelfReg`` callback's capture is untouched and the train mode is restored). For each block
    the :func:`~lightning_selfreg.selfreg.redundancy.channel_correlation` matrix (first ``max_channels`` channels) is
    reduced to its :func:`~lightning_selfreg.selfreg.redundancy.redundancy_score`, logged as ``redundancy/<block>`` with
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

    def __init__(self, every_n_epochs: int = 10, num_images: int = 4, max_channels: int = 64,
                 taps: Mapping | TapSpec | None = None) -> None:
        super().__init__()
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", 1)
        self.num_images = check_int(num_images, "num_images", 1)
        self.max_channels = check_int(max_channels, "max_channels", 1)
        try:
            self.spec = TapSpec.from_config(taps) if taps is not None else None
        except (TypeError, ValueError) as err:
            raise SettingError("taps", f"`taps`: {err}") from err
        self.images: Tensor | None = None
        self._warned_plot = False

    def _resolve_spec(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TapSpec:
        """The spec of the trainer's ``SelfReg`` callback if there is one, else the backbone's ``tap_spec``.

        A backbone without a ``tap_spec`` (any ``nn.Module`` given by class path) trained with
        ``SelfReg(taps=...)`` is monitored on the same taps.
        """
        selfreg = next((cb.spec for cb in trainer.callbacks if isinstance(cb, SelfReg) and cb.spec is not None), None)
        return resolve_tap_spec(_backbone(pl_module), selfreg,
                                owner="RedundancyMonitor (no `taps` and no SelfReg callback with a spec)")

    def _dataset_images(self, trainer: pl.Trainer) -> Tensor | None:
        loader = _first_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        # a per-sample augmentation drawing from the global generators must not shift training's draws
        with isolate_rng(include_cuda=False):  # restores on a normal exit: the expected errors are caught inside
            try:
                n = len(dataset)
                indices = torch.linspace(0, n - 1, min(self.num_images, n)).round().long().unique().tolist()
                images = [_item_image(dataset[i]) for i in indices] if n else [None]
            except (TypeError, KeyError, IndexError, NotImplementedError):
                images = [None]
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
            pair = image_and_label(batch)
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
        loggers = wandb_loggers(trainer)
        if loggers:
            heatmap = self._heatmap(correlations, trainer.current_epoch)
            if heatmap is not None:
                log_to_wandb(trainer, loggers, {"redundancy/heatmaps": heatmap})

    def _heatmap(self, correlations: Mapping[str, Tensor], epoch: int) -> Any:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            from lightning_selfreg.selfreg.redundancy import plot_correlation_heatmaps
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
