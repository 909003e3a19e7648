"""GlaS and MoNuSeg (binary histology segmentation) in the UCTransNet layout, and MoNuSeg's original release.

UCTransNet layout, read as is::

    <data_dir>/Train_Folder/img/<stem>.<png|bmp|jpg|tif>       RGB images
    <data_dir>/Train_Folder/labelcol/<stem>[_anno].<png|bmp|tif>  masks, any value > 0 is foreground
    <data_dir>/Val_Folder/...                                  optional (else validation = fold 0 of 5 of train)
    <data_dir>/Test_Folder/...

For MoNuSeg a split folder may instead hold the original release: ``<stem>.tif`` images with Aperio ImageScope
``<stem>.xml`` polygon annotations (side by side, or in ``Tissue Images/`` and ``Annotations/``); the polygons are
rasterised to the binary nucleus mask.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lightning_selfreg.data.contract import DataError, Item, check_arrays
from lightning_selfreg.data.datamodule import SegDataModule
from lightning_selfreg.data.image_io import load_image_2d
from lightning_selfreg.data.preflight import READ_ERRORS, image_header
from lightning_selfreg.data.preprocessing import ChannelNorm

__all__ = ["GlaSDataModule", "MoNuSegDataModule", "rasterize_monuseg_xml", "read_image_mask"]

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}

UCTRANSNET_LAYOUT = (
    "Train_Folder/img/<stem>.png|bmp|jpg|tif with Train_Folder/labelcol/<stem>[_anno].png|bmp|tif; Val_Folder/ "
    "(optional); Test_Folder/ (MoNuSeg also: <split>_Folder/<stem>.tif + <stem>.xml, or 'Tissue Images/' + "
    "'Annotations/')"
)


def rasterize_monuseg_xml(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the polygons of an Aperio ImageScope XML annotation (MoNuSeg) into a binary mask.

    Args:
        path: The ``.xml`` file.
        shape: ``(H, W)`` of the image.

    Returns:
        ``(H, W)`` uint8 mask, 1 inside any region polygon.

    Raises:
        DataError: Unparsable XML, no ``Region`` with vertices, or non-numeric coordinates.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{path}: cannot be parsed as XML ({err}).") from err
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    regions = 0
    for region in root.iter("Region"):
        try:
            points = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: a Vertex has a missing or non-numeric X/Y ({err}).") from err
        if len(points) >= 3:
            draw.polygon(points, fill=1, outline=1)
            regions += 1
    if regions == 0:
        raise DataError(f"{path}: no <Region> with at least 3 <Vertex> elements was found.")
    return np.asarray(canvas, dtype=np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    """:func:`~lightning_selfreg.data.image_io.load_image_2d` (RGB ``(H, W, 3)`` in [0, 1]); DataError naming ``path``.

    The message names the reader's own error (``UnidentifiedImageError: ...``), not the ``ValueError`` that
    ``load_image_2d`` wraps it in.
    """
    try:
        return load_image_2d(path)
    except READ_ERRORS as err:
        cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ is not None else err
        raise DataError(f"{path}: cannot be read as an image ({type(cause).__name__}: {cause}).") from err


def read_image_mask(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an RGB image scaled to [0, 1] and its mask (``.xml`` polygons or an image; > 0 = foreground).

    Returns:
        ``(image float32 (H, W, 3), label int64 (H, W) in {0, 1})``.

    Raises:
        DataError: Unreadable file or image/mask size mismatch (both files named).
    """
    image = _read_rgb(image_path)
    if mask_path.suffix.lower() == ".xml":
        label = rasterize_monuseg_xml(mask_path, image.shape[:2])
    else:
        try:
            with Image.open(mask_path) as img:
                mask = np.asarray(img)
        except READ_ERRORS as err:
            raise DataError(f"{mask_path}: cannot be read as an image ({type(err).__name__}: {err}).") from err
        if mask.ndim == 3:
            mask = mask[..., :3].max(axis=2)
        label = (mask > 0).astype(np.int64)
    check_arrays(f"{image_path} / {mask_path}", image, label, 2, image_ndim=(3,), label_ndim=2)
    return image, label.astype(np.int64)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}_anno"):
        for suffix in (*IMAGE_SUFFIXES, ".xml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def index_split_folder(folder: Path) -> list[Item]:
    """Image/mask pairs of one split folder in either accepted form (sorted by stem).

    Raises:
        DataError: No images, or images without a mask (all listed).
    """
    if (folder / "img").is_dir():
        image_dir, mask_dir = folder / "img", folder / "labelcol"
    elif (folder / "Tissue Images").is_dir():
        image_dir, mask_dir = folder / "Tissue Images", folder / "Annotations"
    else:
        image_dir = mask_dir = folder
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() \
        else []
    if image_dir == mask_dir:  # original MoNuSeg release: only the images that have an XML next to them
        images = [p for p in images if (folder / f"{p.stem}.xml").is_file()]
    if not images:
        raise DataError(f"{folder}: no images found (expected img/ + labelcol/, or <stem>.tif + <stem>.xml).")
    items, orphans = [], []
    for image in images:
        mask = (folder / f"{image.stem}.xml") if image_dir == mask_dir else _find_mask(mask_dir, image.stem)
        if mask is None:
            orphans.append(image.name)
        else:
            items.append(Item(image.stem, image, mask, name=image.stem))
    if orphans:
        raise DataError(f"{mask_dir}: no mask for image(s) {orphans[:10]}{' ...' if len(orphans) > 10 else ''}.")
    return items


class _HistologyDataModule(SegDataModule):
    """Shared UCTransNet-layout logic; subclasses set the class name."""

    num_classes = 2
    in_channels = 3
    layout_help = UCTRANSNET_LAYOUT
    channel_names = ("R", "G", "B")  # any image is read as RGB (load_image_2d), x / 255
    intensity = (ChannelNorm("rgb_to_0_1"),) * 3
    fallback_val_fold = 0  # no Val_Folder: validate on fold 0 of 5 of Train_Folder
    disjoint_by_content = True  # image names (1.png, ...) are not patient ids: compare the files

    @property
    def volumetric(self) -> bool:
        """False: every test case is one 2D image, scored on its own (no voxel spacing)."""
        return False

    def check_layout(self) -> None:
        """``Train_Folder`` and ``Test_Folder`` exist."""
        self._require(SPLIT_FOLDERS["train"], SPLIT_FOLDERS["test"])

    def _index(self, split: str) -> list[Item] | None:
        folder = self.data_dir / SPLIT_FOLDERS[split]
        if split == "val" and not folder.is_dir():
            return None
        return index_split_folder(folder)

    def _check_header(self, item: Item) -> None:
        size, _ = image_header(item.path)
        if item.label_path.suffix.lower() == ".xml":
            rasterize_monuseg_xml(item.label_path, size)  # parses the polygons; no pixel data is decoded
            return
        mask_size, _ = image_header(item.label_path)
        if mask_size != size:
            raise DataError(f"{item.label_path}: expected a mask of the size of {item.path.name} (H, W) = {size}, "
                            f"found {mask_size}.")

    def _read_sample(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        return read_image_mask(item.path, item.label_path)

    def _read_case(self, item: Item) -> dict[str, Any]:
        image, label = read_image_mask(item.path, item.label_path)
        return {"image": image, "label": label, "spacing": None, "is_2d": True}


class GlaSDataModule(_HistologyDataModule):
    """GlaS gland segmentation (165 images: 85 train / 80 test in the UCTransNet split), binary, RGB.

    Args:
        data_dir: Root of the UCTransNet layout.
        **kwargs: See :class:`~lightning_selfreg.data.datamodule.SegDataModule` (UCTransNet trains at 224 with batch 4).
    """

    class_names = ("gland",)


class MoNuSegDataModule(_HistologyDataModule):
    """MoNuSeg nucleus segmentation (30 train / 14 test images of 1000 x 1000), binary, RGB.

    Reads the UCTransNet layout or the original release (``.tif`` + Aperio ``.xml`` polygons). MoNuSeg is
    CC BY-NC-SA: it is never bundled or downloaded here; point ``data_dir`` at your copy.

    Args:
        data_dir: Root with ``Train_Folder`` / ``Test_Folder`` (and optionally ``Val_Folder``).
        **kwargs: See :class:`~lightning_selfreg.data.datamodule.SegDataModule`.
    """

    class_names = ("nucleus",)
