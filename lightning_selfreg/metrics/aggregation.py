"""Per-case metrics aggregated: means over cases, then classes (:func:`summarize`, DDP-safe :class:`PerCaseMetrics`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_selfreg.utils.checks import check_num_classes

__all__ = ["PerCaseMetrics", "summarize"]


def _class_means(values: np.ndarray) -> list[float | None]:
    """NaN-ignoring mean of each column of ``(N, K)``; None where a column is all NaN (or empty)."""
    valid = ~np.isnan(values)
    counts = valid.sum(axis=0)
    sums = np.where(valid, values, 0.0).sum(axis=0)
    return [float(s / n) if n else None for s, n in zip(sums, counts, strict=True)]


def summarize(dice: ArrayLike, hd95: ArrayLike, class_names: Sequence[str]) -> dict:
    """Aggregate per-case, per-class metrics: mean over cases per class, then mean over classes.

    NaN entries (e.g. a class absent from both ``pred`` and ``gt`` under the ``"strict"`` protocol) are ignored.
    A class whose column is all NaN gets None and does not enter the class mean.

    Args:
        dice: Dice per case and class, shape ``(N, K)``.
        hd95: HD95 per case and class, shape ``(N, K)``.
        class_names: ``K`` names, one per column (foreground classes).

    Returns:
        ``{"num_cases": int, "dice_mean", "iou_mean", "hd95_mean": float | None,
        "per_class": {name: {"dice", "iou", "hd95": float | None}}}`` with plain Python floats, so the
        result is JSON serialisable (None becomes null). A mean is None if no class has a value.

    Raises:
        ValueError: If the arrays are not 2-D of equal shape or ``class_names`` does not have ``K`` entries.
    """
    d = np.asarray(dice, dtype=np.float64)
    h = np.asarray(hd95, dtype=np.float64)
    if d.ndim != 2 or d.shape != h.shape:
        raise ValueError(
            f"`dice` and `hd95` must be 2-D arrays (N_cases, K) of the same shape, found {d.shape} and {h.shape}."
        )
    names = list(class_names)
    if len(names) != d.shape[1]:
        raise ValueError(f"`class_names` must have K={d.shape[1]} entries (one per column), found {len(names)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` must be unique, found {names}.")
    # per case and class IoU = D / (2 - D): exact for one binary pair, so it needs no extra state
    with np.errstate(invalid="ignore", divide="ignore"):
        j = d / (2.0 - d)
    dice_c, iou_c, hd_c = _class_means(d), _class_means(j), _class_means(h)

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return float(np.mean(present)) if present else None

    return {
        "num_cases": int(d.shape[0]),
        "dice_mean": mean(dice_c),
        "iou_mean": mean(iou_c),
        "hd95_mean": mean(hd_c),
        "per_class": {
            n: {"dice": dv, "iou": jv, "hd95": hv}
            for n, dv, jv, hv in zip(names, dice_c, iou_c, hd_c, strict=True)
        },
    }


class PerCaseMetrics(Metric):
    """Collects per-case Dice / HD95 vectors (from :func:`case_metrics`) and summarises them.

    States are lists reduced by concatenation, so under DDP ``compute()`` sees every case of every rank and the
    means are over cases, never an average of per-rank averages. Each case is stored flattened (1-D states, so
    a rank that saw no case syncs cleanly) and reshaped to ``(N, K)`` in :meth:`compute`. Values are stored as
    float64 (the metric's dtype).

    Note: Lightning's default ``DistributedSampler`` pads the evaluation set by repeating cases so that every rank
    gets the same number; the data modules of this package use an unpadded sampler for the test set so that each
    case is counted exactly once.

    Args:
        num_classes: Number of classes including background (as for :func:`case_metrics`); ``K = num_classes - 1``.
        class_names: ``K`` foreground class names, in label order ``1 .. num_classes - 1``.
        **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``dist_sync_fn``, ``sync_on_compute``).

    Example:
        >>> m = PerCaseMetrics(3, ["a", "b"])
        >>> m.update(torch.tensor([0.5, 1.0]), torch.tensor([2.0, 0.0]))
        >>> m.compute()["dice_mean"]
        0.75
    """

    # The output mixes Dice (higher is better) and HD95 (lower is better): no single direction.
    higher_is_better = None
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, class_names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        check_num_classes(num_classes)
        names = [str(n) for n in class_names]
        if len(names) != num_classes - 1:
            raise ValueError(
                f"`class_names` must name the foreground classes: expected num_classes - 1 = {num_classes - 1} "
                f"names (background excluded), found {len(names)}."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"`class_names` must be unique, found {names}.")
        self.num_classes = int(num_classes)
        self.class_names = names
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        # States are kept in the metric's dtype: torchmetrics fills a rank without cases with an empty tensor of
        # that dtype before all_gather, and every rank must gather tensors of one dtype.
        self.set_dtype(torch.float64)

    def update(self, dice: Tensor | ArrayLike, hd95: Tensor | ArrayLike) -> None:
        """Add one case (shape ``(K,)``) or a batch of cases (shape ``(N, K)``).

        Args:
            dice: Per-class Dice, shape ``(K,)`` or ``(N, K)``; NaN marks a class excluded for that case.
            hd95: Per-class HD95, same shape as ``dice``.

        Raises:
            ValueError: If the shapes differ or the last dimension is not ``K``.
        """
        k = self.num_classes - 1
        d = torch.as_tensor(dice, dtype=self.dtype, device=self.device)
        h = torch.as_tensor(hd95, dtype=self.dtype, device=self.device)
        if d.shape != h.shape or d.ndim not in (1, 2) or d.shape[-1] != k:
            raise ValueError(
                f"`dice` and `hd95` must both have shape ({k},) or (N, {k}), found {tuple(d.shape)} and "
                f"{tuple(h.shape)}."
            )
        self.dice.append(d.reshape(-1))
        self.hd95.append(h.reshape(-1))

    def _stacked(self, state: list[Tensor] | Tensor) -> np.ndarray:
        k = self.num_classes - 1
        if isinstance(state, list) and not state:
            return np.zeros((0, k))
        return dim_zero_cat(state).detach().to("cpu", torch.float64).reshape(-1, k).numpy()

    def compute(self) -> dict:
        """Summarise all cases seen (on all ranks) with :func:`summarize`.

        Returns:
            The :func:`summarize` dict: ``dice_mean``, ``hd95_mean`` and ``per_class``; the means are None when no
            case has been added.
        """
        return summarize(self._stacked(self.dice), self._stacked(self.hd95), self.class_names)
