import json
import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.data import SynapseDataModule, UnpaddedDistributedSampler
from lightning_selfreg.models import UNet
from tests.conftest import write_synapse_layout


def test_unpadded_sampler_shards_every_case_once():
    data = list(range(5))
    shards = [list(UnpaddedDistributedSampler(data, 2, r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert sorted(i for s in shards for i in s) == data
    assert [len(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)] == [2, 2, 1]


def _module(seed=0):
    torch.manual_seed(seed)
    return SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)


class SaveTestResults(pl.Callback):
    """Write rank 0's gathered test results (both protocols, per class) to JSON, for the parent process to read."""

    def __init__(self, path):
        self.path = path

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(pl_module.test_results_by_protocol))


def assert_same_results(found: dict, expected: dict) -> None:
    """Every number of two ``test_results_by_protocol`` dicts agrees: case counts, means, per-class values."""
    assert found.keys() == expected.keys() == {"strict", "transunet"}
    for protocol, results in expected.items():
        other = found[protocol]
        assert other["num_cases"] == results["num_cases"], protocol
        assert other["per_class"].keys() == results["per_class"].keys(), protocol
        pairs = [(key, other[key], results[key]) for key in ("dice_mean", "iou_mean", "hd95_mean")]
        pairs += [(f"{name}/{key}", other["per_class"][name][key], value)
                  for name, values in results["per_class"].items() for key, value in values.items()]
        for where, a, b in pairs:
            assert (a is None) == (b is None), (protocol, where, a, b)
            if b is not None:
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), (protocol, where, a, b)


@pytest.fixture
def one_thread_before_fork():
    """One intra-op thread while the test forks (restored after).

    A process whose OpenMP (libgomp) thread team has run, as it has after any earlier multi-threaded test in the
    same pytest process, cannot fork safely: the children's first oneDNN convolution waits forever at a team barrier
    for threads that were not forked (seen as a 180 s timeout of this test in full-suite runs, never alone). With one
    thread the children use no team; it is also the right count for 2 processes on 2 cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(180)
def test_ddp_fit_and_test_gather_every_case_once(tmp_path, one_thread_before_fork):
    """2 CPU processes (gloo, ddp_fork): 3 test volumes are split 2/1, gathered, each counted once."""
    root = write_synapse_layout(tmp_path / "data", n_test=3)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm = SynapseDataModule(root, image_size=32, batch_size=2, val_cases=())
    module = _module()
    trainer = pl.Trainer(devices=2, strategy="ddp_fork", max_steps=2, limit_val_batches=0,
                         callbacks=[SelfReg(), SaveTestResults(tmp_path / "ddp.json")], default_root_dir=tmp_path,
                         **common)
    trainer.fit(module, dm)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    trainer.test(module, dm, ckpt_path=ckpt, verbose=False)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["strict"]["num_cases"] == ddp["transunet"]["num_cases"] == 3
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    assert logged["test/num_cases"] == 3

    # the same checkpoint evaluated in one process gives the same numbers: every per-class value, both protocols
    single = pl.Trainer(devices=1, **common, enable_checkpointing=False)
    reference = _module(seed=1)
    single.test(reference, SynapseDataModule(root, image_size=32, val_cases=()), ckpt_path=ckpt, verbose=False)
    expected = reference.test_results_by_protocol
    assert expected["strict"]["num_cases"] == 3
    # not vacuous: the strict protocol scores every class present in the prediction or the truth
    assert sum(v["dice"] is not None for v in expected["strict"]["per_class"].values()) >= 1
    assert_same_results(ddp, expected)
    for key in ("dice_mean", "iou_mean", "hd95_mean"):  # what rank 0 logged is what it gathered
        if expected["strict"][key] is not None:
            assert logged[f"test/{key}"] == pytest.approx(expected["strict"][key], rel=1e-9)


def test_unpadded_sampler_pads_only_ranks_without_a_case():
    """With fewer cases than ranks, an empty rank gets one marked duplicate; ranks holding cases get no padding."""
    from lightning_selfreg.data import PaddingKey

    shards = [list(UnpaddedDistributedSampler([0], 3, r, pad_empty_ranks=True)) for r in range(3)]
    assert shards == [[0], [0], [0]]
    assert [[type(i) is PaddingKey for i in s] for s in shards] == [[False], [True], [True]]
    assert [len(UnpaddedDistributedSampler([0], 3, r, pad_empty_ranks=True)) for r in range(3)] == [1, 1, 1]
    assert [list(UnpaddedDistributedSampler(range(5), 2, r, pad_empty_ranks=True)) for r in range(2)] == [
        [0, 2, 4], [1, 3]]
    assert list(UnpaddedDistributedSampler([0], 2, 1)) == []  # off by default (prediction: nothing to gather)


@pytest.mark.timeout(120)
def test_ddp_test_with_fewer_cases_than_ranks(tmp_path, one_thread_before_fork):
    """2 CPU processes, ONE test case: rank 1 gets a padding item, joins the gather, and the case counts once."""
    root = write_synapse_layout(tmp_path / "data", n_test=1)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)
    module = _module()
    trainer = pl.Trainer(devices=2, strategy="ddp_fork", callbacks=[SaveTestResults(tmp_path / "ddp.json")],
                         default_root_dir=tmp_path, **common)
    trainer.test(module, SynapseDataModule(root, image_size=32, val_cases=()), verbose=False)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["strict"]["num_cases"] == ddp["transunet"]["num_cases"] == 1

    single = pl.Trainer(devices=1, **common)  # the same (forked, untrained) weights in one process
    single.test(module, SynapseDataModule(root, image_size=32, val_cases=()), verbose=False)
    assert module.test_results_by_protocol["strict"]["num_cases"] == 1
    assert_same_results(ddp, module.test_results_by_protocol)


@pytest.mark.timeout(120)
def test_ddp_3d_validation_with_fewer_cases_than_ranks(tmp_path, one_thread_before_fork):
    """nnU-Net 3D, ONE validation case on 2 processes: rank 1 pads; val/dice and val/loss equal one process's."""
    pytest.importorskip("monai")
    from lightning_selfreg.data import NnUNetDataModule
    from lightning_selfreg.models import create_model
    from tests.data.test_nnunet import write_nnunet

    dataset = write_nnunet(tmp_path / "Dataset001_Toy")
    dm = NnUNetDataModule(dataset, cache_dir=tmp_path / "cache", configuration="3d", patch_size=(8, 16, 16), fold=0,
                          progress=False)
    dm.prepare_data()  # once, before the processes fork
    assert len(dm.splits()["val"]) == 1
    torch.manual_seed(0)
    net = create_model("unet", dm.in_channels, dm.num_classes, base_channels=4, depth=2, spatial_dims=3)
    module = SelfRegSegModule(net, dm.num_classes, dm.class_names, spatial_dims=3, roi_size=dm.patch_size)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)
    ddp = pl.Trainer(devices=2, strategy="ddp_fork", default_root_dir=tmp_path, **common).validate(
        module, dm, verbose=False)[0]
    single = pl.Trainer(devices=1, **common).validate(module, dm, verbose=False)[0]
    assert ddp.keys() == single.keys() and {"val/loss", "val/dice"} <= ddp.keys()
    for key, value in single.items():
        assert (math.isnan(value) and math.isnan(ddp[key])) or ddp[key] == pytest.approx(value, rel=1e-6), key
