"""Per-sample CPU augmentation of 2D training samples: the paper's albumentations pipeline; seeding a transform.

A per-sample transform is a :data:`PairTransform` ``f(image, label[, seed]) -> (image, label)``. The training
dataset gives it each sample's seed (``derive_seed(seed, epoch, index)``, see
:class:`~lightning_selfreg.data.sampling.SampleKey`): as ``seed=`` when it takes one (:func:`accepts_seed`),
otherwise through the global RNGs seeded for that call (:func:`call_with_global_rngs_seeded`). The batched
on-device augmentation is :class:`~lightning_selfreg.data.transforms.RandomAffine`.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_selfreg.utils.rng import seeded_rngs

__all__ = ["PairTransform", "accepts_seed", "call_with_global_rngs_seeded", "paper_augmentation"]

#: ``f(image (H, W[, C]) float32, label (H, W) int) -> (image, label)``, optionally with a ``seed`` keyword.
PairTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def accepts_seed(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``seed`` keyword (then it is given each sample's or batch's seed)."""
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def paper_augmentation(image_size: int | Sequence[int], seed: int | None = None) -> PairTransform:
    """The SelfReg/TransUNet training augmentation, with albumentations, followed by the resize to ``image_size``.

    With probability 0.5 a random ``rot90`` (k in 0..3) and a flip along a random axis; otherwise with probability
    0.5 (0.25 overall) a rotation by an angle in [-20, 19] degrees with nearest-neighbour interpolation for image
    and label (as the authors' ``ndimage.rotate(order=0)``); then a resize (image bicubic, label nearest), as the
    authors' ``zoom(order=3 / 0)``.

    Args:
        image_size: Output side or ``(H, W)``.
        seed: Seed of the pipeline's own stream, used by calls without a ``seed`` (``None``: albumentations
            seeds itself, not reproducibly).

    Returns:
        ``f(image (H, W[, C]) float32, label (H, W) int, seed=None) -> (image, label)`` at ``image_size``. With a
        ``seed`` (the training dataset passes each sample's, see :class:`SampleKey`) the draws are re-seeded from
        it first, so the output is a pure function of the inputs and the seed, whichever process calls it.
    """
    import albumentations as A
    import cv2

    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    nearest = cv2.INTER_NEAREST
    pipeline = A.Compose([
        A.OneOf([
            A.Sequential([A.RandomRotate90(p=1), A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)], p=1)], p=0.5),
            A.Rotate(limit=(-20, 19), interpolation=nearest, mask_interpolation=nearest,
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.25),
            A.NoOp(p=0.25),
        ], p=1),
        A.Resize(h, w, interpolation=cv2.INTER_CUBIC, mask_interpolation=nearest),
    ], seed=seed)

    return _SeededAlbumentations(pipeline)


class _SeededAlbumentations:
    """An albumentations pipeline as a ``(image, label, seed=None)`` pair transform (picklable for workers)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if seed is not None:
            # one NumPy and one Python generator shared by every transform of the pipeline: ~70 us, about 3 % of
            # the pipeline at 512 -> 224 px (set_random_seed, a generator pair per transform, costs ~450 us)
            self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.pipeline(image=image, mask=label.astype(np.uint8))
        return out["image"], out["mask"]


def call_with_global_rngs_seeded(fn: Callable, seed: int, *args: Any) -> Any:
    """``fn(*args)`` with the Python, NumPy and torch CPU RNGs seeded from ``seed``, restored afterwards."""
    with seeded_rngs(seed):
        return fn(*args)
