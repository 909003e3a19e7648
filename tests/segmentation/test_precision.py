import lightning.pytorch as pl
import pytest
import torch

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.data import SynapseDataModule
from lightning_selfreg.models import UNet


class DtypeRecorder(SelfReg):
    """SelfReg that records the dtype of the features it sees and of the terms it returns."""

    def auxiliary_loss(self, pl_module, batch, logits):
        self.feature_dtype = next(iter(self._taps._features.values())).dtype
        total, logs = super().auxiliary_loss(pl_module, batch, logits)
        self.term_dtypes = {total.dtype, *(v.dtype for v in logs.values() if torch.is_tensor(v))}
        return total, logs


def fit(synapse_dir, accelerator, precision, channels_last=False):
    pl.seed_everything(0)
    # resize only: the precision checks need no albumentations (absent from the GPU image)
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=4, val_cases=(), transform=None)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32, channels_last=channels_last)
    recorder = DtypeRecorder()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(module, dm)
    return trainer, recorder


def test_bf16_mixed_on_cpu_keeps_selfreg_in_float32(synapse_dir):
    trainer, recorder = fit(synapse_dir, "cpu", "bf16-mixed", channels_last=True)
    assert recorder.feature_dtype == torch.bfloat16  # the network ran under autocast
    assert recorder.term_dtypes == {torch.float32}
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "selfreg/")))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_amp_on_gpu_keeps_selfreg_in_float32(synapse_dir, precision):
    trainer, recorder = fit(synapse_dir, "gpu", precision, channels_last=True)
    assert recorder.feature_dtype in (torch.float16, torch.bfloat16)
    assert recorder.term_dtypes == {torch.float32}
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "selfreg/")))
