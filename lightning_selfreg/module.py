"""``SelfRegSegModule``: a LightningModule for 2D segmentation to which callbacks can add loss terms (SelfReg)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.segmentation import DiceScore

from lightning_selfreg.callbacks import AuxiliaryLoss
from lightning_selfreg.data.transforms import resize_image, resize_label
from lightning_selfreg.io import save_prediction
from lightning_selfreg.losses import DiceCELoss
from lightning_selfreg.metrics import PerCaseMetrics, case_metrics

__all__ = ["SelfRegSegModule"]

OPTIMIZERS = ("sgd", "adam", "adamw")
PROTOCOLS = ("strict", "transunet")
SCHEDULES = ("poly", "cosine", "constant")


class SelfRegSegModule(pl.LightningModule):
    """Train, validate and test a 2D segmentation network; SelfReg is added by the :class:`SelfReg` callback.

    The module owns the segmentation loss (weighted CE + Dice), the optimizer and schedule, per-class Dice on
    validation slices (torchmetrics, DDP-safe) and per-case volume Dice/HD95 on the test set (slice-wise
    inference stitched into the volume, results gathered over ranks). Every callback that subclasses
    :class:`~lightning_selfreg.callbacks.AuxiliaryLoss` contributes its term to the training loss (see
    :meth:`training_step`).

    Override points for your own backbone: pass any ``nn.Module`` that maps ``(B, C, H, W)`` to logits as ``net``
    (give it a ``tap_spec`` or pass ``taps`` to ``SelfReg``); override :meth:`segmentation_loss` for another
    loss, :meth:`configure_optimizers` for another optimizer, :meth:`predict_volume` for another inference.

    Args:
        net: The network; ``forward(x) -> logits``.
        num_classes: Number of classes ``K`` including background.
        class_names: Names of the ``K - 1`` foreground classes (default ``class_1`` ...).
        ce_weight: Cross-entropy weight (0.4 = authors' Synapse recipe).
        dice_weight: Dice weight (0.6 = authors' Synapse recipe).
        optimizer: ``"sgd"`` (momentum, as the authors), ``"adam"`` or ``"adamw"``.
        lr: Base learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay.
        lr_schedule: ``"poly"`` (``lr * (1 - step / total) ** poly_power`` per step), ``"cosine"`` or
            ``"constant"``.
        poly_power: Exponent of the poly schedule.
        input_size: ``(H, W)`` (or one int) the network sees; test volumes' slices are resized to it and the
            logits resized back to the native grid. ``None`` runs at native resolution.
        eval_protocol: The protocol reported as :attr:`test_results` (both are always computed, see
            :meth:`test_step`): ``"strict"`` or ``"transunet"``.
        slice_batch_size: Slices per forward pass in volume inference.
        channels_last: Run the network in ``channels_last`` memory format (faster convolutions under AMP on GPUs
            and with oneDNN on CPUs; leave off for token-based backbones).
        prediction_dir: If set, ``test_step`` writes each case's prediction there (native resolution): volumes as
            ``<case>.nii.gz`` with the volume's spacing, 2D images as ``<case>.png`` (binary masks as 0/255).
        net_config: How to rebuild ``net`` (``{"name": ..., **kwargs}`` for
            :func:`lightning_selfreg.models.create_model`); only stored in the checkpoint's hyper-parameters so
            that ``experiments.predict`` can load it.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ce_weight: float = 0.4,
        dice_weight: float = 0.6,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: str = "poly",
        poly_power: float = 0.9,
        input_size: int | Sequence[int] | None = None,
        eval_protocol: str = "strict",
        slice_batch_size: int = 16,
        channels_last: bool = False,
        prediction_dir: str | None = None,
        net_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, found {optimizer!r}.")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {SCHEDULES}, found {lr_schedule!r}.")
        if eval_protocol not in PROTOCOLS:
            raise ValueError(f"`eval_protocol` must be one of {PROTOCOLS}, found {eval_protocol!r}.")
        class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(1, num_classes)]
        if len(class_names) != num_classes - 1:
            raise ValueError(
                f"`class_names` must name the {num_classes - 1} foreground classes, found {len(class_names)}: "
                f"{class_names}."
            )
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.class_names = class_names
        self.seg_loss = DiceCELoss(num_classes, ce_weight, dice_weight)
        self.val_dice = DiceScore(num_classes, include_background=False, average="none", input_format="index",
                                  aggregation_level="global")
        self.test_metrics = nn.ModuleDict({p: PerCaseMetrics(num_classes, class_names) for p in PROTOCOLS})
        self.test_results: dict[str, Any] | None = None
        self.test_results_by_protocol: dict[str, dict[str, Any]] = {}
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)`` of images ``(B, C, H, W)``."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def segmentation_loss(self, logits: Tensor, label: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Supervised loss; returns ``(total, {name: term})``. Override for another loss."""
        return self.seg_loss(logits, label)

    def _auxiliary_losses(self) -> list[AuxiliaryLoss]:
        trainer = self._trainer
        return [cb for cb in trainer.callbacks if isinstance(cb, AuxiliaryLoss)] if trainer is not None else []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Segmentation loss plus the terms of every :class:`AuxiliaryLoss` callback (e.g. SelfReg).

        The forward pass runs inside each auxiliary callback's :meth:`~AuxiliaryLoss.capture` context; afterwards
        each callback returns ``(weighted term, logs)``; the terms are added to the loss and the logs logged.
        """
        image, label = batch["image"], batch["label"]
        auxiliary = self._auxiliary_losses()
        with ExitStack() as stack:
            for callback in auxiliary:
                stack.enter_context(callback.capture(self))
            logits = self(image)
        loss, logs = self.segmentation_loss(logits, label)
        logs = {f"train/{k}": v for k, v in logs.items()}
        for callback in auxiliary:
            term, callback_logs = callback.auxiliary_loss(self, batch, logits)
            loss = loss + term
            logs.update(callback_logs)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=image.shape[0])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=image.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate per-class Dice over validation slices."""
        logits = self(batch["image"])
        loss, _ = self.segmentation_loss(logits, batch["label"])
        self.val_dice.update(logits.argmax(1), batch["label"].long())
        self.log("val/loss", loss, on_epoch=True, batch_size=batch["image"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/dice`` (mean over foreground classes) and ``val/dice/<class>``."""
        per_class = self.val_dice.compute().reshape(-1)  # 0-d for a single foreground class
        self.val_dice.reset()
        self.log("val/dice", per_class.nanmean(), prog_bar=True)
        self.log_dict({f"val/dice/{name}": value for name, value in zip(self.class_names, per_class, strict=True)})

    @torch.no_grad()
    def _segment(self, volume: Tensor) -> tuple[Tensor, Tensor]:
        """Slice-wise inference: ``(native-resolution prediction, prediction at input size)``, both ``(D, h, w)``.

        The native prediction is the argmax of the logits resized back (bilinear) to the native grid; the other
        is the argmax at the network's input size (what the field's scripts then resize with nearest neighbour).
        """
        if volume.ndim == 3:
            volume = volume[:, None]
        if volume.ndim != 4:
            raise ValueError(f"`volume` must be (D, H, W) or (D, C, H, W), found {tuple(volume.shape)}.")
        native = tuple(volume.shape[-2:])
        size = self.hparams.input_size or native
        full, small = [], []
        was_training = self.training
        self.eval()  # BatchNorm running statistics, also when called directly after fit
        try:
            for chunk in volume.split(self.hparams.slice_batch_size):
                logits = self(resize_image(chunk.to(self.device, torch.float32), size)).float()
                small.append(logits.argmax(1))
                full.append(resize_image(logits, native).argmax(1))
        finally:
            self.train(was_training)
        return torch.cat(full), torch.cat(small)

    def predict_volume(self, volume: Tensor) -> Tensor:
        """Segment a volume slice by slice (or a 2D image as ``D = 1``).

        Slices are resized to ``input_size``, run in chunks of ``slice_batch_size``, and the logits are resized
        back (bilinear) to the native grid before the argmax.

        Args:
            volume: ``(D, H, W)`` or ``(D, C, H, W)`` image volume.

        Returns:
            ``(D, H, W)`` int64 label volume.
        """
        return self._segment(volume)[0]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Per-case metrics of one case under both protocols.

        ``batch`` is one case: ``image`` ``(D, C, H, W)``, ``label`` ``(D, H, W)``, ``case`` name and optional
        ``spacing`` ``(3,)`` in mm; a 2D image has ``D = 1`` and is scored in 2D.

        * ``strict``: the prediction at native resolution, HD95 in mm when the spacing is known, missed or
          spurious organs penalised (see :func:`lightning_selfreg.metrics.case_metrics`).
        * ``transunet``: the field's scripts: volumes predicted at the input size and resized back with nearest
          neighbour, HD95 in voxels with the scripts' special cases (TransUNet); 2D images scored at the input size
          against the nearest-resized mask (UCTransNet).
        """
        label = batch["label"]
        full, small = self._segment(batch["image"])
        num_classes = self.hparams.num_classes
        is_2d = label.shape[0] == 1
        spacing = batch.get("spacing")
        spacing = None if spacing is None else tuple(float(v) for v in np.asarray(spacing.cpu()).reshape(-1))
        if is_2d:
            compat_label = resize_label(label.to(small.device), small.shape[-2:])
            pairs = {"strict": (full[0], label[0], None), "transunet": (small[0], compat_label[0], None)}
        else:
            compat_pred = resize_label(small, label.shape[-2:])
            pairs = {"strict": (full, label, spacing), "transunet": (compat_pred, label, None)}
        for protocol, (pred, gt, sp) in pairs.items():
            dice, hd95 = case_metrics(pred.cpu().numpy(), gt.cpu().numpy(), num_classes, sp, protocol=protocol)
            self.test_metrics[protocol].update(torch.as_tensor(dice), torch.as_tensor(hd95))
        if self.hparams.prediction_dir:
            save_prediction(full.cpu().numpy(), Path(self.hparams.prediction_dir), str(batch.get("case", batch_idx)),
                            spacing, num_classes)

    def on_test_epoch_end(self) -> None:
        """Gather every case over ranks; store :attr:`test_results` (the chosen protocol) and log the means."""
        self.test_results_by_protocol = {p: m.compute() for p, m in self.test_metrics.items()}
        for metric in self.test_metrics.values():
            metric.reset()
        self.test_results = self.test_results_by_protocol[self.hparams.eval_protocol]
        logged = {"test/num_cases": self.test_results["num_cases"]}
        for protocol, results in self.test_results_by_protocol.items():
            for key in ("dice_mean", "iou_mean", "hd95_mean"):
                if results.get(key) is not None:
                    logged[f"test/{protocol}/{key}"] = results[key]
                    if protocol == self.hparams.eval_protocol:
                        logged[f"test/{key}"] = results[key]
        self.log_dict({k: float(v) for k, v in logged.items()})

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Label volume ``(D, H, W)`` for a batch holding one ``image`` volume."""
        return self.predict_volume(batch["image"])

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and the per-step LR schedule chosen in the constructor."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.lr_schedule == "poly":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(0.0, 1.0 - step / total) ** hp.poly_power
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
