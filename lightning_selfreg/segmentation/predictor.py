"""Segment new images with a trained checkpoint: :class:`Predictor` (what ``experiments.predict`` runs).

A checkpoint with its :class:`~lightning_selfreg.data.preprocessing.Preprocessing` record -> labels on the input's
own grid: read -> reorient -> the training normalisation and resampling -> the one inference path of
:func:`~lightning_selfreg.segmentation.inference.segment` (the code ``trainer.test`` runs) -> back to the input's
voxel order, shape, affine and header.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_selfreg.data.preprocessing import Preprocessing, restore
from lightning_selfreg.segmentation import inputs
from lightning_selfreg.segmentation.inference import PredictionError, inference_steps, segment

__all__ = ["NO_RECORD", "Prediction", "Predictor", "load_module", "resolve_device"]


# ---------------------------------------------------------------------------------------------------- loading
def resolve_device(name: str | torch.device | None) -> torch.device:
    """The ``torch.device`` of ``name`` (default: ``cuda`` if available), checked to exist on this machine.

    Raises:
        PredictionError: For an unknown device name or one this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise PredictionError(f"--device {name}: expected cpu, cuda or cuda:N, found an unknown device name "
                              f"({str(err).splitlines()[0]})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise PredictionError(f"--device {name}: expected a CUDA GPU, found none ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictionError(f"--device {name}: expected an index below {torch.cuda.device_count()} (the "
                                  f"number of visible GPUs), found {device.index}")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as err:  # each backend raises its own type when it is missing
            raise PredictionError(f"--device {name}: this machine cannot use it ({str(err).splitlines()[0]})") from err
    return device


NO_RECORD = (
    "{path}: expected the preprocessing record that checkpoints of this version carry (orientation, spacing, "
    "intensity normalisation of the training data), found none (the checkpoint predates it); pass the run's "
    "configuration with --data-config {config} (its `data:` section rebuilds the DataModule), or load it in Python "
    "with Predictor.from_checkpoint(path, preprocessing=datamodule.preprocessing())"
)


def load_module(path: str | os.PathLike, device: torch.device | str | None = None,
                preprocessing: Preprocessing | None = None) -> tuple[nn.Module, Preprocessing]:
    """Rebuild the trained :class:`~lightning_selfreg.SelfRegSegModule` and its preprocessing from a checkpoint.

    The checkpoint carries the network's configuration (its class path and arguments, written when the module was
    built by ``experiments.run`` / LightningCLI), so the module is rebuilt from the file alone; the ImageNet file of
    a ``pretrained`` argument is not read (the weights come from the checkpoint).

    Args:
        path: The ``.ckpt`` file.
        device: Where to run (see :func:`resolve_device`).
        preprocessing: A record to use instead of the checkpoint's (for checkpoints written before records).

    Raises:
        PredictionError: An incomplete or foreign checkpoint, one without a network configuration or without a
            preprocessing record (and none given), weights that do not fit, or a record that disagrees with the
            network.
    """
    from lightning_selfreg.segmentation.module import SelfRegSegModule
    from lightning_selfreg.utils.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    device = resolve_device(device)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as err:
        raise PredictionError(f"--checkpoint {err}") from err
    net = (checkpoint.get("hyper_parameters") or {}).get("net")
    if not isinstance(net, Mapping) or "class_path" not in net:
        raise PredictionError(f"--checkpoint {path}: expected the network's configuration (`net` with a `class_path`) "
                              "in its hyper-parameters, found none (it was not written by experiments.run); load it "
                              "in Python with SelfRegSegModule.load_from_checkpoint(path, net=...) and use "
                              "Predictor(module, preprocessing)")
    record = preprocessing
    if record is None:
        data = checkpoint.get("preprocessing")
        if data is None:
            config = path.parent.parent / "config.yaml"
            raise PredictionError("--checkpoint " + NO_RECORD.format(
                path=path, config=config if config.is_file() else "runs/NAME/config.yaml"))
        try:
            record = Preprocessing.from_dict(data)
        except ValueError as err:
            raise PredictionError(f"--checkpoint {path}: {err}") from err
    init_args = {k: v for k, v in (net.get("init_args") or {}).items() if k != "pretrained"}
    net = {**net, "init_args": init_args}
    try:
        module = SelfRegSegModule.load_from_checkpoint(path, map_location="cpu", net=net)
    except (RuntimeError, TypeError, ValueError, KeyError, ImportError) as err:
        why = str(err).strip().splitlines()[0]
        raise PredictionError(f"--checkpoint {path}: expected weights of the network {net['class_path']} "
                              f"{init_args}, found weights that do not fit ({why})") from err
    if record.spatial_dims != module.hparams.spatial_dims:
        raise PredictionError(f"--checkpoint {path}: its preprocessing record is for a {record.spatial_dims}D network, "
                              f"but the network is {module.hparams.spatial_dims}D")
    return module.to(device).eval(), record


# ---------------------------------------------------------------------------------------------------- predictor
@dataclass
class Prediction:
    """One case's result on the input's own grid.

    Attributes:
        labels: ``(D, H, W)`` uint8/uint16 labels in the input's voxel order (``z, y, x``: the transpose of a NIfTI
            array as nibabel reads it).
        probabilities: ``(K, D, H, W)`` float16 softmax in the same order, when asked for.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None


class Predictor:
    """Segment images with a trained checkpoint, preprocessed exactly as its training data.

    Args:
        module: A :class:`~lightning_selfreg.SelfRegSegModule` (eval mode, on its device).
        preprocessing: The record of the data it was trained on (:meth:`SegDataModule.preprocessing`).
        mirror: Mirroring test-time augmentation (the mean logits of all flips; 4 passes in 2D, 8 in 3D).
        sw_batch_size: Windows per forward pass in 3D (default: the module's).
        window: Override ``(low, high)`` of a windowed (Synapse-style CT) model's HU window.

    Example:
        >>> predictor = Predictor.from_checkpoint("runs/x/checkpoints/last.ckpt", device="cpu")  # doctest: +SKIP
        >>> labels = predictor.predict("ct.nii.gz")  # a nibabel image on the input's grid  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, preprocessing: Preprocessing, mirror: bool = False,
                 sw_batch_size: int | None = None, window: Sequence[float] | None = None) -> None:
        self.module = module.eval()
        if window is not None:
            low, high = (float(v) for v in window)
            try:
                preprocessing = preprocessing.with_window(low, high)
            except ValueError as err:
                raise PredictionError(f"--window {low:g} {high:g}: {err}") from err
        self.preprocessing = preprocessing
        self.mirror = mirror
        if sw_batch_size is not None:
            if sw_batch_size < 1:
                raise PredictionError(f"--sw-batch-size: expected an integer >= 1, found {sw_batch_size}")
            self.module.hparams.sw_batch_size = int(sw_batch_size)
        expected = getattr(module.net, "in_channels", None)
        if isinstance(expected, int) and expected != self.preprocessing.in_channels:
            raise PredictionError(f"the preprocessing record names {self.preprocessing.in_channels} channel(s) "
                                  f"({', '.join(self.preprocessing.channel_names)}), but the network takes {expected}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str | None = None,
                        preprocessing: Preprocessing | None = None, **kwargs: Any) -> Predictor:
        """Load a checkpoint written by ``experiments.run`` (see :func:`load_module`); ``kwargs`` go to the class."""
        module, record = load_module(path, device, preprocessing)
        return cls(module, record, **kwargs)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Background first, then the foreground classes."""
        return ("background", *self.module.class_names)

    def predict_case(self, case: Any, probabilities: bool = False,
                     step: Callable[[int], Any] | None = None, total: Callable[[int], Any] | None = None
                     ) -> Prediction:
        """Segment one :class:`~lightning_selfreg.segmentation.inputs.Case` (read and checked by ``read_case``).

        Args:
            case: The case.
            probabilities: Also return the class probabilities.
            step: Progress callback per forward pass (see :func:`segment`).
            total: Called once with the number of forward-pass items, before the first.
        """
        record = self.preprocessing
        prepared = record.prepare(case.image, case.spacing, case.affine, normalized=case.normalized,
                                  source=case.display)
        image = torch.from_numpy(prepared.image)
        if self.module.hparams.spatial_dims == 2:
            image = image.transpose(0, 1)  # (D, C, H, W) slices
        if total is not None:
            total(inference_steps(self.module, image))
        result = segment(self.module, image, prepared.shape, self.mirror, probabilities, step)
        dtype = np.uint8 if record.num_classes <= 256 else np.uint16
        labels = restore(result.labels.cpu().numpy().astype(dtype), prepared.ornt)
        probs = None
        if result.probabilities is not None:
            probs = restore(result.probabilities.cpu().numpy(), prepared.ornt)
        return Prediction(labels, probs)

    def predict(self, image: Any, affine: np.ndarray | None = None) -> Any:
        """Segment one image; the result lies on the input's own grid.

        Args:
            image: A nibabel image (returns a uint8 label image with its affine and header geometry), a path
                (NIfTI / DICOM folder / 2D image / layout file; returns a nibabel image, or an ``(H, W)`` array for
                a 2D image), or an array with ``affine``: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` as nibabel reads a NIfTI
                (``affine`` its voxel-to-world RAS affine, None: declared in the model's orientation), or an
                ``(H, W[, C])`` 2D image (returns an array of the input's spatial shape).
            affine: The voxel-to-world affine of an array ``image`` (None: the array is in the model's
                orientation already).

        Raises:
            PredictionError: A bad input (one line naming it).
        """
        if isinstance(image, str | os.PathLike):
            sources = inputs.find_cases(Path(image), self.preprocessing)
            if len(sources) != 1:
                raise PredictionError(f"--input {image}: expected one image, found {len(sources)} cases; use "
                                      "lightning_selfreg.segmentation.predict_files for folders")
            case = inputs.read_case(sources[0], self.preprocessing)
            labels = self.predict_case(case).labels
            return labels[0] if case.kind == "image" else inputs.label_image_of(labels, case, self.preprocessing)
        case = inputs.case_from_object(image, affine, self.preprocessing)
        labels = self.predict_case(case).labels
        if case.reference is not None:
            return inputs.label_image_of(labels, case, self.preprocessing)
        if self.preprocessing.image_dims == 2:
            return labels[0]
        return labels.transpose(2, 1, 0)
