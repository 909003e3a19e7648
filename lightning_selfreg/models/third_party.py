"""SelfReg tap specs for third-party UNets, and factories that build them with ``tap_spec`` attached.

The networks are used as their libraries ship them, 2D or 3D (``spatial_dims``, the same taps in both); SelfReg only
reads named submodules through hooks:

* MONAI ``BasicUNet``: encoder ``down_1..down_4``, decoder ``upcat_4, upcat_3, upcat_2``, ``F_final`` =
  ``upcat_1`` (the last decoder map, before ``final_conv``); the authors' UNet aggregation.
* MONAI ``DynUNet`` (nnU-Net's network) with ``L`` levels (``len(strides)``): encoder ``downsamples.0..{L-3}`` and
  ``bottleneck``, decoder ``upsamples.0..{L-3}`` (deep to shallow), ``F_final`` = ``upsamples.{L-2}`` (the last
  decoder map, before ``output_block``); the full-resolution ``input_block`` is left out like the paper's ``inc``.
* MONAI ``SwinUNETR``: every Swin block of the four encoder stages
  (``swinViT.layers{1..4}.0.blocks.{j}``, channels-last) and the convolutional decoder stages
  ``decoder5..decoder2``; ``F_final`` = ``decoder1`` (full resolution, before the ``out`` head). Grouped as the
  authors' Swin aggregation, each decoder stage being one block (its first and its last).
* segmentation_models_pytorch ``Unet`` with a ResNet/ResNeXt encoder: ``encoder.layer1..layer4``,
  ``decoder.blocks.0..3``, ``F_final`` = ``decoder.blocks.4`` (for ``encoder_depth=5``).

These are the only place the specs are written: :func:`ready_tap_spec` computes the spec of a network of one of
these classes from the instance (:data:`READY_TAP_SPECS`), and
:func:`~lightning_selfreg.selfreg.taps.resolve_tap_spec` falls back to it, so ``SelfReg()`` needs no arguments
for MONAI's own ``BasicUNet`` built in Python or given by class path (``--backbone monai-basicunet``). Every
factory here also returns the library's own module with that spec attached as ``tap_spec``. MONAI is an optional
dependency (``pip install 'lightning_selfreg[monai]'``); smp needs timm and
torchvision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_selfreg.selfreg.taps import TapSpec
from lightning_selfreg.utils.checks import SettingError, check_spatial_dims
from lightning_selfreg.utils.imports import MONAI_INSTALL_HINT, require

__all__ = [
    "READY_TAP_SPECS",
    "monai_basic_unet",
    "monai_basic_unet_tap_spec",
    "monai_dynunet",
    "monai_dynunet_tap_spec",
    "monai_swin_unetr",
    "monai_swin_unetr_tap_spec",
    "ready_tap_spec",
    "smp_unet",
    "smp_unet_tap_spec",
]

SMP_INSTALL_HINT = "pip install segmentation-models-pytorch  (it needs timm and a torchvision matching your torch)"



def monai_basic_unet_tap_spec() -> TapSpec:
    """Taps of MONAI ``BasicUNet`` (any ``features``): the authors' UNet aggregation.

    Returns:
        IFD groups ``encoder`` (``down_1..down_4``) and ``decoder`` (``upcat_4, upcat_3, upcat_2``), one SCR group of
        all seven, ``final="upcat_1"``.
    """
    return TapSpec.unet(
        encoder=["down_1", "down_2", "down_3", "down_4"], decoder=["upcat_4", "upcat_3", "upcat_2"], final="upcat_1"
    )


def monai_basic_unet(
    in_channels: int, num_classes: int, features: Sequence[int] = (32, 32, 64, 128, 256, 32), spatial_dims: int = 2,
    **kwargs: Any
) -> nn.Module:
    """A MONAI ``BasicUNet`` (2D or 3D) with :func:`monai_basic_unet_tap_spec` attached as ``tap_spec``.

    Args:
        in_channels: Input channels.
        num_classes: Output classes (background included).
        features: The six widths of ``BasicUNet`` (encoder ``conv_0, down_1..down_4``, last decoder stage).
        spatial_dims: 2 (``(B, C, H, W)`` inputs) or 3 (``(B, C, D, H, W)``); the taps are the same modules.
        **kwargs: Further ``BasicUNet`` arguments (``act``, ``norm``, ``dropout``, ``upsample``...).

    Returns:
        ``monai.networks.nets.BasicUNet``; at 224x224 with the default ``features`` the taps are ``down_1`` 32x112x112
        ... ``down_4`` 256x14x14, ``upcat_4`` 128x28x28 ... ``upcat_2`` 32x112x112 and ``F_final`` 32x224x224 (in 3D
        each side is halved per level alike). Inputs whose sides are multiples of 16 keep every map aligned.

    Raises:
        ImportError: If MONAI is not installed (with the install command).
        ValueError: If ``spatial_dims`` is not 2 or 3.
    """
    check_spatial_dims(spatial_dims)
    nets = require("monai.networks.nets", "monai-basicunet backbone", MONAI_INSTALL_HINT)
    net = nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                         features=features, **kwargs)
    net.tap_spec = ready_tap_spec(net)
    return net


def monai_dynunet_tap_spec(num_levels: int = 5) -> TapSpec:
    """Taps of a MONAI ``DynUNet`` with ``num_levels = len(strides)`` levels (2D or 3D): the authors' UNet aggregation.

    ``DynUNet`` runs ``input_block`` (level 0), ``downsamples.0..{L-3}`` (levels 1..L-2), ``bottleneck`` (level
    L-1), then ``upsamples.0`` (deepest) .. ``upsamples.{L-2}`` (level 0, the map ``output_block`` reads). As in the
    paper's UNet (``docs/method.md`` §4) every encoder block below the input block and every decoder block is tapped:

    * IFD groups ``encoder`` = ``downsamples.0..{L-3}, bottleneck`` and ``decoder`` = ``upsamples.0..{L-3}``;
    * one SCR group of all of them, against ``F_final`` = ``upsamples.{L-2}``.

    Args:
        num_levels: ``len(strides)`` of the ``DynUNet`` (at least 3); nnU-Net's 3D plans have 5 to 7.

    Raises:
        ValueError: If ``num_levels`` is not an integer >= 3.
    """
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 3:
        raise SettingError("num_levels", f"`num_levels` (len(strides) of the DynUNet) must be an integer >= 3, found "
                           f"{num_levels!r}.")
    return TapSpec.unet(
        encoder=[*(f"downsamples.{i}" for i in range(num_levels - 2)), "bottleneck"],
        decoder=[f"upsamples.{i}" for i in range(num_levels - 2)],
        final=f"upsamples.{num_levels - 2}",
    )


def monai_dynunet(
    in_channels: int, num_classes: int, spatial_dims: int = 2, strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2),
    kernel_size: Sequence[int | Sequence[int]] | None = None,
    upsample_kernel_size: Sequence[int | Sequence[int]] | None = None, **kwargs: Any
) -> nn.Module:
    """A MONAI ``DynUNet`` (nnU-Net's network; 2D or 3D) with :func:`monai_dynunet_tap_spec` attached as ``tap_spec``.

    Args:
        in_channels: Input channels.
        num_classes: Output classes (background included).
        spatial_dims: 2 (``(B, C, H, W)`` inputs) or 3 (``(B, C, D, H, W)``).
        strides: Per-level strides (``int`` or one per axis, e.g. ``(1, 2, 2)`` for an anisotropic level);
            ``strides[0]`` should be 1 so that the output is at the input's resolution.
        kernel_size: Per-level kernel sizes; ``None`` = 3 at every level.
        upsample_kernel_size: Transposed-convolution kernels of the ``L - 1`` decoder levels; ``None`` =
            ``strides[1:]`` (as nnU-Net).
        **kwargs: Further ``DynUNet`` arguments (``filters``, ``norm_name``, ``act_name``, ``res_block``,
            ``dropout``...). ``deep_supervision`` is not supported (the module trains on one logits map).

    Returns:
        ``monai.networks.nets.DynUNet``; with the default strides input sides should be multiples of 16. The taps
        of level ``l`` have ``filters[l]`` channels at ``1 / prod(strides[:l+1])`` of the input (MONAI's default
        ``filters`` are 32, 64, 128, 256, 320 in 3D and 32 ... 512 in 2D).

    Raises:
        ImportError: If MONAI is not installed (with the install command).
        ValueError: If ``spatial_dims`` is not 2 or 3, or ``deep_supervision=True`` is asked for.
    """
    check_spatial_dims(spatial_dims)
    if kwargs.get("deep_supervision"):
        raise SettingError(
            "deep_supervision", "`deep_supervision=True` is not supported: SelfRegSegModule trains on one logits map, "
            "and DynUNet's deep-supervision output stacks the heads."
        )
    nets = require("monai.networks.nets", "monai-dynunet backbone", MONAI_INSTALL_HINT)
    strides = list(strides)
    kernel_size = [3] * len(strides) if kernel_size is None else list(kernel_size)
    upsample_kernel_size = strides[1:] if upsample_kernel_size is None else list(upsample_kernel_size)
    net = nets.DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                       kernel_size=kernel_size, strides=strides, upsample_kernel_size=upsample_kernel_size, **kwargs)
    net.tap_spec = ready_tap_spec(net)
    return net


def monai_swin_unetr_tap_spec(depths: Sequence[int] = (2, 2, 2, 2)) -> TapSpec:
    """Taps of a MONAI ``SwinUNETR`` (2D or 3D) with ``depths`` Swin blocks per encoder stage.

    The authors' Swin aggregation (``docs/method.md`` §2, §4) with SwinUNETR's one-block convolutional decoder stages
    (``decoder5`` at 1/16 of the input ... ``decoder2`` at 1/2): IFD over ``encoder_last``, ``encoder_first``,
    ``decoder_first`` and ``decoder_last`` (the two decoder groups hold the same four stages), SCR over
    ``last_blocks`` and ``first_blocks`` (decoder stages, then the encoder's last / first blocks). ``F_final`` is
    ``decoder1``, the full-resolution map before the ``out`` head (SCR needs the spatially largest map).

    Args:
        depths: ``SwinUNETR(depths=...)``, four stages.

    Raises:
        ValueError: If ``depths`` does not list four stages of at least one block.
    """
    depths = tuple(depths)
    if len(depths) != 4 or not all(isinstance(d, int) and d >= 1 for d in depths):
        raise SettingError("depths", f"`depths` must list the 4 SwinUNETR stages (>= 1 block each), found {depths!r}.")
    enc_first = [f"swinViT.layers{i + 1}.0.blocks.0" for i in range(4)]
    enc_last = [f"swinViT.layers{i + 1}.0.blocks.{d - 1}" for i, d in enumerate(depths)]
    decoder = ["decoder5", "decoder4", "decoder3", "decoder2"]
    return TapSpec(
        final="decoder1",
        ifd_groups={"encoder_last": enc_last, "encoder_first": enc_first, "decoder_first": decoder,
                    "decoder_last": decoder},
        scr_groups={"last_blocks": [*decoder, *enc_last], "first_blocks": [*decoder, *enc_first]},
        nhwc=tuple(dict.fromkeys([*enc_first, *enc_last])),
    )


def monai_swin_unetr(
    in_channels: int, num_classes: int, feature_size: int = 24, depths: Sequence[int] = (2, 2, 2, 2),
    spatial_dims: int = 2, **kwargs: Any
) -> nn.Module:
    """A MONAI ``SwinUNETR`` (2D or 3D) with :func:`monai_swin_unetr_tap_spec` attached as ``tap_spec``.

    Args:
        in_channels: Input channels.
        num_classes: Output classes (background included).
        feature_size: Width of the first stage (a multiple of 12); stage ``i`` has ``feature_size * 2**i``.
        depths: Swin blocks per encoder stage.
        spatial_dims: 2 or 3; in 3D the Swin blocks output ``(B, D, H, W, C)`` (permuted by the taps) and every
            side follows the 2D sizes below.
        **kwargs: Further ``SwinUNETR`` arguments (``num_heads``, ``window_size``, ``dropout_path_rate``,
            ``use_v2``...).

    Returns:
        ``monai.networks.nets.SwinUNETR``. Input sides must be multiples of 32. At ``(H, W)`` the Swin blocks of
        stage ``i`` output ``feature_size * 2**i`` channels at ``H / 2**(i+1)``, ``decoder5..decoder2`` output
        ``8, 4, 2, 1`` times ``feature_size`` at ``H/16 .. H/2``, and ``F_final`` is ``feature_size x H x W``.

    Raises:
        ImportError: If MONAI or einops is not installed (with the install command).
        ValueError: If ``spatial_dims`` is not 2 or 3.
    """
    check_spatial_dims(spatial_dims)
    nets = require("monai.networks.nets", "monai-swinunetr backbone", MONAI_INSTALL_HINT)
    require("einops", "monai-swinunetr backbone", MONAI_INSTALL_HINT)
    net = nets.SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=spatial_dims,
                         feature_size=feature_size, depths=tuple(depths), **kwargs)
    net.tap_spec = ready_tap_spec(net)
    return net


def smp_unet_tap_spec(encoder_name: str = "resnet34", encoder_depth: int = 5) -> TapSpec:
    """Taps of a segmentation_models_pytorch ``Unet`` with a ResNet/ResNeXt encoder.

    smp's ResNet encoders are torchvision ResNets (``encoder.layer1..layer4`` at 1/4 .. 1/32 of the input) and the
    decoder is ``decoder.blocks`` (``encoder_depth`` blocks, the last one at full resolution). The spec is the
    authors' UNet aggregation: encoder ``layer1..layer{d-1}``, decoder ``blocks.0..blocks.{d-2}``, ``F_final`` =
    ``decoder.blocks.{d-1}`` (before ``segmentation_head``).

    Args:
        encoder_name: smp encoder name; only the ``resnet*`` / ``resnext*`` families are mapped.
        encoder_depth: ``Unet(encoder_depth=...)``, 3 to 5.

    Raises:
        ValueError: For another encoder family (write the spec with ``list_tap_candidates``) or depth.
    """
    if not encoder_name.startswith(("resnet", "resnext")):
        raise SettingError(
            "encoder_name", f"No ready smp tap spec for encoder {encoder_name!r} (only resnet*/resnext*). Pass "
            "SelfReg(taps={'encoder': [...], 'decoder': [...], 'final': ...}); "
            "lightning_selfreg.list_tap_candidates(model, input_shape) lists the module paths."
        )
    if encoder_depth not in (3, 4, 5):
        raise SettingError("encoder_depth",
                           f"`encoder_depth` must be 3, 4 or 5 for a ResNet encoder, found {encoder_depth!r}.")
    return TapSpec.unet(
        encoder=[f"encoder.layer{i}" for i in range(1, encoder_depth)],
        decoder=[f"decoder.blocks.{i}" for i in range(encoder_depth - 1)],
        final=f"decoder.blocks.{encoder_depth - 1}",
    )


def smp_unet(
    in_channels: int, num_classes: int, encoder_name: str = "resnet34", encoder_depth: int = 5,
    encoder_weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """A segmentation_models_pytorch ``Unet`` with :func:`smp_unet_tap_spec` attached as ``tap_spec``.

    Args:
        in_channels: Input channels.
        num_classes: Output classes (background included).
        encoder_name: A ``resnet*`` / ``resnext*`` smp encoder.
        encoder_depth: Encoder stages (3 to 5; ``decoder_channels`` needs as many entries).
        encoder_weights: smp pretrained weights name; ``None`` (default) downloads nothing.
        **kwargs: Further ``smp.Unet`` arguments (``decoder_channels``, ``decoder_attention_type``...).

    Returns:
        ``segmentation_models_pytorch.Unet``; input sides must be multiples of ``2**encoder_depth``.

    Raises:
        ImportError: If segmentation_models_pytorch (or its timm/torchvision) cannot be imported.
        ValueError: For an encoder without a ready spec.
    """
    smp_unet_tap_spec(encoder_name, encoder_depth)  # an encoder without a ready spec fails before the build
    smp = require("segmentation_models_pytorch", "smp-unet backbone", SMP_INSTALL_HINT)
    net = smp.Unet(encoder_name=encoder_name, encoder_depth=encoder_depth, encoder_weights=encoder_weights,
                   in_channels=in_channels, classes=num_classes, **kwargs)
    net.tap_spec = ready_tap_spec(net)
    return net


def _dynunet_spec(net: nn.Module) -> TapSpec:
    return monai_dynunet_tap_spec(len(net.downsamples) + 2)  # input block + downsamples + bottleneck


def _swin_unetr_spec(net: nn.Module) -> TapSpec:
    return monai_swin_unetr_tap_spec(tuple(len(getattr(net.swinViT, f"layers{i}")[0].blocks) for i in range(1, 5)))


def _smp_unet_spec(net: nn.Module) -> TapSpec | None:
    if not all(hasattr(net.encoder, f"layer{i}") for i in range(1, 5)):  # not a ResNet/ResNeXt encoder
        return None
    return smp_unet_tap_spec("resnet", len(net.decoder.blocks))  # one decoder block per encoder stage


# A third-party class (its module and name, as its library defines it: nothing is imported) -> the ready tap spec
# of an instance. The specs depend on the instance where the architecture does: DynUNet's number of levels,
# SwinUNETR's blocks per stage, smp's encoder depth.
READY_TAP_SPECS: dict[str, Callable[[nn.Module], TapSpec | None]] = {
    "monai.networks.nets.basic_unet.BasicUNet": lambda net: monai_basic_unet_tap_spec(),
    "monai.networks.nets.dynunet.DynUNet": _dynunet_spec,
    "monai.networks.nets.swin_unetr.SwinUNETR": _swin_unetr_spec,
    "segmentation_models_pytorch.decoders.unet.model.Unet": _smp_unet_spec,
}


def ready_tap_spec(net: nn.Module) -> TapSpec | None:
    """The ready tap spec of a MONAI ``BasicUNet`` / ``DynUNet`` / ``SwinUNETR`` or an smp ``Unet`` (or a subclass).

    Args:
        net: The network, as its library builds it.

    Returns:
        The spec (see :data:`READY_TAP_SPECS`), or None for another class (or an smp encoder without a spec).

    Example:
        >>> ready_tap_spec(nn.Conv2d(1, 3, 1)) is None  # not a class with a ready spec (MONAI below is optional)
        True
        >>> from monai.networks.nets import BasicUNet  # doctest: +SKIP
        >>> ready_tap_spec(BasicUNet(spatial_dims=2, out_channels=3)).final  # doctest: +SKIP
        'upcat_1'
    """
    for cls in type(net).__mro__:
        build = READY_TAP_SPECS.get(f"{cls.__module__}.{cls.__qualname__}")
        if build is not None:
            return build(net)
    return None
