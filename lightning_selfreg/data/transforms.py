"""Tensor transforms shared by the data modules and the model's volume inference (batched, device-agnostic).

Also :func:`derive_seed`, the one rule by which every random draw of the data pipeline gets its seed: the
sampler gives each training sample the seed ``derive_seed(seed, epoch, index)``, the per-sample CPU augmentation
draws from it, and the on-device :class:`RandomAffine` draws from ``derive_seed(*seeds of the batch's samples)``.
No draw of the data pipeline touches the global RNGs, so the batches depend on neither the number of workers,
nor the rank count, nor what else (SelfReg, dropout) draws from the global RNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_selfreg.utils.checks import SettingError

__all__ = ["RandomAffine", "default_seed", "derive_seed", "resize_image", "resize_label"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A seed in ``[0, 2**63)`` that is a pure, well-mixed function of the integers ``values`` (in order).

    ``derive_seed(seed, epoch, index)`` is the seed of one training sample; nearby inputs give unrelated seeds
    (SplitMix64 chained over the values), and the result fits an int64 tensor.

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    state = _splitmix64(len(values))
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    return state >> 1


def default_seed() -> int:
    """The run's seed when none is given: Lightning's ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` images (anti-aliased when shrinking); identity at the same size."""
    size = _size(size)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_label(label: Tensor, size: int | Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``(B, H, W)`` integer label maps; identity at the same size."""
    size = _size(size)
    if tuple(label.shape[-2:]) == size:
        return label
    return F.interpolate(label[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(label.dtype)


class RandomAffine:
    """Batched random rotation, isotropic zoom, shift and intensity jitter of image/label pairs, on any device.

    Each sample gets its own parameters. With a ``seed`` (the DataModules pass ``derive_seed`` of the batch's
    sample seeds, so the draws follow from the run's seed, the epoch and the batch's samples) they come from a
    ``torch.Generator`` on the batch's device seeded with it, without a host sync; without one, from the global
    torch RNG. Images are sampled bilinearly, labels with nearest neighbour, and out-of-field pixels become 0
    (air/background). No flips or 90-degree rotations: abdominal anatomy has a fixed orientation and left/right
    labels depend on it.

    Args:
        degrees: Rotation range ``[-degrees, degrees]``.
        zoom: Zoom factors ``exp(U(-log(zoom), log(zoom)))``; 1 disables.
        shift: Translation range as a fraction of the side.
        gain: Intensity multiplier range ``1 +- gain``.
        offset: Intensity offset range ``+- offset``.
        p: Probability that a sample is transformed at all.
    """

    def __init__(
        self,
        degrees: float = 15.0,
        zoom: float = 1.5,
        shift: float = 0.075,
        gain: float = 0.1,
        offset: float = 0.05,
        p: float = 1.0,
    ) -> None:
        if zoom < 1:
            raise SettingError("zoom", f"`zoom` must be >= 1 (a factor range 1/zoom..zoom), found {zoom}.")
        if not 0 <= p <= 1:
            raise SettingError("p", f"`p` must be in [0, 1], found {p}.")
        self.degrees, self.zoom, self.shift, self.gain, self.offset, self.p = degrees, zoom, shift, gain, offset, p

    def __call__(self, image: Tensor, label: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Transform a batch.

        Args:
            image: ``(B, C, H, W)`` float images.
            label: ``(B, H, W)`` integer labels.
            seed: Seed of this batch's draws (an int in ``[0, 2**63)``); ``None`` draws from the global torch RNG.

        Returns:
            The transformed ``(image, label)`` with the same shapes and dtypes.
        """
        b, device = image.shape[0], image.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
        draws = iter(torch.rand(7, b, device=device, generator=generator))  # one draw for all parameters

        def uniform(low: float, high: float) -> Tensor:
            return next(draws) * (high - low) + low

        on = (next(draws) < self.p).float()
        angle = uniform(-self.degrees, self.degrees) * math.pi / 180 * on
        scale = torch.exp(uniform(-math.log(self.zoom), math.log(self.zoom)) * on)
        tx, ty = (uniform(-2 * self.shift, 2 * self.shift) * on for _ in range(2))  # grid units span 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        gain = 1 + uniform(-self.gain, self.gain) * on
        offset = uniform(-self.offset, self.offset) * on
        image = image * gain.view(b, 1, 1, 1) + offset.view(b, 1, 1, 1)
        return image, label[:, 0].round().to(torch.long)
