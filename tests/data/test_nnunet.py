"""NnUNetDataModule: the nnU-Net v2 raw format, splits, preprocessing, cache, sampling, 2D / 3D fit + test."""

import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_selfreg.data import DataError, SampleKey
from lightning_selfreg.data.nnunet import NnUNetDataModule, crop_or_pad
from lightning_selfreg.data.nnunet.format import crossval_split, read_dataset_json
from lightning_selfreg.data.resampling import resample_image, resample_label
from lightning_selfreg.data.transforms import derive_seed

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _case(root, folder, lfolder, name, spacing, shape, rng, channels=2):
    """One case: CT (int16 HU) + T2 channels and a label with two classes; NIfTI (x, y, z) = shape[::-1]."""
    sz, sy, sx = spacing
    d, h, w = shape
    lab = np.zeros((w, h, d), np.uint8)
    lab[w // 4:3 * w // 4, h // 4:3 * h // 4, 1:d - 1] = 1
    lab[w // 3:w // 2, h // 3:h // 2, d // 2:d // 2 + 2] = 2
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    ct = rng.normal(-100, 20, lab.shape) + 150 * (lab == 1) + 300 * (lab == 2)
    t2 = rng.normal(500, 50, lab.shape) + 200 * (lab > 0)
    for c, arr in enumerate((ct.astype(np.int16), t2.astype(np.float32))[:channels]):
        nib.save(nib.Nifti1Image(arr, affine), root / folder / f"{name}_{c:04d}.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), root / lfolder / f"{name}.nii.gz")


def write_nnunet(root, n_train=5, seed=0, test_spacing=(2.0, 0.7, 0.7)):
    """A tiny nnU-Net dataset: 5 training cases (anisotropic spacing, 2 channels), 1 test case with a label."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True)
    for i in range(n_train):  # z 3.0 / 3.5 / 4.0 mm, in-plane 1.0 / 1.1 mm
        spacing = (3.0 + 0.5 * (i % 3), 1.0 + 0.1 * (i % 2), 1.0 + 0.1 * (i % 2))
        _case(root, "imagesTr", "labelsTr", f"case_{i:03d}", spacing, (8 + i % 2, 18, 20 + 2 * (i % 2)), rng)
    _case(root, "imagesTs", "labelsTs", "test_000", test_spacing, (12, 26, 30), rng)
    meta = {"channel_names": {"0": "CT", "1": "T2"}, "labels": LABELS, "numTraining": n_train,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_nnunet(tmp_path_factory.mktemp("nnunet") / "Dataset001_Toy")


def _dm(path, tmp_path, **kwargs):
    kwargs.setdefault("progress", False)
    return NnUNetDataModule(path, cache_dir=tmp_path / "cache", **kwargs)


# ------------------------------------------------------------------ dataset.json and layout
def test_dataset_json_is_parsed(dataset):
    meta = read_dataset_json(dataset)
    assert meta.channel_names == ("CT", "T2") and meta.labels == ("background", "organ", "lesion")
    assert meta.num_classes == 3 and meta.file_ending == ".nii.gz"


@pytest.mark.parametrize("change, message", [
    ({"labels": {"background": 0, "organ": 1, "lesion": 3}}, "consecutive"),
    ({"labels": {"background": 0, "organ": [1, 2], "lesion": 2}}, "region-based"),
    ({"labels": {**LABELS, "ignore": 3}}, "ignore"),
    ({"labels": {"organ": 1, "background2": 0}}, "'background': 0"),
    ({"file_ending": ".mha"}, "supported: .nii.gz, .nii, .png"),
    ({"numTraining": 4}, "numTraining is 4 but imagesTr/ holds 5"),
    ({"channel_names": {"0": "CT"}}, "case 'case_000' has channel files [0, 1], expected [0]"),
    ({"file_ending": None}, "missing required key(s) ['file_ending']"),
])
def test_dataset_json_errors(tmp_path, change, message):
    root = write_nnunet(tmp_path / "Dataset002_Bad")
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=re.escape(message)):
        _dm(root, tmp_path).check_layout()


def test_preflight_names_the_bad_file(tmp_path):
    root = write_nnunet(tmp_path / "Dataset003_Bad")
    # a label with a value outside dataset.json's labels
    path = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(DataError, match=r"case_001.nii.gz: label: expected class indices in \[0, \d\), found values "
                                        r"in \[0, 7\]"):
        _dm(root, tmp_path).validate()
    # a channel on another grid than the label
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), img.affine), root / "imagesTr" / "case_002_0001.nii.gz")
    with pytest.raises(DataError, match=r"case_002_0001.nii.gz: channel shape .* differs from case_002_0000"):
        _dm(root, tmp_path).validate()
    (root / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(DataError, match="case_003.nii.gz: missing"):
        _dm(root, tmp_path).validate()


def _patch_header(path, edit):
    """Edit a .nii.gz file's header bytes directly (nibabel's save would repair a zero spacing)."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header(raw[:348], check=False)
    edit(header)
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:]))


def _rewrite(path, change):
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data, affine = change(data, img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _sform_without_z(header):
    matrix = header.get_best_affine()
    matrix[:3, 2] = 0
    header.set_sform(matrix, code=1)
    header["qform_code"] = 0


def _flip_x(data, affine):
    flipped = affine @ np.diag([-1.0, 1, 1, 1])
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (data.shape[0] - 1)  # the same field of view, x reversed
    return data[::-1].copy(), flipped


FAULTS = {  # the file that is damaged, how, and what the message says
    "truncated image": ("imagesTr/case_001_0000.nii.gz", "truncate", "cannot be read as NIfTI"),
    "NaN in a training image": ("imagesTr/case_002_0001.nii.gz",
                                lambda d, a: (np.where(d == d.max(), np.nan, d).astype(np.float32), a),
                                "image contains NaN or infinite values"),
    "NaN in a test image": ("imagesTs/test_000_0001.nii.gz",
                            lambda d, a: (np.where(d == d.max(), np.nan, d).astype(np.float32), a),
                            "image contains NaN or infinite values"),
    "fractional label": ("labelsTr/case_003.nii.gz", lambda d, a: (d.astype(np.float32) * 0.5, a),
                         "found non-integer values (e.g. 0.5)"),
    "label flipped against its image": ("labelsTr/case_000.nii.gz", _flip_x,
                                        "label geometry differs from case_000_0000.nii.gz's: voxel axis 0 flipped"),
    "label shifted": ("labelsTr/case_004.nii.gz", lambda d, a: (d, a + np.pad(np.ones((3, 1)) * 5, ((0, 1), (3, 0)))),
                      "origin moved by (5.0, 5.0, 5.0) mm"),
    "zero spacing in pixdim": ("imagesTr/case_001_0000.nii.gz",
                               lambda h: h["pixdim"].__setitem__(3, 0.0), "found pixdim[1:4] = (1.1, 1.1, 0.0)"),
    "negative spacing in pixdim": ("labelsTr/case_002.nii.gz",
                                   lambda h: h["pixdim"].__setitem__(1, -1.0), "found pixdim[1:4] = (-1.0, 1.0, 4.0)"),
    "zero axis in the sform": ("imagesTs/test_000_0000.nii.gz", _sform_without_z,
                               "a sform whose voxel axes have lengths (0.7, 0.7, 0.0)"),
    "test image without its label": ("labelsTs/test_000.nii.gz", "delete", "1 test case(s) without a label in "
                                     "labelsTs/: test_000; expected each test image's label"),
    "fold overlap in splits_final.json": ("splits_final.json", "overlap", "fold 0 has case(s) ['case_001'] in both "
                                          "train and val"),
    "a test case with a training case's name": ("imagesTs/test_000_0000.nii.gz", "rename",
                                                "case(s) case_002 are in both the train and the test split"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_preflight_reads_every_file_before_any_cache(tmp_path, fault):
    """Each fault is named by validate(), before a preprocessed case or the run exists."""
    root = write_nnunet(tmp_path / "Dataset006_Faults")
    relative, change, found = FAULTS[fault]
    path = root / relative
    if change == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif change == "delete":
        path.unlink()
    elif change == "overlap":
        path.write_text(json.dumps([{"train": ["case_000", "case_001"], "val": ["case_001", "case_004"]}]))
    elif change == "rename":
        for name in ("test_000_0000", "test_000_0001"):
            (root / "imagesTs" / f"{name}.nii.gz").rename(root / "imagesTs" / f"{name.replace('test_000', 'case_002')}"
                                                                              ".nii.gz")
        (root / "labelsTs" / "test_000.nii.gz").rename(root / "labelsTs" / "case_002.nii.gz")
    elif relative.endswith(".nii.gz") and change.__code__.co_argcount == 1:
        _patch_header(path, change)
    else:
        _rewrite(path, change)
    dm = _dm(root, tmp_path, fold=0 if change == "overlap" else None)
    with pytest.raises(DataError) as info:
        dm.validate()
    message = str(info.value)
    assert "\n" not in message and found in message, message
    if change not in ("delete", "overlap", "rename"):
        assert message.startswith(str(path)), message
    assert not (tmp_path / "cache" / "nnunet").exists()  # nothing preprocessed


def test_unlabeled_test_cases_can_be_predict_only(tmp_path):
    root = write_nnunet(tmp_path / "Dataset007_Unlabeled")
    rng = np.random.default_rng(1)
    _case(root, "imagesTs", "labelsTs", "test_001", (2.0, 0.7, 0.7), (10, 20, 22), rng)
    (root / "labelsTs" / "test_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"1 test case\(s\) without a label in labelsTs/: test_001"):
        _dm(root, tmp_path).validate()
    with pytest.warns(UserWarning, match=r"1 case\(s\) without a label are left out of testing .*'test_001'"):
        dm = _dm(root, tmp_path, unlabeled_test_cases="predict_only")
        assert dm.validate() == {"train": 5, "val": 0, "test": 1}
    assert dm.predict_only == ["test_001"] and [i.case for i in dm.splits()["test"]] == ["test_000"]


def test_a_warm_nnunet_preflight_reads_no_case_again(tmp_path, monkeypatch):
    import lightning_selfreg.data.nnunet.datamodule as nnunet_module

    root = write_nnunet(tmp_path / "Dataset008_Warm")
    read = []
    original = nnunet_module.check_case
    monkeypatch.setattr(nnunet_module, "check_case", lambda case, meta: read.append(case.case) or original(case, meta))
    _dm(root, tmp_path).validate()
    assert len(read) == 6
    read.clear()
    _dm(root, tmp_path).validate()
    assert read == []
    path = root / "imagesTr" / "case_003_0001.nii.gz"  # the second channel alone changes
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _dm(root, tmp_path).validate()
    assert read == ["case_003"]


# ------------------------------------------------------------------ splits
# sklearn.model_selection.KFold(5, shuffle=True, random_state=12345) on the sorted ids (computed with sklearn 1.x)
KFOLD_7 = [["case_003", "case_006"], ["case_000", "case_004"], ["case_001"], ["case_005"], ["case_002"]]
KFOLD_12 = [["case_000", "case_003", "case_008"], ["case_007", "case_010", "case_011"], ["case_006", "case_009"],
            ["case_001", "case_004"], ["case_002", "case_005"]]


@pytest.mark.parametrize("n, expected", [(7, KFOLD_7), (12, KFOLD_12)])
def test_default_split_is_nnunets_kfold(n, expected):
    ids = [f"case_{i:03d}" for i in reversed(range(n))]  # order of discovery must not matter
    splits = crossval_split(ids)
    assert [s["val"] for s in splits] == expected
    for s in splits:
        assert sorted(s["train"] + s["val"]) == sorted(ids) and s["train"] == sorted(s["train"])


def test_splits_final_json_and_default_split(tmp_path):
    root = write_nnunet(tmp_path / "Dataset004_Split")
    dm = _dm(root, tmp_path, fold=1)
    split = crossval_split([f"case_{i:03d}" for i in range(5)])[1]
    assert [i.case for i in dm.splits()["val"]] == split["val"]
    assert _dm(root, tmp_path).splits()["val"] == []  # fold=None: train on all cases
    (root / "splits_final.json").write_text(json.dumps([{"train": ["case_000", "case_001"], "val": ["case_004"]},
                                                        {"train": ["case_004"], "val": ["case_002", "case_003"]}]))
    dm = _dm(root, tmp_path, fold=1)
    assert [i.case for i in dm.splits()["train"]] == ["case_004"]
    assert [i.case for i in dm.splits()["val"]] == ["case_002", "case_003"]
    (root / "splits_final.json").write_text(json.dumps([{"train": ["case_000"], "val": ["case_999"]}]))
    with pytest.raises(DataError, match=r"splits_final.json: fold 0 names case\(s\) \['case_999'\]"):
        _dm(root, tmp_path, fold=0).splits()


# ------------------------------------------------------------------ preprocessing
def test_resampling_round_trip_to_native_grid():
    rng = np.random.default_rng(0)
    native = np.zeros((10, 40, 36), np.int16)
    native[2:8, 8:30, 6:28] = 1
    native[4:6, 12:20, 10:18] = 2
    spacing, target = (3.0, 0.8, 0.8), (3.0, 1.6, 1.6)  # anisotropic: z kept apart
    small = resample_label(native, spacing, target)
    assert small.shape == (10, 20, 18)
    back = resample_label(small, target, spacing, native.shape)
    assert back.shape == native.shape
    for c in (1, 2):
        dice = 2 * ((back == c) & (native == c)).sum() / ((back == c).sum() + (native == c).sum())
        assert dice > 0.9, (c, dice)
    # a smooth image survives the round trip; the coarse axis is resampled with nearest neighbour
    z, y, x = np.meshgrid(np.arange(10), np.arange(40), np.arange(36), indexing="ij")
    image = np.sin(y / 7.0)[None] + np.cos(x / 9.0)[None] + 0.01 * rng.normal(size=(1, 10, 40, 36))
    up = resample_image(image, spacing, (1.5, 0.8, 0.8))
    assert up.shape == (1, 20, 40, 36)
    assert np.array_equal(up[0, 0], image[0, 0].astype(np.float32)) and np.array_equal(up[0, 1], up[0, 0])
    back = resample_image(resample_image(image, spacing, target), target, spacing, native.shape)
    assert np.abs(back - image).max() < 0.1


def test_anisotropic_target_spacing_takes_the_10th_percentile_of_the_coarse_axis():
    """nnU-Net's rule: when the coarse axis' median spacing is > 3x the others' and its median size x 3 is below the
    others', the coarse axis takes the 10th percentile of its spacings (finer than the median); otherwise the median."""
    from lightning_selfreg.data.nnunet.preprocess import Fingerprint, target_spacing

    def target(z_spacings, z_size):
        spacings = np.array([[z, 0.8, 0.8] for z in z_spacings])
        shapes = np.array([[z_size, 512, 512]] * len(z_spacings))
        return tuple(target_spacing(Fingerprint(spacings, shapes, ())).tolist())

    thick = [5.0] * 8 + [1.5, 1.5]
    assert target(thick, 60) == pytest.approx((1.5, 0.8, 0.8))  # the anisotropic branch
    assert target(thick, 200) == pytest.approx((5.0, 0.8, 0.8))  # enough slices: the median
    assert target([2.0] * 10, 60) == pytest.approx((2.0, 0.8, 0.8))  # not anisotropic: the median
    assert target([5.0] * 10, 60) == pytest.approx((5.0, 0.8, 0.8))  # the 10th percentile of equal spacings
    assert target([5.0] * 8 + [0.5, 0.5], 60)[0] == pytest.approx(0.8 + 1e-5)  # never finer than the other axes


def test_normalization_per_channel_type(dataset, tmp_path):
    dm = _dm(dataset, tmp_path, configuration="3d")
    dm.prepare_data()
    stats = json.loads((dm.cache_dir / "fingerprint.json").read_text())["intensity"]
    assert stats[1] is None  # T2: z-score per case
    fg = []
    for i in range(5):
        ct = np.asanyarray(nib.load(dataset / "imagesTr" / f"case_{i:03d}_0000.nii.gz").dataobj)
        lab = np.asanyarray(nib.load(dataset / "labelsTr" / f"case_{i:03d}.nii.gz").dataobj)
        fg.append(ct[lab > 0].astype(np.float64))
    fg = np.concatenate(fg)
    assert stats[0]["mean"] == pytest.approx(fg.mean()) and stats[0]["std"] == pytest.approx(fg.std())
    low, high = np.percentile(fg, [0.5, 99.5])
    assert stats[0]["percentile_00_5"] == pytest.approx(low) and stats[0]["percentile_99_5"] == pytest.approx(high)
    raw = np.stack([np.full((2, 2, 2), v) for v in (high + 100, 700.0)])
    raw[1, 0] = 300.0
    out = dm.preprocessing().normalize(raw)  # the record's normalisation: what training and predict apply
    assert out[0].max() == pytest.approx((high - fg.mean()) / fg.std(), rel=1e-5)  # clipped, then z-scored
    assert out[1].mean() == pytest.approx(0, abs=1e-6) and out[1].std() == pytest.approx(1, rel=1e-5)


def test_the_default_cache_is_under_xdg_and_nothing_is_written_into_the_dataset(tmp_path, monkeypatch):
    """The dataset may be read-only or inside the installed package (the bundled sample): the cache never goes there."""
    root = write_nnunet(tmp_path / "Dataset006_ReadOnly")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dm = NnUNetDataModule(root, configuration="2d", progress=False)  # no cache_dir: the default
    dm.prepare_data()
    dm.setup("fit")
    assert dm.is_preprocessed() and dm.cache_dir.is_relative_to(tmp_path / "xdg" / "lightning_selfreg")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # no file added, removed or touched


def test_cache_is_reused_and_follows_the_files(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "Dataset005_Cache")
    dm = _dm(root, tmp_path, configuration="2d")
    dm.prepare_data()
    first = dm.cache_dir
    assert dm.is_preprocessed() and sorted(p.parent.name for p in first.glob("*/props.json"))[:2] == ["case_000",
                                                                                                      "case_001"]
    import lightning_selfreg.data.nnunet.datamodule as nnunet_module

    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(nnunet_module, "preprocess_case", fail)
    monkeypatch.setattr(nnunet_module, "compute_fingerprint", fail)
    again = _dm(root, tmp_path, configuration="2d")
    again.setup("fit")  # reuses the cache
    assert again.cache_dir == first
    assert _dm(root, tmp_path, configuration="3d").cache_dir != first  # other settings: other folder
    path = root / "labelsTr" / "case_000.nii.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a changed file: a new cache
    assert _dm(root, tmp_path, configuration="2d").cache_dir != first


# ------------------------------------------------------------------ sampling and items
def test_crop_or_pad():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(crop_or_pad(a, (-1, 2), (3, 3), -1), [[-1, -1, -1], [2, 3, -1], [6, 7, -1]])


def test_patches_are_a_function_of_seed_epoch_index_with_foreground_oversampling(dataset, tmp_path):
    dm = _dm(dataset, tmp_path, configuration="3d", patch_size=(2, 8, 8), samples_per_epoch=30, seed=3)
    dm.setup("fit")
    ds = dm._train
    a = ds[SampleKey(5, derive_seed(3, 0, 5))]
    assert a["image"].shape == (2, 2, 8, 8) and a["label"].shape == (2, 8, 8)
    assert torch.equal(a["image"], ds[SampleKey(5, derive_seed(3, 0, 5))]["image"])
    assert not torch.equal(a["image"], ds[SampleKey(5, derive_seed(3, 1, 5))]["image"])
    centred = {i for i in range(30) if ds[SampleKey(i, derive_seed(3, 0, i))]["label"][1, 4, 4] > 0}
    forced = {i for i in range(30) if int((i + 1) * 0.33) > int(i * 0.33)}  # 0.33 of the indices, evenly spread
    assert len(forced) == 9 and forced <= centred  # those patches are centred on a foreground voxel
    dm2 = _dm(dataset, tmp_path, configuration="2d", patch_size=(8, 8), samples_per_epoch=4)
    dm2.setup("fit")
    b = dm2._train[SampleKey(3, 11)]
    assert b["image"].shape == (2, 8, 8) and b["label"].shape == (8, 8) and b["label"][4, 4] > 0
    jittered = _dm(dataset, tmp_path, configuration="3d", patch_size=(2, 8, 8), samples_per_epoch=30, seed=3,
                   intensity_shift=2.0)
    jittered.setup("fit")
    c = jittered._train[SampleKey(5, derive_seed(3, 0, 5))]
    assert torch.equal(c["label"], a["label"]) and not torch.allclose(c["image"], a["image"])
    low, high = jittered._train.clip[0]
    assert low <= c["image"][0].min() and c["image"][0].max() <= high + 1e-6  # CT clipped again


def test_case_items_follow_the_interface(dataset, tmp_path):
    for configuration, shape in (("3d", (2, 7, 18, 21)), ("2d", (12, 2, 18, 21))):
        dm = _dm(dataset, tmp_path, configuration=configuration, fold=0)
        assert dm.image_size is None and dm.input_size is None  # no 2D size: the patches are what the net sees
        assert dm.validate() == {"train": 4, "val": 1, "test": 1}
        dm.setup("test")
        item = dm._test[0]
        assert tuple(item["image"].shape) == shape and item["case"] == "test_000"
        assert item["label"].shape == (12, 26, 30) and item["label"].dtype == torch.int64
        assert item["spacing"].tolist() == pytest.approx([2.0, 0.7, 0.7])
        assert np.allclose(item["affine"].numpy(), nib.load(dataset / "labelsTs" / "test_000.nii.gz").affine)
        assert dm.target_spacing == pytest.approx((3.5, 1.0, 1.0))  # per-axis median of the training spacings


@pytest.mark.parametrize("configuration", ["2d", "3d"])
def test_fit_and_test_learns_the_organ_and_writes_native_predictions(dataset, tmp_path, configuration):
    """A tiny UNet + SelfReg, 20 steps: the organ is learned; predictions are on the native grid with its affine."""
    import lightning.pytorch as pl

    from lightning_selfreg import SelfReg, SelfRegSegModule
    from lightning_selfreg.callbacks import TestPredictionWriter
    from lightning_selfreg.models import create_model

    pl.seed_everything(0)
    patch = (16, 16) if configuration == "2d" else (8, 16, 16)
    dm = _dm(dataset, tmp_path, configuration=configuration, patch_size=patch, batch_size=4, samples_per_epoch=80,
             fold=0)
    dm.validate()
    net = create_model("unet", dm.in_channels, dm.num_classes, base_channels=4, depth=2,
                       spatial_dims=dm.spatial_dims)
    grid = {"spatial_dims": 3, "roi_size": dm.patch_size} if configuration == "3d" else {}
    module = SelfRegSegModule(net, dm.num_classes, dm.class_names, optimizer="adam", lr=1e-2, weight_decay=0.0,
                              lr_schedule="constant", **grid)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SelfReg(), TestPredictionWriter(tmp_path / "pred")], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.test_results["num_cases"] == 1
    assert module.test_results["per_class"]["organ"]["dice"] > 0.6
    written = nib.load(tmp_path / "pred" / "test_000.nii.gz")
    native = nib.load(dataset / "labelsTs" / "test_000.nii.gz")
    assert written.shape == native.shape and np.allclose(written.affine, native.affine)


def test_an_interrupted_preprocessing_leaves_no_half_written_case(tmp_path, monkeypatch):
    """A case is a folder renamed into place when complete: a failure mid-case leaves nothing of it, a killed run
    leaves a temporary folder that the next preprocessing removes."""
    import subprocess
    import sys

    root = write_nnunet(tmp_path / "Dataset009_Atomic")
    dm = _dm(root, tmp_path)
    written = []
    original = np.savez

    def savez(path, *args, **kwargs):  # the last file of a case; its arrays are already in the folder
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    cache = dm.cache_dir
    assert (cache / "case_002").parent == written[2].parent.parent  # it was being written beside the others
    assert sorted(p.name for p in cache.iterdir()) == ["case_000", "case_001", "fingerprint.json"]
    assert not dm.is_preprocessed()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    orphan = cache / f".tmp{dead}.case_003"  # what a SIGKILL mid-case leaves
    orphan.mkdir()
    (orphan / "image.npy").write_bytes(b"\x93NUMPY half")
    monkeypatch.setattr(np, "savez", original)
    _dm(root, tmp_path).prepare_data()
    assert not orphan.exists() and dm.is_preprocessed()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [f"case_{i:03d}" for i in range(5)] + ["test_000"]
    assert all((cache / p.name / "props.json").is_file() for p in cache.iterdir() if p.is_dir())
