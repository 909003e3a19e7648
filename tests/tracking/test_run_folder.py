"""The run folder to look at: curves.png, overlays/, redundancy.png, metrics.md / metrics.json (issue 22 §2).

The pictures are checked for existence, size and the data they are drawn from, not for their looks.
"""

import csv
import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import CurvesWriter, MetricsWriter, OverlayWriter, RedundancyFigure, RedundancyMonitor
from lightning_selfreg.metrics import dice
from lightning_selfreg.metrics.overlap import class_dice
from lightning_selfreg.tracking.curves import FIGURE_SIZE, epoch_means, plot_curves, read_metrics_csv
from lightning_selfreg.tracking.figures import class_colour, save_figure
from lightning_selfreg.tracking.overlays import figure_inches, is_thin_slab, organ_box, plot_case, slab_slices
from lightning_selfreg.tracking.report import format_organ_table, settings_line
from tests.tracking.test_tracking import make, threshold_net, trainer


def png_size(path):
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def write_lightning_csv(path, rows):
    """A CSVLogger file: header epoch,step,<names> and one row per log event, empty cells where nothing was logged."""
    names = sorted({k for row in rows for k in row} - {"epoch", "step"})
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["epoch", "step", *names])
        writer.writeheader()
        writer.writerows(rows)


def test_curves_are_the_per_epoch_means_of_the_csv(tmp_path):
    rows = [{"epoch": 0, "step": 4, "train/loss": 1.0, "train/ce": 0.6, "selfreg/scr": 2.0, "selfreg/total": 0.03},
            {"epoch": 0, "step": 9, "train/loss": 0.8, "train/ce": 0.4},
            {"epoch": 0, "step": 9, "val/dice": 0.5, "val/dice/liver": 0.7, "val/dice/spleen": 0.3},
            {"epoch": 1, "step": 14, "train/loss": 0.5, "train/ce": 0.2, "selfreg/scr": 1.0},
            {"epoch": 1, "step": 19, "val/dice": 0.6, "val/dice/liver": 0.8, "val/dice/spleen": 0.4}]
    write_lightning_csv(tmp_path / "metrics.csv", rows)
    read = read_metrics_csv(tmp_path / "metrics.csv")
    assert read[1] == {"epoch": 0.0, "step": 9.0, "train/loss": 0.8, "train/ce": 0.4}  # empty cells left out
    assert epoch_means(read, "train/loss") == ([1, 2], [pytest.approx(0.9), 0.5])
    assert epoch_means(read, "val/dice/spleen") == ([1, 2], [0.3, 0.4])
    assert epoch_means(read, "selfreg/ifd") == ([], [])
    # a resumed run's metrics.csv holds the steps after its checkpoint twice: the last value of each (step, key) counts
    again = {"epoch": 0, "step": 9, "train/loss": 0.2, "train/ce": 0.4}
    write_lightning_csv(tmp_path / "resumed.csv", [*rows[:2], again, *rows[2:]])
    assert epoch_means(read_metrics_csv(tmp_path / "resumed.csv"), "train/loss") == ([1, 2], [pytest.approx(0.6), 0.5])
    fig = plot_curves(read, title="toy")
    loss_ax, dice_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["total loss", "CE", "SCR (unweighted)",
                                                                  "SelfReg (weighted)"]
    assert [line.get_label() for line in dice_ax.get_lines()] == ["liver", "spleen", "mean"]
    assert list(dice_ax.get_lines()[2].get_ydata()) == [50.0, 60.0]  # percent
    # metrics.csv sorts its columns by name; with the module's class names each class keeps its overlay colour
    ordered = plot_curves(read, class_names=["spleen", "liver"]).axes[1].get_lines()
    assert [(line.get_label(), line.get_color()) for line in ordered[:2]] == [("spleen", class_colour(1)),
                                                                           ("liver", class_colour(2))]
    path = save_figure(fig, tmp_path / "curves.png")
    assert png_size(path) == (int(FIGURE_SIZE[0] * 100), int(FIGURE_SIZE[1] * 100))
    assert not list(tmp_path.glob(".tmp*"))


def test_curves_writer_draws_from_the_trainers_csv_logger(synapse_dir, tmp_path):
    dm, module = make(synapse_dir)
    writer = CurvesWriter(tmp_path / "run" / "curves.png", every_n_seconds=0)
    trainer([SelfReg(), writer], logger=CSVLogger(tmp_path / "run", name="", version="")).fit(module, dm)
    assert png_size(tmp_path / "run" / "curves.png") == (1200, 450)
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert epoch_means(rows, "train/ce")[0] == [1, 2] and epoch_means(rows, "val/dice")[0] == [1, 2]
    assert CurvesWriter(tmp_path / "none.png").draw(pl.Trainer(logger=False)) is None  # no CSV: nothing drawn


def volume_case(depth=12, size=40):
    label = np.zeros((depth, size, size), dtype=np.int64)
    label[3:9, 10:20, 10:22] = 1
    label[4:7, 25:30, 5:12] = 2
    pred = label.copy()
    pred[:, 10:20, 10:15] = 0  # class 1 partly missed
    return np.random.default_rng(0).random(label.shape), label, pred


def test_case_picture_rows_are_the_organs_lowest_dice_first():
    image, label, pred = volume_case()
    scores = class_dice(pred, label, 3)
    assert scores[0] < scores[1] == 1.0
    fig = plot_case(image, label, pred, ["a", "b"], spacing=(2.0, 1.0, 1.0), dice=scores)
    assert tuple(round(v) for v in fig.get_size_inches() * 100) == \
        tuple(round(v * 100) for v in figure_inches(2, True))
    rows = [ax.get_ylabel().split("\n")[0] for ax in fig.axes if ax.get_ylabel()]
    assert rows == ["a", "b"]  # the lower Dice first
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert [t.split(",")[0] for t in titles] == ["axial", "coronal", "sagittal"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a", "b", "ground truth", "prediction"]
    # a thin slab (6 mm deep, 40 mm wide) shows three axial slices through the organ instead
    assert is_thin_slab((3, 40, 40), (2.0, 1.0, 1.0)) and not is_thin_slab((12, 40, 40), (2.0, 1.0, 1.0))
    assert slab_slices(label, pred, 1) == (4, 6, 7)
    slab = plot_case(image[3:6], label[3:6], pred[3:6], ["a", "b"], spacing=(2.0, 1.0, 1.0))
    assert all(ax.get_title().startswith("axial") for ax in slab.axes[:3])
    # each row is cropped around its organ, at least MIN_CROP_MM wide where the image allows
    box = organ_box(label, pred, 2, (2.0, 1.0, 1.0))
    assert box[1] == slice(0, 40) and box[0].start >= 0
    small = organ_box(label, pred, 2, (2.0, 10.0, 10.0))  # 10 mm voxels: the 5-voxel organ plus 30 % margin
    assert small[1] == slice(23, 32)
    stray = pred.copy()
    stray[0, 0, 0] = 2  # a false positive far away does not widen the organ's crop
    assert organ_box(label, stray, 2, (2.0, 10.0, 10.0)) == small
    with pytest.raises(ValueError, match="share the grid"):
        plot_case(image[:2], label, pred, ["a", "b"])


def test_class_dice_is_dice_of_each_class():
    rng = np.random.default_rng(1)
    pred, gt = rng.integers(0, 4, (5, 6, 7)), rng.integers(0, 3, (5, 6, 7))
    expected = [dice(pred == c, gt == c) for c in range(1, 5)]
    got = class_dice(torch.as_tensor(pred), torch.as_tensor(gt), 5)
    assert np.allclose(got[:3], expected[:3]) and math.isnan(got[3]) and math.isnan(expected[3])


class TwoVolumes(pl.LightningDataModule):
    """Two 3D test cases seen by a slice-wise threshold net: 'good' is segmented exactly, 'bad' half missed."""

    volumetric = True

    def test_dataloader(self):
        items = []
        for case, threshold in (("good", 1.0), ("bad/x", 0.2)):
            label = torch.zeros(6, 16, 16, dtype=torch.long)
            label[1:5, 4:12, 4:12] = 1
            image = label.float() * threshold  # 'bad': below the net's threshold of 0.5 in half the organ
            image[:, :, 8:] = label[:, :, 8:].float()
            items.append({"image": image[:, None], "label": label, "case": case,
                          "spacing": torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)})
        return torch.utils.data.DataLoader(items, batch_size=None)


def test_overlay_writer_ranks_cases_and_metrics_md_links_them(tmp_path):
    run = tmp_path / "run"
    module = SelfRegSegModule(threshold_net(), 2, ["square"])
    (run / "curves.png").parent.mkdir(parents=True)
    save_figure(plot_curves([]), run / "curves.png")
    callbacks = [OverlayWriter(run / "overlays"), MetricsWriter(run, info={"seed": 0}, settings="toy settings")]
    trainer(callbacks).test(module, TwoVolumes(), verbose=False)
    names = sorted(p.name for p in (run / "overlays").iterdir())
    assert names == ["001_bad_x.png", "002_good.png"]  # the lowest Dice first; '/' made safe
    assert png_size(run / "overlays" / "002_good.png") == tuple(round(v * 100) for v in figure_inches(1, True))
    assert not (run / "overlays.partial").exists() and not (run / "overlays.new").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ["good", "bad/x"]
    assert metrics["cases"][0]["dice"] == {"square": 1.0} and metrics["cases"][1]["mean_dice"] == pytest.approx(2 / 3)
    assert metrics["hd95_units"] == {"strict": "mm", "transunet": "voxels"}
    text = (run / "metrics.md").read_text()
    assert "toy settings" in text and "| organ | Dice strict (%) | IoU strict (%) | HD95 strict (mm) |" in text
    assert "| square | 83.3 |" in text and "[training curves](curves.png)" in text and "redundancy.png" not in text
    assert "| bad/x | 66.7 | [001_bad_x.png](overlays/001_bad_x.png) |" in text
    assert text.index("| bad/x |") < text.index("| good |")
    # testing again replaces the folder as a whole (a re-test of the run); a stale partial folder is removed
    (run / "overlays.partial" / "rank0").mkdir(parents=True)
    (run / "overlays.partial" / "rank0" / "stale.png").write_bytes(b"x")
    trainer([OverlayWriter(run / "overlays", max_cases=1)]).test(module, TwoVolumes(), verbose=False)
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["001_good.png"]
    assert not (run / "overlays.partial").exists()


def test_organ_table_units_follow_the_spacing():
    r = {"dice_mean": 0.5, "iou_mean": 1 / 3, "hd95_mean": None,
         "per_class": {"liver": {"dice": 0.5, "iou": 1 / 3, "hd95": None}}}
    table = format_organ_table({"strict": r, "transunet": r}, spacing_known=False)
    assert table.splitlines()[0] == ("| organ | Dice strict (%) | IoU strict (%) | HD95 strict (voxels) | "
                                     "Dice transunet (%) | IoU transunet (%) | HD95 transunet (voxels) |")
    assert table.splitlines()[2] == "| liver | 50.0 | 33.3 | n/a | 50.0 | 33.3 | n/a |"
    line = settings_line({"seed_everything": 3, "data": {"class_path": "a.NnUNetDataModule", "init_args": {
        "configuration": "3d", "patch_size": [64, 64, 64], "batch_size": 2}}, "model": {"net": {
            "class_path": "a.UNet", "init_args": {"base_channels": 8}}, "optimizer": "sgd", "lr": 0.01,
        "lr_schedule": "poly"}, "selfreg": {"init_args": {"lambda_scr": 0.1, "lambda_ifd": 0.2}},
        "trainer": {"max_epochs": 5}})
    assert line == ("NnUNet 3d · UNet (base_channels=8) · SelfReg λ_SCR=0.1 λ_IFD=0.2 · sgd lr 0.01 poly · batch 2 · "
                    "patch [64, 64, 64] · 5 epochs · seed 3")


def test_redundancy_figure_shows_the_first_and_last_epoch(synapse_dir, tmp_path):
    dm, module = make(synapse_dir)
    monitor = RedundancyMonitor(every_n_epochs=1, num_images=2)
    figure = RedundancyFigure(tmp_path / "redundancy.png")
    trainer([SelfReg(), monitor, figure], max_epochs=3).fit(module, dm)
    assert monitor.first[0] == 0 and monitor.last[0] == 2 and set(monitor.first[1]) == {"down1", "down2", "up1",
                                                                                        "up2"}
    width, height = png_size(tmp_path / "redundancy.png")
    fig = monitor.figure()
    assert (width, height) == tuple(round(v * 100) for v in fig.get_size_inches())
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith("after")] == ["after epoch 1",
                                                                                          "after epoch 3"]
    restored = RedundancyMonitor()  # a resumed run's figure still starts at the first epoch
    restored.load_state_dict(monitor.state_dict())
    assert restored.first[0] == 0 and torch.equal(restored.first[1]["down1"], monitor.first[1]["down1"])
    assert RedundancyMonitor().figure() is None


def test_nifti_cases_are_shown_in_the_radiological_layout():
    from lightning_selfreg.tracking.overlays import radiological

    assert radiological(np.diag([1.0, 1.0, 1.0, 1.0])) == ((0, 1, 2), (True, True, True))  # RAS: all reversed
    assert radiological(np.diag([-1.0, -1.0, 1.0, 1.0])) == ((0, 1, 2), (True, False, False))  # LPS (DICOM)
    sagittal_first = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # i = z, k = x
    axes, flips = radiological(sagittal_first)
    assert axes == (2, 1, 0) and flips == (True, True, True)
    # a voxel at the patient's right-anterior-superior corner lands top-left of the first axial slice
    volume = np.zeros((4, 5, 6))
    volume[-1, -1, -1] = 1  # RAS array: the largest index on every axis
    shown = np.flip(volume.transpose(axes := radiological(np.eye(4))[0]), [0, 1, 2])
    assert axes == (0, 1, 2) and shown[0, 0, 0] == 1
