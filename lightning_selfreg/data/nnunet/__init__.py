"""Any nnU-Net v2 raw dataset: its format (``format``), nnU-Net's preprocessing (``preprocess``), the DataModule."""

from lightning_selfreg.data.nnunet.datamodule import SAMPLE_NNUNET_DIR, NnUNetDataModule, crop_or_pad

__all__ = ["SAMPLE_NNUNET_DIR", "NnUNetDataModule", "crop_or_pad"]
