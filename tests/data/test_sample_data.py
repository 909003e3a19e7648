"""Checks on the bundled TotalSegmentator-derived CT sample (lightning_selfreg/data/sample)."""

from pathlib import Path

import h5py
import numpy as np
import pytest

import lightning_selfreg

SAMPLE = Path(lightning_selfreg.__file__).parent / "data" / "sample"
LIVER, SPLEEN = 5, 7
ALL_CLASSES = set(range(9))
TEST_CLASSES = {0, 1, 5, 6, 7, 8}
# windowed value of 0 HU and 120 HU, with half a HU step of slack for float32 rounding
LIVER_LO, LIVER_HI = (0 + 125) / 400 - 1e-4, (120 + 125) / 400 + 1e-4


def _read_list(name):
    lines = (SAMPLE / "lists" / name).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


@pytest.fixture(scope="module")
def train():
    slices = {}
    for name in _read_list("train.txt"):
        with np.load(SAMPLE / "train_npz" / f"{name}.npz") as z:
            slices[name] = {k: z[k] for k in z.files}
    return slices


@pytest.fixture(scope="module")
def test_vol():
    with h5py.File(SAMPLE / "test_vol_h5" / "totalseg_dicom.npy.h5", "r") as f:
        return {
            "image": f["image"][:],
            "label": f["label"][:],
            "spacing": np.asarray(f.attrs["spacing"]),
            "chunks": f["image"].chunks,
            "compression": f["image"].compression,
            "keys": set(f.keys()),
        }


def _liver_share(image, label):
    vals = image[label == LIVER]
    assert vals.size > 0
    return float(np.mean((vals >= LIVER_LO) & (vals <= LIVER_HI)))


def _col_fraction(label, cls):
    cols = np.nonzero(label == cls)[-1]
    assert cols.size > 0
    return (cols.mean() + 0.5) / label.shape[-1]


def test_files_present():
    for rel in ("README.md", "LICENSE-TotalSegmentator.txt", "lists/train.txt", "lists/test_vol.txt"):
        assert (SAMPLE / rel).is_file(), rel
    assert "Apache License" in (SAMPLE / "LICENSE-TotalSegmentator.txt").read_text(encoding="utf-8")


def test_lists_match_files():
    train_names = _read_list("train.txt")
    assert len(train_names) == 51
    assert len(set(train_names)) == len(train_names)
    assert all(n.startswith("totalseg_ct_slice") for n in train_names)
    assert sorted(p.stem for p in (SAMPLE / "train_npz").glob("*.npz")) == sorted(train_names)
    assert _read_list("test_vol.txt") == ["totalseg_dicom"]
    assert sorted(p.name for p in (SAMPLE / "test_vol_h5").iterdir()) == ["totalseg_dicom.npy.h5"]


def test_train_slices(train):
    shapes = set()
    classes = set()
    for name, s in train.items():
        assert set(s) == {"image", "label", "spacing"}, name
        img, lab = s["image"], s["label"]
        assert img.dtype == np.float32 and lab.dtype == np.uint8
        assert img.ndim == 2 and img.shape == lab.shape
        assert np.isfinite(img).all()
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert lab.max() <= 8 and lab.any(), name
        assert s["spacing"].dtype == np.float32
        np.testing.assert_allclose(s["spacing"], [3.0, 3.0])
        shapes.add(img.shape)
        classes |= set(np.unique(lab).tolist())
    assert shapes == {(101, 122)}
    assert classes == ALL_CLASSES


def test_test_volume(test_vol):
    img, lab = test_vol["image"], test_vol["label"]
    assert test_vol["keys"] == {"image", "label"}
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    assert img.shape == lab.shape == (20, 512, 512)
    assert test_vol["chunks"] == (1, 512, 512)
    assert test_vol["compression"] == "gzip"
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0
    # lossless fixed window: every value is an integer HU step of 1/400
    steps = img.astype(np.float64) * 400
    assert np.abs(steps - np.round(steps)).max() < 1e-3
    assert set(np.unique(lab).tolist()) == TEST_CLASSES
    np.testing.assert_allclose(test_vol["spacing"], [2.0, 0.9765625, 0.9765625])


def test_orientation_train(train):
    img = np.stack([s["image"] for s in train.values()])
    lab = np.stack([s["label"] for s in train.values()])
    assert _liver_share(img, lab) > 0.9
    assert _col_fraction(lab, LIVER) < 0.5
    assert _col_fraction(lab, SPLEEN) > 0.5


def test_orientation_test(test_vol):
    img, lab = test_vol["image"], test_vol["label"]
    assert _liver_share(img, lab) > 0.9
    assert _col_fraction(lab, LIVER) < 0.5
    assert _col_fraction(lab, SPLEEN) > 0.5
