"""The preprocessing a model was trained with, as a record stored in its checkpoints, and the code that applies it.

A DataModule describes what it does to a raw image before the network sees it with :class:`Preprocessing`
(:meth:`~lightning_selfreg.data.SegDataModule.preprocessing`): the voxel order (orientation) of its arrays, the
target spacing, the intensity normalisation of each channel with its fitted numbers, the channel and class names
and the network's dimensionality. :class:`~lightning_selfreg.SelfRegSegModule` keeps the record of the DataModule it
is trained and tested with and writes it into every checkpoint; prediction on new images
(:class:`~lightning_selfreg.segmentation.predictor.Predictor`) applies the same record with the same functions
(:meth:`Preprocessing.prepare`, :func:`restore`) that the DataModules use, so a prediction equals what
``trainer.test`` computed for the same file.

**Arrays and orientation.** Images are ``(C, D, H, W)`` arrays whose last three axes are the NIfTI voxel axes
``(z, y, x)`` in reverse (nnU-Net's and TransUNet's order: ``D`` is the file's third axis). An orientation is given
as nibabel axis codes of the ``(x, y, z)`` = ``(W, H, D)`` axes in nibabel's RAS+ convention: ``("L", "P", "S")``
means ``W`` runs towards the patient's left, ``H`` towards posterior and ``D`` towards superior (axial slices seen
from the feet, radiological display: the bundled CT sample and, as far as its arrays are documented, TransUNet's
Synapse). Reorientation is exact (flips and axis permutations chosen by nibabel's ``io_orientation``, as
TotalSegmentator's ``as_closest_canonical`` and MONAI's ``Orientationd`` do): no voxel is interpolated, and
:func:`restore` maps labels back onto the input's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np

from lightning_selfreg.data.contract import DataError
from lightning_selfreg.data.resampling import resample_image
from lightning_selfreg.utils.checks import SettingError

__all__ = [
    "RECORD_VERSION",
    "SCHEMES",
    "ChannelNorm",
    "Prepared",
    "Preprocessing",
    "affine_for",
    "check_axcodes",
    "orientation_of",
    "orientation_transform",
    "reorient",
    "reorient_spacing",
    "restore",
    "restore_spacing",
]

RECORD_VERSION = 1  # bump when the meaning of a field changes; older records are read, newer ones refused

Scheme = Literal["window", "ct", "zscore", "rescale_to_0_1", "rgb_to_0_1", "none"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
_PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's axis-code pairs; the second letter is the + direction
_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


@dataclass(frozen=True)
class ChannelNorm:
    """The intensity normalisation of one channel (applied in float32, before any resampling, as nnU-Net does).

    Schemes:

    * ``"window"``: ``(clip(x, low, high) - low) / (high - low)``, the Synapse / TransUNet CT window to [0, 1];
    * ``"ct"``: nnU-Net's CT normalisation: clip to ``[low, high]`` (the training foreground's 0.5 / 99.5
      percentiles), then ``(x - mean) / std`` with the training foreground's mean and std;
    * ``"zscore"``: ``(x - mean(x)) / std(x)`` of each image (nnU-Net's default for MRI);
    * ``"rescale_to_0_1"``: ``(x - min(x)) / (max(x) - min(x))`` of each image;
    * ``"rgb_to_0_1"``: ``x / 255`` (values must lie in 0..255);
    * ``"none"``: as stored.
    """

    scheme: Scheme
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"`scheme` must be one of {SCHEMES}, found {self.scheme!r}.")
        needs = {"window": ("low", "high"), "ct": ("low", "high", "mean", "std")}.get(self.scheme, ())
        for name in needs:
            value = getattr(self, name)
            if value is None or not math.isfinite(value):
                raise ValueError(f"ChannelNorm({self.scheme!r}) needs a finite `{name}`, found {value!r}.")
        if self.scheme == "window" and not self.low < self.high:
            raise ValueError(f"a window needs low < high, found [{self.low:g}, {self.high:g}].")

    def apply(self, x: np.ndarray, source: Any = "") -> np.ndarray:
        """The normalised float32 copy of one channel ``x`` (any shape).

        Raises:
            DataError: ``rgb_to_0_1`` on values outside 0..255 (naming ``source``).
        """
        x = np.asarray(x).astype(np.float32)
        if self.scheme == "window":
            return (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low)
        if self.scheme == "ct":
            x = np.clip(x, self.low, self.high)
            return (x - self.mean) / max(self.std, 1e-8)
        if self.scheme == "zscore":
            return (x - x.mean()) / max(float(x.std()), 1e-8)
        if self.scheme == "rescale_to_0_1":
            return (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        if self.scheme == "rgb_to_0_1":
            if x.min() < 0 or x.max() > 255:
                raise DataError(f"{source}: values must lie in 0..255 for rgb_to_0_1, found "
                                f"[{float(x.min()):g}, {float(x.max()):g}].")
            return x / 255.0
        return x

    def describe(self) -> str:
        """A few words for a log line, e.g. ``window [-125, 275] -> [0, 1]``."""
        if self.scheme == "window":
            return f"window [{self.low:g}, {self.high:g}] -> [0, 1]"
        if self.scheme == "ct":
            return (f"CT clip [{self.low:.4g}, {self.high:.4g}], (x - {self.mean:.4g}) / {self.std:.4g}")
        return {"zscore": "z-score per image", "rescale_to_0_1": "min-max to [0, 1] per image",
                "rgb_to_0_1": "x / 255", "none": "as stored"}[self.scheme]


def check_axcodes(axcodes: Sequence[str] | str | None, name: str = "orientation") -> tuple[str, str, str] | None:
    """Validate axis codes such as ``"LPS"`` or ``("R", "A", "S")``; returns them as an upper-case tuple (or None).

    Raises:
        SettingError: Naming ``name`` unless there are three codes, one from each of L/R, P/A, I/S.
    """
    if axcodes is None:
        return None
    codes = tuple(str(c).upper() for c in axcodes)
    pairs = sorted(next((i for i, pair in enumerate(_PAIRS) if c in pair), -1) for c in codes)
    if len(codes) != 3 or pairs != [0, 1, 2]:
        raise SettingError(name, f"`{name}` must be three axis codes, one of each of L/R, P/A and I/S (e.g. 'LPS', "
                                 f"'RAS'), or None, found {axcodes!r}.")
    return codes  # type: ignore[return-value]


def orientation_of(affine: np.ndarray) -> tuple[str, str, str]:
    """The closest axis codes of a voxel-to-world affine (``nibabel.aff2axcodes``)."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def orientation_transform(affine: np.ndarray, axcodes: Sequence[str]) -> np.ndarray | None:
    """The nibabel orientation transform ``(3, 2)`` from the voxel order of ``affine`` to ``axcodes``.

    Row ``i`` says where input axis ``i`` (of ``x, y, z``) goes and whether it is flipped. ``None`` when the
    voxel order is already ``axcodes`` (nothing to do).
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)), axcodes2ornt(tuple(axcodes)))
    return None if np.array_equal(ornt, _IDENTITY) else ornt


def _apply(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``nibabel.orientations.apply_orientation`` on the last three axes of a ``(..., z, y, x)`` array (a view)."""
    lead = array.ndim - 3
    out = array
    for i, (_, flip) in enumerate(ornt):
        if flip == -1:
            out = np.flip(out, lead + 2 - i)
    perm = list(range(lead)) + [0, 0, 0]
    for i, (j, _) in enumerate(ornt):
        perm[lead + 2 - int(j)] = lead + 2 - i
    return out.transpose(perm)


def _inverse(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for i, (j, flip) in enumerate(ornt):
        inv[int(j)] = [i, flip]
    return inv


def reorient(array: np.ndarray, ornt: np.ndarray | None) -> np.ndarray:
    """A ``(..., D, H, W)`` array (last axes ``z, y, x``) in the voxel order that ``ornt`` leads to (a copy).

    Args:
        array: Image ``(C, D, H, W)`` or labels ``(D, H, W)``.
        ornt: From :func:`orientation_transform`; None returns ``array`` itself.
    """
    return array if ornt is None else np.ascontiguousarray(_apply(array, ornt))


def restore(array: np.ndarray, ornt: np.ndarray | None) -> np.ndarray:
    """The inverse of :func:`reorient`: labels (or probabilities ``(K, D, H, W)``) back in the input's voxel order."""
    return array if ornt is None else np.ascontiguousarray(_apply(array, _inverse(np.asarray(ornt))))


def reorient_spacing(spacing: Sequence[float], ornt: np.ndarray | None) -> tuple[float, float, float]:
    """The ``(z, y, x)`` spacing after :func:`reorient` with ``ornt``."""
    zyx = tuple(float(s) for s in spacing)
    if ornt is None:
        return zyx  # type: ignore[return-value]
    xyz, out = zyx[::-1], [0.0, 0.0, 0.0]
    for i, (j, _) in enumerate(ornt):
        out[int(j)] = xyz[i]
    return tuple(out[::-1])  # type: ignore[return-value]


def restore_spacing(spacing: Sequence[float], ornt: np.ndarray | None) -> tuple[float, float, float]:
    """The inverse of :func:`reorient_spacing`: a ``(z, y, x)`` spacing back in the input's voxel order."""
    return reorient_spacing(spacing, None if ornt is None else _inverse(np.asarray(ornt)))


def affine_for(axcodes: Sequence[str] | None, spacing: Sequence[float] | None) -> np.ndarray:
    """The NIfTI affine of a ``(D, H, W)`` array that carries none, from its declared orientation and spacing.

    The array is written as ``(x, y, z) = (W, H, D)``; each voxel axis points along the world axis of its code
    (RAS+: ``L`` gives a negative x column), scaled by its spacing; the origin is 0. Without an orientation the
    axes are labelled as RAS (no anatomical claim: the layout declares none).

    Args:
        axcodes: The declared voxel order, e.g. ``("L", "P", "S")``, or None.
        spacing: ``(z, y, x)`` mm, or None for 1 mm.
    """
    z, y, x = (float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    affine = np.diag([x, y, z, 1.0])
    if axcodes is None:
        return affine
    from nibabel.orientations import axcodes2ornt

    out = np.eye(4)
    for i, (world, sign) in enumerate(axcodes2ornt(tuple(axcodes))):
        out[:3, i] = 0.0
        out[int(world), i] = sign * (x, y, z)[i]
    return out


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network, and what is needed to map its prediction back.

    Attributes:
        image: ``(C, D', H', W')`` float32 at the network's grid (reoriented, normalised, resampled).
        shape: ``(D, H, W)`` of the native grid in the network's voxel order: predictions are resampled to it.
        spacing: ``(z, y, x)`` mm of that grid (None if unknown).
        ornt: The orientation transform that was applied (None: none), for :func:`restore`.
    """

    image: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    ornt: np.ndarray | None


@dataclass(frozen=True)
class Preprocessing:
    """What a DataModule does to a raw image before its network sees it; stored in every checkpoint.

    Attributes:
        spatial_dims: The network's: 2 (slices or 2D images) or 3 (volumetric patches, sliding window).
        image_dims: The inputs': 3 for volumes (NIfTI, DICOM), 2 for 2D images (PNG, TIFF).
        channel_names: One name per input channel (nnU-Net's ``channel_names``; ``"CT"``, ``"RGB:R"`` ...).
        intensity: One :class:`ChannelNorm` per channel.
        class_names: The ``K - 1`` foreground classes, in label order.
        orientation: Axis codes of the arrays the network was trained on (see the module docstring), or None:
            images are used in their stored voxel order (layouts without an anatomical orientation, such as the
            oblique short-axis stacks of ACDC, and 2D images).
        spacing: Target ``(z, y, x)`` spacing in mm that images are resampled to (nnU-Net); a None entry keeps the
            image's own spacing on that axis (the slice axis of nnU-Net's 2D configuration); None: no resampling
            (Synapse-style models resize each slice to the network's ``input_size`` instead).
        version: :data:`RECORD_VERSION` of the writer.
    """

    spatial_dims: int
    image_dims: int
    channel_names: tuple[str, ...]
    intensity: tuple[ChannelNorm, ...]
    class_names: tuple[str, ...]
    orientation: tuple[str, str, str] | None = None
    spacing: tuple[float | None, float | None, float | None] | None = None
    version: int = field(default=RECORD_VERSION)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3) or self.image_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` and `image_dims` must be 2 or 3, found {self.spatial_dims}, "
                             f"{self.image_dims}.")
        if self.image_dims == 2 and self.spatial_dims == 3:
            raise ValueError("a 3D network cannot be trained on 2D images (image_dims=2, spatial_dims=3).")
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        norms = tuple(n if isinstance(n, ChannelNorm) else ChannelNorm(**n) for n in self.intensity)
        object.__setattr__(self, "intensity", norms)
        if len(norms) != len(self.channel_names) or not norms:
            raise ValueError(f"`intensity` must hold one ChannelNorm per channel ({len(self.channel_names)}), "
                             f"found {len(norms)}.")
        object.__setattr__(self, "orientation", check_axcodes(self.orientation))
        if self.spacing is not None:
            spacing = tuple(None if s is None else float(s) for s in self.spacing)
            if len(spacing) != 3 or any(s is not None and not (math.isfinite(s) and s > 0) for s in spacing):
                raise ValueError(f"`spacing` must be three positive numbers (or None entries), found {self.spacing}.")
            object.__setattr__(self, "spacing", spacing)

    # ---------------------------------------------------------------- the record
    @property
    def in_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names) + 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and pickle-friendly dict (what checkpoints store under ``"preprocessing"``)."""
        data = asdict(self)
        for key in ("channel_names", "class_names", "orientation", "spacing"):
            data[key] = None if data[key] is None else list(data[key])
        data["intensity"] = [{k: v for k, v in n.items() if v is not None} for n in data["intensity"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: A record of a newer version than this library reads, or a malformed one.
        """
        version = int(data.get("version", 0))
        if version > RECORD_VERSION:
            raise ValueError(f"the preprocessing record has version {version}, newer than this library's "
                             f"{RECORD_VERSION}; update lightning_selfreg.")
        fields = {k: v for k, v in data.items() if k != "version"}
        try:
            return cls(**fields, version=version)
        except TypeError as err:
            raise ValueError(f"malformed preprocessing record ({err}).") from err

    def with_window(self, low: float, high: float) -> Preprocessing:
        """The record with every ``"window"`` channel set to ``[low, high]`` (a user's override).

        Raises:
            ValueError: If no channel is windowed, or the window is not finite with ``low < high``.
        """
        if not any(n.scheme == "window" for n in self.intensity):
            raise ValueError(f"expected a model with a windowed channel (a Synapse-style CT model), found "
                             f"{self.describe_intensity()}")
        norms = tuple(ChannelNorm("window", low, high) if n.scheme == "window" else n for n in self.intensity)
        return replace(self, intensity=norms)

    def describe_intensity(self) -> str:
        """Per-channel normalisation in words."""
        return "; ".join(f"{name}: {norm.describe()}" for name, norm in zip(self.channel_names, self.intensity,
                                                                             strict=True))

    def describe(self) -> str:
        """One line for a log: orientation, spacing, intensity."""
        orientation = "".join(self.orientation) if self.orientation else "as stored"
        if self.spacing is None:
            spacing = "native grid"
        else:
            spacing = " x ".join("native" if s is None else f"{s:g}" for s in self.spacing) + " mm (z, y, x)"
        return (f"{self.spatial_dims}D network on {'volumes' if self.image_dims == 3 else '2D images'}; "
                f"orientation {orientation}; spacing {spacing}; intensity {self.describe_intensity()}")

    # ---------------------------------------------------------------- applying it
    def orientation_transform(self, affine: np.ndarray | None) -> np.ndarray | None:
        """The transform from an image's voxel order to the record's (None: none needed or none declared)."""
        if self.orientation is None or affine is None:
            return None
        return orientation_transform(affine, self.orientation)

    def normalize(self, image: np.ndarray, source: Any = "") -> np.ndarray:
        """Per-channel intensity normalisation of a ``(C, ...)`` image (float32).

        Raises:
            DataError: A channel count that is not the record's, or ``rgb_to_0_1`` outside 0..255.
        """
        if image.shape[0] != self.in_channels:
            raise DataError(f"{source}: expected {self.in_channels} channel(s) ({', '.join(self.channel_names)}), "
                            f"found {image.shape[0]}.")
        out = np.empty(image.shape, dtype=np.float32)
        for c, norm in enumerate(self.intensity):
            out[c] = norm.apply(image[c], source)
        return out

    def target_spacing(self, spacing: Sequence[float]) -> np.ndarray | None:
        """The ``(z, y, x)`` spacing an image of ``spacing`` is resampled to (None: no resampling)."""
        if self.spacing is None:
            return None
        return np.array([float(sp) if t is None else t for sp, t in zip(spacing, self.spacing, strict=True)])

    def prepare(self, image: np.ndarray, spacing: Sequence[float] | None, affine: np.ndarray | None,
                normalized: bool = False, source: Any = "") -> Prepared:
        """Reorient, normalise and resample one image: the network's input and the grid to predict on.

        The steps and their order are nnU-Net's (normalisation before resampling), with the reorientation first.
        The DataModules call this for their evaluation cases, the predictor for every input.

        Args:
            image: ``(C, D, H, W)`` in the file's voxel order (a 2D image: ``D = 1``).
            spacing: ``(z, y, x)`` mm in that order, or None (unknown; then no resampling is possible).
            affine: The file's voxel-to-world affine of ``(x, y, z)``, or None (the array is declared to be in the
                record's orientation already, as the Synapse / ACDC layouts are).
            normalized: The image is already normalised (a layout that stores normalised arrays).
            source: Named in errors.

        Raises:
            DataError: A channel count other than the record's, or a target spacing without an image spacing.
        """
        ornt = self.orientation_transform(affine)
        image = reorient(np.asarray(image), ornt)
        native_shape = tuple(int(s) for s in image.shape[1:])
        native_spacing = None if spacing is None else reorient_spacing(spacing, ornt)
        if not normalized:
            image = self.normalize(image, source)
        elif image.shape[0] != self.in_channels:
            raise DataError(f"{source}: expected {self.in_channels} channel(s) ({', '.join(self.channel_names)}), "
                            f"found {image.shape[0]}.")
        image = image.astype(np.float32, copy=False)
        if self.spacing is not None:
            if native_spacing is None:
                raise DataError(f"{source}: the model resamples to {self.spacing} mm (z, y, x), but the image "
                                "carries no spacing.")
            image = resample_image(image, native_spacing, self.target_spacing(native_spacing))
        return Prepared(image=image, shape=native_shape, spacing=native_spacing, ornt=ornt)
