"""``TestPredictionWriter``: write each case's label map to disk, from ``trainer.test`` and ``trainer.predict``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lightning_selfreg.data.image_io import save_prediction
from lightning_selfreg.data.preprocessing import restore, restore_spacing
from lightning_selfreg.data.sampling import is_padding
from lightning_selfreg.segmentation.inference import step_prediction

__all__ = ["TestPredictionWriter"]


def _as_array(value: Any, dtype: type) -> np.ndarray | None:
    if value is None:
        return None
    return np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=dtype)


class TestPredictionWriter(BasePredictionWriter):
    """Write every evaluated case's prediction at its native grid, as Lightning's ``BasePredictionWriter`` does.

    Volumes ``(D, H, W)`` become ``<output_dir>/<case>.nii.gz`` on the source file's grid: a case that was
    reoriented for the network (``ornt`` ``(3, 2)`` in the batch, see
    :func:`~lightning_selfreg.data.preprocessing.restore`) is mapped back to the file's voxel order; the geometry
    is the ``source`` file's header (exact affine, q/s-form codes), else the case's ``affine`` ``(4, 4)``, else the
    affine of the module's recorded orientation with the case's ``spacing`` ``(3,)`` (the Synapse layout's arrays
    carry no affine: they get the declared LPS one);
    2D images (``D = 1``) become ``<case>.png`` (binary masks as 0/255, see
    :func:`~lightning_selfreg.data.image_io.save_prediction`). ``<case>`` is the batch's ``"case"`` name, else the batch
    index.

    - ``trainer.test``: from the ``{"prediction": (D, H, W)}`` that
      :meth:`~lightning_selfreg.segmentation.module.SelfRegSegModule.test_step` returns (``on_test_batch_end``).
    - ``trainer.predict``: from the ``(D, H, W)`` label map that ``predict_step`` returns
      (:meth:`write_on_batch_end`), with the batch's ``case``, ``spacing`` and ``affine`` when it has them.

    Batches are one case each (``batch_size=None``), as the evaluation loaders of the bundled DataModules give them.
    Under DDP every rank writes the cases it evaluated; padding items (``batch["padding"]``, see
    :class:`~lightning_selfreg.data.UnpaddedDistributedSampler`) are not written.

    Args:
        output_dir: Folder of the files (created on the first write).

    Example:
        >>> trainer = pl.Trainer(callbacks=[TestPredictionWriter("runs/x/predictions")])  # doctest: +SKIP
        >>> trainer.test(module, datamodule=dm)  # doctest: +SKIP
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, output_dir: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write(self, pl_module: pl.LightningModule, prediction: Tensor, batch: Any, batch_idx: int) -> Path:
        """Write one case's ``(D, H, W)`` prediction; returns the written path."""
        if not isinstance(prediction, Tensor) or prediction.ndim != 3:
            found = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
            raise ValueError(f"TestPredictionWriter expects one case's (D, H, W) label map per batch, found {found}; "
                             "evaluate one case per batch (`batch_size=None`).")
        meta = batch if isinstance(batch, Mapping) else {}
        spacing = _as_array(meta.get("spacing"), np.float64)
        affine = _as_array(meta.get("affine"), np.float64)
        ornt = _as_array(meta.get("ornt"), np.float64)
        num_classes = int(getattr(pl_module.hparams, "num_classes", 0) or int(prediction.max()) + 1)
        labels = restore(prediction.cpu().numpy(), ornt)  # back to the source file's voxel order
        if ornt is not None and spacing is not None:
            spacing = np.asarray(restore_spacing(spacing.reshape(-1), ornt))
        reference = None
        if meta.get("source") and affine is not None:
            import nibabel as nib

            reference = nib.load(str(meta["source"]))  # header only: the prediction gets its exact geometry
        record = getattr(pl_module, "preprocessing", None)
        return save_prediction(labels, self.output_dir, str(meta.get("case", batch_idx)),
                               None if spacing is None else tuple(spacing.reshape(-1).tolist()), num_classes,
                               affine=affine, orientation=None if record is None else record.orientation,
                               reference=reference)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write the ``outputs["prediction"]`` of the test step (nothing for a padding item)."""
        if is_padding(batch):
            return
        prediction = step_prediction(outputs)
        if prediction is None:
            raise ValueError("TestPredictionWriter: the test step returned no `prediction`; it needs a test_step that "
                             "returns {'prediction': (D, H, W)} (SelfRegSegModule does).")
        self.write(pl_module, prediction, batch, batch_idx)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        """Write the label map that ``predict_step`` returned for this batch (nothing for a padding item)."""
        if is_padding(batch):
            return
        self.write(pl_module, prediction, batch, batch_idx)
