"""The CNN UNet of the SelfReg paper (milesial-style UNet with bilinear up-sampling), written cleanly.

At ``base_channels=64, depth=4`` and a 1-channel 224x224 input it matches the authors' ``UNet_hd`` layer for
layer (17,262,345 parameters with 9 classes) and its SelfReg taps are the paper's (paper.md §3.1):

==========  ==================  =================
module      output (C x H x W)  SelfReg role
==========  ==================  =================
``down1``   128 x 112 x 112     encoder: IFD, SCR
``down2``   256 x 56 x 56       encoder: IFD, SCR
``down3``   512 x 28 x 28       encoder: IFD, SCR
``down4``   512 x 14 x 14       encoder: IFD, SCR
``up1``     256 x 28 x 28       decoder: IFD, SCR
``up2``     128 x 56 x 56       decoder: IFD, SCR
``up3``     64 x 112 x 112      decoder: IFD, SCR
``up4``     64 x 224 x 224      ``F_final`` (teacher)
==========  ==================  =================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfreg.taps import TapSpec

__all__ = ["UNet"]


class DoubleConv(nn.Sequential):
    """(3x3 conv without bias -> BatchNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Bilinear 2x up-sampling (``align_corners=True``), pad to the skip's size, concat ``[skip, up]``, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Fuse ``x`` (B, C1, h, w) into ``skip`` (B, C2, H, W); returns (B, out_channels, H, W)."""
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """UNet with ``depth`` max-pool levels, bilinear decoder and a 1x1 head; ``forward`` returns logits only.

    Submodules are ``inc``, ``down1..down{depth}``, ``up1..up{depth}`` and ``outc``; :attr:`tap_spec` names the
    SelfReg taps (encoder ``down*``, decoder ``up1..up{depth-1}``, ``F_final`` = ``up{depth}``).

    Args:
        in_channels: Input channels (1 for CT/MRI).
        num_classes: Output classes (background included).
        base_channels: Width of the first level (64 in the paper; 8-16 for tests and CPU runs).
        depth: Number of down-sampling levels (4 in the paper).

    Shape:
        - Input: ``(B, in_channels, H, W)``; H and W need not be multiples of ``2**depth`` (skips are padded).
        - Output: ``(B, num_classes, H, W)``.

    Example:
        >>> net = UNet(1, 3, base_channels=4, depth=2)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 9, base_channels: int = 64, depth: int = 4) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                                 ("base_channels", base_channels, 2), ("depth", depth, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, found {value!r}.")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth)]  # channels of inc, down1, ..., down{depth-1}
        self.inc = DoubleConv(in_channels, widths[0])
        for i in range(1, depth):
            self.add_module(f"down{i}", Down(widths[i - 1], widths[i]))
        self.add_module(f"down{depth}", Down(widths[-1], widths[-1]))  # bottleneck: 2*w // 2 with bilinear ups
        for j in range(1, depth + 1):
            skip = widths[depth - j]
            out = base_channels if j == depth else skip // 2
            self.add_module(f"up{j}", Up(2 * skip, out))
        self.outc = nn.Conv2d(base_channels, num_classes, kernel_size=1)
        self.tap_spec = TapSpec.unet(
            encoder=[f"down{i}" for i in range(1, depth + 1)],
            decoder=[f"up{j}" for j in range(1, depth)],
            final=f"up{depth}",
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes, H, W)`` in train and eval mode alike."""
        skips = [self.inc(x)]
        for i in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        y = skips.pop()
        for j in range(1, self.depth + 1):
            y = getattr(self, f"up{j}")(y, skips.pop())
        return self.outc(y)
