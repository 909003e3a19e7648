"""nnU-Net's preprocessing: fingerprint, target spacing, intensity normalisation, resampling, cached cases.

Follows nnU-Net v2's ``DefaultPreprocessor`` and ``ExperimentPlanner`` (F. Isensee et al., *nnU-Net*, Nature Methods
18, 203-211 (2021), and the code at <https://github.com/MIC-DKFZ/nnUNet>, ``nnunetv2/preprocessing`` and
``nnunetv2/experiment_planning``):

* **orientation** (not in nnU-Net, whose readers use the arrays as stored): every case is first brought to the
  DataModule's voxel order (``NnUNetDataModule(orientation="auto")``: the one most training cases are stored in,
  so a dataset stored in one orientation is used as stored), exactly (flips and axis permutations), and the
  record of all the steps below (:class:`~lightning_selfreg.data.preprocessing.Preprocessing`) is what checkpoints
  carry for prediction;
* **fingerprint** over all training cases at their native resolution: spacings, shapes and, for CT channels,
  the foreground (``label > 0``) intensities. nnU-Net samples ``1e8 // num_cases`` foreground voxels per case
  with replacement; here every foreground voxel is used when a case has fewer than that (the statistics
  nnU-Net's sampling estimates), otherwise that many are drawn without replacement (``RandomState(1234)``);
* **target spacing**: the per-axis median of the training spacings, with nnU-Net's anisotropy rule (if the
  coarsest axis is > 3x the others and its median size x 3 is below the others', it takes the 10th percentile
  of its spacings); the 2D configuration resamples in-plane only (the slice axis keeps each case's spacing);
* **normalisation** per channel from ``channel_names`` (case-insensitive): ``CT`` clips to the foreground's
  0.5–99.5 percentiles and z-scores with the foreground mean / std of all training cases; ``noNorm`` casts;
  ``rescale_to_0_1`` and ``rgb_to_0_1`` rescale; any other name z-scores each case. As in nnU-Net it runs
  before resampling;
* **resampling** to the target spacing (``new_shape = round(spacing / target * shape)``): images with order-3
  splines, labels one class at a time with linear interpolation and a 0.5 threshold (higher labels win), which is
  nnU-Net's ``resize_segmentation``; when the spacing is anisotropic (max / min > 3) the coarse axis is resampled
  separately with nearest neighbour, as nnU-Net's "separate z". Centre-aligned coordinates (skimage's
  ``resize`` with ``mode="edge"``, ``anti_aliasing=False``);
* **class locations**: per foreground class up to 10,000 voxel coordinates (at least 1 %) for foreground
  oversampling, drawn with ``RandomState(1234)``.

Not done (documented differences): the crop to the non-zero region (a CT volume has no zero background; MRI
z-scoring then includes the zero background), the transpose that puts the coarsest axis first (slices run along
the file's third axis, which is the coarsest for axial CT / MR), and the 3d_lowres configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.data.contract import DataError
from lightning_selfreg.data.nnunet.format import CaseFiles, DatasetJson, read_case
from lightning_selfreg.data.preprocessing import (
    ChannelNorm,
    Preprocessing,
    orientation_transform,
    reorient,
    reorient_spacing,
)
from lightning_selfreg.data.resampling import ANISO_THRESHOLD, resample_label
from lightning_selfreg.utils.files import atomic_folder

__all__ = [
    "CACHE_VERSION",
    "Fingerprint",
    "cache_key",
    "channel_norms",
    "class_locations",
    "compute_fingerprint",
    "is_preprocessed_case",
    "load_preprocessed",
    "preprocess_case",
    "target_spacing",
]

CACHE_VERSION = 3  # bump when the preprocessed format or algorithm changes (3: one folder per case)
FOREGROUND_SAMPLES = int(1e8)  # nnU-Net's budget of foreground intensity samples, split over the cases
MAX_LOCATIONS = 10_000


@dataclass(frozen=True)
class Fingerprint:
    """Dataset statistics that preprocessing needs.

    Attributes:
        spacings: ``(N, 3)`` training spacings ``(z, y, x)`` mm.
        shapes: ``(N, 3)`` training shapes ``(D, H, W)``.
        intensity: Per channel, the foreground statistics (``mean``, ``std``, ``percentile_00_5``,
            ``percentile_99_5``) of CT channels, ``None`` for others.
    """

    spacings: np.ndarray
    shapes: np.ndarray
    intensity: tuple[dict[str, float] | None, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"spacings": self.spacings.tolist(), "shapes": self.shapes.tolist(), "intensity": list(self.intensity)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_json`."""
        return cls(np.asarray(data["spacings"], dtype=np.float64), np.asarray(data["shapes"], dtype=np.int64),
                   tuple(data["intensity"]))


def _scheme(channel_name: str) -> str:
    name = channel_name.lower()
    return name if name in ("ct", "nonorm", "rescale_to_0_1", "rgb_to_0_1") else "zscore"


def compute_fingerprint(cases: Sequence[CaseFiles], meta: DatasetJson, progress: bool = False,
                        orientation: Sequence[str] | None = None) -> Fingerprint:
    """Spacings, shapes and CT foreground intensity statistics of the training ``cases`` (native resolution).

    Spacings and shapes are given in the voxel order ``orientation`` (None: as stored).

    Raises:
        DataError: Unreadable files or bad label values (the message names the file), or a CT channel of a
            dataset without any foreground voxel.
    """
    from tqdm.auto import tqdm

    schemes = [_scheme(n) for n in meta.channel_names]
    budget = FOREGROUND_SAMPLES // max(len(cases), 1)
    spacings, shapes = [], []
    samples: list[list[np.ndarray]] = [[] for _ in schemes]
    for case in tqdm(cases, desc="nnU-Net fingerprint", unit="case", disable=not progress):
        data = read_case(case, meta)
        ornt = None if orientation is None or data["affine"] is None else \
            orientation_transform(data["affine"], orientation)
        spacings.append(reorient_spacing(data["spacing"], ornt))
        shapes.append(reorient_spacing(data["image"].shape[1:], ornt))
        if "ct" not in schemes:
            continue
        foreground = data["label"] > 0
        rng = np.random.RandomState(1234)
        for c, scheme in enumerate(schemes):
            if scheme == "ct":
                values = data["image"][c][foreground]
                if values.size > budget:
                    values = values[rng.choice(values.size, budget, replace=False)]
                samples[c].append(values.astype(np.float64))
    intensity = []
    for c, scheme in enumerate(schemes):
        if scheme != "ct":
            intensity.append(None)
            continue
        values = np.concatenate(samples[c]) if samples[c] else np.zeros(0)
        if values.size == 0:
            raise DataError(f"{meta.path}: channel {c} is {meta.channel_names[c]!r} (CT normalisation needs "
                            "foreground statistics) but no training label has a foreground voxel.")
        low, high = np.percentile(values, [0.5, 99.5])
        intensity.append({"mean": float(values.mean()), "std": float(values.std()), "percentile_00_5": float(low),
                          "percentile_99_5": float(high)})
    return Fingerprint(np.asarray(spacings, dtype=np.float64), np.asarray(shapes, dtype=np.int64), tuple(intensity))


def target_spacing(fingerprint: Fingerprint) -> np.ndarray:
    """nnU-Net's 3d_fullres target spacing ``(z, y, x)``: the median, with the anisotropy rule.

    As nnU-Net v2's ``ExperimentPlanner.determine_fullres_target_spacing`` (see the module docstring).
    """
    spacings, shapes = fingerprint.spacings, fingerprint.shapes
    target = np.median(spacings, axis=0)
    target_size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if target[worst] > ANISO_THRESHOLD * max(target[others]) and target_size[worst] * ANISO_THRESHOLD < min(
            target_size[others]):
        value = np.percentile(spacings[:, worst], 10)
        target[worst] = max(value, max(target[others]) + 1e-5)
    return target


def channel_norms(channel_names: Sequence[str], intensity: Sequence[dict[str, float] | None]
                  ) -> tuple[ChannelNorm, ...]:
    """nnU-Net's per-channel normalisation as :class:`~lightning_selfreg.data.preprocessing.ChannelNorm` records.

    ``CT`` (case-insensitive) gets the training foreground's statistics from ``intensity`` (the fingerprint's);
    ``noNorm`` casts; ``rescale_to_0_1`` and ``rgb_to_0_1`` rescale; any other name z-scores each image.
    """
    norms = []
    for c, name in enumerate(channel_names):
        scheme = _scheme(name)
        if scheme == "ct":
            stats = intensity[c]
            norms.append(ChannelNorm("ct", low=stats["percentile_00_5"], high=stats["percentile_99_5"],
                                     mean=stats["mean"], std=stats["std"]))
        else:
            norms.append(ChannelNorm("none" if scheme == "nonorm" else scheme))
    return tuple(norms)


def class_locations(label: np.ndarray, num_classes: int, seed: int = 1234) -> dict[int, np.ndarray]:
    """Per foreground class present, ``max(min(10000, n), ceil(0.01 n))`` voxel coordinates ``(k, 3)`` int32."""
    rng = np.random.RandomState(seed)
    out = {}
    for value in range(1, num_classes):
        coords = np.argwhere(label == value)
        if len(coords) == 0:
            continue
        k = min(len(coords), max(MAX_LOCATIONS, math.ceil(0.01 * len(coords))))
        if k < len(coords):
            coords = coords[rng.choice(len(coords), k, replace=False)]
        out[value] = coords.astype(np.int32)
    return out


def preprocess_case(case: CaseFiles, meta: DatasetJson, record: Preprocessing, out_dir: Path) -> dict[str, Any]:
    """Read, reorient, normalise and resample one case and write it to ``out_dir/<case>/``, atomically as a whole.

    The image goes through :meth:`Preprocessing.prepare <lightning_selfreg.data.preprocessing.Preprocessing.prepare>`
    (the function prediction uses); the label is reoriented alike and resampled with :func:`resample_label`.

    The case's files are written into a temporary folder that is renamed to ``<case>/`` at the end
    (:func:`~lightning_selfreg.utils.files.atomic_folder`), so a failed or killed preprocessing never leaves a
    half-written case: the folder exists complete or not at all (a killed run leaves only ``.tmp<pid>.<case>/``,
    which the next preprocessing removes).

    Files: ``image.npy`` float32 (C, D', H', W'); with a label, ``label.npy`` int16 (D', H', W') at the
    preprocessed grid, ``native.npy`` int16 (D, H, W) at the native grid (in the record's voxel order) and
    ``locations.npz`` (class locations); ``props.json`` the properties.

    Args:
        case: The case's files.
        meta: dataset.json.
        record: The DataModule's preprocessing (orientation, normalisation with the fingerprint's statistics,
            target spacing; a None axis keeps the case's spacing, the 2D configuration's slice axis).
        out_dir: Cache folder.

    Returns:
        The properties: native shape, spacing and affine (of the file), the orientation transform applied
        (``ornt``, or None), preprocessed shape and spacing; classes present.
    """
    data = read_case(case, meta)
    prepared = record.prepare(data["image"], data["spacing"], data["affine"], source=case.images[0])
    image = prepared.image
    target = record.target_spacing(prepared.spacing)
    affine = data["affine"]
    props: dict[str, Any] = {
        "case": case.case, "split": case.split, "native_shape": list(prepared.shape),
        "native_spacing": list(prepared.spacing), "affine": None if affine is None else affine.tolist(),
        "ornt": None if prepared.ornt is None else prepared.ornt.tolist(), "source": str(case.images[0]),
        "spacing": list(prepared.spacing) if target is None else target.tolist(), "shape": list(image.shape[1:]),
        "has_label": data["label"] is not None, "classes": [],
    }
    arrays = {"image": image}
    locations = None
    if data["label"] is not None:
        native = reorient(data["label"], prepared.ornt)
        label = resample_label(native, prepared.spacing, props["spacing"], image.shape[1:])
        locations = class_locations(label, meta.num_classes)
        arrays.update(label=label, native=native.astype(np.int16))
        props["classes"] = sorted(int(k) for k in locations)

    def write(folder: Path) -> None:
        for name, array in arrays.items():
            with open(folder / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(array))
        if locations is not None:
            np.savez(folder / "locations.npz", **{str(k): v for k, v in locations.items()})
        (folder / "props.json").write_text(json.dumps(props), encoding="utf-8")

    atomic_folder(out_dir / case.case, write)
    return props


def is_preprocessed_case(cache: Path, case: str) -> bool:
    """Whether ``cache`` holds the complete preprocessed ``case`` (its folder exists only when complete)."""
    return (cache / case / "props.json").is_file()


def load_preprocessed(cache: Path, case: str, mmap: bool = True) -> dict[str, Any]:
    """Properties and arrays of one preprocessed case (arrays memory-mapped; absent ones are None).

    Returns:
        The properties of :func:`preprocess_case` plus ``image``, ``label``, ``native`` and ``locations``
        (``{class: (k, 3) int32}``).
    """
    folder = cache / case
    props = json.loads((folder / "props.json").read_text(encoding="utf-8"))
    mode = "r" if mmap else None

    def load(name: str) -> np.ndarray | None:
        path = folder / f"{name}.npy"
        return np.load(path, mmap_mode=mode) if path.is_file() else None

    props["image"], props["label"], props["native"] = load("image"), load("label"), load("native")
    props["locations"] = {}
    if (folder / "locations.npz").is_file():
        with np.load(folder / "locations.npz") as z:
            props["locations"] = {int(k): z[k] for k in z.files}
    return props


def cache_key(meta: DatasetJson, cases: Sequence[CaseFiles], settings: dict[str, Any]) -> str:
    """A short hash of the settings, dataset.json and every file's name, size and modification time."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True, default=str).encode())
    digest.update(meta.path.read_bytes())
    for case in cases:
        for path in (*case.images, *(() if case.label is None else (case.label,))):
            stat = os.stat(path)
            digest.update(f"{case.split}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
