"""Segment your own volume or image with a trained checkpoint: ``python -m experiments.predict``.

Examples::

    python -m experiments.predict --checkpoint runs/my-run/checkpoints/last.ckpt --input ct.nii.gz --output seg.nii.gz
    python -m experiments.predict --checkpoint runs/glas/checkpoints/best-epoch=99.ckpt --input slide.png \
        --output mask.png

NIfTI volumes are segmented slice by slice along their third axis and written with the input's affine. CT
intensities are windowed to ``--window`` (HU, default [-125, 275], the Synapse preprocessing) and scaled to
[0, 1]; pass ``--no-window`` for inputs already in [0, 1]. 2D images are read as RGB in [0, 1] (GlaS/MoNuSeg).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by experiments.run")
    parser.add_argument("--input", type=Path, required=True, help=".nii / .nii.gz volume, or a 2D image")
    parser.add_argument("--output", type=Path, required=True, help=".nii.gz for volumes, .png for images")
    parser.add_argument("--window", type=float, nargs=2, default=(-125.0, 275.0), metavar=("LOW", "HIGH"),
                        help="HU window for CT volumes")
    parser.add_argument("--no-window", action="store_true", help="volume intensities are already in [0, 1]")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Segment one file; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: --checkpoint {args.checkpoint}: file not found", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"error: --input {args.input}: file not found", file=sys.stderr)
        return 2
    is_volume = args.input.name.endswith((".nii", ".nii.gz"))
    if is_volume != args.output.name.endswith(".nii.gz"):
        print("error: --output must be .nii.gz for a NIfTI input and .png for a 2D image", file=sys.stderr)
        return 2

    import torch
    from PIL import Image

    from lightning_selfreg import SelfRegSegModule
    from lightning_selfreg.io import load_image_2d, load_nifti, save_nifti
    from lightning_selfreg.models import create_model

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    build = checkpoint.get("hyper_parameters", {}).get("net_config")
    if not build:
        print(f"error: --checkpoint {args.checkpoint}: no `net_config` in its hyper-parameters (it was not written "
              "by experiments.run); load it in Python with SelfRegSegModule.load_from_checkpoint(path, net=...)",
              file=sys.stderr)
        return 2
    build = {k: v for k, v in build.items() if k != "pretrained"}  # the weights come from the checkpoint
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = SelfRegSegModule.load_from_checkpoint(args.checkpoint, net=create_model(**build), map_location=device,
                                                   prediction_dir=None)
    module.eval()
    try:
        if is_volume:
            volume, affine, _ = load_nifti(args.input)
            if not args.no_window:
                low, high = args.window
                volume = (np.clip(volume, low, high) - low) / (high - low)
            pred = module.predict_volume(torch.from_numpy(volume)).cpu().numpy()
            save_nifti(pred, args.output, affine=affine)
        else:
            image = load_image_2d(args.input)
            pred = module.predict_volume(torch.from_numpy(image).permute(2, 0, 1)[None]).cpu().numpy()[0]
            scale = 255 if module.hparams.num_classes == 2 else 1
            args.output.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pred * scale).astype(np.uint8)).save(args.output)
    except ValueError as err:
        print(f"error: --input: {err}", file=sys.stderr)
        return 2
    names = ["background", *module.class_names]
    found = {names[c]: int((pred == c).sum()) for c in np.unique(pred)}
    print(f"wrote {args.output} (voxels per class: {found})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
