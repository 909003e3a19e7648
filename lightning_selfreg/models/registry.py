"""Build a backbone by name: ``create_model("swinunet", in_channels=1, num_classes=9)``.

Every registered backbone comes with its SelfReg ``tap_spec``, so ``SelfReg()`` works without arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lightning_selfreg.models.swin_unet import SwinUnet
from lightning_selfreg.models.third_party import monai_basic_unet, monai_dynunet, monai_swin_unetr, smp_unet
from lightning_selfreg.models.unet import UNet

__all__ = ["create_model", "list_models"]


def _unet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return UNet(in_channels, num_classes, **kwargs)


def _swinunet(
    in_channels: int, num_classes: int, img_size: int = 224, pretrained: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    # SwinUnet(in_chans=1) keeps the 3-channel patch embedding of the ImageNet weights and repeats the input.
    return SwinUnet(img_size=img_size, in_chans=in_channels, num_classes=num_classes,
                    pretrained=None if pretrained is None else str(pretrained), **kwargs)


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": _unet,
    "swinunet": _swinunet,
    "monai-basicunet": monai_basic_unet,
    "monai-dynunet": monai_dynunet,
    "monai-swinunetr": monai_swin_unetr,
    "smp-unet": smp_unet,
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered backbone with its SelfReg ``tap_spec``.

    3D networks are the same names with ``spatial_dims=3`` (every backbone but ``"swinunet"`` and
    ``"smp-unet"`` takes it; default 2).

    ========================  ==========================================================================
    name                      network and main keyword arguments
    ========================  ==========================================================================
    ``"unet"``                :class:`~lightning_selfreg.models.UNet` (``base_channels``, ``depth``,
                              ``spatial_dims``)
    ``"swinunet"``            :class:`~lightning_selfreg.models.SwinUnet` (``img_size`` = the exact input
                              side, 224 by default; ``pretrained`` = path of a local ImageNet Swin
                              checkpoint; ``patch_size``, ``embed_dim``, ``depths``, ``num_heads``,
                              ``window_size``, ``drop_path_rate``). A 1-channel input is repeated to 3.
    ``"monai-basicunet"``     MONAI ``BasicUNet`` (``features``, ``spatial_dims``); needs MONAI
    ``"monai-dynunet"``       MONAI ``DynUNet``, nnU-Net's network (``strides``, ``kernel_size``,
                              ``filters``, ``spatial_dims``); needs MONAI
    ``"monai-swinunetr"``     MONAI ``SwinUNETR`` (``feature_size``, ``depths``, ``spatial_dims``); sides
                              multiple of 32
    ``"smp-unet"``            segmentation_models_pytorch ``Unet`` (``encoder_name`` resnet*/resnext*)
    ========================  ==========================================================================

    Args:
        name: One of :func:`list_models`.
        in_channels: Input channels.
        num_classes: Output classes (background included).
        **kwargs: Passed to the backbone's constructor (see the table).

    Returns:
        The network; ``forward(x)`` returns logits ``(B, num_classes, H, W)`` (``(B, num_classes, D, H, W)`` in 3D).

    Raises:
        KeyError: For an unknown ``name`` (the message lists the available ones).
        ImportError: If the backbone's library is missing (the message has the install command).

    Example:
        >>> net = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=2)
        >>> net.tap_spec.final
        'up2'
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise KeyError(f"Unknown model {name!r}; available models: {', '.join(list_models())}.") from None
    return builder(in_channels, num_classes, **kwargs)
