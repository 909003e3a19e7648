"""Build the small real CT sample bundled in ``lightning_selfreg/data/sample`` from the TotalSegmentator sdist.

A data-build tool, not an experiment: run it only to rebuild the bundled sample (and its nnU-Net copy).

The TotalSegmentator 2.18.0 source distribution (Apache-2.0) ships two small abdominal CTs with
TotalSegmentator predictions in ``tests/reference_files/``:

* train patient: ``example_ct.nii.gz`` + ``example_seg_fast_force_split.nii.gz`` (122x101x112, 3 mm, RAS);
* test patient: ``example_ct_dicom/`` (20 JPEG 2000 lossless DICOM slices) + ``example_seg_dicom.nii.gz``.

This script converts them into the Synapse / TransUNet layout (``train_npz/*.npz`` slices,
``test_vol_h5/*.npy.h5`` volumes, ``lists/{train,test_vol}.txt``) with the Synapse label map and the
standard HU window [-125, 275] (``lightning_selfreg.data.image_io.HU_WINDOW``) -> [0, 1]. Both patients are brought into
one canonical 2D orientation, the raw DICOM display orientation: rows run anterior -> posterior, columns run
from the patient's right to the patient's left (liver on the image left). The orientation is derived from the NIfTI
affines and the DICOM geometry, cross-checked against the explicit index operations, and verified with an HU test
on the liver mask; the script fails loudly if any check does not hold.

Usage::

    python tools/build_totalseg_sample.py --source /tmp/tsdl/totalsegmentator-2.18.0.tar.gz \
        --out lightning_selfreg/data/sample

Requires ``lightning_selfreg`` (for the HU window), ``numpy``, ``nibabel``, ``pydicom``, ``pillow`` (JPEG 2000
decoding) and ``h5py``. The other third-party imports are done lazily inside the functions that use them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from lightning_selfreg.data.image_io import HU_WINDOW

logger = logging.getLogger("build_totalseg_sample")

EXPECTED_VERSION = "2.18.0"
REF_DIR = Path("tests") / "reference_files"
TRAIN_CT = "example_ct.nii.gz"
TRAIN_SEG = "example_seg_fast_force_split.nii.gz"
TEST_DICOM_DIR = "example_ct_dicom"
TEST_SEG = "example_seg_dicom.nii.gz"

TRAIN_PREFIX = "totalseg_ct"
TEST_CASE = "totalseg_dicom"

HU_MIN, HU_MAX = HU_WINDOW
LIVER_HU_RANGE = (0.0, 120.0)
LIVER_HU_SHARE_MIN = 0.9

#: TotalSegmentator (v2 "total" task) label -> Synapse label; everything else becomes background.
TOTALSEG_TO_SYNAPSE: dict[int, int] = {52: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
SYNAPSE_NAMES: dict[int, str] = {
    1: "aorta",
    2: "gallbladder",
    3: "kidney_left",
    4: "kidney_right",
    5: "liver",
    6: "pancreas",
    7: "spleen",
    8: "stomach",
}
LIVER, SPLEEN = 5, 7

#: Canonical orientation of a (column, row, slice) indexed 3D array in nibabel axis codes:
#: column index increases towards the patient's Left, row index towards Posterior, slice towards Superior.
CANONICAL_AXCODES = ("L", "P", "S")


class SampleCheckError(RuntimeError):
    """Raised when a consistency check on the source data or the converted sample fails."""


def _check(condition: bool, message: str) -> None:
    """Raise :class:`SampleCheckError` with ``message`` if ``condition`` is false.

    Args:
        condition: The condition that must hold.
        message: Explanation used in the error.

    Raises:
        SampleCheckError: If ``condition`` is false.
    """
    if not condition:
        raise SampleCheckError(message)


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 digest of a file.

    Args:
        path: File to hash.

    Returns:
        The lowercase hexadecimal digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def window_hu(hu: Any) -> Any:
    """Clip HU to :data:`~lightning_selfreg.data.image_io.HU_WINDOW` ([-125, 275]) and scale linearly to [0, 1].

    Args:
        hu: Array of Hounsfield units (any numeric dtype).

    Returns:
        ``float32`` array ``(clip(hu, -125, 275) + 125) / 400``.
    """
    import numpy as np

    hu = np.asarray(hu, dtype=np.float64)
    return ((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)).astype(np.float32)


def map_labels(seg: Any) -> Any:
    """Map TotalSegmentator labels to Synapse labels.

    Args:
        seg: Integer label array with TotalSegmentator class ids.

    Returns:
        ``uint8`` array with Synapse ids 0..8 (unmapped classes become 0).
    """
    import numpy as np

    lut = np.zeros(max(int(seg.max()), max(TOTALSEG_TO_SYNAPSE)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_SYNAPSE.items():
        lut[src] = dst
    return lut[np.asarray(seg, dtype=np.int64)]


def to_canonical(vol: Any, affine: Any) -> tuple[Any, Any]:
    """Reorient a NIfTI volume to the canonical (column, row, slice) = (L, P, S) index order.

    Args:
        vol: 3D array as stored in the NIfTI file.
        affine: The file's voxel -> RAS+ world affine.

    Returns:
        Tuple ``(vol_lps, ornt)`` where ``vol_lps`` is the reoriented array (axis 0 = column, axis 1 = row,
        axis 2 = slice) and ``ornt`` the nibabel orientation transform that was applied.
    """
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    )
    return nib.orientations.apply_orientation(vol, ornt), ornt


def liver_hu_share(hu: Any, label: Any) -> float:
    """Return the share of liver voxels whose HU lies in [0, 120].

    Args:
        hu: HU array aligned with ``label``.
        label: Synapse label array.

    Returns:
        Fraction of liver voxels (label 5) with 0 <= HU <= 120.
    """
    import numpy as np

    vals = hu[label == LIVER]
    _check(vals.size > 0, "no liver voxels found")
    return float(np.mean((vals >= LIVER_HU_RANGE[0]) & (vals <= LIVER_HU_RANGE[1])))


def centroid_fractions(label: Any, cls: int) -> tuple[float, float]:
    """Return the centroid of a class as (row, column) fractions of the in-plane image size.

    Args:
        label: Label array whose last two axes are (row, column).
        cls: Class id.

    Returns:
        ``(row_fraction, column_fraction)`` in [0, 1].
    """
    import numpy as np

    idx = np.argwhere(label == cls)
    _check(idx.size > 0, f"class {cls} absent")
    rows, cols = label.shape[-2], label.shape[-1]
    return float((idx[:, -2].mean() + 0.5) / rows), float((idx[:, -1].mean() + 0.5) / cols)


def check_orientation(name: str, hu: Any, label: Any) -> dict[str, Any]:
    """Verify the canonical orientation with the liver HU test and the liver/spleen centroids.

    Args:
        name: Patient name used in messages.
        hu: HU array, (..., row, column), aligned with ``label``.
        label: Synapse label array of the same shape.

    Returns:
        Dict with the liver HU share and the liver/spleen centroid fractions.

    Raises:
        SampleCheckError: If the liver HU share is not above 0.9, or the liver is not on the image left and the
            spleen on the image right.
    """
    share = liver_hu_share(hu, label)
    _check(
        share > LIVER_HU_SHARE_MIN,
        f"{name}: only {share:.3f} of liver voxels lie in 0-120 HU (need > {LIVER_HU_SHARE_MIN}); "
        "image and mask are misaligned",
    )
    liver = centroid_fractions(label, LIVER)
    spleen = centroid_fractions(label, SPLEEN)
    _check(liver[1] < 0.5, f"{name}: liver centroid column fraction {liver[1]:.2f} is not on the image left")
    _check(spleen[1] > 0.5, f"{name}: spleen centroid column fraction {spleen[1]:.2f} is not on the image right")
    return {"liver_hu_share": share, "liver_centroid": liver, "spleen_centroid": spleen}


def resolve_source(source: Path, workdir: Path) -> tuple[Path, str | None]:
    """Return the extracted sdist root, extracting a tarball into ``workdir`` if necessary.

    Args:
        source: Extracted sdist root or the ``.tar.gz`` sdist.
        workdir: Scratch directory for extraction.

    Returns:
        Tuple ``(root, sha256)``; ``sha256`` is the sdist digest, or None when a directory was given.

    Raises:
        SampleCheckError: If the source does not look like the TotalSegmentator 2.18.0 sdist.
    """
    digest = None
    if source.is_file():
        digest = sha256_of(source)
        with tarfile.open(source, "r:gz") as tar:
            try:
                tar.extractall(workdir, filter="data")
            except TypeError:  # Python without tarfile extraction filters
                tar.extractall(workdir)
        roots = [p for p in workdir.iterdir() if p.is_dir()]
        _check(len(roots) == 1, f"unexpected sdist layout in {source}")
        root = roots[0]
    else:
        root = source
    pkg_info = root / "PKG-INFO"
    _check(pkg_info.is_file(), f"{root} has no PKG-INFO; is it the extracted sdist root?")
    meta = dict(line.split(": ", 1) for line in pkg_info.read_text(encoding="utf-8").splitlines() if ": " in line)
    _check(meta.get("Name", "").lower() == "totalsegmentator", f"{root} is not a TotalSegmentator sdist")
    _check(
        meta.get("Version") == EXPECTED_VERSION,
        f"expected TotalSegmentator {EXPECTED_VERSION}, found {meta.get('Version')}",
    )
    return root, digest


def convert_train(ref: Path) -> dict[str, Any]:
    """Load the train patient, reorient it to the canonical view and cut the labelled axial slices.

    Args:
        ref: The sdist's ``tests/reference_files`` directory.

    Returns:
        Dict with ``slices`` (list of ``(k, image, label)``), ``spacing`` ([row_mm, col_mm]), ``check`` results,
        ``shape`` of the source volume, ``n_slices`` and per-class voxel counts over the kept slices.
    """
    import nibabel as nib
    import numpy as np

    ct_img = nib.load(ref / TRAIN_CT)
    seg_img = nib.load(ref / TRAIN_SEG)
    _check(ct_img.shape == seg_img.shape, "train CT and seg shapes differ")
    _check(np.allclose(ct_img.affine, seg_img.affine, atol=1e-4), "train CT and seg affines differ")
    _check(nib.aff2axcodes(ct_img.affine) == ("R", "A", "S"), "train CT is expected to be RAS")
    ct = np.asanyarray(ct_img.dataobj)
    _check(
        np.issubdtype(ct.dtype, np.integer) and ct_img.header.get_slope_inter() == (None, None),
        "train CT is expected to hold raw integer HU",
    )
    seg = map_labels(np.asanyarray(seg_img.dataobj))

    ct_c, ornt = to_canonical(ct, ct_img.affine)
    seg_c, _ = to_canonical(seg, seg_img.affine)
    # Cross-check the affine-derived reorientation against the documented explicit operation:
    # slice k in DICOM orientation = ct[::-1, ::-1, k].T (flip both in-plane axes, then transpose).
    _check(np.array_equal(ct_c, ct[::-1, ::-1, :]), "train reorientation differs from ct[::-1, ::-1, k]")
    _check(np.array_equal(ornt[:, 0], [0, 1, 2]), "train slice axis is not the third array axis")

    zooms = np.abs(np.asarray(ct_img.header.get_zooms()[:3], dtype=np.float64))
    spacing = np.array([zooms[1], zooms[0]], dtype=np.float32)  # rows follow array axis j, columns axis i

    hu_2d = np.transpose(ct_c, (2, 1, 0))  # (slice, row, column)
    lab_2d = np.transpose(seg_c, (2, 1, 0))
    check = check_orientation("train", hu_2d, lab_2d)

    keep = [k for k in range(lab_2d.shape[0]) if lab_2d[k].any()]
    slices = [(k, window_hu(hu_2d[k]), np.ascontiguousarray(lab_2d[k], dtype=np.uint8)) for k in keep]
    counts = {c: int((lab_2d[keep] == c).sum()) for c in SYNAPSE_NAMES}
    return {
        "slices": slices,
        "spacing": spacing,
        "check": check,
        "shape": tuple(int(s) for s in ct.shape),
        "n_slices": lab_2d.shape[0],
        "counts": counts,
    }


def convert_test(ref: Path) -> dict[str, Any]:
    """Load the DICOM test patient and its NIfTI mask and align both in the canonical DICOM orientation.

    Args:
        ref: The sdist's ``tests/reference_files`` directory.

    Returns:
        Dict with ``image`` (float32, D x H x W), ``label`` (uint8, D x H x W), ``spacing`` ([z, row, col] mm),
        ``check`` results, per-class voxel ``counts``, ``z`` positions and DICOM ``instances``.
    """
    import nibabel as nib
    import numpy as np
    import pydicom

    files = sorted(p for p in (ref / TEST_DICOM_DIR).iterdir() if p.is_file())
    datasets = [pydicom.dcmread(p) for p in files]
    _check(len(datasets) > 0, "no DICOM files found")
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))  # z ascending (LPS: inferior -> superior)

    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    pixel_spacing = np.asarray(datasets[0].PixelSpacing, dtype=np.float64)  # [row spacing, column spacing]
    ipp = np.asarray([d.ImagePositionPatient for d in datasets], dtype=np.float64)
    for d in datasets:
        _check(np.allclose(np.asarray(d.ImageOrientationPatient, dtype=np.float64), iop), "IOP differs between slices")
        _check(np.allclose(np.asarray(d.PixelSpacing, dtype=np.float64), pixel_spacing), "PixelSpacing differs")
    # Rows along +x (patient left) and columns along +y (posterior): raw DICOM display orientation is canonical.
    _check(np.allclose(iop, [1, 0, 0, 0, 1, 0]), f"unexpected ImageOrientationPatient {iop.tolist()}")
    _check(np.allclose(ipp[:, :2], ipp[0, :2]), "ImagePositionPatient x/y differ between slices")
    dz = np.diff(ipp[:, 2])
    _check(dz.size > 0 and np.allclose(dz, dz[0]) and dz[0] > 0, "DICOM slices are not equally spaced")
    spacing = np.array([dz[0], pixel_spacing[0], pixel_spacing[1]], dtype=np.float32)

    hu = np.stack(
        [d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )  # (D, row, column)
    _check(np.array_equal(hu, np.round(hu)), "DICOM HU are expected to be integers")

    seg_img = nib.load(ref / TEST_SEG)
    seg = map_labels(np.asanyarray(seg_img.dataobj))
    depth, rows, cols = hu.shape
    _check(seg.shape == (cols, rows, depth), f"mask shape {seg.shape} does not match DICOM grid {hu.shape}")

    # Map every DICOM voxel centre through both geometries: DICOM (r, c, k) -> LPS -> RAS -> mask voxel index.
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    row_dir, col_dir = iop[:3], iop[3:]

    def dicom_to_mask_index(r: float, c: float, k: int) -> Any:
        lps = ipp[k] + c * pixel_spacing[1] * row_dir + r * pixel_spacing[0] * col_dir
        ras = lps_to_ras @ lps
        return np.linalg.solve(seg_img.affine[:3, :3], ras - seg_img.affine[:3, 3])

    for r, c, k in [(0, 0, 0), (rows - 1, 0, 0), (0, cols - 1, 0), (0, 0, depth - 1), (100, 300, depth // 2)]:
        ijk = dicom_to_mask_index(r, c, k)
        _check(
            np.allclose(ijk, [c, rows - 1 - r, k], atol=1e-3),
            f"DICOM voxel {(r, c, k)} maps to mask index {ijk}, expected {(c, rows - 1 - r, k)}",
        )

    seg_c, _ = to_canonical(seg, seg_img.affine)
    # Documented explicit operation: mask slice k in DICOM orientation = mask[:, ::-1, k].T
    _check(np.array_equal(seg_c, seg[:, ::-1, :]), "test reorientation differs from mask[:, ::-1, k]")
    label = np.ascontiguousarray(np.transpose(seg_c, (2, 1, 0)), dtype=np.uint8)  # (D, row, column)

    check = check_orientation("test", hu, label)
    counts = {c: int((label == c).sum()) for c in SYNAPSE_NAMES}
    return {
        "image": window_hu(hu),
        "hu": hu.astype(np.int16),
        "label": label,
        "spacing": spacing,
        "check": check,
        "counts": counts,
        "z": ipp[:, 2].tolist(),
        "instances": [int(d.InstanceNumber) for d in datasets],
        "transfer_syntax": str(datasets[0].file_meta.TransferSyntaxUID),
        "thickness": float(datasets[0].SliceThickness),
    }


def write_sample(out: Path, train: dict[str, Any], test: dict[str, Any], shuffle: bool = False) -> None:
    """Write the Synapse-layout files (npz slices, h5 volume, lists).

    Args:
        out: Output directory.
        train: Result of :func:`convert_train`.
        test: Result of :func:`convert_test`.
        shuffle: Apply the HDF5 byte-shuffle filter before gzip. Off by default: the image holds only 401
            distinct float32 values (integer HU / 400) whose mantissa bytes look random, so whole 4-byte words
            compress better unshuffled (measured 2.75 MB vs 4.19 MB for the image dataset).
    """
    import h5py
    import numpy as np

    npz_dir, h5_dir, list_dir = out / "train_npz", out / "test_vol_h5", out / "lists"
    for d in (npz_dir, h5_dir, list_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    names = []
    for k, image, label in train["slices"]:
        name = f"{TRAIN_PREFIX}_slice{k:03d}"
        np.savez_compressed(npz_dir / f"{name}.npz", image=image, label=label, spacing=train["spacing"])
        names.append(name)
    (list_dir / "train.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")

    depth, rows, cols = test["image"].shape
    with h5py.File(h5_dir / f"{TEST_CASE}.npy.h5", "w") as h5:
        for key, arr in (("image", test["image"]), ("label", test["label"])):
            h5.create_dataset(
                key, data=arr, chunks=(1, rows, cols), compression="gzip", compression_opts=9, shuffle=shuffle
            )
        h5.attrs["spacing"] = test["spacing"]
    (list_dir / "test_vol.txt").write_text(f"{TEST_CASE}\n", encoding="utf-8")


def write_readme(
    out: Path, train: dict[str, Any], test: dict[str, Any], sdist_sha256: str | None, shuffle: bool = False
) -> None:
    """Write ``README.md`` with provenance, preprocessing, orientation, label map and licence.

    Args:
        out: Output directory.
        train: Result of :func:`convert_train`.
        test: Result of :func:`convert_test`.
        sdist_sha256: SHA-256 of the sdist tarball, or None if unknown.
        shuffle: Whether the h5 datasets were written with the shuffle filter.
    """
    present = [SYNAPSE_NAMES[c] for c in SYNAPSE_NAMES if test["counts"][c] > 0]
    absent = [SYNAPSE_NAMES[c] for c in SYNAPSE_NAMES if test["counts"][c] == 0]
    label_rows = "\n".join(
        f"| {src} | {dst} | {SYNAPSE_NAMES[dst]} | {train['counts'][dst]:,} | {test['counts'][dst]:,} |"
        for src, dst in sorted(TOTALSEG_TO_SYNAPSE.items(), key=lambda kv: kv[1])
    )
    tc, sc = train["check"], test["check"]
    ks = [k for k, _, _ in train["slices"]]
    tr_sp, te_sp = train["spacing"], test["spacing"]
    sha = sdist_sha256 or "not recorded (converted from an extracted directory)"
    h5_filters = (
        " with the shuffle filter"
        if shuffle
        else " without the shuffle filter\n(the image holds only 401 distinct float32 values whose mantissa bytes look "
        "random, so unshuffled\n4-byte words compress about 1.5x better than shuffled ones)"
    )
    text = f"""# Bundled CT sample (derived from TotalSegmentator {EXPECTED_VERSION} test data)

A tiny, real abdominal CT sample in the Synapse / TransUNet file layout, for smoke tests, examples and
short CPU runs. It is **not** the Synapse dataset and is far too small for meaningful benchmarks.

**The masks are TotalSegmentator model predictions, not manual annotations.**

## Provenance

- Source: the `totalsegmentator` {EXPECTED_VERSION} source distribution from PyPI
  (`totalsegmentator-{EXPECTED_VERSION}.tar.gz`, sha256 `{sha}`).
- Files used (inside the sdist, under `{REF_DIR.as_posix()}/`):
  - train patient: `{TRAIN_CT}` (CT, {"x".join(map(str, train["shape"]))}, 3 mm, RAS) and
    `{TRAIN_SEG}` (TotalSegmentator `--fast --force_split` prediction);
  - test patient: `{TEST_DICOM_DIR}/` ({len(test["z"])} DICOM slices, transfer syntax `{test["transfer_syntax"]}`,
    JPEG 2000 lossless) and `{TEST_SEG}` (TotalSegmentator prediction).
- Converted with `tools/build_totalseg_sample.py` of this repository.

## Layout

```
train_npz/{TRAIN_PREFIX}_sliceNNN.npz   {len(ks)} axial slices; keys image (float32 HxW), label (uint8 HxW),
                                     spacing (float32 [row_mm, col_mm] = [{tr_sp[0]:.8g}, {tr_sp[1]:.8g}])
test_vol_h5/{TEST_CASE}.npy.h5     h5 datasets image (float32 DxHxW), label (uint8 DxHxW), D = {test["image"].shape[0]};
                                     file attribute spacing = [z_mm, row_mm, col_mm]
                                     = [{te_sp[0]:.8g}, {te_sp[1]:.8g}, {te_sp[2]:.8g}]
lists/train.txt                      slice names without extension
lists/test_vol.txt                   {TEST_CASE}
```

h5 datasets use chunks (1, H, W) and lossless gzip level 9 compression{h5_filters}.

## Preprocessing

- HU: NIfTI values are raw integer HU; DICOM HU = pixel x RescaleSlope + RescaleIntercept.
- Image = (clip(HU, -125, 275) + 125) / 400, stored as float32 in [0, 1] (a fixed window, not a per-volume
  min-max; every value is an integer HU step of 1/400).
- Labels mapped to the Synapse order (below); every other TotalSegmentator class becomes 0. uint8.
- Native resolution, no resampling or resizing: train slices are
  {train["shape"][1]}x{train["shape"][0]} (rows x columns) at {tr_sp[0]:.8g} mm, test slices are 512x512
  at {te_sp[1]:.8g} mm.
- Train: the axial slices of the train patient that contain at least one of the 8 organs
  (slices {ks[0]}-{ks[-1]} of {train["n_slices"]}, NNN = slice index in the source NIfTI, inferior -> superior).
- Test: the whole DICOM series as one volume, slices sorted by ImagePositionPatient z ascending
  (inferior -> superior; z = {test["z"][0]:g} ... {test["z"][-1]:g} mm, instance numbers {test["instances"][0]} ...
  {test["instances"][-1]}). The slice step is {te_sp[0]:.8g} mm (SliceThickness {test["thickness"]:g} mm).

## Orientation convention

Both patients use the raw DICOM display orientation: rows run anterior -> posterior, columns run from the
patient's right to the patient's left (radiological view: liver on the image left, spine at the bottom).

- Train NIfTI (RAS): slice k = `ct[::-1, ::-1, k].T` (same for the mask).
- Test DICOM: pixel arrays as stored (ImageOrientationPatient = 1,0,0,0,1,0); NIfTI mask (LAS) slice k =
  `mask[:, ::-1, k].T`.

Both operations are derived from the NIfTI affines / DICOM geometry by the converter and checked there.
Verification (share of liver-mask voxels within 0-120 HU; organ centroids as (row, column) fractions):

| patient | liver HU share | liver centroid | spleen centroid |
|---|---|---|---|
| train | {tc["liver_hu_share"]:.3f} | {tc["liver_centroid"][0]:.2f}, {tc["liver_centroid"][1]:.2f} | \
{tc["spleen_centroid"][0]:.2f}, {tc["spleen_centroid"][1]:.2f} |
| test | {sc["liver_hu_share"]:.3f} | {sc["liver_centroid"][0]:.2f}, {sc["liver_centroid"][1]:.2f} | \
{sc["spleen_centroid"][0]:.2f}, {sc["spleen_centroid"][1]:.2f} |

Do not use flips or rot90 augmentation with this data: kidney left/right labels depend on the side.

## Label map

| TotalSegmentator | Synapse | organ | train voxels | test voxels |
|---|---|---|---|---|
{label_rows}

The train slices contain all 8 organs. The test slab ({len(test["z"])} slices, upper abdomen) contains
{", ".join(present)}; {", ".join(absent)} are absent.

## Licence

TotalSegmentator (author: Jakob Wasserthal, <https://github.com/wasserth/TotalSegmentator>) is licensed
under the Apache License 2.0. This directory contains a modified (converted and cropped) copy of its test
reference files; the licence text is in `LICENSE-TotalSegmentator.txt`.
The sdist contains no NOTICE file.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


BODY_MARGIN = 8  # voxels kept around the body's bounding box in the nnU-Net copy of the test patient


def body_box(hu: Any, margin: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """In-plane bounding box of the largest connected region above -300 HU (the body), plus ``margin`` voxels.

    Args:
        hu: ``(i, j, k)`` HU volume, ``k`` the slice axis.
        margin: Voxels added on every side (clipped to the volume).

    Returns:
        ``((i0, j0), (i1, j1))``, half-open.
    """
    import numpy as np
    from scipy import ndimage

    body = ndimage.binary_opening(hu > -300, iterations=2)
    regions, n = ndimage.label(body)
    _check(n > 0, "no body found in the test CT")
    sizes = ndimage.sum(body, regions, range(1, n + 1))
    idx = np.argwhere(regions == int(np.argmax(sizes)) + 1)
    lo = np.maximum(idx.min(0)[:2] - margin, 0)
    hi = np.minimum(idx.max(0)[:2] + 1 + margin, hu.shape[:2])
    return (int(lo[0]), int(lo[1])), (int(hi[0]), int(hi[1]))


def nnunet_images(ref: Path, test: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The two patients as NIfTI images for the nnU-Net copy: raw HU (int16) and Synapse labels (uint8), in RAS.

    The train patient is the sdist's NIfTI cut to the labelled axial slices of the Synapse copy (the same slices as
    ``train_npz``), with its affine moved accordingly. The test patient's DICOM HU are put on its mask's voxel grid
    (``ct[:, :, k] = dicom_k.T[:, ::-1]``, the alignment :func:`convert_test` verifies) with the mask's affine, and
    cut in-plane to the body's bounding box (:func:`body_box`; the 500 mm field of view is mostly air, table and
    arms, and its noise would make the file 4.7 MB instead of 2.3 MB); every HU value and label is kept as is.
    Both are then reoriented to RAS (the train patient already is; the test mask is LAS), so that the arrays of
    the two cases share one orientation: nnU-Net's default readers use the arrays as stored.

    Args:
        ref: The sdist's ``tests/reference_files`` directory.
        test: Result of :func:`convert_test` (its ``hu`` and ``label``).

    Returns:
        ``{case: (ct_image, label_image)}`` for ``TRAIN_PREFIX`` and ``TEST_CASE``.

    Raises:
        SampleCheckError: If the result is not RAS or fails the liver HU check.
    """
    import nibabel as nib
    import numpy as np

    ct_img, seg_img = nib.load(ref / TRAIN_CT), nib.load(ref / TRAIN_SEG)
    seg = map_labels(np.asanyarray(seg_img.dataobj))
    keep = np.flatnonzero(seg.any(axis=(0, 1)))
    lo, hi = int(keep[0]), int(keep[-1]) + 1
    _check(np.array_equal(keep, np.arange(lo, hi)), "train labelled slices are not contiguous")
    train_ct = nib.Nifti1Image(np.asanyarray(ct_img.dataobj).astype(np.int16), ct_img.affine).slicer[:, :, lo:hi]
    train_seg = nib.Nifti1Image(seg.astype(np.uint8), ct_img.affine).slicer[:, :, lo:hi]  # slicer moves the origin

    test_seg_img = nib.load(ref / TEST_SEG)
    hu_grid = np.ascontiguousarray(test["hu"].transpose(2, 1, 0)[:, ::-1, :])  # (D, row, col) -> mask (i, j, k)
    test_label = map_labels(np.asanyarray(test_seg_img.dataobj))
    _check(hu_grid.shape == test_label.shape, f"test HU grid {hu_grid.shape} != mask {test_label.shape}")
    (i0, j0), (i1, j1) = body_box(hu_grid, BODY_MARGIN)
    _check(test_label[:i0].sum() + test_label[i1:].sum() + test_label[:, :j0].sum() + test_label[:, j1:].sum() == 0,
           "test labels extend beyond the body box")
    test_ct = nib.Nifti1Image(hu_grid.astype(np.int16), test_seg_img.affine).slicer[i0:i1, j0:j1, :]
    test_seg = nib.Nifti1Image(test_label.astype(np.uint8), test_seg_img.affine).slicer[i0:i1, j0:j1, :]

    out = {}
    for case, (ct, lab) in {TRAIN_PREFIX: (train_ct, train_seg), TEST_CASE: (test_ct, test_seg)}.items():
        ct, lab = nib.as_closest_canonical(ct), nib.as_closest_canonical(lab)
        _check(nib.aff2axcodes(ct.affine) == ("R", "A", "S"), f"{case}: nnU-Net copy is not RAS")
        _check(np.allclose(ct.affine, lab.affine), f"{case}: nnU-Net image and label affines differ")
        hu, label = np.asanyarray(ct.dataobj), np.asanyarray(lab.dataobj)
        share = liver_hu_share(hu, label)
        _check(share > LIVER_HU_SHARE_MIN, f"{case}: nnU-Net copy liver HU share {share:.3f} <= {LIVER_HU_SHARE_MIN}")
        for img, dtype in ((ct, np.int16), (lab, np.uint8)):
            img.set_data_dtype(dtype)
            img.header.set_xyzt_units("mm", "sec")
        out[case] = (ct, lab)
    return out


def write_nnunet(out: Path, images: dict[str, tuple[Any, Any]]) -> None:
    """Write the nnU-Net v2 raw copy ``out`` (e.g. ``.../Dataset900_TotalSegSample``).

    ``imagesTr/totalseg_ct_0000.nii.gz`` + ``labelsTr/totalseg_ct.nii.gz`` (train patient),
    ``imagesTs/totalseg_dicom_0000.nii.gz`` + ``labelsTs/totalseg_dicom.nii.gz`` (test patient) and
    ``dataset.json`` (one CT channel, the 8 Synapse organs, ``numTraining`` 1, ``.nii.gz``).

    Args:
        out: The dataset folder (replaced).
        images: Result of :func:`nnunet_images`.
    """
    import json

    import nibabel as nib

    if out.exists():
        shutil.rmtree(out)
    for split, case in (("Tr", TRAIN_PREFIX), ("Ts", TEST_CASE)):
        ct, lab = images[case]
        (out / f"images{split}").mkdir(parents=True)
        (out / f"labels{split}").mkdir(parents=True)
        nib.save(ct, out / f"images{split}" / f"{case}_0000.nii.gz")
        nib.save(lab, out / f"labels{split}" / f"{case}.nii.gz")
    meta = {
        "name": "TotalSegSample",
        "description": "Two abdominal CTs from the TotalSegmentator 2.18.0 sdist test data, Synapse organ labels "
                       "(TotalSegmentator predictions, not manual annotations). Apache-2.0.",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: value for value, name in SYNAPSE_NAMES.items()}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "licence": "Apache-2.0 (TotalSegmentator)",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Run the conversion.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="TotalSegmentator sdist .tar.gz or its root")
    parser.add_argument("--out", type=Path, required=True, help="output directory (e.g. lightning_selfreg/data/sample)")
    parser.add_argument("--sdist-sha256", default=None, help="sdist digest to record when --source is a directory")
    parser.add_argument("--shuffle", action="store_true", help="use the HDF5 shuffle filter (larger for this data)")
    parser.add_argument("--nnunet-out", type=Path, default=None,
                        help="also write the nnU-Net v2 raw copy here (e.g. "
                             "lightning_selfreg/data/sample_nnunet/Dataset900_TotalSegSample)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        root, digest = resolve_source(args.source, Path(tmp))
        ref = root / REF_DIR
        train = convert_train(ref)
        test = convert_test(ref)
        args.out.mkdir(parents=True, exist_ok=True)
        write_sample(args.out, train, test, shuffle=args.shuffle)
        write_readme(args.out, train, test, digest or args.sdist_sha256, shuffle=args.shuffle)
        notices = sorted(p for p in root.iterdir() if p.is_file() and p.name.upper().startswith("NOTICE"))
        _check(not notices, f"sdist has NOTICE file(s) {notices}; copy them and update the README")
        shutil.copyfile(root / "LICENSE", args.out / "LICENSE-TotalSegmentator.txt")
        if args.nnunet_out is not None:
            write_nnunet(args.nnunet_out, nnunet_images(ref, test))
            shutil.copyfile(root / "LICENSE", args.nnunet_out.parent / "LICENSE-TotalSegmentator.txt")

    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    tc, sc = train["check"], test["check"]
    logger.info(
        "wrote %s: %d train slices, test volume %s, %d bytes in total; liver 0-120 HU share train %.3f test %.3f; "
        "test voxels %s; sdist sha256 %s",
        args.out,
        len(train["slices"]),
        "x".join(map(str, test["image"].shape)),
        total,
        tc["liver_hu_share"],
        sc["liver_hu_share"],
        {SYNAPSE_NAMES[c]: n for c, n in test["counts"].items()},
        digest or args.sdist_sha256,
    )


if __name__ == "__main__":
    main()
