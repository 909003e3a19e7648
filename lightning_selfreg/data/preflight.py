"""The pre-flight's pieces: header reads that name a broken file at once, full reads, splits and inverted masks.

:meth:`~lightning_selfreg.data.datamodule.SegDataModule.validate` reads every file a run will use in full before the
first training step (recording what passed, :mod:`~lightning_selfreg.data.preflight_record`, so that a later run
re-reads only what changed). The header reads come first, so that a missing key, a wrong dtype or shape, or a
truncated archive is named before any data is decoded:

* ``.npz``: the zip directory, then the ``.npy`` header of every member. ``np.savez_compressed`` deflates its
  members, so only the first bytes of each member stream are inflated (about 4 kB per member);
* ``.h5``: the datasets' shapes and dtypes and the file attributes (h5py reads no data until it is indexed);
  HDF5 also refuses to open a truncated file;
* images: size and mode from the header (PIL opens lazily); ``verify()`` checks the PNG chunk checksums
  without decoding the pixels.

Then every file is read in full (volumes a block of slices at a time, :func:`check_h5_volume`) for label range,
finite values and shape agreement; :func:`check_disjoint` checks that the splits share no case and
:func:`report_inverted` reports masks that look inverted. Every problem is a one-line
:class:`~lightning_selfreg.data.contract.DataError` that names the file, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.data.contract import DataError, Item, check_arrays

__all__ = [
    "READ_ERRORS",
    "ArrayHeader",
    "check_disjoint",
    "check_h5_volume",
    "check_pair_header",
    "h5_headers",
    "image_header",
    "npz_headers",
    "report_inverted",
    "run_checks",
]

log = logging.getLogger(__name__)

# What the readers (numpy, zipfile, zlib, h5py, PIL) raise on truncated or corrupt files; readers turn these into
# a DataError naming the file. (A DataError is a ValueError: catch it first and re-raise it unchanged.)
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, RuntimeError, SyntaxError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class ArrayHeader:
    """Shape and dtype of a stored array, read without its data."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:  # 3.0 is only written for structured dtypes with non-latin-1 field names, never an image or a label
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), dtype


def npz_headers(path: str | Path) -> dict[str, ArrayHeader]:
    """The arrays of an ``.npz`` archive from its zip directory and ``.npy`` headers, without their data.

    Also checks that every member holds exactly the bytes its header announces (a member cut short before it was
    zipped) and that no member is an object (pickled) array, which ``np.load`` refuses.

    Args:
        path: The ``.npz`` file.

    Returns:
        ``{key: ArrayHeader}`` as ``np.load(path).files`` names them.

    Raises:
        DataError: Not a zip archive (e.g. truncated: the directory sits at the end), an unreadable ``.npy``
            header, an object array or a member size that does not match its header.
    """
    path = Path(path)
    headers: dict[str, ArrayHeader] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                with archive.open(info) as fp:
                    shape, dtype = _read_npy_header(fp)
                    offset = fp.tell()
                if dtype.hasobject:
                    raise DataError(f"{path}: expected a numeric array `{key}`, found an object (pickled) array of "
                                    f"dtype {dtype}.")
                expected = offset + math.prod(shape) * dtype.itemsize
                if info.file_size != expected:
                    raise DataError(f"{path}: array `{key}` of shape {shape} and dtype {dtype} needs {expected} "
                                    f"bytes, found {info.file_size}.")
                headers[key] = ArrayHeader(shape, dtype)
    except DataError:
        raise
    except READ_ERRORS as err:
        raise DataError(f"{path}: expected a NumPy .npz (zip) archive, found a truncated or corrupt file "
                        f"({_describe(err)}).") from err
    return headers


def h5_headers(path: str | Path) -> tuple[dict[str, ArrayHeader], dict[str, Any]]:
    """The top-level datasets (shape, dtype) and the file attributes of an HDF5 file, without reading data.

    Returns:
        ``({name: ArrayHeader}, {attribute: value})``.

    Raises:
        DataError: The file cannot be opened as HDF5 (HDF5 refuses a truncated file at open).
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            datasets = {name: ArrayHeader(tuple(obj.shape), obj.dtype) for name, obj in f.items()
                        if isinstance(obj, h5py.Dataset)}
            attrs = dict(f.attrs)
    except READ_ERRORS as err:
        raise DataError(f"{path}: expected an HDF5 file, found a truncated or corrupt file ({_describe(err)}).") \
            from err
    return datasets, attrs


def image_header(path: str | Path) -> tuple[tuple[int, int], str]:
    """``((H, W), mode)`` of an image file from its header; PNG chunk checksums are verified without decoding.

    Raises:
        DataError: Not a readable image, or a corrupt / truncated PNG.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            size, mode = (img.height, img.width), img.mode
            img.verify()
    except READ_ERRORS as err:
        raise DataError(f"{path}: expected an image file, found an unreadable or corrupt file "
                        f"({_describe(err)}).") from err
    return size, mode


def check_pair_header(source: Any, headers: dict[str, ArrayHeader], keys: tuple[str, str],
                      image_ndim: Sequence[int], label_ndim: int, kind: str = "keys") -> None:
    """Check an image/label pair from its headers: both present, numeric, of the right rank, same shape.

    Args:
        source: File name for the message.
        headers: ``{name: ArrayHeader}`` from :func:`npz_headers` or :func:`h5_headers`.
        keys: Names of the image and the label array.
        image_ndim: Allowed image ranks (the label's plus an optional trailing channel axis).
        label_ndim: Required label rank; ``image.shape[:label_ndim]`` must equal ``label.shape``.
        kind: What the names are called in the message (``"keys"`` or ``"datasets"``).

    Raises:
        DataError: Naming the file, what was expected and what was found.
    """
    missing = [k for k in keys if k not in headers]
    if missing:
        raise DataError(f"{source}: expected {kind} {list(keys)}, found {sorted(headers)} (missing {missing}).")
    (image_key, label_key), image, label = keys, headers[keys[0]], headers[keys[1]]
    if image.dtype.kind not in "fiu":
        raise DataError(f"{source}: expected a numeric (float or int) `{image_key}`, found dtype {image.dtype}.")
    if label.dtype.kind not in "fiub":
        raise DataError(f"{source}: expected an integer (or integer-valued float) `{label_key}`, found dtype "
                        f"{label.dtype}.")
    if len(image.shape) not in image_ndim:
        ranks = " or ".join(f"{n}D" for n in image_ndim)
        raise DataError(f"{source}: expected a {ranks} `{image_key}`, found shape {image.shape}.")
    if len(label.shape) != label_ndim or image.shape[:label_ndim] != label.shape:
        raise DataError(f"{source}: expected `{label_key}` of shape {image.shape[:label_ndim]} (that of "
                        f"`{image_key}` {image.shape}), found {label.shape}.")
    if 0 in image.shape:
        raise DataError(f"{source}: expected a non-empty `{image_key}`, found shape {image.shape}.")


def check_h5_volume(path: str | Path, num_classes: int, keys: tuple[str, str] = ("image", "label"),
                    block: int = 16) -> float:
    """Read an HDF5 volume in full, ``block`` slices at a time, and check every block with ``check_arrays``.

    Args:
        path: The file; datasets ``keys`` of shape ``(D, H, W)``.
        num_classes: Labels must lie in ``[0, num_classes)``.
        keys: Image and label dataset names.
        block: Slices per read (bounds the memory to ``block * H * W`` values per dataset).

    Returns:
        The share of the label that is foreground (non-zero).

    Raises:
        DataError: Missing datasets, shape mismatch, NaN/inf, out-of-range or non-integer labels (the message
            names the file and the slices), or a read error.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            headers = {k: ArrayHeader(tuple(f[k].shape), f[k].dtype) for k in keys
                       if k in f and isinstance(f[k], h5py.Dataset)}
            check_pair_header(path, headers, keys, (3,), 3, kind="datasets")
            image, label = f[keys[0]], f[keys[1]]
            foreground = 0
            for start in range(0, image.shape[0], block):
                stop = min(start + block, image.shape[0])
                labels = label[start:stop]
                check_arrays(f"{path} (slices {start}-{stop - 1})", image[start:stop], labels,
                             num_classes, image_ndim=(3,), label_ndim=3)
                foreground += int(np.count_nonzero(labels))
    except DataError:
        raise
    except READ_ERRORS as err:
        raise DataError(f"{path}: expected a readable HDF5 volume, found a truncated or corrupt file "
                        f"({_describe(err)}).") from err
    return foreground / max(math.prod(headers[keys[1]].shape), 1)


def run_checks(check: Callable[[Item], Any], items: Sequence[Item], workers: int) -> None:
    """``check`` every item, ``workers`` threads at a time; the first failure in item order is raised."""
    if workers <= 1 or len(items) < 2:
        for item in items:
            check(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(check, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_disjoint(splits: Mapping[str, Sequence[Item]], source: Any, by_content: bool = False) -> None:
    """Raise a :class:`DataError` when a case (or, ``by_content``, an identical image file) is in two splits.

    Args:
        splits: ``{"train": [...], "val": [...], "test": [...]}``.
        source: The dataset, for the message.
        by_content: Compare the image files' bytes (same size, then SHA-256) instead of the case names, for
            datasets whose file names are not patient identifiers (GlaS, MoNuSeg: ``1.png`` in two folders may be
            two images).

    Raises:
        DataError: Naming the case(s) or files and the two splits.
    """
    names = [name for name in ("train", "val", "test") if name in splits]
    if by_content:
        by_size: dict[int, list[tuple[str, Item]]] = {}
        for name in names:
            for item in splits[name]:
                by_size.setdefault(item.path.stat().st_size, []).append((name, item))
        for group in by_size.values():
            if len({name for name, _ in group}) < 2:
                continue
            digests: dict[str, tuple[str, Item]] = {}
            for name, item in group:
                other = digests.setdefault(_digest(item.path), (name, item))
                if other[0] != name:
                    raise DataError(f"{source}: the same image is in the {other[0]} split ({other[1].path}) and the "
                                    f"{name} split ({item.path}); expected disjoint splits.")
        return
    cases = {name: {item.case for item in splits[name]} for name in names}
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            both = sorted(cases[first] & cases[second])
            if both:
                shown = ", ".join(both[:5]) + (f" and {len(both) - 5} more" if len(both) > 5 else "")
                raise DataError(f"{source}: case(s) {shown} are in both the {first} and the {second} split; "
                                "expected disjoint splits (the same patient on both sides inflates the scores).")


def report_inverted(items: Sequence[tuple[Item, float | None]], threshold: float = 0.5) -> list[Item]:
    """Warn (one line) about labels whose majority is foreground: they look inverted (background must be 0).

    Args:
        items: ``(item, share of its label that is foreground)`` pairs (None: unknown).
        threshold: Report a label whose foreground share is above this.

    Returns:
        The reported items.
    """
    inverted = [(item, fg) for item, fg in items if fg is not None and fg > threshold]
    if inverted:
        shown = ", ".join(f"{(item.label_path or item.path)} ({fg:.0%} foreground)" for item, fg in inverted[:5])
        more = f" and {len(inverted) - 5} more" if len(inverted) > 5 else ""
        log.warning("pre-flight: %d of %d labels look inverted (more foreground than background; foreground is any "
                    "value > 0): %s%s. Check that their background is 0.", len(inverted), len(items), shown, more)
    return [item for item, _ in inverted]
