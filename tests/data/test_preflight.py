"""The data pre-flight (``SegDataModule.validate()``), the list-folder search, and the data-side argument checks.

Every bad file is written in the exact real format (TransUNet ``.npz`` slices, ``.npy.h5`` volumes), then broken;
each test asserts that the one-line message names the file and what was expected and found.
"""

import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from experiments.run import main
from lightning_selfreg.data import (
    ACDCDataModule,
    DataError,
    GlaSDataModule,
    SegDataModule,
    SynapseDataModule,
    read_slice,
)
from lightning_selfreg.data.preflight import npz_headers
from tests.conftest import write_synapse_layout
from tests.data.test_data import write_acdc, write_uctransnet


def _dm(root, **kwargs):
    return SynapseDataModule(root, val_cases=["case0001"], image_size=16, transform=None, **kwargs)


def _preflight_error(dm) -> str:
    with pytest.raises(DataError) as info:
        dm.validate()
    message = str(info.value)
    assert "\n" not in message
    return message


def _write_volume(path, image, label):
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


@pytest.fixture
def root(tmp_path):
    return write_synapse_layout(tmp_path / "synapse", n_train_cases=2)


# ---------------------------------------------------------------- test volumes: read in full


def test_test_volume_with_labels_out_of_range(root):
    path = root / "test_vol_h5" / "case0100.npy.h5"
    label = np.zeros((4, 24, 20), np.float32)
    label[2, 5, 5] = 12
    _write_volume(path, np.zeros((4, 24, 20), np.float32), label)
    message = _preflight_error(_dm(root))
    assert "case0100.npy.h5 (slices 0-3): label: expected class indices in [0, 9), found values in [0, 12]" in message


def test_test_volume_with_nan(root):
    image = np.zeros((4, 24, 20), np.float32)
    image[3, 1, 1] = np.nan
    _write_volume(root / "test_vol_h5" / "case0100.npy.h5", image, np.zeros((4, 24, 20), np.float32))
    assert "case0100.npy.h5" in (message := _preflight_error(_dm(root))) and "NaN/infinite" in message


def test_test_volume_shape_mismatch_and_missing_dataset(root):
    path = root / "test_vol_h5" / "case0100.npy.h5"
    _write_volume(path, np.zeros((4, 24, 20), np.float32), np.zeros((4, 24, 21), np.float32))
    message = _preflight_error(_dm(root))
    assert "case0100.npy.h5: expected `label` of shape (4, 24, 20)" in message and "found (4, 24, 21)" in message
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 24, 20), np.float32)
    message = _preflight_error(_dm(root))
    assert "case0100.npy.h5: expected datasets ['image', 'label'], found ['image'] (missing ['label'])" in message


def test_truncated_h5_is_named(root):
    path = root / "test_vol_h5" / "case0100.npy.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _preflight_error(_dm(root))
    assert f"{path}: expected an HDF5 file, found a truncated or corrupt file" in message and "truncated" in message


def test_malformed_spacing_attribute(root):
    with h5py.File(root / "test_vol_h5" / "case0100.npy.h5", "a") as f:
        f.attrs["spacing"] = [1.0, -1.0, 1.0]
    assert "attribute `spacing` must be 3 positive numbers" in _preflight_error(_dm(root))


# ---------------------------------------------------------------- training slices: headers only


def test_truncated_training_npz_is_named_before_training(root):
    path = root / "train_npz" / "case0000_slice001.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the zip directory sits at the end
    message = _preflight_error(_dm(root))
    assert f"{path}: expected a NumPy .npz (zip) archive, found a truncated or corrupt file (BadZipFile" in message


def test_npz_missing_key_wrong_dtype_and_shape(root):
    path = root / "train_npz" / "case0000_slice002.npz"
    cases = [
        (dict(image=np.zeros((24, 20), np.float32)),
         "expected keys ['image', 'label'], found ['image'] (missing ['label'])"),
        (dict(image=np.full((24, 20), "a"), label=np.zeros((24, 20), np.uint8)),
         "expected a numeric (float or int) `image`, found dtype <U1"),
        (dict(image=np.zeros((24, 20), np.float32), label=np.zeros((24, 20), complex)),
         "expected an integer (or integer-valued float) `label`, found dtype complex128"),
        (dict(image=np.zeros((24, 20), np.float32), label=np.zeros((24, 21), np.uint8)),
         "expected `label` of shape (24, 20) (that of `image` (24, 20)), found (24, 21)"),
        (dict(image=np.zeros((2, 24, 20), np.float32), label=np.zeros((24, 20), np.uint8)),
         "expected a 2D `image`, found shape (2, 24, 20)"),
        (dict(image=np.array([None, 1], dtype=object), label=np.zeros((24, 20), np.uint8)),
         "expected a numeric array `image`, found an object (pickled) array"),
    ]
    for arrays, expected in cases:
        np.savez_compressed(path, **arrays)
        message = _preflight_error(_dm(root))
        assert message.startswith(f"{path}: ") and expected in message, (expected, message)


def test_header_reader_reads_no_data(root, monkeypatch):
    """The header pass of a compressed slice inflates a few kB, not the 2 x 4 MB of a 1024 x 1024 slice."""
    import zipfile

    path = root / "train_npz" / "big.npz"
    np.savez_compressed(path, image=np.random.default_rng(0).random((1024, 1024), dtype=np.float32),
                        label=np.zeros((1024, 1024), np.float32))
    read = []
    original = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        out = original(self, n)
        read.append(len(out))
        return out

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    headers = npz_headers(path)
    assert headers["image"].shape == (1024, 1024) and headers["label"].dtype == np.float32
    assert sum(read) < 1000


def test_corrupt_deflate_stream_is_named_by_the_preflight_and_when_read(root):
    """A corrupt member (directory intact) passes the header check; the pre-flight's full read names the file, and so
    does training's read, from a worker."""
    path = root / "train_npz" / "case0000_slice000.npz"
    np.savez_compressed(path, image=np.random.default_rng(0).random((24, 200), dtype=np.float32),
                        label=np.zeros((24, 200), np.uint8))
    data = bytearray(path.read_bytes())
    data[12000:12300] = bytes(300)  # deep inside image.npy's deflate stream, past what the header read inflates
    path.write_bytes(bytes(data))
    npz_headers(path)  # the header pass alone does not see it
    dm = _dm(root, num_workers=1, batch_size=6)
    with pytest.raises(DataError, match=r"case0000_slice000.npz: cannot be read as .npz \((BadZipFile|error)"):
        dm.validate()
    with pytest.raises(DataError, match=r"case0000_slice000.npz: cannot be read as .npz \((BadZipFile|error)"):
        read_slice(path, 9)
    dm.setup("fit")
    batches = iter(torch.utils.data.DataLoader(dm._train, batch_size=6, num_workers=1))
    try:
        with pytest.raises(DataError) as info:  # re-raised from the worker's formatted traceback
            next(batches)
    finally:
        batches._shutdown_workers()  # now, not when a later test collects the iterator (a 5 s join there)
    assert str(info.value).startswith(f"{path}: cannot be read as .npz") and "\n" not in str(info.value)


def test_validation_slice_is_read_in_full(root):
    label = np.zeros((24, 20), np.uint8)
    label[0, 0] = 9
    np.savez_compressed(root / "train_npz" / "case0001_slice000.npz", image=np.zeros((24, 20), np.float32),
                        label=label)
    message = _preflight_error(_dm(root))
    assert "case0001_slice000.npz: label: expected class indices in [0, 9), found values in [0, 9]" in message


def test_acdc_and_histology_headers(tmp_path):
    acdc = write_acdc(tmp_path / "acdc")
    name = (acdc / "lists_ACDC" / "train.txt").read_text().split()[0]
    np.savez(acdc / "train" / name, image=np.zeros((20, 24), np.float32), label=np.zeros((20, 24), np.uint8))
    message = _preflight_error(ACDCDataModule(acdc, transform=None))
    assert f"{name}: expected keys ['img', 'label'], found ['image', 'label']" in message
    glas = write_uctransnet(tmp_path / "glas")
    mask = next((glas / "Train_Folder" / "labelcol").iterdir())
    Image.fromarray(np.zeros((30, 35), np.uint8)).save(mask)
    message = _preflight_error(GlaSDataModule(glas, transform=None))
    assert f"{mask}: expected a mask of the size of" in message and "(30, 36), found (30, 35)" in message
    Image.fromarray(np.zeros((30, 36), np.uint8)).save(mask)
    image = next((glas / "Train_Folder" / "img").iterdir())
    data = image.read_bytes()
    image.write_bytes(data[: len(data) - 30])  # a truncated PNG: header intact, chunks cut
    message = _preflight_error(GlaSDataModule(glas, transform=None))
    assert f"{image}: expected an image file, found an unreadable or corrupt file" in message


# ---------------------------------------------------------------- layouts users have


def _move_lists(root, target):
    target.mkdir(parents=True)
    for name in ("train.txt", "test_vol.txt"):
        (root / "lists" / name).rename(target / name)
    (root / "lists").rmdir()


def test_transunet_list_layout_found_automatically_and_via_list_dir(tmp_path):
    # TransUNet's README: data in <project>/data/Synapse, lists in the repository's lists/lists_Synapse
    root = write_synapse_layout(tmp_path / "project" / "data" / "Synapse")
    _move_lists(root, tmp_path / "project" / "TransUNet" / "lists" / "lists_Synapse")
    dm = SynapseDataModule(root, val_cases=())
    assert dm.lists == tmp_path / "project" / "data" / "Synapse" / "../../TransUNet/lists/lists_Synapse"
    assert dm.validate() == {"train": 6, "val": 0, "test": 1}
    elsewhere = tmp_path / "my_lists"
    (tmp_path / "project" / "TransUNet" / "lists" / "lists_Synapse").rename(elsewhere)
    assert SynapseDataModule(root, val_cases=(), list_dir=elsewhere).validate()["train"] == 6
    inside = write_synapse_layout(tmp_path / "inside")
    _move_lists(inside, tmp_path / "lists_Synapse")
    (inside / "lists").mkdir()
    (tmp_path / "lists_Synapse").rename(inside / "lists" / "lists_Synapse")
    assert SynapseDataModule(inside, val_cases=()).lists == inside / "lists/lists_Synapse"


def test_list_folder_errors_say_what_was_searched_and_found(tmp_path):
    root = write_synapse_layout(tmp_path / "s")
    (root / "lists" / "train.txt").rename(root / "lists" / "all.lst")
    with pytest.raises(DataError) as info:
        SynapseDataModule(root, val_cases=()).validate()
    message = str(info.value)
    assert info.value.parameter == "list_dir"
    assert f"no folder with train.txt and test_vol.txt under {root}: searched lists, lists/lists_Synapse" in message
    assert "found lists/ holds all.lst, test_vol.txt" in message
    with pytest.raises(DataError, match=r"`list_dir` .*nowhere: expected train.txt and test_vol.txt, found the "
                                        r"folder does not exist"):
        SynapseDataModule(root, val_cases=(), list_dir=tmp_path / "nowhere").validate()
    (root / "train_npz").rename(root / "npz")
    with pytest.raises(DataError, match=r"lacks train_npz \(found: lists/, npz/, test_vol_h5/\)"):
        SynapseDataModule(root, val_cases=()).validate()


def test_val_cases_absent_from_the_data_are_named(root):
    with pytest.raises(DataError) as info:
        SynapseDataModule(root).validate()  # the default SYNAPSE_VAL_CASES are not in this tiny set
    message = str(info.value)
    assert info.value.parameter == "val_cases"
    assert message.startswith("`val_cases` case0006, case0010, case0026, case0031 are not among the 2 training cases")
    assert "(case0000, case0001)" in message
    with pytest.raises(DataError, match="`num_folds`=5 needs at least 5 training cases, found 2"):
        SynapseDataModule(root, fold=0).validate()
    assert {i.case for i in SynapseDataModule(root, fold=1, num_folds=2).splits()["val"]} == {"case0001"}


# ---------------------------------------------------------------- Python API checks at construction


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_size": 0}, "`image_size` must be a positive int or an \\(H, W\\) pair of positive ints, found 0"),
    ({"image_size": -3}, "`image_size` .* found -3"),
    ({"image_size": (224, 0)}, "`image_size` .* found \\(224, 0\\)"),
    ({"image_size": "224"}, "`image_size` .* found '224'"),
    ({"image_size": True}, "`image_size` .* found True"),
    ({"image_size": None}, "`image_size` .* found None"),  # only a DataModule with its own input_size takes None
    ({"val_cases": "case0006"}, "`val_cases` must be a list of case names, found the string 'case0006' "
                                "\\(for one case write \\['case0006'\\]\\)"),
    ({"val_cases": [6, 10]}, "`val_cases` must be a list of non-empty case-name strings"),
    ({"fold": 5}, "`fold` must be None or an int in \\[0, 5\\) \\(`num_folds`=5\\), found 5"),
    ({"fold": -1}, "`fold` .* found -1"),
    ({"fold": "1"}, "`fold` .* found '1'"),
    ({"fold": 0, "num_folds": 1}, "`num_folds` must be an int >= 2, found 1"),
    ({"fold": 0, "val_cases": ["case0001"]}, "give `val_cases` or `fold` / `num_folds`, not both"),
    ({"batch_size": 0}, "`batch_size` must be an int >= 1, found 0"),
    ({"list_dir": ""}, "`list_dir` must be a folder path or None"),
])
def test_bad_arguments_raise_at_construction(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynapseDataModule(root, **kwargs)


def test_num_classes_below_two(root):
    class OneClass(SegDataModule):
        num_classes = 1
        class_names = ()

    with pytest.raises(ValueError, match="`OneClass.num_classes` must be an int >= 2 .* found 1"):
        OneClass(root)
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 2"):
        read_slice(root / "train_npz" / "case0000_slice000.npz", 1)


# ---------------------------------------------------------------- every file in full, recorded, splits, inverted


@pytest.mark.parametrize(("change", "found"), [
    ("label_255", "label: expected class indices in [0, 9), found values in [0, 255]"),
    ("label_half", "label: expected class indices in [0, 9), found non-integer values (e.g. 0.5)"),
    ("image_nan", "expected finite image values, found 1 NaN/infinite value(s) (first at index (3, 4))"),
])
def test_training_slices_are_read_in_full(root, change, found):
    """A training slice whose header is fine but whose values are not: named by the pre-flight, not by training."""
    path = root / "train_npz" / "case0000_slice001.npz"
    image, label = np.full((24, 20), 0.5, np.float32), np.zeros((24, 20), np.float32)
    if change == "label_255":
        label[4:9, 4:9] = 255
    elif change == "label_half":
        label[4:9, 4:9] = 0.5
    else:
        image[3, 4] = np.nan
    np.savez(path, image=image, label=label)
    message = _preflight_error(_dm(root))
    assert message.startswith(str(path)) and found in message, message


def test_a_warm_preflight_reads_only_the_files_that_changed(root, monkeypatch, tmp_path):
    checked = []
    for name in ("_check_sample", "_check_case"):
        original = getattr(SynapseDataModule, name)
        monkeypatch.setattr(SynapseDataModule, name,
                            lambda self, item, original=original: checked.append(item.path.name) or original(self,
                                                                                                           item))
    before = sorted(p.name for p in root.rglob("*"))
    cache = tmp_path / "cache"
    assert _dm(root, cache_dir=cache).validate() == {"train": 3, "val": 3, "test": 1}
    assert len(checked) == 7  # cold: the 6 slices and the test volume, read in full
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written into the dataset
    assert len(list((cache / "preflight").glob("SynapseDataModule-*.json"))) == 1
    checked.clear()
    _dm(root, cache_dir=cache).validate()
    assert checked == []  # warm: nothing read again
    path = root / "train_npz" / "case0001_slice002.npz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # changed on disk
    _dm(root, cache_dir=cache).validate()
    assert checked == [path.name]
    checked.clear()
    np.savez(path, image=np.zeros((24, 20), np.float32), label=np.full((24, 20), 9, np.float32))  # now bad
    assert str(path) in _preflight_error(_dm(root, cache_dir=cache))
    assert checked == [path.name]
    other = SynapseDataModule(root, val_cases=["case0001"], cache_dir=cache)  # same data: same record
    checked.clear()
    with pytest.raises(DataError):
        other.validate()
    assert checked == [path.name]


def test_a_cache_folder_that_cannot_be_written_costs_speed_not_the_run(root, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="lightning_selfreg.data.preflight_record"):
        assert _dm(root, cache_dir=blocked).validate()["test"] == 1
    assert "could not record what it checked" in caplog.text and "next run checks every file again" in caplog.text
    assert blocked.read_text() == "not a folder"


def test_splits_must_be_disjoint(root, tmp_path):
    (root / "lists" / "test_vol.txt").write_text("case0100\ncase0000\n")  # a training case among the tests
    _write_volume(root / "test_vol_h5" / "case0000.npy.h5", np.zeros((4, 24, 20), np.float32),
                  np.zeros((4, 24, 20), np.float32))
    message = _preflight_error(_dm(root))
    assert "case(s) case0000 are in both the train and the test split" in message
    glas = write_uctransnet(tmp_path / "glas")
    for sub, name in (("img", "Tr_1.png"), ("labelcol", "Tr_1_anno.bmp")):  # a training image copied as a test one
        (glas / "Test_Folder" / sub / name.replace("Tr_1", "Te_9")).write_bytes((glas / "Train_Folder" / sub /
                                                                                 name).read_bytes())
    message = _preflight_error(GlaSDataModule(glas, image_size=16))
    assert "the same image is in the" in message and "Tr_1.png" in message and "Te_9.png" in message


def test_labels_that_look_inverted_are_reported(tmp_path, caplog):
    glas = write_uctransnet(tmp_path / "glas")
    mask = glas / "Train_Folder" / "labelcol" / "Tr_2_anno.bmp"
    inverted = np.full((30, 36), 255, np.uint8)
    inverted[8:20, 10:25] = 0  # background 255, gland 0: read as 81 % foreground
    Image.fromarray(inverted).save(mask)
    dm = GlaSDataModule(glas, image_size=16)
    with caplog.at_level("WARNING", logger="lightning_selfreg.data.preflight"):
        dm.validate()
    (record,) = caplog.records
    assert "1 of 7 labels look inverted" in record.getMessage() and f"{mask} (83% foreground)" in \
        record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_selfreg.data.preflight"):
        GlaSDataModule(glas, image_size=16).validate()  # warm: reported again, from the record
    assert len(caplog.records) == 1 and str(mask) in caplog.records[0].getMessage()


# ---------------------------------------------------------------- the command line


def test_cli_bad_test_volume_exits_2_before_training(root, tmp_path, capsys):
    label = np.zeros((4, 24, 20), np.float32)
    label[1, 2, 3] = 14
    _write_volume(root / "test_vol_h5" / "case0100.npy.h5", np.zeros((4, 24, 20), np.float32), label)
    out = tmp_path / "runs"
    argv = ["--dataset", "synapse", "--data-dir", str(root), "--output-dir", str(out), "--max-epochs", "1",
            "--image-size", "32", "--width", "4", "--batch-size", "2", "--wandb", "disabled", "--augment", "none"]
    assert main([*argv, "--val-cases", "case0001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --data-dir: ")
    assert "case0100.npy.h5 (slices 0-3): label: expected class indices in [0, 9), found values in [0, 14]" in err
    assert not out.exists()  # nothing written: no run folder, checkpoint or metrics
    assert main(argv) == 2  # the default validation cases are absent: the message names them and the flag
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data.val_cases: `val_cases` case0006, case0010, case0026, case0031 are not among")
    assert main([*argv, "--val-cases", "case0001", "--fold", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --val-cases: give `val_cases` or `fold` / `num_folds`, not both")
    (root / "lists").rename(root / "elsewhere")
    assert main([*argv, "--val-cases"]) == 2
    assert capsys.readouterr().err.startswith("error: --data.list_dir: no folder with train.txt and test_vol.txt")
    assert not out.exists()


def test_setting_and_data_errors_carry_their_parameter_across_processes():
    """DataLoader workers and DDP ranks send errors pickled: the parameter a command line names must survive."""
    import pickle

    from lightning_selfreg.utils.checks import SettingError

    setting = pickle.loads(pickle.dumps(SettingError("lr", "`lr` must be > 0, found -1.")))
    assert (type(setting), setting.parameter, str(setting)) == (SettingError, "lr", "`lr` must be > 0, found -1.")
    data = pickle.loads(pickle.dumps(DataError("`val_cases` ['x'] are not cases.", parameter="val_cases")))
    assert (type(data), data.parameter, str(data)) == (DataError, "val_cases", "`val_cases` ['x'] are not cases.")
    assert DataError("a.h5: truncated").parameter == "data_dir"  # a file under the data folder
    assert isinstance(data, SettingError) and isinstance(data, ValueError)
