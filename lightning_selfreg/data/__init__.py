"""Data modules, readers and batched transforms."""

from lightning_selfreg.data.synapse import (
    SAMPLE_CLASS_NAMES,
    SAMPLE_DIR,
    SYNAPSE_CLASS_NAMES,
    DataError,
    SampleCTDataModule,
    SynapseLayoutDataModule,
    read_slice,
    read_volume,
)
from lightning_selfreg.data.transforms import RandomAffine, resize_image, resize_label

__all__ = [
    "SAMPLE_CLASS_NAMES",
    "SAMPLE_DIR",
    "SYNAPSE_CLASS_NAMES",
    "DataError",
    "RandomAffine",
    "SampleCTDataModule",
    "SynapseLayoutDataModule",
    "read_slice",
    "read_volume",
    "resize_image",
    "resize_label",
]
