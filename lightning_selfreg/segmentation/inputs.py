"""What prediction reads and writes: the cases in a file or folder, read as the training data was, and their outputs.

Inputs (:func:`find_cases`, :func:`read_case`):

* a NIfTI volume (``.nii`` / ``.nii.gz``); a 4D file whose last axis holds the model's channels;
* a folder of them, one case per file, or in nnU-Net's test layout with channel suffixes (``case_0000.nii.gz``,
  ``case_0001.nii.gz`` -> one multi-channel case ``case``, its channels checked against the model's);
* a DICOM series folder (read with SimpleITK's ``ImageSeriesReader``, which sorts the slices by position and keeps
  the geometry; install ``lightning_selfreg[dicom]``); a folder holding several series gives one case per series;
* 2D images (PNG, TIFF, BMP, JPEG) for models trained on 2D images (histology, nnU-Net 2D-image datasets);
* the files of the Synapse / ACDC layouts (``.npy.h5`` volumes, ``.npz``), which store normalised arrays in the
  layout's declared orientation.

Outputs mirror the inputs: a NIfTI label map with the input's shape, affine and header geometry for a NIfTI input,
the DICOM series' geometry (as dcm2niix writes it) for a series, the declared orientation's affine for a layout
file, a PNG for a 2D image; named ``<case>.nii.gz`` / ``<case>.png`` (nnU-Net's naming) in an output folder.
Every problem with an input raises :class:`~lightning_selfreg.segmentation.inference.PredictionError` with one line
naming the file, what was expected and what was found.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_selfreg.data.image_io import label_image, save_image, save_png
from lightning_selfreg.data.nnunet.format import SPACING_2D
from lightning_selfreg.data.preprocessing import Preprocessing, affine_for
from lightning_selfreg.segmentation.inference import PredictionError
from lightning_selfreg.utils.files import atomic_write

__all__ = [
    "IMAGE_ENDINGS",
    "LAYOUT_ENDINGS",
    "NIFTI_ENDINGS",
    "Case",
    "CaseSource",
    "case_from_object",
    "find_cases",
    "label_image_of",
    "read_case",
    "write_prediction",
    "write_probabilities",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
LAYOUT_ENDINGS = (".npy.h5", ".h5", ".npz")
IMAGE_ENDINGS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
Kind = Literal["nifti", "dicom", "layout", "image", "array"]
_CHANNEL = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, RuntimeError, KeyError, TypeError)
ACCEPTED = ("a NIfTI volume (.nii/.nii.gz), a DICOM series folder, a 2D image (.png/.tif/.bmp/.jpg), a layout file "
            "(.npy.h5/.npz) or a folder of them")


def _ending(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in (*NIFTI_ENDINGS, *LAYOUT_ENDINGS, *IMAGE_ENDINGS) if name.endswith(e)), None)


def _stem(path: Path) -> str:
    ending = _ending(path)
    return path.name[: -len(ending)] if ending else path.name


def _kind(path: Path) -> Kind | None:
    ending = _ending(path)
    if ending in NIFTI_ENDINGS:
        return "nifti"
    if ending in LAYOUT_ENDINGS:
        return "layout"
    return "image" if ending in IMAGE_ENDINGS else None


@dataclass(frozen=True)
class CaseSource:
    """The files of one case, before reading.

    Attributes:
        name: The case's name (the output is ``<name><suffix>``).
        paths: Its files (one per channel; DICOM: the series folder).
        kind: ``"nifti"``, ``"dicom"``, ``"layout"`` or ``"image"``.
        series: The DICOM series UID (DICOM only).
    """

    name: str
    paths: tuple[Path, ...]
    kind: Kind
    series: str | None = None

    @property
    def suffix(self) -> str:
        """The output's ending: ``.png`` for 2D images, ``.nii.gz`` for everything else."""
        return ".png" if self.kind == "image" else ".nii.gz"

    @property
    def display(self) -> str:
        """How errors name the case: its first file (or the series folder)."""
        return str(self.paths[0])


@dataclass
class Case:
    """One case read and checked, in the file's voxel order.

    Attributes:
        name: Its name.
        image: ``(C, D, H, W)`` float32 (``D, H, W`` = the NIfTI ``z, y, x`` axes; a 2D image: ``(C, 1, H, W)``).
        affine: Voxel-to-world affine of ``(x, y, z)`` in RAS+ (nibabel), or None (declared in the model's
            orientation: layout files, arrays without an affine, 2D images).
        spacing: ``(z, y, x)`` mm, or None.
        kind: Where it came from (see :class:`CaseSource`).
        normalized: The arrays are stored normalised already (layout files).
        reference: The nibabel image whose header the output copies (NIfTI inputs), else None.
        display: How errors name it.
    """

    name: str
    image: np.ndarray
    affine: np.ndarray | None
    spacing: tuple[float, float, float] | None
    kind: Kind
    normalized: bool = False
    reference: Any = None
    display: str = ""


def _fail(path: Any, message: str) -> PredictionError:
    return PredictionError(f"--input {path}: {message}")


# ---------------------------------------------------------------------------------------------------- discovery
def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise PredictionError("DICOM input needs SimpleITK: pip install 'lightning_selfreg[dicom]' (or: pip install "
                              "SimpleITK)") from err
    return sitk


def _dicom_series(folder: Path) -> list[CaseSource]:
    sitk = _sitk()
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise _fail(folder, "expected a DICOM series, found DICOM files without a readable series (no image slices)")
    if len(ids) == 1:
        return [CaseSource(folder.name, (folder,), "dicom", ids[0])]
    return [CaseSource(f"{folder.name}_{uid}", (folder,), "dicom", uid) for uid in sorted(ids)]


def _file_channels(path: Path) -> int | None:
    """The channels a NIfTI file holds (its 4th axis, from the header alone), or None when it cannot be read."""
    try:
        import nibabel as nib

        shape = nib.load(str(path)).shape
    except Exception:  # noqa: BLE001 - read_case names an unreadable file
        return None
    return int(shape[3]) if len(shape) == 4 else 1


def _group_channels(files: list[Path], record: Preprocessing, folder: Path) -> list[CaseSource]:
    """NIfTI files as cases: nnU-Net's ``{case}_{XXXX}`` channel files grouped, else one case per file."""
    channels = record.in_channels
    names = ", ".join(record.channel_names)
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for path in files:
        match = _CHANNEL.fullmatch(_stem(path))
        if match is None:
            if channels > 1 and _file_channels(path) not in (None, channels):  # not a 4D file of the channels
                raise _fail(path, f"the model takes {channels} channels ({names}); expected nnU-Net's channel files "
                                  f"{{case}}_0000{_ending(path)} ... {{case}}_{channels - 1:04d}{_ending(path)}, found "
                                  f"a file without a channel suffix")
            singles.append(CaseSource(_stem(path), (path,), "nifti"))
            continue
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = list(singles)
    for case, found in sorted(groups.items()):
        if channels == 1 and set(found) != {0}:  # not nnU-Net's one-channel naming: numbered scans, each a case
            cases.extend(CaseSource(_stem(path), (path,), "nifti") for _, path in sorted(found.items()))
            continue
        if set(found) != set(range(channels)):
            raise _fail(folder, f"case {case!r} has channel files {sorted(found)}, expected "
                                f"{list(range(channels))} (the model's channels: {names})")
        cases.append(CaseSource(case, tuple(found[c] for c in range(channels)), "nifti"))
    return sorted(cases, key=lambda c: c.name)


def _single_files(files: list[Path], kind: Kind) -> list[CaseSource]:
    """One case per file.

    nnU-Net's ``_0000`` channel suffix is dropped from the names when every file has it (a 2D image holds all its
    channels in one file: ``case_0000.png`` -> ``case``).
    """
    stems = [_stem(p) for p in files]
    if all(s.endswith("_0000") for s in stems):
        stems = [s[:-5] for s in stems]
    return [CaseSource(s, (p,), kind) for s, p in zip(stems, files, strict=True)]


def _check_kind(path: Path, kind: str, record: Preprocessing) -> None:
    if record.image_dims == 2 and kind in ("nifti", "layout", "dicom"):
        raise _fail(path, "the model segments 2D images (PNG/TIFF/BMP/JPEG), found a volume file")
    if record.image_dims == 3 and kind == "image":
        raise _fail(path, "the model segments volumes (NIfTI, DICOM), found a 2D image")


def find_cases(path: Path, record: Preprocessing) -> list[CaseSource]:
    """The cases of an input file or folder (see the module docstring), sorted by name.

    A single channel file ``case_0000.nii.gz`` given to a multi-channel model brings its sibling channel files.

    Raises:
        PredictionError: A missing path, an unsupported file, a folder without images, a folder mixing volumes and
            2D images, or channel files that do not match the model's channels.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "not found")
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            if _is_dicom(path):
                raise _fail(path, "a single DICOM file; expected the folder of its series")
            raise _fail(path, f"expected {ACCEPTED}, found a file of another type")
        _check_kind(path, kind, record)
        match = _CHANNEL.fullmatch(_stem(path))
        if kind == "nifti" and record.in_channels > 1 and match is not None:
            siblings = [p for p in sorted(path.parent.iterdir()) if _kind(p) == "nifti"
                        and (m := _CHANNEL.fullmatch(_stem(p))) is not None and m["case"] == match["case"]]
            return _group_channels(siblings, record, path.parent)
        if kind == "nifti":
            return _group_channels([path], record, path.parent)
        return _single_files([path], kind)
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    by_kind: dict[str, list[Path]] = {}
    for file in files:
        by_kind.setdefault(_kind(file) or "other", []).append(file)
    known = [k for k in ("nifti", "layout", "image") if k in by_kind]
    if not known and any(_is_dicom(f) for f in by_kind.get("other", [])[:50]):
        _check_kind(path, "dicom", record)
        return _dicom_series(path)
    if not known:
        raise _fail(path, f"expected {ACCEPTED}, found no image file in the folder (a DICOM export: give the folder "
                          "of one series)")
    if len(known) > 1:
        raise _fail(path, f"expected one kind of input per folder, found {' and '.join(known)} files; put them in "
                          "separate folders")
    kind = known[0]
    _check_kind(path, kind, record)
    cases = _group_channels(by_kind["nifti"], record, path) if kind == "nifti" else _single_files(by_kind[kind], kind)
    seen: dict[str, CaseSource] = {}
    for case in cases:  # two inputs must not write one output (ct.nii.gz and ct_0000.nii.gz)
        if case.name in seen:
            raise _fail(path, f"expected one input per case name, found {seen[case.name].paths[0].name} and "
                              f"{case.paths[0].name} both named {case.name!r}")
        seen[case.name] = case
    return cases


# ---------------------------------------------------------------------------------------------------- reading
def _check_finite(source: Any, image: np.ndarray) -> None:
    bad = ~np.isfinite(image)
    if bad.any():
        first = int(np.argmax(bad.any(axis=(0, 2, 3))))
        raise _fail(source, f"expected finite intensities, found {int(bad.sum())} NaN/inf voxel(s) (first in slice "
                            f"{first} of {image.shape[1]})")


def _read_nifti_file(path: Path) -> tuple[Any, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for bad files
        raise _fail(path, f"cannot be read as NIfTI ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as err:
        raise _fail(path, f"expected a complete NIfTI file, found a truncated or damaged one ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from err
    return image, data


def _nifti_case(source: CaseSource, record: Preprocessing) -> Case:
    channels, reference = [], None
    for path in source.paths:
        image, data = _read_nifti_file(path)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim == 4 and len(source.paths) == 1:
            channels += [np.asarray(data[..., c], dtype=np.float32).transpose(2, 1, 0) for c in range(data.shape[3])]
        elif data.ndim == 3:
            channels.append(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))
        else:
            raise _fail(path, f"expected a 3D volume (one file per channel), found shape {data.shape}")
        if reference is None:
            reference = image
        elif channels[-1].shape != channels[0].shape or not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise _fail(path, f"expected the grid of {source.paths[0].name} (shape {channels[0].shape[::-1]}), "
                              f"found shape {channels[-1].shape[::-1]} / another affine")
    zooms = reference.header.get_zooms()
    spacing = tuple(float(z) for z in (tuple(zooms[:3]) + (1.0,) * 3)[:3])[::-1]
    return Case(source.name, np.ascontiguousarray(np.stack(channels)), np.asarray(reference.affine, np.float64),
                spacing, "nifti", reference=reference, display=source.display)  # type: ignore[arg-type]


def _dicom_case(source: CaseSource) -> Case:
    sitk = _sitk()
    folder = source.paths[0]
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), source.series))
        image = reader.Execute()
    except RuntimeError as err:
        raise _fail(folder, f"cannot be read as a DICOM series ({str(err).strip().splitlines()[-1]})") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise _fail(folder, f"expected a 3D grey-value series, found {image.GetDimension()}D with "
                            f"{image.GetNumberOfComponentsPerPixel()} components per pixel")
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x), rescale slope / intercept applied
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)  # (x, y, z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return Case(source.name, array[None], affine, tuple(float(s) for s in spacing[::-1]), "dicom",
                display=str(folder))  # type: ignore[arg-type]


def _layout_case(source: CaseSource) -> Case:
    path = source.paths[0]
    spacing = None
    try:
        if path.name.lower().endswith(".npz"):
            with np.load(path) as data:
                key = next((k for k in ("image", "img") if k in data.files), None)
                if key is None:
                    raise _fail(path, f"expected an `image` (Synapse) or `img` (ACDC) array, found keys {data.files}")
                array = data[key]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise _fail(path, f"expected an `image` dataset, found {list(f.keys())}")
                array = f["image"][()]
                spacing = f.attrs.get("spacing")
    except PredictionError:
        raise
    except _READ_ERRORS as err:
        raise _fail(path, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise _fail(path, f"expected an (H, W) slice or a (D, H, W) volume, found shape {array.shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
        if len(spacing) != 3:
            raise _fail(path, f"expected the attribute spacing = (z, y, x), found {spacing}")
    return Case(source.name, np.asarray(array, dtype=np.float32)[None], None, spacing, "layout",  # type: ignore
                normalized=True, display=str(path))


def _image_case(source: CaseSource, record: Preprocessing) -> Case:
    from PIL import Image

    path = source.paths[0]
    try:
        with Image.open(path) as img:
            if record.in_channels == 3:
                img = img.convert("RGB")  # as the histology DataModules read every image
            array = np.asarray(img)
    except _READ_ERRORS as err:
        raise _fail(path, f"cannot be read as an image ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
    # nnU-Net's spacing of 2D images (a dummy slice axis), so that a 2D-image nnU-Net model's recorded target
    # spacing (None, 1, 1) applies as in training
    return Case(source.name, np.asarray(array, dtype=np.float32)[:, None], None, SPACING_2D, "image",
                display=str(path))


def _check_against(case: Case, record: Preprocessing) -> Case:
    """The checks every input passes whatever its format: dimensionality, channels, finite values."""
    volume = case.kind != "image"
    if record.image_dims == 2 and volume and case.image.shape[1] > 1:
        raise _fail(case.display, f"the model segments 2D images (PNG/TIFF), found a volume of "
                                  f"{case.image.shape[1]} slices")
    if record.image_dims == 3 and not volume:
        raise _fail(case.display, "the model segments volumes (NIfTI, DICOM), found a 2D image")
    if record.spatial_dims == 3 and case.image.shape[1] == 1:
        raise _fail(case.display, f"the 3D model needs a volume, found a single slice (shape "
                                  f"{case.image.shape[1:]} (D, H, W))")
    if case.kind == "layout" and record.spacing is not None:
        raise _fail(case.display, f"expected a NIfTI or DICOM image for a model trained on raw images "
                                  f"({record.describe()}), found a layout file, whose arrays the Synapse / ACDC "
                                  "layouts store already normalised")
    if record.spacing is not None and case.spacing is None:
        raise _fail(case.display, f"the model resamples to {record.spacing} mm (z, y, x); expected an image with a "
                                  "voxel spacing, found none")
    if case.image.shape[0] != record.in_channels:
        what = {"image": "the image's channels", "nifti": "the files' channels"}.get(case.kind, "channels")
        raise _fail(case.display, f"the model takes {record.in_channels}-channel images "
                                  f"({', '.join(record.channel_names)}), found {case.image.shape[0]} ({what})")
    _check_finite(case.display, case.image)
    return case


def read_case(source: CaseSource, record: Preprocessing) -> Case:
    """Read and check one case: as the training data was read, in the file's voxel order.

    Raises:
        PredictionError: An unreadable or truncated file, non-finite values, a channel count other than the
            model's, a 2D image for a volume model or the reverse (one line naming the file).
    """
    if source.kind == "nifti":
        case = _nifti_case(source, record)
    elif source.kind == "dicom":
        case = _dicom_case(source)
    elif source.kind == "layout":
        case = _layout_case(source)
    else:
        case = _image_case(source, record)
    return _check_against(case, record)


def case_from_object(image: Any, affine: np.ndarray | None, record: Preprocessing) -> Case:
    """A :class:`Case` of a nibabel image or an array (see :meth:`Predictor.predict`); checked like a file."""
    if hasattr(image, "dataobj") and hasattr(image, "affine"):
        data = np.asanyarray(image.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        data = data[..., None] if data.ndim == 3 else data
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        case = Case("image", np.ascontiguousarray(np.asarray(data, np.float32).transpose(3, 2, 1, 0)),
                    np.asarray(image.affine, np.float64), zooms[::-1], "nifti", reference=image,  # type: ignore
                    display="the nibabel image")
        return _check_against(case, record)
    array = np.asarray(image)
    if record.image_dims == 2:
        if array.ndim not in (2, 3):
            raise PredictionError(f"a 2D image must be (H, W) or (H, W, C), found shape {array.shape}")
        chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        case = Case("image", np.asarray(chw, np.float32)[:, None], None, None, "image", display="the array")
        return _check_against(case, record)
    if array.ndim not in (3, 4):
        raise PredictionError(f"a volume must be (X, Y, Z) or (X, Y, Z, C) as nibabel reads it, found shape "
                              f"{array.shape}")
    array = array[..., None] if array.ndim == 3 else array
    spacing = None
    if affine is not None:
        spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in (2, 1, 0))
    case = Case("image", np.ascontiguousarray(np.asarray(array, np.float32).transpose(3, 2, 1, 0)),
                None if affine is None else np.asarray(affine, np.float64), spacing, "array",  # type: ignore
                display="the array")
    return _check_against(case, record)


# ---------------------------------------------------------------------------------------------------- writing
def label_image_of(labels: np.ndarray, case: Case, record: Preprocessing) -> Any:
    """The nibabel label image of ``(D, H, W)`` labels of ``case`` (in its voxel order), with its geometry.

    NIfTI inputs: the input's header and affine; DICOM: the series' geometry (q/s-form code 1, scanner); layout
    files and arrays without an affine: the declared orientation's affine with the case's spacing.
    """
    if case.reference is not None:
        return label_image(labels, reference=case.reference)
    if case.affine is not None:
        return label_image(labels, affine=case.affine, xform_code=1 if case.kind == "dicom" else 2)
    return label_image(labels, affine=affine_for(record.orientation, case.spacing))


def write_prediction(labels: np.ndarray, case: Case, path: Path, record: Preprocessing) -> None:
    """Write ``(D, H, W)`` labels of ``case`` to ``path`` (atomically): NIfTI, or PNG for a 2D image."""
    if case.kind == "image":
        save_png(labels[0], path, record.num_classes)
    else:
        save_image(label_image_of(labels, case, record), path)


def write_probabilities(probabilities: np.ndarray, path: Path, class_names: Sequence[str], image_2d: bool = False
                        ) -> None:
    """Write ``(K, D, H, W)`` float16 probabilities as ``.npz`` (atomically), as nnU-Net's ``--save_probabilities``.

    Keys: ``probabilities`` ``(K, X, Y, Z)`` in the order nibabel reads the label map (argmax over axis 0 gives
    its labels up to float16 ties), ``(K, H, W)`` for a 2D image; ``class_names`` background first.
    """
    probs = probabilities[:, 0] if image_2d else probabilities.transpose(0, 3, 2, 1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probs.astype(np.float16), class_names=np.asarray(class_names))

    atomic_write(path, write)
