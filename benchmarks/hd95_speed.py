"""Time lightning_selfreg.metrics.hd95 against medpy's hd95 on a CT-sized volume with organ-sized blobs.

Usage: python benchmarks/hd95_speed.py [--repeats 3]

The volume is (100, 512, 512) like a Synapse CT case; each "organ" is a smooth, irregular blob placed inside it,
and the prediction is a perturbed, shifted copy of the ground truth. Both libraries get the same masks and the
same spacing; the script checks that they agree and prints the best-of-N wall time of each and the ratio.
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


def best_of(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N timing for each library")
    args = parser.parse_args()
    print(f"volume {SHAPE}, spacing {SPACING} mm, best of {args.repeats}")
    print(f"{'organ':<8} {'voxels':>9} {'medpy s':>9} {'ours s':>9} {'speed-up':>9} {'hd95 mm':>9} {'|diff|':>8}")
    for i, (name, (centre, axes)) in enumerate(ORGANS.items()):
        pred, gt = organ_pair(centre, axes, seed=i)
        t_medpy, v_medpy = best_of(lambda p=pred, g=gt: medpy_binary.hd95(p, g, voxelspacing=SPACING), args.repeats)
        t_ours, v_ours = best_of(lambda p=pred, g=gt: hd95(p, g, SPACING), args.repeats)
        print(
            f"{name:<8} {int(gt.sum()):>9} {t_medpy:>9.3f} {t_ours:>9.3f} {t_medpy / t_ours:>8.1f}x "
            f"{v_ours:>9.3f} {abs(v_ours - v_medpy):>8.1e}"
        )


if __name__ == "__main__":
    main()
