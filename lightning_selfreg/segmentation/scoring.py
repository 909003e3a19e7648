"""Score written predictions against reference labels (``experiments.predict --labels``), as nnU-Net's evaluate_folder.

Every case is scored with the project's metrics under both protocols (:func:`~lightning_selfreg.metrics.case_metrics`:
per-class Dice, IoU and HD95; ``strict`` in mm from the label file's voxel size, ``transunet`` in voxels) and
aggregated as ``trainer.test`` aggregates them (:func:`~lightning_selfreg.metrics.summarize`: mean over cases per
class, then over classes). Written: ``scores.csv`` (one row per case, protocol and class) and ``scores.json`` (the
summary per protocol). ``strict`` scores the written prediction as ``trainer.test`` scores the same label map;
``transunet`` applies that protocol's rules to the written (native-grid) prediction, whereas ``trainer.test``
applies them to the network-grid prediction resized by nearest neighbour, so the two can differ slightly.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.metrics import PROTOCOLS, case_metrics, summarize
from lightning_selfreg.segmentation.inference import PredictionError
from lightning_selfreg.segmentation.inputs import Case
from lightning_selfreg.utils.checks import label_problem
from lightning_selfreg.utils.files import atomic_write_text

__all__ = ["check_label", "find_label", "read_labels", "score_cases", "write_scores"]


def read_labels(path: Path, num_classes: int, what: str = "--labels") -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A label map as stored (NIfTI ``(X, Y, Z)``, or an ``(H, W)`` image) and its voxel size (None for images).

    A binary model's image masks are read as ``> 0`` (0/255 masks, as the DataModules read them).

    Raises:
        PredictionError: An unreadable file or values outside ``[0, num_classes)`` (naming ``what`` and the file).
    """
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
            data = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
            spacing = tuple(float(z) for z in image.header.get_zooms()[:data.ndim])
        else:
            from PIL import Image

            with Image.open(path) as img:
                data = np.asarray(img)
            data = data[..., :3].max(axis=-1) if data.ndim == 3 else data
            data = (data > 0).astype(np.uint8) if num_classes == 2 else data
            spacing = None
    except Exception as err:  # nibabel and Pillow raise many types for bad files
        raise PredictionError(f"{what} {path}: cannot be read ({type(err).__name__}: {err})") from err
    problem = label_problem(data, num_classes)
    if problem is not None:
        raise PredictionError(f"{what} {path}: {problem}")
    return data.astype(np.int64), spacing


def check_label(label: Path, case: Case, num_classes: int) -> None:
    """Check a reference label before any prediction is written: readable, class indices, the input's grid.

    The grid is checked where the input's stored shape is known (NIfTI files, 2D images); the scoring checks the
    others against the written prediction.

    Raises:
        PredictionError: One line naming the label file.
    """
    data, _ = read_labels(label, num_classes)
    if case.reference is not None:
        expected = tuple(int(n) for n in case.reference.shape[:3])
    elif case.kind == "image":
        expected = tuple(int(n) for n in case.image.shape[2:])
    else:
        return
    if tuple(data.shape) != expected:
        raise PredictionError(f"--labels {label}: expected the grid of {case.display} {expected}, found "
                              f"{tuple(data.shape)}")


def find_label(labels: Path, case: str, suffix: str) -> Path | None:
    """The reference label of ``case`` in the folder ``labels``, or ``labels`` itself when it is a file.

    nnU-Net's naming ``<case><suffix>``; for images also the GlaS / UCTransNet ``<case>_anno`` and other image
    endings.
    """
    if labels.is_file():
        return labels
    endings = (suffix, ".nii") if suffix == ".nii.gz" else (suffix, ".bmp", ".tif", ".tiff")
    for name in (case, f"{case}_anno"):
        for ending in endings:
            candidate = labels / f"{name}{ending}"
            if candidate.is_file():
                return candidate
    return None


def score_cases(pairs: Sequence[tuple[str, Path, Path]], class_names: Sequence[str]) -> tuple[list[dict], dict]:
    """Score ``(case, prediction file, label file)`` triples.

    Args:
        pairs: The cases.
        class_names: The foreground classes, in label order.

    Returns:
        ``(rows, summary)``: one row per case, protocol and class (``case, protocol, class, dice, iou, hd95``), and
        ``{protocol: summarize(...)}``.

    Raises:
        PredictionError: A label file that cannot be read or whose grid is not the prediction's.
    """
    num_classes = len(class_names) + 1
    rows: list[dict[str, Any]] = []
    per_protocol: dict[str, tuple[list, list]] = {p: ([], []) for p in PROTOCOLS}
    for case, prediction, label in pairs:
        pred, spacing = read_labels(prediction, num_classes, "--output")
        gt, _ = read_labels(label, num_classes)
        if pred.shape != gt.shape:
            raise PredictionError(f"--labels {label}: expected the grid of the input ({pred.shape}), found {gt.shape}")
        for protocol in PROTOCOLS:
            dice, hd95 = case_metrics(pred, gt, num_classes, spacing, protocol=protocol)
            per_protocol[protocol][0].append(dice)
            per_protocol[protocol][1].append(hd95)
            for name, d, h in zip(class_names, dice, hd95, strict=True):
                rows.append({"case": case, "protocol": protocol, "class": name, "dice": _num(d),
                             "iou": _num(d / (2 - d)) if np.isfinite(d) else None, "hd95": _num(h)})
    summary = {p: summarize(np.asarray(d).reshape(-1, num_classes - 1), np.asarray(h).reshape(-1, num_classes - 1),
                            class_names) for p, (d, h) in per_protocol.items()}
    return rows, summary


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def write_scores(rows: Sequence[dict], summary: dict, folder: Path, prefix: str = "") -> tuple[Path, Path]:
    """Write ``<prefix>scores.csv`` and ``<prefix>scores.json`` into ``folder`` (atomically); returns both paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "protocol", "class", "dice", "iou", "hd95"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    csv_path, json_path = folder / f"{prefix}scores.csv", folder / f"{prefix}scores.json"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(summary, indent=1))
    return csv_path, json_path
