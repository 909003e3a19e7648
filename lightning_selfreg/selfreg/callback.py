"""``SelfReg``: switch SCR + IFD on for a :class:`~lightning_selfreg.SelfRegSegModule` (an ``AuxiliaryLoss``)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_selfreg.segmentation.auxiliary_loss import AuxiliaryLoss
from lightning_selfreg.selfreg.losses import Pairing, SelfRegLoss
from lightning_selfreg.selfreg.taps import FeatureTaps, TapSpec, resolve_tap_spec
from lightning_selfreg.utils.checks import SettingError, check_int

__all__ = ["SelfReg"]


def _backbone(pl_module: nn.Module) -> nn.Module:
    """The network of a module: ``pl_module.net`` when it has one, else the module itself."""
    return getattr(pl_module, "net", pl_module)


class SelfReg(AuxiliaryLoss):
    """Switch SelfReg (SCR + IFD) on for a :class:`~lightning_selfreg.segmentation.module.SelfRegSegModule`.

    Forward hooks are put on the tapped modules of ``pl_module.net`` at setup and removed at teardown; features
    are captured during the training forward pass only. A compiled network works (the hooks are traced into its
    graph); for that the taps turn on Dynamo's guards on module hooks for the process (see
    :class:`~lightning_selfreg.selfreg.taps.FeatureTaps`).

    Args:
        taps: Tap spec (a :class:`~lightning_selfreg.selfreg.taps.TapSpec` or its mapping form). ``None`` uses the
            backbone's own ``tap_spec`` attribute (the bundled backbones have one).
        lambda_scr: SCR weight (paper: lambda_1 = 0.015).
        lambda_ifd: IFD weight (paper: lambda_2 = 0.015).
        pairing: SCR channel pairing, ``"random"`` (authors' code) or ``"ordered"``.
        detach_shallow: IFD stops the gradient through the top-ranked half (paper wording) instead of the code's
            symmetric MSE.
        warmup_steps: Linear ramp of both lambdas from 0 over this many optimizer steps (0 = off).
        seed: Seed of the random channel pairing; ``None`` derives it from ``torch.initial_seed()`` at setup (so
            ``seed_everything`` makes it reproducible). The generator state is saved in checkpoints.

    Example:
        >>> from lightning_selfreg.models import UNet
        >>> cb = SelfReg(lambda_scr=0.015, lambda_ifd=0.015)
        >>> trainer = pl.Trainer(callbacks=[cb], logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        taps: Mapping | TapSpec | None = None,
        lambda_scr: float = 0.015,
        lambda_ifd: float = 0.015,
        pairing: Pairing = "random",
        detach_shallow: bool = False,
        warmup_steps: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_int(warmup_steps, "warmup_steps", 0)
        try:
            self.spec = TapSpec.from_config(taps) if taps is not None else None
        except (TypeError, ValueError) as err:
            raise SettingError("taps", f"`taps`: {err}") from err
        self._loss_kwargs = dict(
            lambda_scr=lambda_scr, lambda_ifd=lambda_ifd, pairing=pairing, detach_shallow=detach_shallow
        )
        SelfRegLoss({}, {}, **self._loss_kwargs)  # validate the options now rather than at setup
        self.loss: SelfRegLoss | None = None
        self.warmup_steps = warmup_steps
        self.seed = seed
        self._taps: FeatureTaps | None = None
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    @property
    def state_key(self) -> str:
        """Checkpoint key; includes the tapped paths so two SelfReg callbacks on different taps do not clash."""
        return self._generate_state_key(taps=None if self.spec is None else self.spec.paths)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the tap spec against the backbone and register the hooks."""
        if self._taps is not None:
            return
        net = _backbone(pl_module)
        self.spec = resolve_tap_spec(net, self.spec, owner="SelfReg (no `taps`)")
        self.loss = SelfRegLoss(self.spec.ifd_groups, self.spec.scr_groups, **self._loss_kwargs)
        self._taps = FeatureTaps(net, self.spec.paths, self.spec.nhwc)
        if self.seed is None:
            self.seed = torch.initial_seed() % 2**63

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    def capture(self, pl_module: pl.LightningModule) -> AbstractContextManager:
        """Record the tapped features during the enclosed forward pass."""
        if self._taps is None:
            raise RuntimeError("SelfReg.capture() was called before setup(); add the callback to the Trainer.")
        return self._taps.capture()

    def lambda_scale(self, step: int) -> float:
        """Warm-up factor in ``[0, 1]`` at optimizer step ``step``."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(int(self.seed))
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def auxiliary_loss(self, pl_module: pl.LightningModule, batch: Any, logits: Tensor) -> tuple[Tensor, dict]:
        """Weighted SCR + IFD of the features captured in this step.

        Logs ``selfreg/scr`` and ``selfreg/ifd`` (unweighted group sums), ``selfreg/total`` (the weighted term) and
        the effective ``selfreg/lambda_scr`` / ``selfreg/lambda_ifd``.
        """
        features = self._taps.pop()
        if self.spec.final not in features:
            raise RuntimeError(
                f"SelfReg captured nothing from {self.spec.final!r}: the training forward pass must run inside "
                "`capture()` and go through the tapped modules."
            )
        final = features[self.spec.final]
        scale = self.lambda_scale(pl_module.global_step)
        total, terms = self.loss(features, final, self._get_generator(final.device), scale)
        logs = {f"selfreg/{k}": v for k, v in terms.items()}
        logs["selfreg/total"] = total.detach()
        logs["selfreg/lambda_scr"] = self.loss.lambda_scr * scale  # effective weights (after any warm-up)
        logs["selfreg/lambda_ifd"] = self.loss.lambda_ifd * scale
        return total, logs

    def state_dict(self) -> dict[str, Any]:
        """Seed and generator state of the channel pairing, so a resumed run continues the same draws."""
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {"seed": self.seed, "generator_state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pairing generator (applied when the generator is created on the features' device)."""
        self.seed = state_dict.get("seed", self.seed)
        self._pending_state = state_dict.get("generator_state")
        self._generator = None
