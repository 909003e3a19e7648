"""``SelfRegSegModule``: a LightningModule for 2D/3D segmentation to which callbacks can add loss terms (SelfReg)."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from numbers import Real
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.segmentation import DiceScore

from lightning_selfreg.data.preprocessing import Preprocessing
from lightning_selfreg.data.sampling import is_padding
from lightning_selfreg.data.transforms import resize_label
from lightning_selfreg.metrics import PROTOCOLS, PerCaseMetrics, Protocol, case_metrics
from lightning_selfreg.segmentation.auxiliary_loss import AuxiliaryLoss
from lightning_selfreg.segmentation.inference import linear_resize_argmax, nearest_resize, segment, sliding_window
from lightning_selfreg.segmentation.loss import DiceCELoss
from lightning_selfreg.utils.checks import SettingError, check_int, check_spatial_dims, label_problem
from lightning_selfreg.utils.imports import MONAI_INSTALL_HINT, require

__all__ = ["SelfRegSegModule"]

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["poly", "cosine", "constant"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def _check_3d_options(spatial_dims: int, roi_size: int | Sequence[int] | None, input_size: Any, sw_batch_size: int,
                      sw_overlap: float) -> None:
    check_spatial_dims(spatial_dims)
    check_int(sw_batch_size, "sw_batch_size", 1)
    if not isinstance(sw_overlap, int | float) or not 0 <= sw_overlap < 1:
        raise SettingError("sw_overlap", f"`sw_overlap` must be in [0, 1), found {sw_overlap!r}.")
    if spatial_dims == 2:
        if roi_size is not None:
            raise SettingError("roi_size", f"`roi_size` is for spatial_dims=3 (sliding window); found "
                               f"roi_size={roi_size!r} in 2D (use `input_size`).")
        return
    if input_size is not None:
        raise SettingError("input_size", f"`input_size` is for spatial_dims=2; in 3D the network runs on `roi_size` "
                           f"windows at the volume's grid (found input_size={input_size!r}).")
    roi = (roi_size,) if isinstance(roi_size, int) else tuple(roi_size) if roi_size is not None else ()
    if roi_size is None or len(roi) not in (1, 3) or not all(isinstance(v, int) and v >= 1 for v in roi):
        raise SettingError(
            "roi_size", f"spatial_dims=3 needs `roi_size`, the sliding window (D, H, W) or one int, found {roi_size!r}."
        )
    require("monai.inferers", "3D (sliding-window) inference", MONAI_INSTALL_HINT)


def _check_optimizer_options(lr: Any, momentum: Any, weight_decay: Any, poly_power: Any) -> None:
    for name, value, low, inclusive in (("lr", lr, 0.0, False), ("poly_power", poly_power, 0.0, False),
                                        ("weight_decay", weight_decay, 0.0, True), ("momentum", momentum, 0.0, True)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or \
                value < low or (value == low and not inclusive):
            raise SettingError(name, f"`{name}` must be a finite number {'>=' if inclusive else '>'} {low:g}"
                                     f"{' and < 1' if name == 'momentum' else ''}, found {value!r}.")
    if momentum >= 1:
        raise SettingError("momentum", f"`momentum` must be a finite number >= 0 and < 1, found {momentum!r}.")


class SelfRegSegModule(pl.LightningModule):
    """Train, validate and test a 2D or 3D segmentation network; SelfReg is added by the :class:`SelfReg` callback.

    The module owns the segmentation loss (weighted CE + Dice), the optimizer and schedule, per-class Dice on
    validation slices (torchmetrics, DDP-safe) and per-case volume Dice/HD95 on the test set (slice-wise
    inference stitched into the volume, or a sliding window in 3D; results gathered over ranks). Every callback
    that subclasses :class:`~lightning_selfreg.callbacks.AuxiliaryLoss` contributes its term to the training loss
    (see :meth:`training_step`).

    Override points for your own backbone: pass any ``nn.Module`` that maps ``(B, C, H, W)`` to logits as ``net``
    (give it a ``tap_spec`` or pass ``taps`` to ``SelfReg``); override :meth:`segmentation_loss` for another
    loss, :meth:`configure_optimizers` for another optimizer, :meth:`forward` for what the network computes.
    Inference itself is one function, :func:`~lightning_selfreg.segmentation.inference.segment`, which the test,
    validation and predict steps and the ``Predictor`` call alike (so they cannot disagree).

    Args:
        net: The network; ``forward(x) -> logits``. Given by class path (LightningCLI), its ``class_path`` /
            ``init_args`` config is stored in the hyper-parameters, so ``load_from_checkpoint(path)`` rebuilds it
            from the checkpoint alone; a network built in Python is stored as weights only (pass ``net=`` to
            ``load_from_checkpoint``). Predictions on disk: :class:`~lightning_selfreg.callbacks.TestPredictionWriter`.
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
        slice_batch_size: Slices per forward pass in volume inference (and output slices per step when logits are
            resampled to another grid).
        channels_last: Run the network in ``channels_last`` memory format (``channels_last_3d`` in 3D; faster
            convolutions under AMP on GPUs and with oneDNN on CPUs; leave off for token-based backbones).
        spatial_dims: 2 (slice-wise network) or 3 (volumetric network: training on ``(B, C, D, H, W)`` patches with
            ``(B, D, H, W)`` labels; validation, test and prediction on whole volumes with MONAI's sliding-window
            inference, see :meth:`predict_volume`). 3D needs MONAI.
        roi_size: 3D only, required there: the sliding window ``(D, H, W)`` (or one int), normally the training patch
            size.
        sw_batch_size: 3D only: windows per forward pass.
        sw_overlap: 3D only: overlap of neighbouring windows, in ``[0, 1)`` (0.5 as nnU-Net); windows are blended
            with Gaussian weights (sigma = 1/8 of the window, as nnU-Net).

    **Preprocessing record.** At :meth:`setup` the module takes the DataModule's
    :class:`~lightning_selfreg.data.preprocessing.Preprocessing` (what it does to raw images: orientation, spacing,
    intensity normalisation with its fitted numbers) as :attr:`preprocessing` and writes it into every checkpoint;
    :class:`~lightning_selfreg.segmentation.predictor.Predictor` applies it to new images and calls the same
    inference (:func:`~lightning_selfreg.segmentation.inference.segment`) as :meth:`test_step`.

    **Native grid.** Evaluation cases may come at a preprocessed grid (resampled images) with labels at the
    native grid: whenever the label's ``(D, H, W)`` differs from the grid the network predicted on, the logits are
    resampled linearly to the label's grid before the argmax (see :meth:`predict_volume`), and ``spacing`` is the
    native one.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ce_weight: float = 0.4,
        dice_weight: float = 0.6,
        optimizer: Optimizer = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: Schedule = "poly",
        poly_power: float = 0.9,
        input_size: int | Sequence[int] | None = None,
        eval_protocol: Protocol = "strict",
        slice_batch_size: int = 16,
        channels_last: bool = False,
        spatial_dims: int = 2,
        roi_size: int | Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.5,
    ) -> None:
        super().__init__()
        _check_3d_options(spatial_dims, roi_size, input_size, sw_batch_size, sw_overlap)
        _check_optimizer_options(lr, momentum, weight_decay, poly_power)
        if optimizer not in OPTIMIZERS:
            raise SettingError("optimizer", f"`optimizer` must be one of {OPTIMIZERS}, found {optimizer!r}.")
        if lr_schedule not in SCHEDULES:
            raise SettingError("lr_schedule", f"`lr_schedule` must be one of {SCHEDULES}, found {lr_schedule!r}.")
        if eval_protocol not in PROTOCOLS:
            raise SettingError("eval_protocol", f"`eval_protocol` must be one of {PROTOCOLS}, found {eval_protocol!r}.")
        class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(1, num_classes)]
        if len(class_names) != num_classes - 1:
            raise SettingError(
                "class_names", f"`class_names` must name the {num_classes - 1} foreground classes, found "
                f"{len(class_names)}: {class_names}."
            )
        self._save_hyperparameters(net)
        self.net = net
        self.class_names = class_names
        self.seg_loss = DiceCELoss(num_classes, ce_weight, dice_weight)
        self.val_dice = DiceScore(num_classes, include_background=False, average="none", input_format="index",
                                  aggregation_level="global")
        # the mean over validation samples (3D: cases), synced at the epoch's end; Lightning's own weighted mean
        # (`self.log(..., sync_dist=True)`) averages the integer sample counts of the ranks and truncates them
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_metrics = nn.ModuleDict({p: PerCaseMetrics(num_classes, class_names) for p in PROTOCOLS})
        self.test_results: dict[str, Any] | None = None
        # what the DataModule does to raw images (set in `setup`, restored from checkpoints), for prediction
        self.preprocessing: Preprocessing | None = None
        self.test_results_by_protocol: dict[str, dict[str, Any]] = {}
        self._checked_stages: set[str] = set()  # stages whose first batch passed _check_first_batch
        # evaluation is sharded by case; with fewer cases than ranks (the bundled sample has one test patient) a
        # rank without one gets a padding item in test / 3D validation, which the steps skip (so it still reaches
        # the metric gathers), and none in prediction (nothing to gather), which needs this:
        self.allow_zero_length_dataloader_with_multiple_devices = True
        if channels_last:
            self.net.to(memory_format=self._memory_format)

    def _save_hyperparameters(self, net: nn.Module) -> None:
        """``save_hyperparameters()`` as documented, with ``net`` stored as its class_path config or not at all.

        Under LightningCLI (``load_from_checkpoint_support``, its default) ``save_hyperparameters`` records the
        parsed configuration, where ``net`` is its ``class_path`` / ``init_args`` config: it is kept, so
        ``load_from_checkpoint(path)`` alone rebuilds the network, without the linked arguments its class does
        not take (the CLI links ``img_size`` to every network, and a UNet would refuse it). A network built in
        Python arrives as the module itself and is dropped: it is stored as weights only (the first call copies
        it once into ``hparams_initial``, the second one replaces that copy).
        """
        with warnings.catch_warnings():  # the advice to ignore an nn.Module is moot: it is dropped just below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        config = self.hparams.pop("net", None)  # `hparams`: where the documentation puts manual updates
        if isinstance(config, Mapping) and isinstance(config.get("init_args"), Mapping):
            parameters = inspect.signature(type(net)).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                config = {**config, "init_args": {k: v for k, v in config["init_args"].items() if k in parameters}}
        if isinstance(config, Mapping):
            self.hparams["net"] = config
        self.save_hyperparameters(dict(self.hparams))  # hparams_initial (what loggers record) = hparams

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.hparams.spatial_dims == 3 else torch.channels_last

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)`` of images ``(B, C, H, W)`` (3D: ``(B, K, D, H, W)`` of ``(B, C, D, H, W)``)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=self._memory_format)
        return self.net(x)

    def segmentation_loss(self, logits: Tensor, label: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Supervised loss; returns ``(total, {name: term})``. Override for another loss."""
        return self.seg_loss(logits, label)

    def _auxiliary_losses(self) -> list[AuxiliaryLoss]:
        trainer = self._trainer
        return [cb for cb in trainer.callbacks if isinstance(cb, AuxiliaryLoss)] if trainer is not None else []

    def _input_channels(self) -> int | None:
        """The input channels the network declares (``net.in_channels``), or None."""
        value = getattr(self.net, "in_channels", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def setup(self, stage: str) -> None:
        """Check the DataModule's ``in_channels`` against the network's; take its preprocessing record.

        A DataModule with a ``preprocessing()`` method (every :class:`~lightning_selfreg.data.SegDataModule`) gives
        the record of what it does to raw images (:class:`~lightning_selfreg.data.preprocessing.Preprocessing`);
        the module keeps it as :attr:`preprocessing` and writes it into every checkpoint, so that
        :class:`~lightning_selfreg.segmentation.predictor.Predictor` preprocesses new images as the training and
        test data were. Also re-arms :meth:`_check_first_batch` for the stage.

        Raises:
            ValueError: The DataModule's channels or dimensionality differ from the network's.
        """
        self._checked_stages = set()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        found, expected = getattr(datamodule, "in_channels", None), self._input_channels()
        if isinstance(found, int) and expected is not None and found != expected:
            raise ValueError(f"`datamodule.in_channels` of {type(datamodule).__name__} is {found}, but the network "
                             f"takes {expected}-channel images (`in_channels`={expected}).")
        make_record = getattr(datamodule, "preprocessing", None)
        if callable(make_record):
            record = make_record()
            if record.spatial_dims != self.hparams.spatial_dims:
                raise ValueError(f"{type(datamodule).__name__} serves data for a {record.spatial_dims}D network, but "
                                 f"the module has spatial_dims={self.hparams.spatial_dims}.")
            if self.preprocessing is not None and self.preprocessing != record:
                rank_zero_warn(f"{type(datamodule).__name__}'s preprocessing ({record.describe()}) differs from the "
                               f"one this module was trained with ({self.preprocessing.describe()}); the DataModule's "
                               "is used from now on and written into new checkpoints.")
            self.preprocessing = record

    def _check_first_batch(self, batch: dict[str, Any], stage: str) -> None:
        """Check the first batch of each stage: image channels against the network, labels in ``[0, K)``.

        Runs once per stage (``"train"``, ``"val"``, ``"test"``; re-armed by :meth:`setup`), so later steps stay
        free of host syncs: the label range costs one sync (min and max) on that first batch. The bundled
        DataModules check every sample as they read it. When the network declares no ``in_channels`` (see
        :meth:`_input_channels`), a one-shot forward pre-hook checks the input of the first convolution the batch
        reaches instead (a mismatch there would fail anyway).

        Raises:
            ValueError: Naming ``batch["image"]`` and ``in_channels``, or ``batch["label"]`` and ``num_classes``.
        """
        if stage in self._checked_stages:
            return
        self._checked_stages.add(stage)
        image, label = batch["image"], batch["label"]
        channel_dim = 0 if stage != "train" and self.hparams.spatial_dims == 3 else 1  # 3D eval: one (C, D, H, W)
        expected = self._input_channels()
        if expected is not None and image.ndim > channel_dim and image.shape[channel_dim] != expected:
            raise ValueError(f"`batch['image']` of the first {stage} batch has {image.shape[channel_dim]} channels "
                             f"(shape {tuple(image.shape)}), but the network takes {expected} (`in_channels`).")
        if expected is None:
            self._check_first_convolution(stage)
        problem = label_problem(label, self.hparams.num_classes)  # the one sync
        if problem is not None:
            raise ValueError(f"`batch['label']` of the first {stage} batch: {problem} "
                             f"(`num_classes`={self.hparams.num_classes}).")

    def _check_first_convolution(self, stage: str) -> None:
        convs = [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
                 and m.in_channels > 0]  # lazy convolutions have 0 until their first call
        handles = []

        def pre_hook(module: nn.Module, args: tuple, name: str) -> None:
            for handle in handles:
                handle.remove()
            x = args[0] if args else None
            if isinstance(x, Tensor) and x.ndim >= 2 and x.shape[1] != module.in_channels:
                raise ValueError(f"`batch['image']` of the first {stage} batch reaches the network's first "
                                 f"convolution `{name}` with {x.shape[1]} channels (shape {tuple(x.shape)}), but it "
                                 f"takes {module.in_channels} (`in_channels`).")

        for name, module in convs:
            handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: pre_hook(mod, args, name)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Segmentation loss plus the terms of every :class:`AuxiliaryLoss` callback (e.g. SelfReg).

        The forward pass runs inside each auxiliary callback's :meth:`~AuxiliaryLoss.capture` context; afterwards
        each callback returns ``(weighted term, logs)``; the terms are added to the loss and the logs logged.
        """
        image, label = batch["image"], batch["label"]
        self._check_first_batch(batch, "train")
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

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        """Accumulate per-class Dice over validation slices (2D) or whole validation cases (3D).

        In 3D ``batch`` is one case as in :meth:`test_step`: the Dice compares the native-grid prediction with the
        native label; ``val/loss`` is the segmentation loss of the blended logits against the label resampled
        (nearest) to the network's grid, and the step returns ``{"prediction": (D, H, W)}`` (native grid) for
        callbacks such as :class:`~lightning_selfreg.callbacks.SegmentationPanels`. A padding item
        (``batch["padding"]``: a DDP rank without a case of its own, see
        :class:`~lightning_selfreg.data.UnpaddedDistributedSampler`) adds nothing to ``val/dice`` and ``val/loss``
        and returns None. Both are logged at the epoch's end (:meth:`on_validation_epoch_end`).
        """
        if is_padding(batch):
            self._skip_padding_case()
            return None
        self._check_first_batch(batch, "val")
        if self.hparams.spatial_dims == 3:
            return self._validate_case(batch)
        logits = self(batch["image"])
        loss, _ = self.segmentation_loss(logits, batch["label"])
        self.val_dice.update(logits.argmax(1), batch["label"].long())
        self.val_loss.update(loss.detach(), weight=batch["image"].shape[0])

    def _validate_case(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        label = batch["label"]
        was_training = self.training
        self.eval()  # BatchNorm running statistics
        try:
            logits = sliding_window(self, batch["image"])
        finally:
            self.train(was_training)
        loss, _ = self.segmentation_loss(logits[None], nearest_resize(label, logits.shape[1:])[None])
        pred, _ = linear_resize_argmax(logits.transpose(0, 1), label.shape, self.hparams.slice_batch_size)
        self.val_dice.update(pred[None], label[None].long())
        self.val_loss.update(loss.detach())
        return {"prediction": pred}

    def _skip_padding_case(self) -> None:
        """Validation on a padding item: an update that adds nothing, so this rank's Dice states sync like the others'.

        ``val_dice`` gets a background-only voxel: 0 added to every class's numerator and denominator (a
        ``DiceScore`` without any update could not gather its 2-D list states). ``val_loss`` needs none.
        """
        background = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=self.device)
        self.val_dice.update(background, background)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/dice`` (mean over foreground classes), ``val/dice/<class>``; gathered over ranks."""
        per_class = self.val_dice.compute().reshape(-1)  # 0-d for a single foreground class
        self.val_dice.reset()
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        self.log("val/dice", per_class.nanmean(), prog_bar=True)
        self.log_dict({f"val/dice/{name}": value for name, value in zip(self.class_names, per_class, strict=True)})

    def _segment(self, volume: Tensor, shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """``(prediction at the target grid (D, H, W), prediction at the network's grid)``; see :func:`segment`."""
        result = segment(self, volume, shape)
        return result.labels, result.small

    def predict_volume(self, volume: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """Segment a volume: slice by slice (2D; a 2D image is ``D = 1``) or with a sliding window (3D).

        2D: slices are resized to ``input_size``, run in chunks of ``slice_batch_size``, and the logits are resized
        back (bilinear) to the native grid before the argmax. 3D: MONAI's ``sliding_window_inference`` at
        ``roi_size`` (``sw_batch_size`` windows per pass, ``sw_overlap``, Gaussian blending) gives the logits at the
        volume's grid. When ``shape`` differs from that grid (a preprocessed image and its native label grid), the
        logits are resampled to ``shape`` by linear interpolation over the three axes (``align_corners=False``,
        ``slice_batch_size`` output slices at a time) before the argmax, as nnU-Net exports its predictions.

        Args:
            volume: ``(D, H, W)`` or ``(D, C, H, W)`` image volume (2D), ``(C, D, H, W)`` (3D).
            shape: The output grid ``(D, H, W)``; ``None`` = the volume's own grid.

        Returns:
            ``(D, H, W)`` int64 label volume.
        """
        return segment(self, volume, shape).labels  # a convenience: the steps call segment() as it does

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        """Per-case metrics of one case under both protocols.

        ``batch`` is one case: ``image`` ``(D, C, H, W)`` (3D: ``(C, D, H, W)``), ``label`` ``(D, H, W)``, ``case``
        name and optional ``spacing`` ``(3,)`` in mm (the label grid's, in array-axis order); a 2D image has
        ``D = 1`` and is scored in 2D. The label may be at another grid than the image (see
        :meth:`predict_volume`).

        * ``strict``: the prediction at native resolution, HD95 in mm when the spacing is known, missed or
          spurious organs penalised (see :func:`lightning_selfreg.metrics.case_metrics`).
        * ``transunet``: the field's scripts: volumes predicted at the input size and resized back with nearest
          neighbour, HD95 in voxels with the scripts' special cases (TransUNet); 2D images scored at the input size
          against the nearest-resized mask (UCTransNet).

        A padding item (``batch["padding"]``: a DDP rank without a case of its own, see
        :class:`~lightning_selfreg.data.UnpaddedDistributedSampler`) is skipped: no inference, no metric update.

        Returns:
            ``{"prediction": (D, H, W)}``, the native-grid label map, for callbacks' ``outputs``
            (:class:`~lightning_selfreg.callbacks.TestPredictionWriter` writes it to disk); None for a padding item.
        """
        if is_padding(batch):
            return None
        label = batch["label"]
        self._check_first_batch(batch, "test")
        full, small = self._segment(batch["image"], label.shape)
        num_classes = self.hparams.num_classes
        is_2d = self.hparams.spatial_dims == 2 and label.shape[0] == 1
        spacing = batch.get("spacing")
        spacing = None if spacing is None else tuple(float(v) for v in np.asarray(spacing.cpu()).reshape(-1))
        if is_2d:
            compat_label = resize_label(label.to(small.device), small.shape[-2:])
            pairs = {"strict": (full[0], label[0], None), "transunet": (small[0], compat_label[0], None)}
        else:
            compat_pred = nearest_resize(small, label.shape)
            pairs = {"strict": (full, label, spacing), "transunet": (compat_pred, label, None)}
        for protocol, (pred, gt, sp) in pairs.items():
            dice, hd95 = case_metrics(pred.cpu().numpy(), gt.cpu().numpy(), num_classes, sp, protocol=protocol)
            self.test_metrics[protocol].update(torch.as_tensor(dice), torch.as_tensor(hd95))
        return {"prediction": full}

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the preprocessing record, and a class_path ``net`` config without its ``pretrained`` file.

        The record (:attr:`preprocessing`, from the DataModule, see :meth:`setup`) goes under
        ``checkpoint["preprocessing"]`` as a plain dict.

        A network given by class path (LightningCLI) is rebuilt from ``hyper_parameters["net"]`` by
        ``load_from_checkpoint``; an initialisation file named there (``SwinUnet(pretrained=...)``) would have to
        exist wherever the checkpoint is loaded, and its weights are overwritten by the state dict anyway.
        """
        if self.preprocessing is not None:
            checkpoint["preprocessing"] = self.preprocessing.to_dict()
        net = (checkpoint.get("hyper_parameters") or {}).get("net")
        init_args = net.get("init_args") if isinstance(net, Mapping) else None
        if isinstance(init_args, Mapping) and init_args.get("pretrained") is not None:
            checkpoint["hyper_parameters"]["net"] = {**net, "init_args": {**init_args, "pretrained": None}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the preprocessing record; keep a stored class_path ``net`` config in :attr:`hparams`.

        The record is taken when the module has none yet (``load_from_checkpoint``; under ``trainer.test(...,
        ckpt_path=...)`` the DataModule's, set in :meth:`setup`, stays). ``load_from_checkpoint`` builds the network
        from the ``net`` config and passes the built module as ``net``, which alone would be stored as weights only,
        so the config is put back into :attr:`hparams`.
        """
        record = checkpoint.get("preprocessing")
        if record is not None and self.preprocessing is None:
            self.preprocessing = Preprocessing.from_dict(record)
        net = (checkpoint.get("hyper_parameters") or {}).get("net")
        if isinstance(net, Mapping) and "net" not in self.hparams:
            self.hparams["net"] = net

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Label volume ``(D, H, W)`` for a batch holding one ``image`` volume.

        The output grid is the ``label``'s when the batch has one, else ``native_shape`` ``(3,)`` when given, else
        the image's own grid.
        """
        shape = batch["label"].shape if "label" in batch else batch.get("native_shape")
        return self.predict_volume(batch["image"], shape)

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
