"""Segment your own volume or image with a trained checkpoint: ``python -m experiments.predict``.

Examples::

    python -m experiments.predict --checkpoint runs/my-run/checkpoints/last.ckpt --input ct.nii.gz --output seg.nii.gz
    python -m experiments.predict --checkpoint runs/glas/checkpoints/best-epoch=99.ckpt --input slide.png \
        --output mask.png

NIfTI volumes are segmented slice by slice along their third axis and written with the input's affine. CT
intensities are windowed to ``--window`` (HU, default [-125, 275], the Synapse preprocessing) and scaled to
[0, 1]; pass ``--no-window`` for inputs already in [0, 1]. 2D images are read as RGB in [0, 1] (GlaS/MoNuSeg).

Every problem with the arguments, the checkpoint or the input (missing or truncated files, NaN/inf voxels, a
window with LOW >= HIGH, an image whose channel count is not the model's, a device that is not there) ends with
exit status 2 and one line naming it, before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lightning_selfreg.data.image_io import HU_WINDOW


class PredictError(ValueError):
    """A bad argument or input; the message names it, says what was expected and what was found."""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by experiments.run")
    parser.add_argument("--input", type=Path, required=True, help=".nii / .nii.gz volume, or a 2D image")
    parser.add_argument("--output", type=Path, required=True, help=".nii.gz for volumes, .png for images")
    parser.add_argument("--window", type=float, nargs=2, default=HU_WINDOW, metavar=("LOW", "HIGH"),
                        help="HU window for CT volumes (default: the Synapse window)")
    parser.add_argument("--no-window", action="store_true", help="volume intensities are already in [0, 1]")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return parser


def _check_arguments(args: argparse.Namespace) -> bool:
    """Checks that need no import of torch; returns whether the input is a volume."""
    low, high = args.window
    if not args.no_window and not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise PredictError(f"--window LOW HIGH: expected finite values with LOW < HIGH, found {low:g} {high:g}")
    if not args.checkpoint.is_file():
        raise PredictError(f"--checkpoint {args.checkpoint}: file not found")
    if not args.input.is_file():
        raise PredictError(f"--input {args.input}: file not found")
    is_volume = args.input.name.endswith((".nii", ".nii.gz"))
    if is_volume != args.output.name.endswith(".nii.gz"):
        raise PredictError("--output must be .nii.gz for a NIfTI input and .png for a 2D image")
    return is_volume


def resolve_device(name: str | None):
    """The ``torch.device`` of ``--device`` (default: ``cuda`` if available), checked to exist on this machine.

    Raises:
        PredictError: For an unknown device name or one this machine does not have.
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise PredictError(f"--device {name}: expected cpu, cuda or cuda:N, found an unknown device name "
                           f"({str(err).splitlines()[0]})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise PredictError(f"--device {name}: expected a CUDA GPU, found none ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictError(f"--device {name}: expected an index below {torch.cuda.device_count()} (the number "
                               f"of visible GPUs), found {device.index}")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as err:  # each backend raises its own type when it is missing
            raise PredictError(f"--device {name}: this machine cannot use it ({str(err).splitlines()[0]})") from err
    return device


def load_module(checkpoint_path: Path, device):
    """Rebuild the trained :class:`SelfRegSegModule` from a checkpoint written by ``experiments.run``.

    The checkpoint carries the network's configuration (its class path and arguments, see
    :mod:`experiments.cli`), so ``SelfRegSegModule.load_from_checkpoint`` rebuilds it; the ImageNet file of a
    ``pretrained`` argument is not read (the weights come from the checkpoint).

    Raises:
        PredictError: If the file is not a complete checkpoint, carries no network configuration or its weights do
            not fit.
    """
    from lightning_selfreg import SelfRegSegModule
    from lightning_selfreg.utils.checkpoint import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as err:
        raise PredictError(f"--checkpoint {err}") from err
    net = (checkpoint.get("hyper_parameters") or {}).get("net")
    if not isinstance(net, dict) or "class_path" not in net:
        raise PredictError(f"--checkpoint {checkpoint_path}: expected the network's configuration (`net` with a "
                           "`class_path`) in its hyper-parameters, found none (it was not written by experiments.run); "
                           "load it in Python with SelfRegSegModule.load_from_checkpoint(path, net=...)")
    init_args = {k: v for k, v in (net.get("init_args") or {}).items() if k != "pretrained"}
    net = {**net, "init_args": init_args}
    try:
        module = SelfRegSegModule.load_from_checkpoint(checkpoint_path, map_location="cpu", net=net)
    except (RuntimeError, TypeError, ValueError, KeyError, ImportError) as err:
        raise PredictError(f"--checkpoint {checkpoint_path}: expected weights of the network {net['class_path']} "
                           f"{init_args}, found weights that do not fit ({str(err).strip().splitlines()[0]})") from err
    return module.to(device).eval(), net


def _check_channels(path: Path, found: int, what: str, net: dict[str, Any]) -> None:
    init_args = net["init_args"]
    expected = init_args.get("in_channels", init_args.get("in_chans"))
    if expected is not None and found != expected:
        raise PredictError(f"--input {path}: the model takes {expected}-channel images "
                           f"({net['class_path'].rsplit('.', 1)[-1]}, in_channels={expected}), found {found} "
                           f"channel(s) ({what})")


def _check_finite(path: Path, volume: np.ndarray) -> None:
    bad = ~np.isfinite(volume)
    if bad.any():
        first = int(np.argmax(bad.reshape(len(volume), -1).any(1)))
        raise PredictError(f"--input {path}: expected finite intensities, found {int(bad.sum())} NaN/inf voxel(s) "
                           f"(first in slice {first} of {len(volume)})")


def predict(args: argparse.Namespace) -> str:
    """Segment ``args.input`` into ``args.output``; returns the summary line.

    Raises:
        PredictError: For any bad argument or input, before the output is written.
    """
    is_volume = _check_arguments(args)
    import torch
    from PIL import Image

    from lightning_selfreg.data.image_io import load_image_2d, load_nifti, save_nifti
    from lightning_selfreg.utils.files import atomic_write

    device = resolve_device(args.device)
    module, build = load_module(args.checkpoint, device)
    try:
        if is_volume:
            volume, affine, _ = load_nifti(args.input)
            image = torch.from_numpy(volume)  # (D, H, W): one channel
            found, what = 1, "a NIfTI volume has one channel"
        else:
            rgb = load_image_2d(args.input)
            image = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W)
            found, what = 3, "the image is read as RGB"
    except ValueError as err:
        raise PredictError(f"--input: {err}") from err
    _check_channels(args.input, found, what, build)
    if is_volume:
        _check_finite(args.input, volume)
        if not args.no_window:
            low, high = args.window
            image = (image.clamp(low, high) - low) / (high - low)
        pred = module.predict_volume(image).cpu().numpy()
        save_nifti(pred, args.output, affine=affine)
    else:
        pred = module.predict_volume(image).cpu().numpy()[0]
        scale = 255 if module.hparams.num_classes == 2 else 1
        mask = Image.fromarray((pred * scale).astype(np.uint8))
        atomic_write(args.output, lambda tmp: mask.save(tmp, format="PNG"))
    names = ["background", *module.class_names]
    found_classes = {names[c]: int((pred == c).sum()) for c in np.unique(pred)}
    return f"wrote {args.output} (voxels per class: {found_classes})"


def main(argv: list[str] | None = None) -> int:
    """Segment one file; returns the exit status (2 with one line on stderr for a bad argument or input)."""
    args = build_parser().parse_args(argv)
    try:
        print(predict(args))
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
