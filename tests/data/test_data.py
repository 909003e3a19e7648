import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_selfreg import SelfReg, SelfRegSegModule
from lightning_selfreg.callbacks import TestPredictionWriter
from lightning_selfreg.data import (
    SYNAPSE_VAL_CASES,
    ACDCDataModule,
    DataError,
    GlaSDataModule,
    MoNuSegDataModule,
    ResumableDataLoader,
    ResumableSampler,
    SynapseDataModule,
    paper_augmentation,
    rasterize_monuseg_xml,
)
from lightning_selfreg.data.splits import split_cases
from lightning_selfreg.models import UNet
from tests.conftest import write_synapse_layout

RNG = np.random.default_rng(0)


def write_acdc(root, patients=("patient001", "patient002", "patient003"), slices=2, test=("patient101",)):
    (root / "lists_ACDC").mkdir(parents=True)
    lists = {"train": [], "valid": [], "test": []}
    for split, names in (("train", patients[:-1]), ("valid", patients[-1:])):
        (root / split).mkdir()
        for p in names:
            for s in range(slices):
                name = f"{p}_frame01_slice_{s}.npz"
                label = np.zeros((20, 24), np.uint8)
                label[5:12, 6:14] = 1 + s % 3
                np.savez(root / split / name, img=RNG.random((20, 24)).astype(np.float32), label=label)
                lists[split].append(name)
    (root / "test").mkdir()
    for p in test:
        name = f"{p}_frame01.npz"
        label = np.zeros((3, 20, 24), np.uint8)
        label[:, 4:10, 5:15] = 3
        np.savez(root / "test" / name, img=RNG.random((3, 20, 24)).astype(np.float32), label=label)
        lists["test"].append(name)
    for split, names in lists.items():
        (root / "lists_ACDC" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def write_uctransnet(root, n_train=5, n_test=2, suffix=".png", mask_suffix="_anno.bmp", val=False):
    folders = {"Train_Folder": n_train, "Test_Folder": n_test, **({"Val_Folder": 2} if val else {})}
    for folder, n in folders.items():
        (root / folder / "img").mkdir(parents=True)
        (root / folder / "labelcol").mkdir()
        for i in range(n):
            image = (RNG.random((30, 36, 3)) * 255).astype(np.uint8)
            mask = np.zeros((30, 36), np.uint8)
            mask[8:20, 10:25] = 255
            Image.fromarray(image).save(root / folder / "img" / f"{folder[:2]}_{i}{suffix}")
            Image.fromarray(mask).save(root / folder / "labelcol" / f"{folder[:2]}_{i}{mask_suffix}")
    return root


XML = """<?xml version="1.0"?>
<Annotations><Annotation><Regions>
<Region Id="1"><Vertices><Vertex X="5" Y="5"/><Vertex X="15" Y="5"/><Vertex X="15" Y="12"/><Vertex X="5" Y="12"/>
</Vertices></Region>
<Region Id="2"><Vertices><Vertex X="20.5" Y="20"/><Vertex X="28" Y="20"/><Vertex X="24" Y="27"/></Vertices></Region>
</Regions></Annotation></Annotations>
"""


def write_monuseg_original(root, n_train=5, n_test=2):
    for folder, n in (("Train_Folder", n_train), ("Test_Folder", n_test)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((RNG.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / folder / f"TCGA-{i}.tif")
            (root / folder / f"TCGA-{i}.xml").write_text(XML)
    return root


# ---------------------------------------------------------------- splits and augmentation


def test_split_cases_is_deterministic_and_disjoint():
    cases = [f"c{i}" for i in range(7)]
    folds = [split_cases(cases, k, 3) for k in range(3)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(cases) and sum(len(v) for v in vals) == 7
    assert all(set(t).isdisjoint(v) for t, v in folds)
    with pytest.raises(ValueError, match="fold"):
        split_cases(cases, 3, 3)


def test_paper_augmentation_probabilities_and_label_integrity():
    """rot90 + flip with p = 0.5, else a rotation with p = 0.5, else nothing (docs/method.md §3, the augmentation)."""
    transform = paper_augmentation(64, seed=0)
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    label = np.zeros((64, 64), np.int64)
    label[8:24, 12:20] = 7
    dihedral = [np.flip(np.rot90(image, k), axis) for k in range(4) for axis in (0, 1)]
    counts = {"unchanged": 0, "rot90_flip": 0, "rotation": 0}
    for _ in range(2000):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (64, 64) and set(np.unique(out_label)) <= {0, 7}  # nearest: no new labels
        if np.array_equal(out_image, image):
            counts["unchanged"] += 1
        elif any(np.array_equal(out_image, d) for d in dihedral):
            counts["rot90_flip"] += 1
        else:
            counts["rotation"] += 1
    share = {k: v / 2000 for k, v in counts.items()}
    # expected 0.25 / 0.5 / 0.25 (a rotation by less than ~1 degree can leave the image unchanged)
    assert 0.21 < share["unchanged"] < 0.31 and 0.45 < share["rot90_flip"] < 0.55 and 0.19 < share["rotation"] < 0.29


# ---------------------------------------------------------------- Synapse


def test_resumable_sampler_order_depends_on_seed_and_epoch_only():
    data = list(range(23))
    a, b = ResumableSampler(data, seed=7), ResumableSampler(data, seed=7)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG plays no part
    assert list(b) == first and sorted(first) == data
    a.set_epoch(1)
    assert list(a) != first
    a.start_at(1, 5)
    b.set_epoch(1)
    assert list(a) == list(b)[5:]
    assert len(list(a)) == 23  # the skip applies to one pass only
    ranks = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert set(ranks[0]) | set(ranks[1]) == set(data)
    with pytest.raises(ValueError, match="skip"):
        a.start_at(0, 24)


def test_resumable_loader_position_round_trip():
    data = torch.arange(10)
    loader = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    full = [batch.tolist() for batch in loader]
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 1}
    resumed = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == full[1:]
    assert resumed.state_dict() == {"epoch": 0, "batches": 3}
    resumed.load_state_dict(resumed.state_dict())  # a finished epoch continues with the next one
    loader.sampler.set_epoch(1)
    assert [batch.tolist() for batch in resumed] == [batch.tolist() for batch in loader]
    plain = ResumableDataLoader(data, batch_size=4)  # any other sampler (as Lightning's overfit_batches swaps in)
    assert [batch.tolist() for batch in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plain.state_dict() == {}
    plain.load_state_dict({})


def test_training_loader_works_with_overfit_batches(synapse_dir):
    """Lightning rebuilds the training loader with a SequentialSampler for overfit_batches."""
    dm = SynapseDataModule(synapse_dir, image_size=32, batch_size=2, val_cases=(), transform=None)
    module = SelfRegSegModule(UNet(1, 9, base_channels=4, depth=2), 9, input_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, overfit_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    assert trainer.global_step == 1


def test_synapse_default_validation_cases_and_fold(tmp_path):
    root = write_synapse_layout(tmp_path / "s", n_train_cases=4)
    with pytest.raises(DataError, match="val_cases"):
        SynapseDataModule(root).splits()  # the standard held-out cases are not in this tiny set
    assert SYNAPSE_VAL_CASES == ("case0006", "case0010", "case0026", "case0031")
    splits = SynapseDataModule(root, val_cases=["case0001"]).splits()
    assert {i.case for i in splits["val"]} == {"case0001"} and "case0001" not in {i.case for i in splits["train"]}
    fold = SynapseDataModule(root, fold=1, num_folds=2).splits()
    assert {i.case for i in fold["val"]} == {"case0001", "case0003"}
    assert SynapseDataModule(root, val_cases=()).validate() == {"train": 12, "val": 0, "test": 1}


def test_validate_lists_missing_files(tmp_path):
    root = write_synapse_layout(tmp_path / "s")
    (root / "train_npz" / "case0000_slice001.npz").unlink()
    (root / "lists" / "train.txt").write_text((root / "lists" / "train.txt").read_text() + "case0009_slice000\n")
    with pytest.raises(DataError, match=r"case0000_slice001.npz \(missing\).*case0009_slice000.npz \(missing\)"):
        SynapseDataModule(root, val_cases=()).validate()


def test_h5_volume_errors_name_the_file(tmp_path):
    import h5py

    root = write_synapse_layout(tmp_path / "s")
    path = root / "test_vol_h5" / "case0100.npy.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((2, 4, 4), np.float32)
        f["label"] = np.zeros((2, 4, 5), np.float32)
    dm = SynapseDataModule(root, val_cases=())
    dm.setup("test")
    with pytest.raises(DataError, match="case0100.npy.h5.*does not match"):
        dm.test_dataloader().dataset[0]
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(DataError, match=r"missing dataset\(s\) \['label'\]"):
        dm.test_dataloader().dataset[0]


# ---------------------------------------------------------------- ACDC


def test_acdc_layout_splits_and_items(tmp_path):
    root = write_acdc(tmp_path / "acdc")
    dm = ACDCDataModule(root, image_size=32, batch_size=2)
    assert dm.validate() == {"train": 4, "val": 2, "test": 1}
    assert {i.case for i in dm.splits()["val"]} == {"patient003"}
    folds = ACDCDataModule(root, fold=0, num_folds=3).splits()
    assert len({i.case for i in folds["val"]}) == 1 and len(folds["train"]) == 4
    dm.setup("fit")
    sample = dm.train_dataloader().dataset[0]
    assert sample["image"].shape == (1, 32, 32) and sample["label"].shape == (32, 32)
    dm.setup("test")
    case = dm.test_dataloader().dataset[0]
    assert case["image"].shape == (3, 1, 20, 24) and case["label"].shape == (3, 20, 24)
    (root / "lists_ACDC" / "valid.txt").unlink()
    with pytest.raises(DataError, match=r"no folder with train.txt and valid.txt and test.txt .*found lists_ACDC/ "
                       r"holds test.txt, train.txt"):
        ACDCDataModule(root).check_layout()


def test_acdc_missing_key(tmp_path):
    root = write_acdc(tmp_path / "acdc")
    name = (root / "lists_ACDC" / "train.txt").read_text().split()[0]
    np.savez(root / "train" / name, image=np.zeros((20, 24), np.float32), label=np.zeros((20, 24), np.uint8))
    dm = ACDCDataModule(root, image_size=32, transform=None)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"missing key\(s\) \['img'\]"):
        dm.train_dataloader().dataset[0]


# ---------------------------------------------------------------- GlaS / MoNuSeg


def test_glas_uctransnet_layout(tmp_path):
    root = write_uctransnet(tmp_path / "glas")
    dm = GlaSDataModule(root, image_size=32, batch_size=2)
    splits = dm.splits()
    assert len(splits["val"]) == 1 and len(splits["train"]) == 4  # no Val_Folder: fold 0 of 5 of Train_Folder
    assert dm.in_channels == 3 and dm.num_classes == 2
    dm.setup("fit")
    sample = dm.train_dataloader().dataset[0]
    assert sample["image"].shape == (3, 32, 32) and set(sample["label"].unique().tolist()) <= {0, 1}
    dm.setup("test")
    case = dm.test_dataloader().dataset[0]
    assert case["image"].shape == (1, 3, 30, 36) and case["label"].shape == (1, 30, 36)
    assert int(case["label"].sum()) == 12 * 15
    with_val = write_uctransnet(tmp_path / "glas2", val=True)
    assert len(GlaSDataModule(with_val).splits()["val"]) == 2


def test_glas_missing_mask_is_reported(tmp_path):
    root = write_uctransnet(tmp_path / "glas")
    next((root / "Train_Folder" / "labelcol").iterdir()).unlink()
    with pytest.raises(DataError, match="no mask for image"):
        GlaSDataModule(root).splits()


def test_monuseg_original_release_xml_is_rasterised(tmp_path):
    mask = rasterize_monuseg_xml(write_monuseg_original(tmp_path / "m") / "Train_Folder" / "TCGA-0.xml", (32, 32))
    assert mask.dtype == np.uint8 and mask[8, 10] == 1 and mask[24, 24] == 1 and mask[0, 0] == 0
    assert mask[5:13, 5:16].all()  # the rectangle, edges included
    dm = MoNuSegDataModule(tmp_path / "m", image_size=32)
    dm.setup("test")
    case = dm.test_dataloader().dataset[0]
    assert case["label"].shape == (1, 32, 32) and case["label"].sum() > 80
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region/></Annotations>")
    with pytest.raises(DataError, match="no <Region>"):
        rasterize_monuseg_xml(bad, (8, 8))
    bad.write_text("<Annotations")
    with pytest.raises(DataError, match="cannot be parsed"):
        rasterize_monuseg_xml(bad, (8, 8))


# ---------------------------------------------------------------- a full fit + test per dataset


@pytest.mark.parametrize("dataset", ["synapse", "acdc", "glas", "monuseg"])
def test_fit_and_test_each_dataset(tmp_path, dataset):
    pl.seed_everything(0)
    if dataset == "synapse":
        dm = SynapseDataModule(write_synapse_layout(tmp_path / "d", n_train_cases=3), image_size=32, batch_size=4,
                               val_cases=["case0002"])
    elif dataset == "acdc":
        dm = ACDCDataModule(write_acdc(tmp_path / "d"), image_size=32, batch_size=4)
    elif dataset == "glas":
        dm = GlaSDataModule(write_uctransnet(tmp_path / "d"), image_size=32, batch_size=4)
    else:
        dm = MoNuSegDataModule(write_monuseg_original(tmp_path / "d"), image_size=32, batch_size=4)
    net = UNet(dm.in_channels, dm.num_classes, base_channels=4, depth=2)
    module = SelfRegSegModule(net, dm.num_classes, dm.class_names, input_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SelfReg(), TestPredictionWriter(tmp_path / "pred")],
                         val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert "val/dice" in trainer.callback_metrics
    trainer.test(module, dm, verbose=False)
    for protocol in ("strict", "transunet"):
        results = module.test_results_by_protocol[protocol]
        assert results["num_cases"] == len(dm.splits()["test"])
        assert set(results["per_class"]) == set(dm.class_names)
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    expected_suffix = ".nii.gz" if dataset in ("synapse", "acdc") else ".png"
    assert written and all(name.endswith(expected_suffix) for name in written)
    if dataset == "synapse":
        import nibabel as nib

        image = nib.load(tmp_path / "pred" / "case0100.nii.gz")
        assert image.shape == (20, 24, 4) and np.allclose(image.header.get_zooms(), (1.0, 1.0, 2.0))
    assert torch.is_tensor(trainer.callback_metrics["test/num_cases"])


# ---------------------------------------------------------------- command-line readiness (LightningCLI / jsonargparse)


@pytest.mark.parametrize("name, args, expected", [
    ("synapse", ["--data.image_size", "32", "--data.transform", "null"], (True, 2, 32, None)),
    ("sample", [], (True, 2, 96, None)),
    ("acdc", ["--data.image_size", "[32, 24]", "--data.transform", "paper"], (True, 2, (32, 24), None)),
    ("glas", ["--data.image_size", "32"], (False, 2, 32, None)),
    ("monuseg", ["--data.image_size", "32"], (False, 2, 32, None)),
    ("nnunet_3d", ["--data.patch_size", "[8, 16, 16]"], (True, 3, None, (8, 16, 16))),
    ("nnunet_2d", ["--data.configuration", "2d"], (True, 2, None, None)),
])
def test_datamodule_signatures_parse_and_describe_the_data(tmp_path, name, args, expected):
    """Typed, documented constructors (jsonargparse), and what a CLI links to the model right after construction."""
    from argparse import ArgumentError

    from jsonargparse import ArgumentParser

    from lightning_selfreg.data import SAMPLE_DIR, SAMPLE_NNUNET_DIR, NnUNetDataModule, SampleCTDataModule

    root = {"synapse": lambda: write_synapse_layout(tmp_path / "d"), "acdc": lambda: write_acdc(tmp_path / "d"),
            "glas": lambda: write_uctransnet(tmp_path / "d"), "monuseg": lambda: write_monuseg_original(tmp_path / "d"),
            "sample": lambda: SAMPLE_DIR}.get(name, lambda: SAMPLE_NNUNET_DIR)()
    cls = {"synapse": SynapseDataModule, "sample": SampleCTDataModule, "acdc": ACDCDataModule,
           "glas": GlaSDataModule, "monuseg": MoNuSegDataModule}.get(name, NnUNetDataModule)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data", fail_untyped=True)
    options = [a for a in parser._actions if a.dest.startswith("data.") and a.dest.count(".") == 1]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]  # Google docstrings
    cfg = parser.parse_args(["--data.data_dir", str(root), "--data.batch_size", "3", *args])
    assert "batch_size: 3" in parser.dump(cfg)  # **kwargs resolved through super().__init__
    dm = parser.instantiate_classes(cfg).data
    assert type(dm) is cls and dm.batch_size == 3
    assert (dm.volumetric, dm.spatial_dims, dm.input_size, dm.roi_size) == expected
    assert len(dm.class_names) == dm.num_classes - 1 and dm.in_channels == (3 if name in ("glas", "monuseg") else 1)
    if cls is NnUNetDataModule:
        assert NnUNetDataModule(progress=False).data_dir == SAMPLE_NNUNET_DIR  # None: the bundled sample
        with pytest.raises(ArgumentError, match="configuration"):
            parser.parse_args(["--data.configuration", "4d"])  # a Literal: the choice is in the signature
    elif cls is not SampleCTDataModule:
        with pytest.raises(ArgumentError, match="transform"):
            parser.parse_args(["--data.data_dir", str(root), "--data.transform", "bogus"])
