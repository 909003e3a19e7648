import lightning.pytorch as pl
import pytest
import torch

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.data import SynapseDataModule, UnpaddedDistributedSampler
from lightning_selfreg.models import UNet

from .conftest import write_synapse_layout


def test_unpadded_sampler_shards_every_case_once():
    data = list(range(5))
    shards = [list(UnpaddedDistributedSampler(data, 2, r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert sorted(i for s in shards for i in s) == data
    assert [len(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)] == [2, 2, 1]


def _module(seed=0):
    torch.manual_seed(seed)
    return SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)


@pytest.mark.timeout(180)
def test_ddp_fit_and_test_gather_every_case_once(tmp_path):
    """2 CPU processes (gloo, ddp_fork): 3 test volumes are split 2/1, gathered, each counted once."""
    root = write_synapse_layout(tmp_path / "data", n_test=3)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm = SynapseDataModule(root, image_size=32, batch_size=2, val_cases=())
    module = _module()
    trainer = pl.Trainer(devices=2, strategy="ddp_fork", max_steps=2, limit_val_batches=0,
                         callbacks=[SelfReg()], default_root_dir=tmp_path, **common)
    trainer.fit(module, dm)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    trainer.test(module, dm, ckpt_path=ckpt, verbose=False)
    ddp = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    assert ddp["test/num_cases"] == 3

    # the same checkpoint evaluated in one process gives the same numbers
    single = pl.Trainer(devices=1, **common, enable_checkpointing=False)
    reference = _module(seed=1)
    single.test(reference, SynapseDataModule(root, image_size=32, val_cases=()), ckpt_path=ckpt, verbose=False)
    assert reference.test_results["num_cases"] == 3
    for key in ("dice_mean", "hd95_mean"):
        if reference.test_results[key] is not None:
            assert ddp[f"test/{key}"] == pytest.approx(reference.test_results[key], abs=1e-6)
