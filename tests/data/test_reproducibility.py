"""Same seed, same run: every random draw of the data pipeline derives from (seed, epoch, sample index).

Tiny Synapse layout (8 training slices, batch 2: 4 steps per epoch), the paper's albumentations augmentation on the
CPU and ``RandomAffine`` on the device, a width-4 UNet. Each fit records a hash of every batch the model sees
(after the on-device augmentation) and ends with its weights.
"""

import hashlib
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.data import RandomAffine, ResumableSampler, SampleKey, SynapseDataModule, derive_seed
from lightning_selfreg.models import UNet
from tests.conftest import write_synapse_layout

SEED = 5
EPOCHS = 2  # 8 steps


class BatchHashes(pl.Callback):
    """Record a hash of the image and label of every training batch, as the model receives it."""

    def __init__(self):
        self.hashes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha1(batch["image"].cpu().numpy().tobytes())
        digest.update(batch["label"].cpu().numpy().tobytes())
        self.hashes.append(digest.hexdigest())


class GlobalRNGConsumer(pl.Callback):
    """Draw from the global Python, NumPy and torch RNGs before every step (as dropout or other code would)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        random.random()
        np.random.rand(3)
        torch.rand(3)


def _datamodule(data_dir, num_workers):
    return SynapseDataModule(data_dir, image_size=32, batch_size=2, val_cases=(), num_workers=num_workers,
                             transform="paper", batch_transform=RandomAffine())


def _fit(data_dir, num_workers=0, callbacks=(), ckpt_path=None, max_epochs=EPOCHS):
    """Fit with ``SEED``; returns (batch hashes, final state dict)."""
    pl.seed_everything(SEED, workers=True, verbose=False)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32, lr_schedule="constant")
    recorder = BatchHashes()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                              for c in callbacks),
                         callbacks=[recorder, *callbacks], num_sanity_val_steps=0)
    trainer.fit(module, _datamodule(data_dir, num_workers), ckpt_path=ckpt_path)
    return recorder.hashes, module.state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synapse_layout(tmp_path_factory.mktemp("repro") / "synapse", n_train_cases=2, slices_per_case=4)


@pytest.fixture(scope="module")
def reference(data_dir):
    """The baseline arm without workers: batch hashes and final weights."""
    return _fit(data_dir)


@pytest.fixture(scope="module")
def with_workers(data_dir, tmp_path_factory):
    """The same run with 2 workers, saving a checkpoint every 3 steps: (hashes, weights, checkpoint folder)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    every = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    return (*_fit(data_dir, num_workers=2, callbacks=[every]), folder)


def test_sample_seeds_follow_seed_epoch_and_index(data_dir):
    pl.seed_everything(SEED, verbose=False)
    dm = _datamodule(data_dir, 0)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    first = list(sampler)
    assert sampler.seed == SEED and sorted(first) == list(range(8))
    assert all(isinstance(k, SampleKey) and k.seed == derive_seed(SEED, 0, k) for k in first)
    sampler.set_epoch(1)
    assert [k.seed for k in sampler] != [k.seed for k in first]  # a new epoch draws new augmentations
    dataset = dm._train
    key = first[0]
    a, b = dataset[key], dataset[SampleKey(int(key), key.seed)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert int(a["seed"]) == key.seed
    outputs = {dataset[SampleKey(int(key), derive_seed(SEED, e, key))]["image"].numpy().tobytes()
               for e in range(6)}
    assert len(outputs) > 1  # the augmentation follows the key's seed
    data = list(range(50))
    next_seed = ResumableSampler(data, seed=1)
    next_epoch = ResumableSampler(data, seed=0)
    next_epoch.set_epoch(1)
    assert list(next_seed) != list(next_epoch)  # not DistributedSampler's seed + epoch


def test_same_seed_gives_identical_weights_with_0_and_2_workers(data_dir, reference, with_workers):
    """The albumentations pipeline and RandomAffine draw from the seed, not from unseeded or worker streams."""
    hashes, weights = reference
    assert len(hashes) == 4 * EPOCHS and len(set(hashes)) == len(hashes)
    again, again_weights = _fit(data_dir)
    assert again == hashes
    _assert_same_weights(again_weights, weights)
    workers, workers_weights, _ = with_workers
    assert workers == hashes
    _assert_same_weights(workers_weights, weights)


def test_compare_arms_see_the_same_batches(data_dir, reference):
    """The SelfReg arm (which also draws from the global RNGs here) receives exactly the baseline's batches."""
    hashes, weights = reference
    selfreg, selfreg_weights = _fit(data_dir, callbacks=[SelfReg(), GlobalRNGConsumer()])
    assert selfreg == hashes
    assert any(not torch.equal(selfreg_weights[k], weights[k]) for k in weights)  # SelfReg did change the training


def test_mid_epoch_resume_with_workers_replays_the_same_augmented_batches(data_dir, reference, with_workers):
    hashes, weights = reference
    interrupted, _, folder = with_workers
    assert interrupted == hashes
    ckpt = folder / "step=6.ckpt"  # epoch 1, after 2 of its 4 batches
    resumed, resumed_weights = _fit(data_dir, num_workers=2, ckpt_path=str(ckpt))
    assert resumed == hashes[6:]
    _assert_same_weights(resumed_weights, weights)


def _noisy(image, label):
    """A user transform that draws from the global Python, NumPy and torch RNGs."""
    noise = np.random.rand(*image.shape) + random.random() + torch.rand(()).item()
    return (image + noise).astype(np.float32), label


def test_a_transform_without_seed_gets_the_global_rngs_seeded_per_sample(data_dir):
    dm = SynapseDataModule(data_dir, image_size=32, batch_size=2, val_cases=(), transform=_noisy)
    dm.setup("fit")
    torch.manual_seed(0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a, b, c = (dm._train[SampleKey(3, seed)]["image"] for seed in (11, 11, 12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_worker_seeds_depend_on_seed_and_epoch_not_on_the_global_rng():
    """The loader's base seed (each worker's torch / random / NumPy seed) is a function of (seed, epoch): the same
    epoch replays the same worker streams, another epoch gets other ones, whatever the global RNG did."""
    from lightning_selfreg.data.sampling import ResumableDataLoader, ResumableSampler

    class WorkerSeed(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            return torch.tensor(torch.initial_seed())  # the worker's torch seed: base seed + worker id

    def seeds(seed, epoch):
        dataset = WorkerSeed()
        sampler = ResumableSampler(dataset, seed=seed)
        sampler.set_epoch(epoch)
        loader = ResumableDataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1)
        torch.rand(3)  # the global RNG moves on between the runs: it must not matter
        return {int(v) for batch in loader for v in batch}

    first = seeds(0, 0)
    assert len(first) == 1 and seeds(0, 0) == first  # one worker, reproducible
    assert seeds(0, 1) != first and seeds(1, 0) != first and seeds(0, 1) != seeds(1, 0)
