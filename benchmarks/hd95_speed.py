"""Time lightning_selfreg.metrics.hd95 (both distance engines) against medpy's hd95 on CT-sized volumes.

Usage: OMP_NUM_THREADS=1 python benchmarks/hd95_speed.py [--repeats 3] [--organs kidney,spleen,liver]

The volume is (100, 512, 512) like a Synapse CT case; each "organ" is a smooth, irregular blob placed inside it,
and the prediction is a perturbed, shifted copy of the ground truth. Every arm gets the same masks and the same
anisotropic spacing: medpy, our ``method="edt"`` (distance transform of the bounding box), ``method="kdtree"``
(KD-tree of the surface voxels) and ``method="auto"`` (the default, which picks one of the two). The arms are
interleaved within each repeat; the script prints the best-of-N wall time of each, its speed-up over medpy and the
largest difference from medpy's value (``0`` means bitwise identical).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from lightning_selfreg.metrics import hd95

SHAPE = (100, 512, 512)
SPACING = (3.0, 0.76, 0.76)  # typical Synapse CT voxel size in mm (z, y, x)
# name: (centre, semi-axes) in voxels, roughly the size of the organ in a (100, 512, 512) abdominal CT
ORGANS = {
    "kidney": ((50, 300, 150), (14, 38, 28)),
    "spleen": ((45, 200, 380), (18, 55, 40)),
    "liver": ((55, 230, 160), (30, 120, 110)),
}


def smooth_noise(rng: np.random.Generator, box: tuple[slice, ...], sigma: float) -> np.ndarray:
    """Unit-variance smooth noise inside ``box``, zero elsewhere."""
    field = np.zeros(SHAPE, dtype=np.float32)
    local = ndimage.gaussian_filter(rng.standard_normal(field[box].shape).astype(np.float32), sigma)
    field[box] = local / local.std()
    return field


def organ_pair(centre, axes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    r2 = ((zz - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 + ((xx - centre[2]) / axes[2]) ** 2
    box = tuple(slice(max(c - 2 * a, 0), min(c + 2 * a, n)) for c, a, n in zip(centre, axes, SHAPE, strict=True))
    shape_noise = 0.25 * smooth_noise(rng, box, 6)
    gt = r2 + shape_noise < 1.0
    # prediction: the same organ, shifted by a few voxels, with an extra smaller-scale boundary error
    pred = np.roll(r2 + shape_noise + 0.2 * smooth_noise(rng, box, 3), (2, 5, -4), axis=(0, 1, 2)) < 1.05
    return pred, gt


ARMS = ("medpy", "edt", "kdtree", "auto")


def timed(fn) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N timing for each arm")
    parser.add_argument("--organs", default=",".join(ORGANS), help=f"comma-separated subset of {list(ORGANS)}")
    args = parser.parse_args()
    organs = args.organs.split(",")
    unknown = sorted(set(organs) - set(ORGANS))
    if unknown:
        parser.error(f"--organs: unknown {unknown}, expected names from {list(ORGANS)}")
    print(f"volume {SHAPE}, spacing {SPACING} mm, best of {args.repeats}, arms interleaved")
    print(f"{'organ':<8} {'voxels':>9} {'medpy s':>8} " + " ".join(f"{a + ' s':>9} {'x':>6}" for a in ARMS[1:])
          + f" {'hd95 mm':>9} {'max|diff|':>9}")
    for name in organs:
        centre, axes = ORGANS[name]
        pred, gt = organ_pair(centre, axes, seed=list(ORGANS).index(name))
        arms = {
            "medpy": lambda p=pred, g=gt: medpy_binary.hd95(p, g, voxelspacing=SPACING),
            **{m: (lambda p=pred, g=gt, m=m: hd95(p, g, SPACING, method=m)) for m in ARMS[1:]},
        }
        best = dict.fromkeys(ARMS, float("inf"))
        values = {}
        for _ in range(args.repeats):
            for arm in ARMS:
                seconds, values[arm] = timed(arms[arm])
                best[arm] = min(best[arm], seconds)
        ratios = " ".join(f"{best[a]:>9.3f} {best['medpy'] / best[a]:>5.1f}x" for a in ARMS[1:])
        diff = max(abs(values[a] - values["medpy"]) for a in ARMS[1:])
        print(f"{name:<8} {int(gt.sum()):>9} {best['medpy']:>8.3f} {ratios} {values['auto']:>9.3f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
