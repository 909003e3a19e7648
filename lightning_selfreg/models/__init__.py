"""Backbones with ready-made SelfReg tap specs."""

from lightning_selfreg.models.unet import UNet

__all__ = ["UNet"]
