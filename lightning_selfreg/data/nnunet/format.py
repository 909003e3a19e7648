"""The nnU-Net v2 raw dataset format: ``dataset.json``, case discovery, file readers and the cross-validation split.

A raw dataset is a folder ``DatasetXXX_Name/`` holding::

    dataset.json                      channel_names, labels, numTraining, file_ending
    imagesTr/{case}_{XXXX}{ending}    one file per channel (XXXX = 0000, 0001, ...)
    labelsTr/{case}{ending}           integer label map
    imagesTs/{case}_{XXXX}{ending}    optional test images
    labelsTs/{case}{ending}           optional test labels (not in nnU-Net's documented format; some converters)
    splits_final.json                 optional: [{"train": [...], "val": [...]}, ...] (nnU-Net keeps it in the
                                      preprocessed folder; here it may also sit in the raw folder)

Readers return arrays in nnU-Net's axis order: NIfTI files (nibabel) are transposed from ``(x, y, z)`` to
``(z, y, x)`` with the spacing reversed likewise (nnU-Net's ``NibabelIO``; arrays are not reoriented, as with
nnU-Net's default readers), 2D images become ``(1, H, W)`` with spacing ``(999, 1, 1)`` (``NaturalImage2DIO``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.data.contract import DataError
from lightning_selfreg.utils.checks import label_problem

__all__ = [
    "IMAGE_2D_ENDINGS",
    "NIFTI_ENDINGS",
    "NNUNET_LAYOUT",
    "SUPPORTED_ENDINGS",
    "CaseFiles",
    "CaseHeader",
    "DatasetJson",
    "check_case",
    "check_label_values",
    "crossval_split",
    "find_cases",
    "read_case",
    "read_case_header",
    "random_split",
    "read_dataset_json",
    "read_splits",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
IMAGE_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + IMAGE_2D_ENDINGS
NNUNET_LAYOUT = (
    "an nnU-Net v2 raw dataset: dataset.json (channel_names, labels, numTraining, file_ending), "
    "imagesTr/{case}_{XXXX}{file_ending} (one file per channel), labelsTr/{case}{file_ending}, optional "
    "imagesTs/ and labelsTs/, optional splits_final.json"
)
SPACING_2D = (999.0, 1.0, 1.0)  # nnU-Net's spacing of 2D images: a dummy slice axis


@dataclass(frozen=True)
class DatasetJson:
    """The parts of ``dataset.json`` this library uses.

    Attributes:
        path: The file.
        channel_names: Channel names in channel order (``"CT"``, ``"T2"``, ...); select the normalisation.
        labels: Class names in label-value order, background first (value ``i`` = ``labels[i]``).
        num_training: ``numTraining``.
        file_ending: e.g. ``".nii.gz"``.
    """

    path: Path
    channel_names: tuple[str, ...]
    labels: tuple[str, ...]
    num_training: int
    file_ending: str

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def is_2d_format(self) -> bool:
        """Whether the files are 2D images (PNG, ...), which only the 2D configuration can train on."""
        return self.file_ending in IMAGE_2D_ENDINGS


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: its channel images (in channel order) and its label file (or None)."""

    case: str
    images: tuple[Path, ...]
    label: Path | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def read_dataset_json(data_dir: str | Path) -> DatasetJson:
    """Parse and check ``<data_dir>/dataset.json``.

    Raises:
        DataError: Missing/invalid file, a missing key, labels that are not ``background: 0`` plus consecutive
            integers, region-based or ignore labels (not supported), an unsupported ``file_ending``, or the
            ``"dataset"`` key (explicit file lists, not supported).
    """
    path = Path(data_dir) / "dataset.json"
    if not Path(data_dir).is_dir():
        raise DataError(f"Data directory {data_dir} does not exist. Expected {NNUNET_LAYOUT}.")
    if not path.is_file():
        raise DataError(f"{path} does not exist. Expected {NNUNET_LAYOUT}.")
    try:
        meta, problem = json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        meta, problem = None, f"cannot be read as JSON ({err})."
    if problem is not None:  # raised outside the handler: the error (and its one line) is about this file
        raise _fail(path, problem)
    if not isinstance(meta, dict):
        raise _fail(path, f"expected a JSON object, found {type(meta).__name__}.")
    channels = meta.get("channel_names", meta.get("modality"))
    missing = [k for k, v in (("channel_names", channels), ("labels", meta.get("labels")),
                              ("numTraining", meta.get("numTraining")), ("file_ending", meta.get("file_ending")))
               if v is None]
    if missing:
        raise _fail(path, f"missing required key(s) {missing} (nnU-Net v2 needs channel_names, labels, numTraining, "
                          "file_ending).")
    if "dataset" in meta:
        raise _fail(path, "the 'dataset' key (explicit file lists) is not supported; use the imagesTr/labelsTr "
                          "folders.")
    ending = str(meta["file_ending"]).lower()
    if ending not in SUPPORTED_ENDINGS:
        raise _fail(path, f"file_ending {meta['file_ending']!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ENDINGS)} (NIfTI via nibabel, 2D images via Pillow).")
    if not isinstance(channels, dict) or not channels:
        raise _fail(path, f"channel_names must be a non-empty mapping {{'0': 'CT', ...}}, found {channels!r}.")
    try:
        order = sorted(channels, key=int)
    except (TypeError, ValueError) as err:
        raise _fail(path, f"channel_names keys must be channel indices '0', '1', ..., found {list(channels)}.") from err
    if [int(k) for k in order] != list(range(len(order))):
        raise _fail(path, f"channel_names keys must be 0..{len(order) - 1}, found {order}.")
    labels = meta["labels"]
    if not isinstance(labels, dict):
        raise _fail(path, f"labels must be a mapping name -> value, found {type(labels).__name__}.")
    if "ignore" in labels:
        raise _fail(path, "the 'ignore' label is not supported; remove it from labels or relabel those voxels.")
    regions = [name for name, value in labels.items() if isinstance(value, list | tuple)]
    if regions or "regions_class_order" in meta:
        raise _fail(path, f"region-based labels ({regions or 'regions_class_order'}) are not supported; only "
                          "name -> integer labels.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise _fail(path, f"label values must be integers, found {labels}.")
    if labels.get("background") != 0:
        raise _fail(path, f"labels must contain 'background': 0, found {labels}.")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise _fail(path, f"label values must be consecutive integers 0..{len(values) - 1}, found {values}.")
    by_value = {v: name for name, v in labels.items()}
    num_training = meta["numTraining"]
    if not isinstance(num_training, int) or num_training < 1:
        raise _fail(path, f"numTraining must be a positive integer, found {num_training!r}.")
    return DatasetJson(path=path, channel_names=tuple(str(channels[k]) for k in order),
                       labels=tuple(by_value[v] for v in range(len(values))), num_training=num_training,
                       file_ending=ending)


def find_cases(data_dir: str | Path, meta: DatasetJson, split: str = "train") -> list[CaseFiles]:
    """Cases of ``imagesTr`` (``split="train"``) or ``imagesTs`` (``"test"``), sorted by identifier.

    Identifiers are the file names ending in ``file_ending`` without ``_XXXX{ending}`` (as nnU-Net's
    ``get_identifiers_from_splitted_dataset_folder``); every case must have one file per channel. Training cases
    must have a label in ``labelsTr``; test cases get the one in ``labelsTs`` when it exists.

    Raises:
        DataError: A missing folder, a file not named ``{case}_{XXXX}{ending}``, missing or extra channel files,
            a missing training label, or ``numTraining`` different from the number of training cases.
    """
    data_dir = Path(data_dir)
    images_dir = data_dir / ("imagesTr" if split == "train" else "imagesTs")
    labels_dir = data_dir / ("labelsTr" if split == "train" else "labelsTs")
    if not images_dir.is_dir():
        if split == "train":
            raise DataError(f"Data directory {data_dir} lacks imagesTr/. Expected {NNUNET_LAYOUT}.")
        return []
    ending = meta.file_ending
    pattern = re.compile(rf"(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}", re.IGNORECASE)
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.name.lower().endswith(ending):
            continue
        match = pattern.fullmatch(path.name)
        if match is None:
            raise _fail(path, f"image files must be named {{case}}_{{XXXX}}{ending} (XXXX = channel index).")
        files.setdefault(match["case"], {})[int(match["channel"])] = path
    n_files = 1 if meta.is_2d_format else len(meta.channel_names)  # one RGB PNG holds 3 channels
    cases = []
    for case in sorted(files):
        channels = files[case]
        expected = set(range(n_files)) if not meta.is_2d_format else None
        if expected is not None and set(channels) != expected:
            raise DataError(f"{images_dir}: case {case!r} has channel files {sorted(channels)}, expected "
                            f"{sorted(expected)} ({len(meta.channel_names)} channel_names in {meta.path.name}).")
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            if split == "train":
                raise _fail(label, f"missing: training case {case!r} has no label in {labels_dir.name}/.")
            label = None
        cases.append(CaseFiles(case, tuple(channels[c] for c in sorted(channels)), label, split))
    if split == "train":
        if not cases:
            raise DataError(f"{images_dir} has no images ending in {ending}. Expected {NNUNET_LAYOUT}.")
        if len(cases) != meta.num_training:
            raise _fail(meta.path, f"numTraining is {meta.num_training} but imagesTr/ holds {len(cases)} cases.")
    return cases


# ---------------------------------------------------------------------------------------------------- readers
def _load_nifti(path: Path, header_only: bool) -> tuple[Any, np.ndarray | None]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = None if header_only else np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for bad or truncated files
        raise _fail(path, f"cannot be read as NIfTI ({type(err).__name__}: {err}).") from err
    return image, data


def _check_nifti_spacing(path: Path, image: Any, ndim: int) -> None:
    """The spacing in the file's own header, before nibabel's fixes: ``pixdim`` and every coded sform / qform.

    nibabel replaces a zero ``pixdim`` by 1 and a negative one by its absolute value when it loads a header (with a
    log line only), so a broken spacing would reach the run as 1 mm. The header is read again without those fixes.
    """
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            raw = type(image.header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - the header was read once already; nothing more to learn here
        return
    pixdim = np.asarray(raw["pixdim"][1:1 + ndim], dtype=np.float64)
    if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
        shown = tuple(float(f"{v:.6g}") for v in pixdim.tolist())  # the header's float32, as typed
        raise _fail(path, f"expected a positive spacing, found pixdim[1:{ndim + 1}] = {shown} in "
                          "the header (nibabel would read a 0 as 1 mm and a negative value as its absolute value).")
    for name, code in (("sform", "sform_code"), ("qform", "qform_code")):
        if int(raw[code]) <= 0:
            continue
        matrix = np.asarray(raw.get_sform() if name == "sform" else raw.get_qform(), dtype=np.float64)
        lengths = np.linalg.norm(matrix[:3, :ndim], axis=0)
        if not np.isfinite(matrix).all() or not (lengths > 0).all():
            raise _fail(path, f"expected a positive spacing, found a {name} whose voxel axes have lengths "
                              f"{tuple(np.round(lengths, 6).tolist())} (a zero or non-finite {name}).")


def _affine_difference(affine: np.ndarray, reference: np.ndarray) -> str:
    """How ``affine`` differs from ``reference``: flipped or permuted axes, the origin's shift."""
    parts = []
    a, b = affine[:3, :3], reference[:3, :3]
    da, db = a / np.maximum(np.linalg.norm(a, axis=0), 1e-12), b / np.maximum(np.linalg.norm(b, axis=0), 1e-12)
    for axis in range(3):
        dot = float(da[:, axis] @ db[:, axis])
        if dot < -0.999:
            parts.append(f"voxel axis {axis} flipped")
        elif dot < 0.999:
            parts.append(f"voxel axis {axis} turned ({np.degrees(np.arccos(np.clip(dot, -1, 1))):.1f} deg)")
    shift = affine[:3, 3] - reference[:3, 3]
    if np.abs(shift).max() > 1e-3:
        parts.append(f"origin moved by {tuple(np.round(shift, 3).tolist())} mm")
    return ", ".join(parts) or "the matrices differ"


def _nifti_geometry(path: Path, image: Any) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise _fail(path, f"expected a 2D or 3D NIfTI image (one file per channel), found shape {shape}.")
    _check_nifti_spacing(path, image, len(shape))
    zooms = np.asarray(image.header.get_zooms()[:len(shape)], dtype=np.float64)
    if len(shape) == 2:
        return (1, shape[1], shape[0]), np.array([SPACING_2D[0], zooms[1], zooms[0]]), np.asarray(image.affine)
    return (shape[2], shape[1], shape[0]), zooms[::-1].copy(), np.asarray(image.affine, dtype=np.float64)


def _to_zyx(data: np.ndarray) -> np.ndarray:
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        return np.ascontiguousarray(data.T[None])
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def _load_2d(path: Path, header_only: bool) -> tuple[tuple[int, ...], int, np.ndarray | None]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            data = None if header_only else np.asarray(img)
    except OSError as err:
        raise _fail(path, f"cannot be read as an image ({err}).") from err
    channels = {"L": 1, "I": 1, "I;16": 1, "F": 1, "P": 1, "1": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(mode)
    if channels is None:
        raise _fail(path, f"unsupported image mode {mode!r}.")
    return (1, size[1], size[0]), channels, data


@dataclass(frozen=True)
class CaseHeader:
    """Geometry of one case from its file headers: shape ``(D, H, W)``, spacing ``(z, y, x)`` mm, affine."""

    shape: tuple[int, ...]
    spacing: np.ndarray
    affine: np.ndarray | None
    num_channels: int


def read_case_header(case: CaseFiles, meta: DatasetJson) -> CaseHeader:
    """Read the headers of a case's files (no voxel data) and check that they agree.

    Raises:
        DataError: An unreadable file; a spacing that is zero, negative or not finite in the header's ``pixdim``
            or in its sform / qform; a channel or label whose shape, spacing or affine (orientation, origin; within
            1e-3) differs from the first channel's; a channel count different from ``channel_names``.
    """
    shapes, spacings, affines, channels = [], [], [], 0
    for path in (*case.images, *(() if case.label is None else (case.label,))):
        if not path.is_file() or path.stat().st_size == 0:
            raise _fail(path, "missing or empty.")
        if meta.is_2d_format:
            shape, n, _ = _load_2d(path, header_only=True)
            spacing, affine = np.asarray(SPACING_2D), None
        else:
            image, _ = _load_nifti(path, header_only=True)
            shape, spacing, affine = _nifti_geometry(path, image)
            n = 1
        if path != case.label:
            channels += n
        shapes.append(shape)
        spacings.append(spacing)
        affines.append(affine)
    first = case.images[0]
    for path, shape, spacing, affine in zip((*case.images, case.label), shapes, spacings, affines, strict=False):
        what = "label" if path == case.label else "channel"
        if shape != shapes[0]:
            raise _fail(path, f"{what} shape (D, H, W) = {shape} differs from {first.name}'s {shapes[0]}.")
        if not np.allclose(spacing, spacings[0], rtol=1e-4, atol=1e-5):
            raise _fail(path, f"{what} spacing (z, y, x) = {tuple(spacing)} differs from {first.name}'s "
                              f"{tuple(spacings[0])}.")
        if affine is not None and not np.allclose(affine, affines[0], rtol=1e-5, atol=1e-3):
            # nnU-Net's verify_dataset_integrity compares the affines too; a label that is flipped or shifted
            # against its image trains the network on wrong voxels
            raise _fail(path, f"{what} geometry differs from {first.name}'s: {_affine_difference(affine, affines[0])} "
                              f"(affine {np.round(affine, 3).tolist()} vs {np.round(affines[0], 3).tolist()}).")
    if channels != len(meta.channel_names):
        raise DataError(f"case {case.case!r}: its files hold {channels} channel(s), but {meta.path.name} names "
                        f"{len(meta.channel_names)}: {list(meta.channel_names)}.")
    if not (spacings[0] > 0).all():
        raise _fail(first, f"spacing must be positive, found {tuple(spacings[0])}.")
    return CaseHeader(shapes[0], spacings[0], affines[0], channels)


def check_label_values(path: Path, label: np.ndarray, num_classes: int) -> None:
    """Raise a :class:`DataError` naming ``path`` unless ``label`` holds integers in ``[0, num_classes)``.

    ``num_classes`` is the number of dataset.json's labels (:func:`~lightning_selfreg.utils.checks.label_problem`).
    """
    problem = label_problem(label, num_classes)
    if problem is not None:
        raise _fail(path, f"label: {problem} (the labels of dataset.json).")


def check_case(case: CaseFiles, meta: DatasetJson) -> float | None:
    """The pre-flight's full read of one case: what :func:`read_case` checks, without building its arrays.

    Each file is read to its end in its stored dtype (no float32 copy): the headers agree
    (:func:`read_case_header`), float intensities are finite, the label is integral and within dataset.json's
    labels.

    Returns:
        The share of the label that is foreground (None without a label).

    Raises:
        DataError: The first problem, naming the file.
    """
    read_case_header(case, meta)
    for path in case.images:
        if meta.is_2d_format:
            data = _load_2d(path, header_only=False)[2]
        else:
            data = _load_nifti(path, header_only=False)[1]
        data = np.asarray(data)
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise _fail(path, "image contains NaN or infinite values.")
    if case.label is None:
        return None
    if meta.is_2d_format:
        _, n, label = _load_2d(case.label, header_only=False)
        if n != 1:
            raise _fail(case.label, f"label images must have one channel, found {n}.")
    else:
        label = _load_nifti(case.label, header_only=False)[1]
    label = np.asarray(label)
    check_label_values(case.label, label, meta.num_classes)
    return float(np.count_nonzero(label)) / label.size if label.size else None


def read_case(case: CaseFiles, meta: DatasetJson, with_label: bool = True) -> dict[str, Any]:
    """Read one case: images, label, spacing and affine.

    Returns:
        ``{"image": float32 (C, D, H, W), "label": int16 (D, H, W) or None, "spacing": float64 (3,) (z, y, x) mm,
        "affine": (4, 4) of the first channel's file or None (2D images)}``.

    Raises:
        DataError: Unreadable files, disagreeing geometry, non-finite image values, or label values outside
            dataset.json's labels.
    """
    header = read_case_header(case, meta)
    channels = []
    for path in case.images:
        if meta.is_2d_format:
            _, n, data = _load_2d(path, header_only=False)
            data = np.asarray(data, dtype=np.float32)
            data = data[None, None] if data.ndim == 2 else data.transpose(2, 0, 1)[:, None]  # (c, 1, H, W)
        else:
            _, data = _load_nifti(path, header_only=False)
            data = _to_zyx(np.asarray(data, dtype=np.float32))[None]
        channels.append(data)
    image = np.concatenate(channels, axis=0)
    if not np.isfinite(image).all():
        bad = next(p for p, c in zip(case.images, channels, strict=False) if not np.isfinite(c).all())
        raise _fail(bad, "image contains NaN or infinite values.")
    label = None
    if with_label and case.label is not None:
        if meta.is_2d_format:
            _, n, data = _load_2d(case.label, header_only=False)
            if n != 1:
                raise _fail(case.label, f"label images must have one channel, found {n}.")
            data = np.asarray(data)[None]
        else:
            _, data = _load_nifti(case.label, header_only=False)
            data = _to_zyx(np.asarray(data))
        check_label_values(case.label, data, meta.num_classes)
        label = data.astype(np.int16)
    return {"image": image, "label": label, "spacing": header.spacing, "affine": header.affine}


# ---------------------------------------------------------------------------------------------------- splits
def crossval_split(identifiers: Sequence[str], seed: int = 12345, n_splits: int = 5) -> list[dict[str, list[str]]]:
    """nnU-Net's default split: ``sklearn.model_selection.KFold(n_splits, shuffle=True, random_state=seed)``.

    Reproduced with NumPy (scikit-learn is not a dependency): the case indices of the sorted identifiers are
    shuffled with ``np.random.RandomState(seed).shuffle``, cut into ``n_splits`` consecutive folds whose first
    ``n % n_splits`` are one case larger, and each fold's ``train`` / ``val`` lists keep the sorted order (as
    KFold's index masks do).

    Returns:
        ``[{"train": [...], "val": [...]}, ...]``, one entry per fold (the ``splits_final.json`` format).

    Raises:
        DataError: Fewer cases than folds.
    """
    ids = np.sort(np.asarray(list(identifiers)))
    n = len(ids)
    if n < n_splits:
        raise DataError(f"nnU-Net's {n_splits}-fold split needs at least {n_splits} training cases, found {n}; "
                        "train on all cases (fold=None) or give a splits_final.json.")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        held = np.zeros(n, dtype=bool)
        held[order[start:start + size]] = True
        splits.append({"train": ids[~held].tolist(), "val": ids[held].tolist()})
        start += size
    return splits


def random_split(identifiers: Sequence[str], fold: int) -> dict[str, list[str]]:
    """nnU-Net's split for ``fold >= len(splits)``: 80 % of the sorted cases drawn by ``RandomState(12345 + fold)``."""
    ids = np.sort(np.asarray(list(identifiers)))
    rnd = np.random.RandomState(seed=12345 + fold)
    idx_tr = rnd.choice(len(ids), int(len(ids) * 0.8), replace=False)
    idx_val = [i for i in range(len(ids)) if i not in idx_tr]
    return {"train": ids[idx_tr].tolist(), "val": ids[idx_val].tolist()}


def read_splits(path: Path, cases: Sequence[str]) -> list[dict[str, list[str]]]:
    """Read and check a ``splits_final.json``: a list of ``{"train": [...], "val": [...]}`` over known cases.

    Raises:
        DataError: Unreadable file, wrong structure, case identifiers that are not training cases, or a fold whose
            train and val share a case.
    """
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"cannot be read as JSON ({err}).") from err
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits):
        raise _fail(path, 'expected a non-empty list of {"train": [case, ...], "val": [case, ...]} (one per fold).')
    known = set(cases)
    for k, split in enumerate(splits):
        unknown = sorted({str(c) for c in split["train"] + split["val"]} - known)
        if unknown:
            raise _fail(path, f"fold {k} names case(s) {unknown[:5]} that are not in imagesTr/.")
        both = sorted({str(c) for c in split["train"]} & {str(c) for c in split["val"]})
        if both:
            raise _fail(path, f"fold {k} has case(s) {both[:5]} in both train and val; expected disjoint splits.")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]
