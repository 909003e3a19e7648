"""DataModules for Synapse, ACDC, GlaS, MoNuSeg, nnU-Net raw datasets and the bundled CT sample; readers; transforms."""

from lightning_selfreg.data.acdc import ACDC_CLASS_NAMES, ACDCDataModule
from lightning_selfreg.data.augmentation import paper_augmentation
from lightning_selfreg.data.contract import DataError
from lightning_selfreg.data.datamodule import SegDataModule
from lightning_selfreg.data.histology import GlaSDataModule, MoNuSegDataModule, rasterize_monuseg_xml
from lightning_selfreg.data.nnunet import SAMPLE_NNUNET_DIR, NnUNetDataModule
from lightning_selfreg.data.readers import read_slice, read_volume
from lightning_selfreg.data.sampling import (
    PaddingKey,
    ResumableDataLoader,
    ResumableSampler,
    SampleKey,
    UnpaddedDistributedSampler,
    is_padding,
)
from lightning_selfreg.data.synapse import (
    SAMPLE_DIR,
    SYNAPSE_CLASS_NAMES,
    SYNAPSE_VAL_CASES,
    SampleCTDataModule,
    SynapseDataModule,
)
from lightning_selfreg.data.transforms import RandomAffine, derive_seed, resize_image, resize_label

__all__ = [
    "ACDC_CLASS_NAMES",
    "SAMPLE_DIR",
    "SAMPLE_NNUNET_DIR",
    "SYNAPSE_CLASS_NAMES",
    "SYNAPSE_VAL_CASES",
    "ACDCDataModule",
    "DataError",
    "GlaSDataModule",
    "MoNuSegDataModule",
    "NnUNetDataModule",
    "PaddingKey",
    "RandomAffine",
    "ResumableDataLoader",
    "ResumableSampler",
    "SampleCTDataModule",
    "SampleKey",
    "SegDataModule",
    "SynapseDataModule",
    "UnpaddedDistributedSampler",
    "derive_seed",
    "is_padding",
    "paper_augmentation",
    "rasterize_monuseg_xml",
    "read_slice",
    "read_volume",
    "resize_image",
    "resize_label",
]
