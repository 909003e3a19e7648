"""Segment your own scans with a trained checkpoint: ``python -m experiments.predict``.

Examples::

    python -m experiments.predict --checkpoint runs/my-run/checkpoints/last.ckpt --input ct.nii.gz --output seg.nii.gz
    python -m experiments.predict --checkpoint CKPT --input imagesTs/ --output predictions/ --labels labelsTs/
    python -m experiments.predict --checkpoint CKPT --input dicom_series/ --output seg.nii.gz --tta
    python -m experiments.predict --checkpoint runs/glas/checkpoints/best.ckpt --input slide.png --output mask.png

The input is preprocessed exactly as the model's training data (the checkpoint's record: orientation, spacing,
intensity normalisation with the training statistics), segmented (2D slice by slice, 3D with a Gaussian-blended
sliding window) and written on the input's own grid, with its affine and header (a thin layer over
:class:`lightning_selfreg.segmentation.predictor.Predictor` and
:func:`lightning_selfreg.segmentation.predict_files.predict_files`; what inputs are accepted:
:mod:`lightning_selfreg.segmentation.inputs`).

Every problem with the arguments, the checkpoint or an input (missing, truncated or non-image files, NaN/inf
voxels, a channel count that is not the model's, a 2D image for a volume model or the reverse, an output that is
an input or exists, an unwritable output folder, a checkpoint without a preprocessing record) ends with exit status
2 and one line naming it, before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class PredictError(ValueError):
    """A bad argument; the message names it, says what was expected and what was found."""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by experiments.run")
    parser.add_argument("--input", type=Path, required=True,
                        help="a NIfTI file, a DICOM series folder, a 2D image, or a folder of them (nnU-Net's "
                             "case_0000.nii.gz channel files are grouped into cases)")
    parser.add_argument("--output", type=Path, required=True,
                        help="a .nii.gz / .png file for one case, else a folder (<case>.nii.gz / <case>.png)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="reference labels (a folder with <case>.nii.gz, or one file): write scores.csv and "
                             "scores.json (Dice, IoU, HD95, both protocols) beside the predictions")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (4 passes in 2D, 8 in 3D)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <case>.npz with the float16 class probabilities")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="skip the cases whose outputs exist (restart an interrupted folder run)")
    parser.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="override the HU window of a windowed CT model (default: the recorded one)")
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="3D: windows per forward pass (default: the model's)")
    parser.add_argument("--data-config", type=Path, default=None,
                        help="for a checkpoint written before preprocessing records: the run's config.yaml, whose "
                             "`data:` section rebuilds the DataModule the model was trained with")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no import of torch."""
    if args.window is not None:
        low, high = args.window
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise PredictError(f"--window LOW HIGH: expected finite values with LOW < HIGH, found {low:g} {high:g}")
    if not args.checkpoint.is_file():
        raise PredictError(f"--checkpoint {args.checkpoint}: file not found")
    if not args.input.exists():
        raise PredictError(f"--input {args.input}: not found")
    if args.overwrite and args.resume:
        raise PredictError("--overwrite and --continue: expected one of them, found both")


def record_from_config(path: Path) -> Any:
    """The preprocessing record of the DataModule in the ``data:`` section of a run's ``config.yaml``.

    Raises:
        PredictError: An unreadable file, no ``data:`` section, or a DataModule that cannot be built from it.
    """
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_selfreg.data import SegDataModule

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise PredictError(f"--data-config {path}: cannot be read as YAML ({err})") from err
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise PredictError(f"--data-config {path}: expected a `data:` section with a class_path (a run's "
                           "config.yaml), found none")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(SegDataModule, "data")
        datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data
        return datamodule.preprocessing()
    except Exception as err:  # jsonargparse and the DataModules raise many types
        raise PredictError(f"--data-config {path}: cannot build the DataModule {data['class_path']} "
                           f"({str(err).strip().splitlines()[0]})") from err


def case_lines() -> Callable[[int, int, Path], None]:
    """``on_case`` for a log: ``case k/N: <output> (elapsed, ETA of the folder)`` on stderr, one line per case."""
    from lightning_selfreg.callbacks.progress import format_duration, run_eta

    start = time.monotonic()

    def line(k: int, n: int, output: Path) -> None:
        elapsed = time.monotonic() - start
        eta = run_eta(elapsed, k / n)
        print(f"case {k}/{n}: {output} (elapsed {format_duration(elapsed)}"
              + (f", ETA {format_duration(eta)})" if k < n and eta is not None else ")"), file=sys.stderr, flush=True)

    return line


def predict(args: argparse.Namespace) -> str:
    """Segment ``args.input`` into ``args.output``; returns the summary.

    Raises:
        PredictError, PredictionError: For any bad argument or input, before an output is written.
    """
    _check_arguments(args)
    from lightning_selfreg.segmentation.predict_files import predict_files
    from lightning_selfreg.segmentation.predictor import Predictor

    record = None if args.data_config is None else record_from_config(args.data_config)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, preprocessing=record,
                                          mirror=args.tta, sw_batch_size=args.sw_batch_size, window=args.window)
    bars = not args.quiet and sys.stderr.isatty()  # in a log file, one line per case instead of tqdm's updates
    result = predict_files(predictor, args.input, args.output, overwrite=args.overwrite, resume=args.resume,
                           probabilities=args.save_probabilities, labels=args.labels, progress=bars,
                           on_case=None if args.quiet or bars else case_lines())
    lines = [f"wrote {len(result.written)} prediction(s) to {args.output}"
             + (f" (skipped {len(result.skipped)} already written)" if result.skipped else "")
             + f"; preprocessing: {predictor.preprocessing.describe()}"]
    if result.scores is not None:
        from lightning_selfreg.tracking.report import format_paper_table

        lines += ["", format_paper_table(result.scores, predictor.preprocessing.image_dims == 3),
                  f"scores: {', '.join(str(p) for p in result.score_files)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Segment a file or a folder; returns the exit status (2 with one line on stderr for a bad argument or input)."""
    args = build_parser().parse_args(argv)
    from lightning_selfreg.data.contract import DataError
    from lightning_selfreg.segmentation.inference import PredictionError
    from lightning_selfreg.utils.files import WriteError

    try:
        print(predict(args))
    except (PredictError, PredictionError, DataError, WriteError) as err:  # WriteError: a full disk, mid-folder
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
