"""Tensor transforms shared by the data modules and the model's volume inference (batched, device-agnostic)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RandomAffine", "resize_image", "resize_label"]


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

    Each sample gets its own parameters, drawn from the torch RNG (seeded by ``seed_everything``); images are
    sampled bilinearly, labels with nearest neighbour, and out-of-field pixels become 0 (air/background). No
    flips or 90-degree rotations: abdominal anatomy has a fixed orientation and left/right labels depend on it.

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
            raise ValueError(f"`zoom` must be >= 1 (a factor range 1/zoom..zoom), found {zoom}.")
        if not 0 <= p <= 1:
            raise ValueError(f"`p` must be in [0, 1], found {p}.")
        self.degrees, self.zoom, self.shift, self.gain, self.offset, self.p = degrees, zoom, shift, gain, offset, p

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Transform a batch.

        Args:
            image: ``(B, C, H, W)`` float images.
            label: ``(B, H, W)`` integer labels.

        Returns:
            The transformed ``(image, label)`` with the same shapes and dtypes.
        """
        b, device = image.shape[0], image.device

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(b, device=device) * (high - low) + low

        on = (torch.rand(b, device=device) < self.p).float()
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
