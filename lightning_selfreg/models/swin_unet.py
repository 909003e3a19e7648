"""SwinUnet (Cao et al. 2022), the transformer backbone of the SelfReg paper, written from its description.

A Swin-T encoder (patch embedding, four stages of shifted-window transformer blocks with patch merging, final
LayerNorm) and a symmetric decoder: ``layers_up[0]`` expands the bottleneck, and every later decoder stage fuses
the mirrored encoder skip (concat + ``Linear(2C, C)``), runs Swin blocks and expands the map 2x (not after the
last stage); ``norm_up``, a final ``patch_size``-times expansion ``up`` and a 1x1 convolution ``output`` give the
logits. Token maps stay ``(B, H, W, C)`` between blocks, so every Swin block's output is channels-last.

Encoder module names follow Microsoft's Swin checkpoints (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``layers.{i}.downsample.reduction``, ``norm``), so :meth:`SwinUnet.load_pretrained` maps an ImageNet Swin-T file
onto the encoder key for key; the decoder is ``layers_up``, ``concat_back_dim``, ``norm_up``, ``up`` (the final
expansion, producing ``F_final``) and ``output`` (the 1x1 head).

SelfReg taps at the paper's configuration (224x224 input; ``docs/method.md`` §4), all channels-last (listed in
``tap_spec.nhwc``) and captured as ``(B, C, H, W)``:

============================================  ==================  ==================================
module                                        output (C x H x W)  SelfReg role
============================================  ==================  ==================================
``layers.0.blocks.0`` / ``.1``                96 x 56 x 56        encoder first / last block
``layers.1.blocks.0`` / ``.1``                192 x 28 x 28       encoder first / last block
``layers.2.blocks.0`` / ``.1``                384 x 14 x 14       encoder first / last block
``layers.3.blocks.0`` / ``.1``                768 x 7 x 7         encoder first / last block
``layers_up.1.blocks.0`` / ``.1``             384 x 14 x 14       decoder first / last block
``layers_up.2.blocks.0`` / ``.1``             192 x 28 x 28       decoder first / last block
``layers_up.3.blocks.0`` / ``.1``             96 x 56 x 56        decoder first / last block
``up``                                        96 x 224 x 224      ``F_final`` (teacher)
============================================  ==================  ==================================

The groups are the authors' Swin aggregation (``docs/method.md`` §2, §4): IFD over ``encoder_last``, ``encoder_first``,
``decoder_first`` and ``decoder_last``; SCR over ``last_blocks`` (decoder then encoder last blocks) and
``first_blocks``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_selfreg.selfreg.taps import TapSpec
from lightning_selfreg.utils.checks import SettingError, check_int

__all__ = ["SwinUnet", "swin_unet_tap_spec"]

logger = logging.getLogger(__name__)

# Buffers that Microsoft's checkpoints store but that are derived from the configuration (recomputed here).
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


def swin_unet_tap_spec(depths: Sequence[int]) -> TapSpec:
    """The authors' SwinUnet taps and groups for a SwinUnet with ``depths`` blocks per encoder stage.

    Args:
        depths: Blocks per encoder stage; decoder stage ``k`` (``1 <= k < len(depths)``) has
            ``depths[len(depths) - 1 - k]`` blocks.

    Returns:
        IFD groups ``encoder_last``, ``encoder_first``, ``decoder_first``, ``decoder_last``; SCR groups
        ``last_blocks`` (decoder last blocks, then encoder last blocks) and ``first_blocks``; ``final="up"``; every
        tap channels-last.
    """
    n = len(depths)
    enc_first = [f"layers.{i}.blocks.0" for i in range(n)]
    enc_last = [f"layers.{i}.blocks.{depths[i] - 1}" for i in range(n)]
    dec_first = [f"layers_up.{k}.blocks.0" for k in range(1, n)]
    dec_last = [f"layers_up.{k}.blocks.{depths[n - 1 - k] - 1}" for k in range(1, n)]
    ifd = {"encoder_last": enc_last, "encoder_first": enc_first, "decoder_first": dec_first, "decoder_last": dec_last}
    scr = {"last_blocks": [*dec_last, *enc_last], "first_blocks": [*dec_first, *enc_first]}
    blocks = dict.fromkeys([*enc_first, *enc_last, *dec_first, *dec_last])
    return TapSpec(final="up", ifd_groups=ifd, scr_groups=scr, nhwc=(*blocks, "up"))


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of a whole sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Drop ``x`` (B, ...) per sample and rescale the kept ones by ``1 / (1 - p)``."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Show the drop probability."""
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last dimension."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim) -> (..., dim)``."""
        return self.fc2(self.act(self.fc1(x)))


def _relative_position_index(window: int) -> Tensor:
    """``(window**2, window**2)`` index into a ``((2 window - 1)**2, heads)`` relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, N, N), each in [0, 2 window - 2]
    return rel[0] * (2 * window - 1) + rel[1]


def _to_windows(x: Tensor, window: int) -> Tensor:
    """``(B, H, W, C) -> (B * H/window * W/window, window**2, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _from_windows(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_to_windows`: ``(B * nW, window**2, C) -> (B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def _shift_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """Additive attention mask ``(nW, N, N)`` of shifted windows: ``-100`` between tokens of different regions.

    After the cyclic shift, a window at the map's bottom/right border holds tokens from up to four regions that
    are not neighbours in the image; attention between them is masked.
    """
    region = torch.zeros(1, h, w, 1)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = label
            label += 1
    windows = _to_windows(region, window).squeeze(-1)  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: Token channels.
        window: Window side.
        num_heads: Attention heads (``dim`` must be divisible by it).
        qkv_bias: Bias in the query/key/value projection.
    """

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        Args:
            x: ``(B * nW, N, C)`` tokens of ``nW`` windows of ``N`` tokens per image.
            mask: ``(nW, N, N)`` additive mask, or ``None``.

        Returns:
            ``(B * nW, N, C)``.
        """
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Swin transformer block on a ``(B, H, W, C)`` map: (shifted) window attention and an MLP, pre-norm residuals.

    As in Swin, a map not larger than the window is attended as one window and never shifted.

    Args:
        dim: Channels.
        resolution: ``(H, W)`` of the map (fixed: the shift mask is built for it).
        num_heads: Attention heads.
        window: Window side.
        shift: Cyclic shift of the windows (``window // 2`` on odd blocks, 0 otherwise).
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: Bias in the query/key/value projection.
        drop_path: Stochastic depth probability of both residual branches.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = _shift_mask(*resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        _, h, w, _ = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = _from_windows(self.attn(_to_windows(y, self.window), self.attn_mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution and LayerNorm: ``(B, C_in, H, W) -> (B, H/p, W/p, dim)``."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Embed patches; the output is channels-last."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (Swin's order), LayerNorm, ``Linear(4C, 2C)``: halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B, H/2, W/2, 2C)``."""
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """``Linear(C, s*s*C/d)``, pixel shuffle by ``s`` and LayerNorm: ``(B, H, W, C) -> (B, sH, sW, C/d)``.

    Args:
        dim: Input channels ``C``.
        scale: Up-sampling factor ``s``.
        out_dim: Output channels (``C // 2`` for the 2x decoder expansions, ``C`` for the final one).
    """

    def __init__(self, dim: int, scale: int, out_dim: int) -> None:
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Expand a channels-last map."""
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, self.out_dim).transpose(2, 3).reshape(b, h * s, w * s, self.out_dim)
        return self.norm(x)


class SwinStage(nn.Module):
    """Swin blocks (alternating plain and shifted windows), then an optional down- or up-sampling module."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float], downsample: bool = False,
                 upsample: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio, qkv_bias,
                      drop_path[j])
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.upsample = PatchExpand(dim, 2, dim // 2) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` through the blocks and the optional resampling."""
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise SettingError(name, f"`{name}` must be a positive integer or a pair of them, found {value!r}.")
    return pair


class SwinUnet(nn.Module):
    """SwinUnet: Swin-T encoder, symmetric Swin decoder with skip fusion, 1x1 head; ``forward`` returns logits.

    The defaults are the paper's configuration (Swin-T, 224x224, 27.2M parameters with 9 classes). The network
    is built for one input size: the shifted-window masks depend on it. A 1-channel input is repeated to the
    channels of the patch embedding, as the authors do for CT slices with the 3-channel ImageNet weights: a
    grey-scale network (``in_chans=1``) keeps the 3-channel embedding, so :meth:`load_pretrained` fills it.

    Args:
        img_size: Input side (or ``(H, W)``). After the ``patch_size`` embedding the token map is halved
            ``len(depths) - 1`` times, and at every stage it must be divisible by ``window_size`` (a stage map not
            larger than the window is one window): 224, 448, ... with the defaults.
        patch_size: Patch side of the embedding, and the factor of the final expansion.
        in_chans: Input channels. 1 (grey-scale) keeps the 3-channel patch embedding of the ImageNet weights
            (:attr:`embed_chans`) and repeats the input to 3 channels; any other value is the embedding's. A
            1-channel input is accepted by every network (repeated), so the network declares no ``in_channels``
            for :class:`~lightning_selfreg.SelfRegSegModule` to check data against: its own input check
            names a wrong channel count on the first batch.
        num_classes: Output classes (background included).
        embed_dim: Channels of the first stage; stage ``i`` has ``embed_dim * 2**i``.
        depths: Swin blocks per encoder stage (the decoder mirrors them).
        num_heads: Attention heads per encoder stage (the decoder mirrors them).
        window_size: Attention window side.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: Bias in the query/key/value projections.
        drop_path_rate: Stochastic depth of the deepest block; it increases linearly from 0 over the encoder
            blocks, and each decoder stage uses the rates of its mirrored encoder stage.
        pretrained: Path of a local ImageNet Swin checkpoint loaded at the end of construction (see
            :meth:`load_pretrained`; nothing is downloaded), or None for a random initialisation.

    Shape:
        - Input: ``(B, in_chans, *img_size)`` or ``(B, 1, *img_size)``.
        - Output: ``(B, num_classes, *img_size)``.

    Raises:
        ValueError: On an inconsistent configuration (the message names the argument and a valid ``img_size``).

    Example:
        >>> net = SwinUnet(img_size=32, patch_size=2, num_classes=3, embed_dim=12, num_heads=(1, 2, 4, 8),
        ...                window_size=4)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 9,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.2,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("patch_size", patch_size, 1), ("in_chans", in_chans, 1),
                                 ("num_classes", num_classes, 2), ("embed_dim", embed_dim, 1),
                                 ("window_size", window_size, 1)):
            check_int(value, name, low)
        depths, num_heads = tuple(depths), tuple(num_heads)
        n = len(depths)
        if n < 2 or not all(isinstance(d, int) and d >= 1 for d in depths):
            raise SettingError("depths", f"`depths` must list at least 2 stages of >= 1 block each, found {depths!r}.")
        if len(num_heads) != n:
            raise SettingError("num_heads", f"`num_heads` must have one entry per stage ({n}), found {num_heads!r}.")
        for i, heads in enumerate(num_heads):
            if not isinstance(heads, int) or heads < 1 or (embed_dim * 2**i) % heads:
                raise SettingError(
                    "num_heads",
                    f"`num_heads[{i}]` ({heads!r}) must divide the stage width embed_dim * 2**{i} = "
                    f"{embed_dim * 2**i}.",
                )
        if not 0.0 <= drop_path_rate < 1.0:
            raise SettingError("drop_path_rate", f"`drop_path_rate` must be in [0, 1), found {drop_path_rate!r}.")
        self.img_size = _pair(img_size, "img_size")
        resolutions = self._stage_resolutions(self.img_size, patch_size, window_size, n)
        self.patch_size, self.in_chans, self.num_classes = patch_size, in_chans, num_classes
        self.embed_chans = 3 if in_chans == 1 else in_chans  # grey-scale keeps the ImageNet (RGB) embedding
        self.depths, self.num_heads = depths, num_heads
        dims = [embed_dim * 2**i for i in range(n)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stage_rates = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(n)]
        common = dict(window=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)

        self.patch_embed = PatchEmbed(patch_size, self.embed_chans, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(dims[i], resolutions[i], depths[i], num_heads[i], drop_path=stage_rates[i],
                      downsample=i < n - 1, **common)
            for i in range(n)
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.layers_up = nn.ModuleList([PatchExpand(dims[-1], 2, dims[-1] // 2)])
        self.concat_back_dim = nn.ModuleList([nn.Identity()])
        for k in range(1, n):
            i = n - 1 - k  # mirrored encoder stage
            self.concat_back_dim.append(nn.Linear(2 * dims[i], dims[i]))
            self.layers_up.append(
                SwinStage(dims[i], resolutions[i], depths[i], num_heads[i], drop_path=stage_rates[i],
                          upsample=k < n - 1, **common)
            )
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = PatchExpand(embed_dim, patch_size, embed_dim)
        self.output = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                nn.init.normal_(module.relative_position_bias_table, std=0.02)
        self.tap_spec = swin_unet_tap_spec(depths)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    @staticmethod
    def _stage_resolutions(img: tuple[int, int], patch: int, window: int, n: int) -> list[tuple[int, int]]:
        unit = patch * window * 2 ** (n - 1)
        hint = f"use a multiple of patch_size * window_size * 2**(len(depths) - 1) = {unit}, e.g. " + (
            f"img_size={math.ceil(max(img) / unit) * unit}"
        )
        if img[0] % patch or img[1] % patch:
            raise SettingError("img_size", f"`img_size` {img} is not divisible by patch_size={patch}; {hint}.")
        resolutions = []
        h, w = img[0] // patch, img[1] // patch
        for i in range(n):
            win = min(window, h, w)
            if i > 0 and (h * 2 != resolutions[-1][0] or w * 2 != resolutions[-1][1]):
                raise SettingError(
                    "img_size", f"`img_size` {img}: the token map of stage {i - 1} ({resolutions[-1]}) cannot be "
                    f"halved by patch merging; {hint}."
                )
            if h % win or w % win:
                raise SettingError(
                    "img_size", f"`img_size` {img}: the token map of stage {i} ({h}, {w}) is not divisible by the "
                    f"window ({win}); {hint}."
                )
            resolutions.append((h, w))
            h, w = h // 2, w // 2
        return resolutions

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Swin's trunc_normal(std=0.02) truncates at +-2 (absolute), i.e. at 100 std: a plain normal, cheaper.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size or x.shape[1] not in (1, self.in_chans):
            raise ValueError(
                f"SwinUnet expects input (B, {self.in_chans} or 1, {self.img_size[0]}, {self.img_size[1]}), found "
                f"{tuple(x.shape)}. Resize the input to {self.img_size} (SelfRegSegModule(input_size=...)) or build "
                "the model with another `img_size`."
            )
        if x.shape[1] != self.embed_chans:
            x = x.expand(-1, self.embed_chans, -1, -1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes, H, W)`` in train and eval mode alike."""
        x = self.patch_embed(self._check_input(x))
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        x = self.norm(x)
        n = len(self.layers)
        for k, layer_up in enumerate(self.layers_up):
            if k > 0:
                x = self.concat_back_dim[k](torch.cat([x, skips[n - 1 - k]], dim=-1))
            x = layer_up(x)
        x = self.up(self.norm_up(x))  # F_final, (B, H, W, embed_dim)
        return self.output(x.permute(0, 3, 1, 2))

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        """Load a local ImageNet Swin checkpoint into the encoder and, mirrored, into the decoder.

        The file is Microsoft's format (a dict whose ``"model"`` entry is the state dict; a bare state dict is
        accepted too). As in the SelfReg/Swin-Unet code, every ``layers.{i}.*`` tensor is also copied to the
        mirrored decoder stage ``layers_up.{n-1-i}.*``; tensors whose shape does not match the model are skipped,
        and the rest is loaded non-strictly. Buffers derived from the configuration (``relative_position_index``,
        ``attn_mask``) are ignored. Nothing is downloaded.

        Args:
            path: Checkpoint file (e.g. ``swin_tiny_patch4_window7_224.pth``).

        Returns:
            ``{"loaded", "skipped_shape", "missing", "unexpected"}``: lists of state-dict keys (``missing``: model
            keys the file did not provide; ``unexpected``: file keys the model does not have).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Pretrained checkpoint {str(path)!r} not found (nothing is downloaded).")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} holds no state dict (expected a dict, optionally under 'model').")
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}
        n = len(self.layers)
        for key, value in list(state.items()):
            match = re.match(r"layers\.(\d+)\.(.*)", key)
            if match and int(match[1]) < n:
                state.setdefault(f"layers_up.{n - 1 - int(match[1])}.{match[2]}", value)
        own = self.state_dict()
        report = {
            "loaded": [k for k in state if k in own and state[k].shape == own[k].shape],
            "skipped_shape": [k for k in state if k in own and state[k].shape != own[k].shape],
            "missing": [k for k in own if k not in state],
            "unexpected": [k for k in state if k not in own],
        }
        self.load_state_dict({k: state[k] for k in report["loaded"]}, strict=False)
        logger.info(
            "SwinUnet: loaded %d tensors from %s (%d skipped for shape, %d missing, %d unexpected).",
            len(report["loaded"]), path, len(report["skipped_shape"]), len(report["missing"]),
            len(report["unexpected"]),
        )
        return report
