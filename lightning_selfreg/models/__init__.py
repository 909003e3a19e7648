"""Backbones with ready-made SelfReg tap specs, and :func:`create_model` to build them by name."""

from lightning_selfreg.models.registry import create_model, list_models
from lightning_selfreg.models.swin_unet import SwinUnet, swin_unet_tap_spec
from lightning_selfreg.models.unet import UNet

__all__ = ["SwinUnet", "UNet", "create_model", "list_models", "swin_unet_tap_spec"]
