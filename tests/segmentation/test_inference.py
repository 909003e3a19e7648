"""One inference path (issue 20): predict == trainer.test, any orientation, the inputs users have, 3D, scoring."""

import csv
import json
import locale

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from experiments import predict
from lightning_selfreg import SelfRegSegModule
from lightning_selfreg.callbacks import TestPredictionWriter
from lightning_selfreg.data import NnUNetDataModule, SynapseDataModule
from lightning_selfreg.data.preprocessing import (
    ChannelNorm,
    Preprocessing,
    affine_for,
    orientation_transform,
    reorient,
    reorient_spacing,
    restore,
    restore_spacing,
)
from lightning_selfreg.metrics import case_metrics
from lightning_selfreg.models import UNet
from lightning_selfreg.segmentation.inference import mirror_axes, segment
from lightning_selfreg.segmentation.predict_files import predict_files
from lightning_selfreg.segmentation.predictor import Predictor
from tests.conftest import write_synapse_layout
from tests.data.test_nnunet import write_nnunet

ORIENTATIONS = ("RAS", "LPS", "PSR", "SAR", "IRP", "LAS")  # PSR, SAR, IRP: permuted axes


def varied_unet(in_channels, num_classes, spatial_dims=2, seed=0):
    """An untrained UNet with a random head: its prediction varies from voxel to voxel (>= 3 classes)."""
    torch.manual_seed(seed)
    net = UNet(in_channels, num_classes, base_channels=4, depth=2, spatial_dims=spatial_dims)
    with torch.no_grad():
        net.outc.weight.normal_(0, 3)
        net.outc.bias.zero_()
    return net


def save_like_the_cli(trainer, path, in_channels, num_classes, spatial_dims=2):
    """Save the trainer's module as experiments.run does: with the network's class_path config."""
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["net"] = {"class_path": "lightning_selfreg.models.UNet", "init_args": {
        "in_channels": in_channels, "num_classes": num_classes, "base_channels": 4, "depth": 2,
        "spatial_dims": spatial_dims}}
    checkpoint["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save(checkpoint, path)
    return path


def run_test(module, datamodule, folder):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[TestPredictionWriter(folder)])
    trainer.test(module, datamodule=datamodule, verbose=False)
    return trainer


def cli(*args):
    return predict.main([*(str(a) for a in args), "--device", "cpu", "--quiet"])


def voxels(path):
    return np.asarray(nib.load(path).dataobj)


def stored_as(image, codes, qform=1, sform=1):
    """The same image stored in the voxel order ``codes`` (nibabel's as_reoriented), with the given xform codes."""
    ornt = ornt_transform(io_orientation(image.affine), axcodes2ornt(tuple(codes)))
    out = image.as_reoriented(ornt)
    data = np.asanyarray(out.dataobj)
    result = nib.Nifti1Image(data, out.affine)
    result.set_qform(out.affine, code=qform)
    result.set_sform(out.affine, code=sform)
    return result


def in_ras(path):
    """A label file's voxels in RAS voxel order (to compare outputs stored in different orientations)."""
    image = nib.load(path)
    return apply_orientation(np.asanyarray(image.dataobj), ornt_transform(io_orientation(image.affine),
                                                                          axcodes2ornt(("R", "A", "S"))))


# ---------------------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_reorientation_is_nibabels_and_restore_inverts_it(codes):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(5, 6, 7))
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    stored = stored_as(nib.Nifti1Image(xyz, affine), codes)
    ornt = orientation_transform(stored.affine, "LPS")
    zyx = np.asanyarray(stored.dataobj).transpose(2, 1, 0)
    expected = apply_orientation(np.asanyarray(stored.dataobj), ornt).transpose(2, 1, 0) if ornt is not None else zyx
    assert np.array_equal(reorient(zyx, ornt), expected)
    assert np.array_equal(reorient(zyx, ornt), xyz[::-1, ::-1].transpose(2, 1, 0))  # LPS of the RAS original
    assert np.array_equal(restore(reorient(zyx, ornt), ornt), zyx)
    assert np.array_equal(restore(reorient(zyx[None], ornt), ornt), zyx[None])  # leading channel axis
    spacing = tuple(stored.header.get_zooms()[::-1])
    assert reorient_spacing(spacing, ornt) == pytest.approx((2.5, 0.9, 0.8))
    assert restore_spacing(reorient_spacing(spacing, ornt), ornt) == pytest.approx(spacing)


def test_affine_of_a_declared_orientation():
    affine = affine_for(("L", "P", "S"), (3.0, 0.7, 0.8))
    assert nib.aff2axcodes(affine) == ("L", "P", "S") and np.allclose(nib.affines.voxel_sizes(affine), (0.8, 0.7, 3))
    assert nib.aff2axcodes(affine_for(None, None)) == ("R", "A", "S")


def test_record_round_trips_and_refuses_a_newer_version():
    record = Preprocessing(2, 3, ("CT",), (ChannelNorm("window", -125, 275),), ("liver",), "LPS")
    assert Preprocessing.from_dict(record.to_dict()) == record
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()
    with pytest.raises(ValueError, match="newer than this library"):
        Preprocessing.from_dict({**record.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="one of each of L/R"):
        Preprocessing(2, 3, ("CT",), (ChannelNorm("none"),), ("liver",), "LRS")


# ---------------------------------------------------------------------------------------------------- predict == test
@pytest.fixture
def synapse_model(tmp_path):
    """A Synapse-layout model after trainer.test (its predictions written), and its checkpoint."""
    root = write_synapse_layout(tmp_path / "synapse", depth=5)
    datamodule = SynapseDataModule(root, val_cases=(), image_size=32)
    module = SelfRegSegModule(varied_unet(1, 9), 9, input_size=32)
    trainer = run_test(module, datamodule, tmp_path / "test")
    path = save_like_the_cli(trainer, tmp_path / "model.ckpt", 1, 9)
    return root, module, path


def test_synapse_predict_equals_test_and_writes_the_declared_orientation(synapse_model, tmp_path):
    root, module, ckpt = synapse_model
    assert torch.load(ckpt, weights_only=False)["preprocessing"] == module.preprocessing.to_dict()
    tested = nib.load(tmp_path / "test" / "case0100.nii.gz")
    assert nib.aff2axcodes(tested.affine) == ("L", "P", "S")  # the layout's declared orientation, not RAS
    assert np.allclose(nib.affines.voxel_sizes(tested.affine), (1.0, 1.0, 2.0))  # the h5 spacing (z, y, x) = 2, 1, 1
    assert cli("--checkpoint", ckpt, "--input", root / "test_vol_h5", "--output", tmp_path / "pred") == 0
    predicted = nib.load(tmp_path / "pred" / "case0100.nii.gz")
    assert len(np.unique(voxels(tested.get_filename()))) >= 3
    assert np.array_equal(np.asarray(predicted.dataobj), np.asarray(tested.dataobj))
    assert np.array_equal(predicted.affine, tested.affine)


def _nnunet_dataset(root, test_codes="LPS"):
    """The tiny nnU-Net dataset (RAS training cases, 2 channels), its test case stored in ``test_codes``."""
    write_nnunet(root)
    for folder, names in (("imagesTs", ("test_000_0000", "test_000_0001")), ("labelsTs", ("test_000",))):
        for name in names:
            path = root / folder / f"{name}.nii.gz"
            nib.save(stored_as(nib.load(path), test_codes), path)
    return root


@pytest.mark.parametrize("configuration", ["2d", "3d"])
def test_nnunet_predict_equals_test_with_a_test_case_in_another_orientation(tmp_path, configuration):
    root = _nnunet_dataset(tmp_path / "Dataset001_Toy")
    patch = (16, 16) if configuration == "2d" else (8, 16, 16)
    datamodule = NnUNetDataModule(root, configuration=configuration, patch_size=patch, cache_dir=tmp_path / "cache",
                                  progress=False)
    dims = datamodule.spatial_dims
    grid = {"spatial_dims": 3, "roi_size": patch} if dims == 3 else {}
    module = SelfRegSegModule(varied_unet(2, 3, dims), 3, datamodule.class_names, **grid)
    trainer = run_test(module, datamodule, tmp_path / "test")
    record = module.preprocessing
    assert record.orientation == ("R", "A", "S") and record.intensity[0].scheme == "ct"
    assert record.intensity[1].scheme == "zscore" and record.spacing[1:] == (1.0, 1.0)
    ckpt = save_like_the_cli(trainer, tmp_path / "model.ckpt", 2, 3, dims)
    label = root / "labelsTs" / "test_000.nii.gz"
    tested = nib.load(tmp_path / "test" / "test_000.nii.gz")
    assert tested.shape == nib.load(label).shape and np.array_equal(tested.affine, nib.load(label).affine)
    assert nib.aff2axcodes(tested.affine) == ("L", "P", "S")  # mapped back to the file's own voxel order
    assert cli("--checkpoint", ckpt, "--input", root / "imagesTs", "--output", tmp_path / "pred",
               "--labels", root / "labelsTs") == 0
    predicted = voxels(tmp_path / "pred" / "test_000.nii.gz")
    assert len(np.unique(predicted)) == 3
    assert np.array_equal(predicted, np.asarray(tested.dataobj))  # the label map trainer.test computed
    with open(tmp_path / "pred" / "scores.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "strict"]
    dice = {r["class"]: float(r["dice"]) for r in rows}
    tested_dice = module.test_results_by_protocol["strict"]["per_class"]
    assert dice == pytest.approx({name: tested_dice[name]["dice"] for name in dice}, rel=1e-6)
    summary = json.loads((tmp_path / "pred" / "scores.json").read_text())
    assert summary["strict"]["hd95_mean"] == pytest.approx(module.test_results_by_protocol["strict"]["hd95_mean"])


# ---------------------------------------------------------------------------------------------------- orientations
def _orientation_model(tmp_path, dims):
    """A RAS-trained nnU-Net-style model (one CT channel) without any data: a record and random weights."""
    record = Preprocessing(spatial_dims=dims, image_dims=3, channel_names=("CT",),
                           intensity=(ChannelNorm("ct", low=-200, high=300, mean=40, std=90),),
                           class_names=("organ", "lesion"), orientation="RAS", spacing=(2.0, 1.2, 1.2))
    grid = {"spatial_dims": 3, "roi_size": (8, 16, 16), "sw_batch_size": 2} if dims == 3 else {}
    module = SelfRegSegModule(varied_unet(1, 3, dims, seed=3), 3, record.class_names, **grid)
    return Predictor(module, record)


@pytest.mark.parametrize("dims", [2, 3])
def test_predictions_agree_across_orientations_and_keep_the_input_geometry(tmp_path, dims):
    rng = np.random.default_rng(0)
    shape = (22, 19, 9)  # (x, y, z): distinct sizes, so any wrong permutation shows
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ball = ((i - 11) / 7) ** 2 + ((j - 8) / 6) ** 2 + ((k - 4) / 3) ** 2 <= 1
    hu = (rng.normal(-50, 40, shape) + 200 * ball).astype(np.int16)
    label = ball.astype(np.uint8) + (ball & (i > 11)).astype(np.uint8)
    affine = np.diag([0.9, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, -300)
    theta = np.deg2rad(3.0)  # and a slightly oblique copy: io_orientation picks the closest axes
    oblique = affine.copy()
    oblique[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                                [0, 0, 1]]) @ affine[:3, :3]
    predictor = _orientation_model(tmp_path, dims)
    results = {}
    for name, base, codes, xforms in [(c, affine, c, (1, 1)) for c in ORIENTATIONS] + [
            ("RAS-qform-only", affine, "RAS", (1, 0)), ("LPS-sform-only", affine, "LPS", (0, 2)),
            ("PSR-oblique", oblique, "PSR", (2, 2))]:
        image = stored_as(nib.Nifti1Image(hu, base), codes, *xforms)
        image.header.set_slope_inter(1.0, -1024.0)  # a CT-like file with intensity scaling
        nib.save(image, tmp_path / f"{name}.nii.gz")
        nib.save(stored_as(nib.Nifti1Image(label, base), codes, *xforms), tmp_path / f"{name}_label.nii.gz")
        source = nib.load(tmp_path / f"{name}.nii.gz")
        out = predictor.predict(tmp_path / f"{name}.nii.gz")
        nib.save(out, tmp_path / f"{name}_seg.nii.gz")
        written = nib.load(tmp_path / f"{name}_seg.nii.gz")
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine), name
        for key in ("qform_code", "sform_code", "pixdim", "quatern_b", "quatern_c", "quatern_d", "srow_x"):
            assert np.array_equal(written.header[key], source.header[key]), (name, key)
        pred = in_ras(tmp_path / f"{name}_seg.nii.gz")
        dice, _ = case_metrics(pred, in_ras(tmp_path / f"{name}_label.nii.gz"), 3)
        results[name] = (pred, dice)
    reference, reference_dice = results["RAS"]
    assert len(np.unique(reference)) == 3
    for name, (pred, dice) in results.items():
        assert (pred != reference).mean() <= 0.005, name  # in fact 0: reorientation moves no voxel value
        assert np.array_equal(pred, reference), name
        assert np.allclose(dice, reference_dice), name
    # not a trivial agreement: the model is not flip-invariant, so voxels read in another order (a flipped array
    # under the same affine) would give another answer
    flipped = np.asarray(predictor.predict(nib.Nifti1Image(hu[::-1], affine)).dataobj)[::-1]
    assert not np.array_equal(flipped, np.asarray(nib.load(tmp_path / "RAS_seg.nii.gz").dataobj))


# ---------------------------------------------------------------------------------------------------- inputs
def _write_dicom_series(folder, volume_zyx, spacing_xyz, origin):
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.4242"
    saved = locale.setlocale(locale.LC_ALL)  # GDCM switches the process to the "C" locale
    try:
        _write_slices(writer, image, folder, series)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(writer, image, folder, series):
    for z in range(image.GetSize()[2]):
        s = image[:, :, z]
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".1",
                           "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series}.{z + 10}",
                           "0020|0013": str(z + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
                           "0028|1052": "0", "0028|1053": "1"}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)


def test_a_dicom_series_folder_is_read_with_its_geometry(synapse_model, tmp_path):
    pytest.importorskip("SimpleITK")
    _, _, ckpt = synapse_model
    rng = np.random.default_rng(1)
    volume = rng.integers(-300, 400, size=(6, 28, 24))  # (z, y, x)
    _write_dicom_series(tmp_path / "series", volume, (0.8, 0.7, 2.5), (10.0, -20.0, 30.0))
    # the same scan as NIfTI: DICOM's (x, y, z) run along patient L, P, S
    affine = np.diag([-0.8, -0.7, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.int16), affine), tmp_path / "same.nii.gz")
    encoding = locale.getpreferredencoding(False)
    assert cli("--checkpoint", ckpt, "--input", tmp_path / "series", "--output", tmp_path / "dicom.nii.gz") == 0
    assert locale.getpreferredencoding(False) == encoding  # GDCM's switch to the "C" locale is undone
    assert cli("--checkpoint", ckpt, "--input", tmp_path / "same.nii.gz", "--output", tmp_path / "nifti.nii.gz") == 0
    from_dicom = nib.load(tmp_path / "dicom.nii.gz")
    assert np.allclose(from_dicom.affine, affine) and int(from_dicom.header["sform_code"]) == 1
    assert np.array_equal(np.asarray(from_dicom.dataobj), voxels(tmp_path / "nifti.nii.gz"))
    assert len(np.unique(voxels(tmp_path / "nifti.nii.gz"))) >= 3


def test_a_folder_of_nifti_files_is_mirrored_and_resumed(synapse_model, tmp_path, capsys):
    _, _, ckpt = synapse_model
    (tmp_path / "scans").mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(rng.integers(-500, 400, (30, 26, 3)).astype(np.int16), np.eye(4)),
                 tmp_path / "scans" / f"{name}.nii.gz")
    out = tmp_path / "out"
    out.mkdir()  # an interrupted run: only `a` was written
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    nib.save(predictor.predict(tmp_path / "scans" / "a.nii.gz"), out / "a.nii.gz")
    before = (out / "a.nii.gz").stat().st_mtime_ns
    assert cli("--checkpoint", ckpt, "--input", tmp_path / "scans", "--output", out) == 2  # exists
    capsys.readouterr()
    assert predict.main([str(a) for a in ("--checkpoint", ckpt, "--input", tmp_path / "scans", "--output", out,
                                          "--continue", "--device", "cpu")]) == 0
    err = capsys.readouterr().err  # not a terminal: a line per case, no progress-bar updates
    assert "\r" not in err
    assert [line.split(" (")[0] for line in err.splitlines()] == [f"case 1/2: {out / 'b.nii.gz'}",
                                                                   f"case 2/2: {out / 'c.nii.gz'}"], err
    assert "ETA" in err.splitlines()[0]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert (out / "a.nii.gz").stat().st_mtime_ns == before  # skipped, not rewritten
    for name in ("b", "c"):
        assert np.array_equal(voxels(out / f"{name}.nii.gz"),
                              np.asarray(predictor.predict(tmp_path / "scans" / f"{name}.nii.gz").dataobj))
    assert cli("--checkpoint", ckpt, "--input", tmp_path / "scans", "--output", out, "--overwrite") == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns != before


def test_2d_images_for_an_rgb_model(tmp_path):
    from PIL import Image

    record = Preprocessing(2, 2, ("R", "G", "B"), (ChannelNorm("rgb_to_0_1"),) * 3, ("gland",))
    predictor = Predictor(SelfRegSegModule(varied_unet(3, 2), 2, ["gland"], input_size=32), record)
    (tmp_path / "slides").mkdir()
    rng = np.random.default_rng(3)
    images = {name: rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for name in ("s1", "s2")}
    for name, rgb in images.items():
        Image.fromarray(rgb).save(tmp_path / "slides" / f"{name}.png")
    result = predict_files(predictor, tmp_path / "slides", tmp_path / "masks", progress=False)
    assert [p.name for p in result.written] == ["s1.png", "s2.png"]
    for name, rgb in images.items():
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
        expected = predictor.predict(rgb)  # (H, W) labels of an array
        assert mask.shape == (40, 36) and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask, expected.astype(np.uint8) * 255)


def test_predictor_accepts_a_nibabel_image_an_array_with_its_affine_and_a_path(synapse_model, tmp_path):
    _, _, ckpt = synapse_model
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    hu = np.random.default_rng(4).integers(-500, 400, (30, 26, 4)).astype(np.int16)
    image = nib.Nifti1Image(hu, np.diag([0.7, 0.7, 3.0, 1.0]))
    nib.save(image, tmp_path / "ct.nii.gz")
    from_image = predictor.predict(image)
    from_path = predictor.predict(tmp_path / "ct.nii.gz")
    from_array = predictor.predict(hu, affine=image.affine)
    assert np.array_equal(np.asarray(from_image.dataobj), np.asarray(from_path.dataobj))
    assert np.array_equal(np.asarray(from_image.dataobj), from_array) and from_array.shape == hu.shape
    # without an affine the array is taken as already in the model's orientation (LPS): flipped in x and y here
    flipped = predictor.predict(np.ascontiguousarray(hu[::-1, ::-1]))
    assert np.array_equal(flipped[::-1, ::-1], from_array)


# ---------------------------------------------------------------------------------------------------- 3D and TTA
def test_3d_small_volume_is_padded_tta_averages_the_flips_and_probabilities_are_written(tmp_path):
    predictor = _orientation_model(tmp_path, 3)
    hu = np.random.default_rng(5).normal(0, 100, (10, 9, 3)).astype(np.float32)  # smaller than the window
    nib.save(nib.Nifti1Image(hu, np.diag([1.2, 1.2, 2.0, 1.0])), tmp_path / "small.nii.gz")
    predictor.mirror = True
    result = predict_files(predictor, tmp_path / "small.nii.gz", tmp_path / "seg.nii.gz", probabilities=True,
                           progress=False)
    assert [p.name for p in result.written] == ["seg.nii.gz"]
    labels = voxels(tmp_path / "seg.nii.gz")
    assert labels.shape == hu.shape
    with np.load(tmp_path / "seg.npz") as f:
        probs, names = f["probabilities"], list(f["class_names"])
    assert probs.dtype == np.float16 and probs.shape == (3, *hu.shape) and names == ["background", "organ", "lesion"]
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)
    assert (probs.argmax(0) == labels).mean() > 0.99  # float16 ties aside
    # mirroring: the mean logits of the 8 flips, computed by hand
    module = predictor.module
    x = torch.randn(1, 1, 8, 16, 16)
    manual = sum(torch.flip(module(torch.flip(x, axes)), axes) for axes in [(), *mirror_axes(3)]) / 8
    with torch.no_grad():
        got = segment(module, x[0], mirror=True, probabilities=True).probabilities
    assert len(mirror_axes(3)) == 7 and len(mirror_axes(2)) == 3
    assert torch.allclose(got.float(), manual[0].softmax(0), atol=2e-3)
    assert (segment(module, x[0], mirror=True).labels == manual[0].argmax(0)).float().mean() > 0.99
    assert (segment(module, x[0]).labels != manual[0].argmax(0)).any()  # the flips do change this model's answer


def test_a_checkpoint_without_a_record_predicts_with_the_runs_data_config(synapse_model, tmp_path, capsys):
    _, _, ckpt = synapse_model
    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint["preprocessing"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    old = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, old)
    (tmp_path / "run" / "config.yaml").write_text(
        "data:\n  class_path: lightning_selfreg.data.SampleCTDataModule\n  init_args:\n    image_size: 32\n")
    nib.save(nib.Nifti1Image(np.zeros((30, 26, 3), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    assert cli("--checkpoint", old, "--input", tmp_path / "ct.nii.gz", "--output", tmp_path / "a.nii.gz") == 2
    err = capsys.readouterr().err
    assert f"--data-config {tmp_path / 'run' / 'config.yaml'}" in err and not (tmp_path / "a.nii.gz").exists()
    assert cli("--checkpoint", old, "--input", tmp_path / "ct.nii.gz", "--output", tmp_path / "a.nii.gz",
               "--data-config", tmp_path / "run" / "config.yaml") == 0
    assert cli("--checkpoint", ckpt, "--input", tmp_path / "ct.nii.gz", "--output", tmp_path / "b.nii.gz") == 0
    assert np.array_equal(voxels(tmp_path / "a.nii.gz"), voxels(tmp_path / "b.nii.gz"))


# ---------------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("regions", ["few", "many"])  # few class borders, and noise-like (the dense fallback)
@pytest.mark.parametrize(("src", "dst"), [((24, 24), (97, 128)), ((24, 24), (24, 60)), ((9, 13), (5, 7)),
                                           ((6, 10, 12), (13, 31, 40)), ((12, 16, 16), (4, 16, 9))])
def test_labels_interpolated_only_at_class_borders_equal_the_full_resample(src, dst, regions):
    from lightning_selfreg.segmentation.inference import resize_argmax

    torch.manual_seed(0)
    mode = "bilinear" if len(src) == 2 else "trilinear"
    coarse = torch.randn(2, 5, *(2 if regions == "few" else max(2, s // 2) for s in src), dtype=torch.float64)
    logits = torch.nn.functional.interpolate(coarse, size=src, mode=mode, align_corners=False)  # class regions
    expected = torch.nn.functional.interpolate(logits, size=dst, mode=mode, align_corners=False).argmax(1)
    assert torch.equal(resize_argmax(logits, dst, chunk=3), expected)
    assert torch.equal(resize_argmax(logits.float(), dst), resize_argmax(logits.float(), dst, chunk=2))


@pytest.mark.parametrize("dataset", ["glas", "acdc"])
def test_predict_equals_test_for_2d_image_and_acdc_layouts(tmp_path, dataset):
    from PIL import Image

    from lightning_selfreg.data import ACDCDataModule, GlaSDataModule
    from tests.data.test_data import write_acdc, write_uctransnet

    if dataset == "glas":
        root = write_uctransnet(tmp_path / "glas")
        datamodule, channels, classes, inputs = GlaSDataModule(root, image_size=32), 3, 2, root / "Test_Folder" / "img"
    else:
        root = write_acdc(tmp_path / "acdc")
        datamodule, channels, classes, inputs = ACDCDataModule(root, image_size=32), 1, 4, root / "test"
    module = SelfRegSegModule(varied_unet(channels, classes), classes, datamodule.class_names, input_size=32)
    trainer = run_test(module, datamodule, tmp_path / "test")
    ckpt = save_like_the_cli(trainer, tmp_path / "model.ckpt", channels, classes)
    assert cli("--checkpoint", ckpt, "--input", inputs, "--output", tmp_path / "pred") == 0
    tested, predicted = sorted((tmp_path / "test").iterdir()), sorted((tmp_path / "pred").iterdir())
    assert len(tested) == len(predicted) == len(list(inputs.iterdir()))
    for a, b in zip(tested, predicted, strict=True):
        if dataset == "glas":
            assert a.name == b.name and np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        else:  # ACDC declares no orientation: the volume as stored, an identity affine
            assert np.array_equal(voxels(a), voxels(b)) and np.array_equal(nib.load(b).affine, np.eye(4))
    assert len(np.unique(voxels(b) if dataset == "acdc" else np.asarray(Image.open(b)))) >= 2


def test_predict_equals_test_for_an_nnunet_dataset_of_2d_images(tmp_path):
    from PIL import Image

    root = tmp_path / "Dataset002_Png"
    rng = np.random.default_rng(6)
    for split, n in (("Tr", 3), ("Ts", 2)):
        (root / f"images{split}").mkdir(parents=True)
        (root / f"labels{split}").mkdir()
        for i in range(n):
            label = np.zeros((28, 34), np.uint8)
            label[6:20, 8:25] = 1
            image = (rng.integers(0, 120, (28, 34, 3)) + 100 * label[..., None]).astype(np.uint8)
            Image.fromarray(image).save(root / f"images{split}" / f"c{split}{i}_0000.png")
            Image.fromarray(label).save(root / f"labels{split}" / f"c{split}{i}.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {
        "background": 0, "gland": 1}, "numTraining": 3, "file_ending": ".png"}))
    datamodule = NnUNetDataModule(root, configuration="2d", patch_size=(16, 16), cache_dir=tmp_path / "cache",
                                  progress=False)
    module = SelfRegSegModule(varied_unet(3, 2), 2, datamodule.class_names)
    trainer = run_test(module, datamodule, tmp_path / "test")
    assert module.preprocessing.image_dims == 2 and module.preprocessing.orientation is None
    ckpt = save_like_the_cli(trainer, tmp_path / "model.ckpt", 3, 2)
    assert cli("--checkpoint", ckpt, "--input", root / "imagesTs", "--output", tmp_path / "pred") == 0
    for name in ("cTs0.png", "cTs1.png"):
        tested, predicted = (np.asarray(Image.open(tmp_path / f / name)) for f in ("test", "pred"))
        assert np.array_equal(tested, predicted) and len(np.unique(predicted)) == 2
