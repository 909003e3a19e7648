"""DataModules for Synapse, ACDC, GlaS, MoNuSeg and the bundled CT sample; readers; batched transforms."""

from lightning_selfreg.data.acdc import ACDC_CLASS_NAMES, ACDCDataModule
from lightning_selfreg.data.base import (
    DataError,
    ResumableDataLoader,
    ResumableSampler,
    SegDataModule,
    UnpaddedDistributedSampler,
    paper_augmentation,
)
from lightning_selfreg.data.histology import GlaSDataModule, MoNuSegDataModule, rasterize_monuseg_xml
from lightning_selfreg.data.synapse import (
    SAMPLE_CLASS_NAMES,
    SAMPLE_DIR,
    SYNAPSE_CLASS_NAMES,
    SYNAPSE_VAL_CASES,
    SampleCTDataModule,
    SynapseDataModule,
    read_slice,
    read_volume,
)
from lightning_selfreg.data.transforms import RandomAffine, resize_image, resize_label

__all__ = [
    "ACDC_CLASS_NAMES",
    "SAMPLE_CLASS_NAMES",
    "SAMPLE_DIR",
    "SYNAPSE_CLASS_NAMES",
    "SYNAPSE_VAL_CASES",
    "ACDCDataModule",
    "DataError",
    "GlaSDataModule",
    "MoNuSegDataModule",
    "RandomAffine",
    "ResumableDataLoader",
    "ResumableSampler",
    "SampleCTDataModule",
    "SegDataModule",
    "SynapseDataModule",
    "UnpaddedDistributedSampler",
    "paper_augmentation",
    "rasterize_monuseg_xml",
    "read_slice",
    "read_volume",
    "resize_image",
    "resize_label",
]
