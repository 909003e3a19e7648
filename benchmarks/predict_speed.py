"""What prediction costs beyond the network's forward passes (issue 20): ``python benchmarks/predict_speed.py``.

A synthetic abdominal-like CT (``--depth`` x ``--size`` x ``--size`` voxels, int16 HU, 0.8 x 0.8 x 2.5 mm, stored
RAS so that it is reoriented for the models) is written as ``.nii.gz`` and segmented from file to file with
:func:`lightning_selfreg.segmentation.predict_files.predict_files` by two models, untrained unless a checkpoint is
given (``--checkpoint-2d`` / ``--checkpoint-3d``). The cost depends on the weights in one place: the labels at
the native grid are interpolated only along class borders (``resize_argmax``), so a model that predicts one class
everywhere (an untrained one) is the cheapest case; ``--random-head`` gives the untrained networks a random 1x1
head, which scatters class borders wherever the features vary:

* ``2d``: the CPU preset (``experiments/configs/sample.yaml``): UNet width 16, slices resized to 96 px, the sample's
  record (LPS, HU window);
* ``3d``: the 3D sample preset (``experiments/configs/sample_3d.yaml``): 3D UNet width 8, 24 x 48 x 48 windows
  (overlap 0.5, 4 per pass, Gaussian blending), the record of ``NnUNetDataModule`` on the bundled nnU-Net sample
  (RAS, its 3 mm target spacing, CT clip + z-score with its foreground statistics).

The forward passes are timed inside the run (a wrapper around the network's ``forward``); the overhead is the rest
of the wall time: reading, reorienting, normalising, resampling, resizing / blending the logits, the argmax at the
native grid, restoring the orientation, writing. Each stage is also timed alone. Prints a table; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_ct(depth: int, size: int, seed: int = 0) -> np.ndarray:
    """``(x, y, z)`` int16 HU: air, a body ellipse of soft tissue with noise, a few brighter organs."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    organs = (((x - 0.3) / 0.25) ** 2 + (y / 0.3) ** 2 <= 1) | (((x + 0.35) / 0.15) ** 2 + ((y + 0.1) / 0.2) ** 2 <= 1)
    slice_hu = np.where(body, 40.0, -1000.0) + 80.0 * organs
    volume = np.repeat(slice_hu[:, :, None], depth, axis=2) + rng.normal(0, 20, (size, size, depth))
    return volume.astype(np.int16)


class ForwardTimer:
    """Wraps ``net.forward``: accumulates the wall time of the forward passes."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.seconds, self.calls = net, 0.0, 0
        self._forward = net.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = self._forward(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        net.forward = timed


def build(config: str, checkpoint: Path | None = None, random_head: bool = False):
    from lightning_selfreg import SelfRegSegModule
    from lightning_selfreg.data import NnUNetDataModule, SampleCTDataModule
    from lightning_selfreg.models import UNet

    if checkpoint is not None:  # a trained model: realistic class borders for the native-grid argmax
        from lightning_selfreg.segmentation.predictor import load_module

        return load_module(checkpoint, "cpu")
    torch.manual_seed(0)
    if config == "2d":
        dm = SampleCTDataModule()  # image_size 96
        module = SelfRegSegModule(UNet(1, 9, base_channels=16), 9, dm.class_names, input_size=dm.input_size,
                                  channels_last=True)
    else:
        cache = Path(tempfile.mkdtemp(prefix="predict_speed_cache_"))
        dm = NnUNetDataModule(configuration="3d", patch_size=(24, 48, 48), cache_dir=cache, progress=False)
        module = SelfRegSegModule(UNet(1, 9, base_channels=8, spatial_dims=3), 9, dm.class_names, spatial_dims=3,
                                  roi_size=dm.roi_size)
    if random_head:  # an untrained network predicts one class nearly everywhere; a random head gives class borders
        with torch.no_grad():
            module.net.outc.weight.normal_(0, 3)
            module.net.outc.bias.zero_()
    return module, dm.preprocessing()


def measure(config: str, path: Path, out: Path, checkpoint: Path | None = None, random_head: bool = False) -> dict:
    from lightning_selfreg.segmentation.inference import segment
    from lightning_selfreg.segmentation.inputs import find_cases, read_case, write_prediction
    from lightning_selfreg.segmentation.predict_files import predict_files
    from lightning_selfreg.segmentation.predictor import Predictor

    module, record = build(config, checkpoint, random_head)
    predictor = Predictor(module.eval(), record)
    timer = ForwardTimer(module.net)
    start = time.perf_counter()
    predict_files(predictor, path, out, overwrite=True, progress=False)
    total = time.perf_counter() - start
    forward, passes = timer.seconds, timer.calls
    # the stages alone
    stages = {}
    t = time.perf_counter()
    case = read_case(find_cases(path, record)[0], record)
    stages["read + check"] = time.perf_counter() - t
    t = time.perf_counter()
    prepared = record.prepare(case.image, case.spacing, case.affine)
    stages["reorient + normalise + resample"] = time.perf_counter() - t
    image = torch.from_numpy(prepared.image)
    image = image.transpose(0, 1) if module.hparams.spatial_dims == 2 else image
    before = timer.seconds
    t = time.perf_counter()
    result = segment(module, image, prepared.shape)
    stages["network forward passes"] = timer.seconds - before
    stages["resize / blend / argmax at the native grid"] = time.perf_counter() - t - stages["network forward passes"]
    t = time.perf_counter()
    from lightning_selfreg.data.preprocessing import restore

    labels = restore(result.labels.numpy().astype(np.uint8), prepared.ornt)
    write_prediction(labels, case, out.with_name("stage.nii.gz"), record)
    stages["restore orientation + write"] = time.perf_counter() - t
    classes = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}
    return {"config": config, "checkpoint": None if checkpoint is None else str(checkpoint),
            "random_head": random_head and checkpoint is None, "voxels_per_class": classes, "total_s": total,
            "forward_s": forward, "forward_calls": passes,
            "overhead_s": total - forward, "overhead_pct": 100 * (total - forward) / total,
            "network_grid": list(prepared.image.shape[1:]), "stages_s": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--configs", default="2d,3d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--checkpoint-2d", type=Path, default=None,
                        help="a trained checkpoint instead of the untrained 2D preset (e.g. experiments.run's default)")
    parser.add_argument("--checkpoint-3d", type=Path, default=None, help="likewise for 3D")
    parser.add_argument("--random-head", action="store_true",
                        help="untrained networks with a random 1x1 head (class borders everywhere the features vary: "
                             "more work for the native-grid argmax than an untrained network's one class)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import nibabel as nib

    folder = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_ct(args.depth, args.size), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    print(f"volume {args.size} x {args.size} x {args.depth} (x, y, z), 0.8 x 0.8 x 2.5 mm, RAS, "
          f"{path.stat().st_size / 2**20:.1f} MiB .nii.gz; torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    results = []
    for config in args.configs.split(","):
        checkpoint = args.checkpoint_2d if config == "2d" else args.checkpoint_3d
        result = measure(config, path, folder / f"seg_{config}.nii.gz", checkpoint, args.random_head)
        results.append(result)
        print(f"\n{config}: total {result['total_s']:.1f} s, forward passes {result['forward_s']:.1f} s "
              f"({result['forward_calls']} calls), overhead {result['overhead_s']:.1f} s = "
              f"{result['overhead_pct']:.0f} % of the whole; network grid {result['network_grid']}; "
              f"{'trained: ' + str(checkpoint) if checkpoint else 'untrained'}"
              f"{' + random head' if args.random_head and not checkpoint else ''}; voxels per class "
              f"{result['voxels_per_class']}")
        for stage, seconds in result["stages_s"].items():
            print(f"  {stage:45s} {seconds:7.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
