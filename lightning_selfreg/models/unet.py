"""The CNN UNet of the SelfReg paper (milesial-style UNet with bilinear up-sampling), written cleanly, in 2D or 3D.

At ``base_channels=64, depth=4`` and a 1-channel 224x224 input it matches the authors' ``UNet_hd`` layer for
layer (17,262,345 parameters with 9 classes) and its SelfReg taps are the paper's (``docs/method.md`` §4):

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

With ``spatial_dims=3`` every layer is its 3D counterpart (3x3x3 convolutions, ``BatchNorm3d``, 2x2x2 max-pooling,
trilinear up-sampling) and the taps are the same modules, with ``(C, D, H, W)`` outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfreg.selfreg.taps import TapSpec
from lightning_selfreg.utils.checks import check_int, check_spatial_dims

__all__ = ["UNet"]


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UPSAMPLE = {2: "bilinear", 3: "trilinear"}


class DoubleConv(nn.Sequential):
    """(3x3 (x3) conv without bias -> BatchNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 spatial_dims: int = 2) -> None:
        mid = mid_channels or out_channels
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        super().__init__(
            conv(in_channels, mid, 3, padding=1, bias=False),
            norm(mid),
            nn.ReLU(inplace=True),
            conv(mid, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 (x2) max-pool then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__(_POOL[spatial_dims](2), DoubleConv(in_channels, out_channels, spatial_dims=spatial_dims))


class Up(nn.Module):
    """Bi/trilinear 2x up-sampling (``align_corners=True``), pad to the skip's size, concat ``[skip, up]``, conv."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.mode = _UPSAMPLE[spatial_dims]
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, spatial_dims)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Fuse ``x`` (B, C1, [d,] h, w) into ``skip`` (B, C2, [D,] H, W); returns (B, out_channels, [D,] H, W)."""
        x = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=True)
        pad: list[int] = []
        for size, have in zip(reversed(skip.shape[2:]), reversed(x.shape[2:]), strict=True):  # last dim first
            diff = size - have
            pad += [diff // 2, diff - diff // 2]
        if any(pad):
            x = F.pad(x, pad)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """UNet with ``depth`` max-pool levels, bi/trilinear decoder and a 1x1 head; ``forward`` returns logits only.

    Submodules are ``inc``, ``down1..down{depth}``, ``up1..up{depth}`` and ``outc``; :attr:`tap_spec` names the
    SelfReg taps (encoder ``down*``, decoder ``up1..up{depth-1}``, ``F_final`` = ``up{depth}``), in 2D and 3D alike.

    Args:
        in_channels: Input channels (1 for CT/MRI).
        num_classes: Output classes (background included).
        base_channels: Width of the first level (64 in the paper; 8-16 for tests and CPU runs).
        depth: Number of down-sampling levels (4 in the paper).
        spatial_dims: 2 (the paper's network) or 3 (``Conv3d``, ``BatchNorm3d``, ``MaxPool3d``, trilinear
            up-sampling; same widths and taps).

    Shape:
        - Input: ``(B, in_channels, H, W)``, or ``(B, in_channels, D, H, W)`` in 3D; the sides need not be multiples
          of ``2**depth`` (skips are padded).
        - Output: ``(B, num_classes, H, W)`` (``(B, num_classes, D, H, W)`` in 3D).

    Raises:
        ValueError: On a bad argument, or in ``forward`` on an input of the wrong rank.

    Example:
        >>> net = UNet(1, 3, base_channels=4, depth=2)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
        >>> UNet(1, 3, base_channels=4, depth=2, spatial_dims=3)(torch.zeros(1, 1, 8, 16, 16)).shape
        torch.Size([1, 3, 8, 16, 16])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 9, base_channels: int = 64, depth: int = 4,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                                 ("base_channels", base_channels, 2), ("depth", depth, 1)):
            check_int(value, name, low)
        check_spatial_dims(spatial_dims)
        self.in_channels = in_channels  # declared, so SelfRegSegModule checks data and batches against it
        self.depth = depth
        self.spatial_dims = spatial_dims
        nd = spatial_dims
        widths = [base_channels * 2**i for i in range(depth)]  # channels of inc, down1, ..., down{depth-1}
        self.inc = DoubleConv(in_channels, widths[0], spatial_dims=nd)
        for i in range(1, depth):
            self.add_module(f"down{i}", Down(widths[i - 1], widths[i], nd))
        self.add_module(f"down{depth}", Down(widths[-1], widths[-1], nd))  # bottleneck: 2*w // 2 with bilinear ups
        for j in range(1, depth + 1):
            skip = widths[depth - j]
            out = base_channels if j == depth else skip // 2
            self.add_module(f"up{j}", Up(2 * skip, out, nd))
        self.outc = _CONV[nd](base_channels, num_classes, kernel_size=1)
        self.tap_spec = TapSpec.unet(
            encoder=[f"down{i}" for i in range(1, depth + 1)],
            decoder=[f"up{j}" for j in range(1, depth)],
            final=f"up{depth}",
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes, [D,] H, W)`` in train and eval mode alike."""
        if x.ndim != self.spatial_dims + 2:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"UNet(spatial_dims={self.spatial_dims}) expects {layout} inputs, found shape {tuple(x.shape)}."
            )
        skips = [self.inc(x)]
        for i in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        y = skips.pop()
        for j in range(1, self.depth + 1):
            y = getattr(self, f"up{j}")(y, skips.pop())
        return self.outc(y)
