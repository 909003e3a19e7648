"""Dashboard callbacks: a real offline W&B run read back from its ``.wandb`` file, and runs without W&B."""

import csv
import json
import re
import struct
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import (
    ImagesPerSecondMonitor,
    RedundancyMonitor,
    SegmentationPanels,
    TestResultsTable,
)
from lightning_selfreg.data import SynapseDataModule
from lightning_selfreg.models import UNet
from lightning_selfreg.tracking.environment import log_run_environment
from tests.conftest import write_synapse_layout

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = ("down1", "down2", "up1", "up2")  # UNet(depth=2).tap_spec paths


def make(data_dir, val_cases=("case0001",)):
    dm = SynapseDataModule(data_dir, image_size=32, batch_size=2, val_cases=val_cases, transform=None)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, dm.class_names, optimizer="adam", lr=1e-3,
                              lr_schedule="constant", input_size=32)
    return dm, module


def tracking_callbacks():
    return [SelfReg(), SegmentationPanels(every_n_epochs=1, num_images=2),
            RedundancyMonitor(every_n_epochs=1, num_images=2), ImagesPerSecondMonitor(), TestResultsTable()]


def trainer(callbacks, logger=False, **kwargs):
    defaults = dict(accelerator="cpu", max_epochs=2, log_every_n_steps=1, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(logger=logger, callbacks=callbacks, **{**defaults, **kwargs})


# --- reading an offline run back -----------------------------------------------------------------------------

def read_wandb_records(path):
    """Decode a ``run-*.wandb`` file: a LevelDB-style log (32 KiB blocks of 7-byte-header chunks) of ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _set(target, keys, value):
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def finished_records(run_dir, timeout=60.0):
    """The records of an offline run once its log ends with the ``exit`` record.

    wandb-core may still be flushing the log when ``finish()`` returns (a small run can sit wholly in its write
    buffer), so the log is re-read until it is complete.
    """
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(wandb_file)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def parse_run(run_dir):
    """History rows, summary and config of an offline run, with values decoded from JSON."""
    history, summary, config = [], {}, {}
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                _set(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(summary, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set(config, list(item.nested_key) or [item.key], json.loads(item.value_json))
    return history, summary, config


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("PIL")
    tmp = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("WANDB_CONFIG_DIR", str(tmp / "config"))
        mp.setenv("WANDB_DATA_DIR", str(tmp / "data"))
        mp.setenv("MPLCONFIGDIR", str(tmp / "mpl"))
        mp.chdir(ROOT)  # log_run_environment reads this repository's commit
        from lightning.pytorch.loggers import WandbLogger

        pl.seed_everything(0)
        dm, module = make(write_synapse_layout(tmp / "data_root"))
        logger = WandbLogger(project="lightning_selfreg_tests", save_dir=str(tmp), offline=True)
        t = trainer(tracking_callbacks(), logger=logger)
        t.fit(module, dm)
        t.test(module, dm, verbose=False)
        log_run_environment(logger)
        run_dir = Path(logger.experiment.dir).parent  # wandb's settings may be cached from an earlier run
        wandb.finish()
    history, summary, config = parse_run(run_dir)
    return {"dir": run_dir, "history": history, "summary": summary, "config": config,
            "metrics": dict(t.callback_metrics), "results": module.test_results}


def _logged(history, key):
    return [row[key] for row in history if key in row]


def test_wandb_scalars_are_logged(wandb_run):
    history = wandb_run["history"]
    for block in (*BLOCKS, "mean"):
        values = _logged(history, f"redundancy/{block}")
        assert len(values) == 2 and all(0 <= v <= 1 for v in values), block  # epochs 0 and 1 (the last)
    assert len(_logged(history, "train/images_per_sec")) == 2
    assert all(v > 0 for v in _logged(history, "train/images_per_sec"))
    assert _logged(history, "train/images_per_sec_step")
    assert _logged(history, "selfreg/ifd") and _logged(history, "val/dice")


def test_wandb_media_overlays_heatmaps_and_table(wandb_run):
    history, run_dir = wandb_run["history"], wandb_run["dir"]
    for key, count in (("val/segmentation", 2), ("test/segmentation", 2), ("redundancy/heatmaps", 1)):
        media = _logged(history, key)
        assert media, key
        assert all(m.get("count", 1) == count for m in media), (key, media)
    assert len(_logged(history, "val/segmentation")) == 2  # every epoch
    (test_panels,) = _logged(history, "test/segmentation")
    assert test_panels["captions"] == ["case0100 slice 1", "case0100 slice 2"]  # the slices with foreground
    for media in _logged(history, "val/segmentation") + [test_panels]:
        assert len(media["all_masks"]) == 2
        paths = [*media["filenames"], *(m[kind]["path"] for m in media["all_masks"] for kind in ("predictions",
                                                                                             "ground_truth"))]
        assert all((run_dir / "files" / p).is_file() for p in paths), paths
    heatmaps = list((run_dir / "files" / "media" / "images" / "redundancy").glob("heatmaps_*.png"))
    assert len(heatmaps) == 2  # epochs 0 and 1
    class_labels = json.dumps(wandb_run["config"]["_wandb"])
    assert '"5": "liver"' in class_labels and '"0": "background"' in class_labels
    (table,) = (run_dir / "files" / "media" / "table").rglob("*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][0] == "class" and {"dice", "hd95"} <= set(content["columns"])
    assert [row[0] for row in content["data"]][-2:] == ["stomach", "mean"] and len(content["data"]) == 9


def test_wandb_summary_and_environment(wandb_run):
    summary, results = wandb_run["summary"], wandb_run["results"]
    assert summary["test/dice_mean"] == pytest.approx(results["dice_mean"])
    assert summary["test/hd95_mean"] == pytest.approx(results["hd95_mean"])
    assert summary["test/dice/liver"] == pytest.approx(results["per_class"]["liver"]["dice"])
    for name, values in results["per_class"].items():  # None (absent from prediction and truth) is left out
        assert (f"test/dice/{name}" in summary) == (values["dice"] is not None), name
    env = wandb_run["config"]["env"]
    assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    assert env["torch"] == torch.__version__ and env["lightning"] == pl.__version__ and "cuda" in env


def test_callbacks_without_logger_are_harmless_and_do_not_change_training(synapse_dir):
    def fit(callbacks):
        pl.seed_everything(0)
        dm, module = make(synapse_dir)
        t = trainer(callbacks)
        t.fit(module, dm)
        metrics = dict(t.callback_metrics)  # trainer.test resets them
        t.test(module, dm, verbose=False)
        return metrics, module

    _, ref_module = fit([SelfReg()])
    callbacks = tracking_callbacks()
    metrics, module = fit(callbacks)
    for (name, a), b in zip(ref_module.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the tracking callbacks changed training"
    for block in (*BLOCKS, "mean"):
        assert 0 <= float(metrics[f"redundancy/{block}"]) <= 1
    assert float(metrics["train/images_per_sec"]) > 0 and float(metrics["train/images_per_sec_step"]) > 0
    assert callbacks[3].epoch_images == 3  # case0000's 3 slices; case0001 is the validation case
    assert all(not m._forward_hooks for m in module.net.modules()), "every hook must be removed"


def test_csv_logger_gets_scalars_and_environment(tmp_path, synapse_dir):
    pl.seed_everything(0)
    dm, module = make(synapse_dir, val_cases=())
    logger = CSVLogger(tmp_path, name="csv", version="")
    t = trainer([RedundancyMonitor(every_n_epochs=5, num_images=3), ImagesPerSecondMonitor(), TestResultsTable(),
                 SegmentationPanels()], logger=logger, max_epochs=1, limit_val_batches=0)
    t.fit(module, dm)
    t.test(module, dm, verbose=False)
    info = log_run_environment(logger, cwd=tmp_path)  # not a git repository
    logger.save()
    assert info["git_commit"] is None and info["git_dirty"] is None
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"redundancy/down1", "redundancy/mean", "train/images_per_sec", "test/dice_mean",
            "test/dice/liver", "test/hd95/liver"} <= columns
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["env"]["torch"] == torch.__version__


def test_redundancy_monitor_needs_taps_and_checks_arguments(synapse_dir):
    with pytest.raises(ValueError, match="`every_n_epochs`"):
        RedundancyMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="`num_images`"):
        SegmentationPanels(num_images=0)
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=(), transform=None)
    module = SelfRegSegModule(torch.nn.Conv2d(1, 9, 1), 9)
    with pytest.raises(ValueError, match="tap_spec"):
        trainer([RedundancyMonitor()], max_steps=1, limit_val_batches=0).fit(module, dm)


def test_log_run_environment_never_fails_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    info = log_run_environment(None, cwd=ROOT)
    assert info["git_commit"] is None and info["torch"] == torch.__version__


def test_segmentation_panels_show_3d_cases_at_the_label_grid():
    """A 3D case (C, D', H', W') at a preprocessed grid is shown at the label's grid with the step's prediction."""
    from types import SimpleNamespace

    panels = SegmentationPanels(num_images=2)
    module = SimpleNamespace(hparams=SimpleNamespace(spatial_dims=3))
    label = torch.zeros(6, 8, 10, dtype=torch.long)
    label[1:5, 2:6, 3:7] = 1
    image = torch.rand(2, 3, 4, 5)  # (C, D', H', W'): half the label grid on every axis
    prediction = torch.randint(0, 2, (6, 8, 10))
    batch = {"image": image, "label": label, "case": "c0"}
    panels._add_case(None, module, {"prediction": prediction}, batch, 0)
    shown = panels._collected()
    assert [p.caption for p in shown] == ["c0 slice 1", "c0 slice 4"]
    for panel, z in zip(shown, (1, 4), strict=True):
        assert panel.image.shape == (8, 10) and panel.label.shape == (8, 10)
        assert (panel.pred == prediction[z].numpy()).all() and (panel.label == label[z].numpy()).all()


def test_redundancy_monitor_uses_the_selfreg_callbacks_taps_on_a_backbone_without_tap_spec(synapse_dir):
    """A backbone given by class path has no `tap_spec`; with SelfReg(taps=...) the monitor reads the same taps."""
    net = torch.nn.Sequential()
    net.add_module("enc", torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()))
    net.add_module("dec", torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()))
    net.add_module("head", torch.nn.Conv2d(4, 9, 1))
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=(), transform=None)
    monitor = RedundancyMonitor(num_images=2)
    t = trainer([SelfReg(taps={"encoder": ["enc"], "final": "dec"}), monitor], max_epochs=1, limit_val_batches=0)
    t.fit(SelfRegSegModule(net, 9, input_size=32), dm)
    assert monitor.spec.paths == ("enc", "dec")
    assert {"redundancy/enc", "redundancy/dec", "redundancy/mean"} <= set(t.callback_metrics)


def test_rng_helpers_round_trip_and_leave_the_generators_as_they_were():
    import random

    import numpy as np
    from lightning.pytorch.utilities.seed import isolate_rng

    from lightning_selfreg.utils.rng import get_rng_states, seeded_rngs, set_rng_states

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    states = get_rng_states()
    first = draw()
    set_rng_states(torch.load(_saved(states), weights_only=True))  # checkpoint-safe: plain types and tensors
    assert draw() == first
    with isolate_rng(include_cuda=False):  # what the monitor and seeded_rngs use
        draw()
    after = draw()
    set_rng_states(states)
    draw()
    assert draw() == after  # the block's draws did not advance the generators
    with seeded_rngs(7):
        seeded = draw()
    with seeded_rngs(7):
        assert draw() == seeded


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


class OneCase(pl.LightningDataModule):
    """One 2D test case (D = 1) whose foreground is the bright square; the DataModule says it is not volumetric."""

    volumetric = False

    def test_dataloader(self):
        label = torch.zeros(1, 8, 8, dtype=torch.long)
        label[0, 2:5, 2:6] = 1
        return torch.utils.data.DataLoader([{"image": label[:, None].float(), "label": label, "case": "c0"}],
                                           batch_size=None)


def threshold_net():
    """A 1x1 convolution predicting class 1 where the image is above 0.5."""
    net = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -5.0]))
    return net


def test_metrics_writer_writes_metrics_json_and_the_paper_table(tmp_path):
    from types import SimpleNamespace

    from lightning_selfreg.callbacks import MetricsWriter
    from lightning_selfreg.tracking.report import format_organ_table, format_paper_table

    module = SelfRegSegModule(threshold_net(), 2, ["square"])
    writer = MetricsWriter(tmp_path / "run", info={"dataset": "toy", "selfreg": False, "seed": 3})
    trainer([writer]).test(module, OneCase(), verbose=False)
    text = (tmp_path / "run" / "metrics.json").read_text()
    metrics = json.loads(text)
    assert text.endswith("}\n") and text.startswith('{\n  "dataset": "toy"')
    assert list(metrics) == ["dataset", "selfreg", "seed", "eval_protocol", "test", "protocols", "hd95_units",
                             "cases", "checkpoint"]
    assert metrics["eval_protocol"] == "strict" and metrics["checkpoint"] is None
    assert metrics["test"] == module.test_results and metrics["test"]["per_class"]["square"]["dice"] == 1.0
    assert metrics["protocols"] == module.test_results_by_protocol
    assert metrics["cases"] == [{"case": "c0", "mean_dice": 1.0, "dice": {"square": 1.0}}]
    assert metrics["hd95_units"] == {"strict": "voxels", "transunet": "voxels"}  # the case has no spacing
    markdown = (tmp_path / "run" / "metrics.md").read_text()
    assert format_organ_table(metrics["protocols"], spacing_known=False) in markdown
    assert format_paper_table(metrics["protocols"], False) in markdown
    other_rank = tmp_path / "rank1"
    MetricsWriter(other_rank).on_test_end(SimpleNamespace(is_global_zero=False), module)
    assert not other_rank.exists()
    with pytest.raises(RuntimeError, match="no `test_results`"):
        MetricsWriter(other_rank).on_test_end(SimpleNamespace(is_global_zero=True), torch.nn.Module())


@pytest.mark.parametrize("fails", [False, True])
def test_redundancy_monitor_reads_its_images_without_shifting_the_global_generators(fails):
    """Reading dataset items runs their augmentation; its draws must not leak into training's (also when an item
    cannot be read and the monitor falls back to the first batch)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, Dataset

    class Augmenting(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            noise = torch.rand(1, 8, 8)  # a draw from the global generator
            if fails and index == 3:
                raise IndexError(index)
            return {"image": noise, "label": torch.zeros(8, 8, dtype=torch.long)}

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    monitor = RedundancyMonitor(num_images=2)
    images = monitor._dataset_images(SimpleNamespace(train_dataloader=DataLoader(Augmenting())))
    assert (images is None) if fails else images.shape == (2, 1, 8, 8)
    assert torch.equal(torch.rand(3), expected)
