"""Callbacks that add auxiliary loss terms to :class:`~lightning_selfreg.module.SelfRegSegModule`, and SelfReg.

A Lightning callback cannot change the loss by itself (``on_before_backward`` only sees it), so the module offers
one mechanism: every callback that subclasses :class:`AuxiliaryLoss` is asked, in ``training_step``, for a
context in which the forward pass runs (:meth:`AuxiliaryLoss.capture`) and then for its loss terms
(:meth:`AuxiliaryLoss.auxiliary_loss`), which the module adds to the segmentation loss and logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_selfreg.losses import SelfRegLoss
from lightning_selfreg.taps import FeatureTaps, TapSpec

__all__ = ["AuxiliaryLoss", "FiniteLossGuard", "RNGStateCheckpoint", "SelfReg"]


class AuxiliaryLoss(pl.Callback):
    """Base class for callbacks that contribute loss terms to ``SelfRegSegModule.training_step``.

    Subclasses implement :meth:`auxiliary_loss` and, when they need activations, :meth:`capture`.
    """

    def capture(self, pl_module: pl.LightningModule) -> AbstractContextManager:
        """Context in which the module runs its training forward pass (e.g. to record features)."""
        return nullcontext()

    def auxiliary_loss(self, pl_module: pl.LightningModule, batch: Any, logits: Tensor) -> tuple[Tensor, dict]:
        """Return ``(weighted term, {name: tensor to log})`` for the current training step."""
        raise NotImplementedError


def _backbone(pl_module: nn.Module) -> nn.Module:
    return getattr(pl_module, "net", pl_module)


class SelfReg(AuxiliaryLoss):
    """Switch SelfReg (SCR + IFD) on for a :class:`~lightning_selfreg.module.SelfRegSegModule`.

    Forward hooks are put on the tapped modules of ``pl_module.net`` at setup and removed at teardown; features
    are captured during the training forward pass only.

    Args:
        taps: Tap spec (a :class:`~lightning_selfreg.taps.TapSpec` or its mapping form). ``None`` uses the
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
        taps: TapSpec | Mapping | None = None,
        lambda_scr: float = 0.015,
        lambda_ifd: float = 0.015,
        pairing: str = "random",
        detach_shallow: bool = False,
        warmup_steps: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, found {warmup_steps}.")
        self.spec = TapSpec.from_config(taps) if taps is not None else None
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
        if self.spec is None:
            spec = getattr(net, "tap_spec", None)
            if spec is None:
                raise ValueError(
                    f"SelfReg got no `taps` and the backbone {type(net).__name__} has no `tap_spec` attribute. "
                    "Pass SelfReg(taps={'encoder': [...], 'decoder': [...], 'final': ...}); "
                    "lightning_selfreg.list_tap_candidates(net, input_shape) lists the module paths."
                )
            self.spec = TapSpec.from_config(spec)
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


class FiniteLossGuard(pl.Callback):
    """Stop training with a clear error when the loss or a logged loss term becomes NaN or infinite.

    Checks ``outputs["loss"]`` every ``every_n_steps`` steps (one device-to-host sync each time) and, when it is
    not finite, names the step and every non-finite ``train/*`` and ``selfreg/*`` term logged in that step. The
    exception stops the run before the next checkpoint, so no checkpoint holds the broken weights.

    Args:
        every_n_steps: Check interval in optimizer steps.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1, found {every_n_steps}.")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Raise ``FloatingPointError`` naming the step and the bad terms."""
        step = max(trainer.global_step - 1, 0)  # 0-based index of the step this batch just took
        if step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is None or bool(torch.isfinite(loss).all()):
            return
        bad = sorted(
            name for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "selfreg/")) and isinstance(value, Tensor) and not torch.isfinite(value).all()
        )
        raise FloatingPointError(
            f"Non-finite training loss ({float(loss)}) at step {step} (epoch {trainer.current_epoch}, "
            f"batch {batch_idx}); non-finite terms: {', '.join(bad) or 'none logged'}. Lower the learning rate or "
            "the SelfReg weights, or train in 32-bit precision."
        )


class RNGStateCheckpoint(pl.Callback):
    """Save the Python, NumPy and torch (CPU and CUDA) RNG states in checkpoints and restore them on resume.

    The data pipeline does not need it: its draws derive from ``(seed, epoch, sample index)``
    (:func:`~lightning_selfreg.data.derive_seed`) and the :class:`~lightning_selfreg.data.ResumableDataLoader`
    restores the position in the epoch; SelfReg's pairing has its own generator in its own state. What it covers
    is everything else that draws from the global generators (dropout masks, a user's augmentation or callback),
    so that a resumed run continues them as an uninterrupted run of the same seed would, from an end-of-epoch or
    a mid-epoch checkpoint.
    """

    def state_dict(self) -> dict[str, Any]:
        """The current RNG states."""
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types and tensors only, so checkpoints still load with torch.load(weights_only=True)
        state = {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the RNG states saved by :meth:`state_dict`."""
        import random

        import numpy as np

        random.setstate(state_dict["python"])
        numpy_state = state_dict["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
