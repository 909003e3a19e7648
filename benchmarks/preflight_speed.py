"""Time the data pre-flight (``validate()``) cold and warm, on a synthetic full-size Synapse or nnU-Net layout.

``--dataset synapse`` writes, into a temporary folder (or ``--dir``, kept for re-runs), the TransUNet layout at its
real size: 2,211 training slices of 512 x 512 as ``np.savez_compressed`` ``.npz`` (``image`` float32 CT-like
values in [0, 1], ``label`` float32 organ masks, as TransUNet's files) over the 18 training case names, and 12 test
volumes ``test_vol_h5/<case>.npy.h5`` (``image``, ``label`` float32, D x 512 x 512, contiguous) with depths 85-198
(1,568 slices in all), plus ``lists/lists_Synapse`` as TransUNet's repository ships it. The default validation
cases (``SYNAPSE_VAL_CASES``: 4 cases, 503 slices) hold the same slice counts as the real ones.

``--dataset nnunet`` writes an nnU-Net v2 raw dataset of ``--cases`` CT cases (default 100: 90 in ``imagesTr``,
10 in ``imagesTs`` with ``labelsTs``), 512 x 512 x D with D in 60-120 (like MSD Pancreas), int16 HU and uint8
labels as ``.nii.gz``, spacing 0.8 x 0.8 x 2.5 mm.

Each repeat times a **cold** pre-flight (a new, empty cache folder: every file read in full and checked) and then
a **warm** one (the same cache folder: only what changed is read; here nothing). ``--evict`` drops the layout's
files from the page cache (``posix_fadvise(DONTNEED)`` on those files only) before the cold run, so its reads
come from the disk.

    python benchmarks/preflight_speed.py --dataset synapse [--dir /tmp/synapse_full] [--evict] [--repeats 2]
    python benchmarks/preflight_speed.py --dataset nnunet [--dir /tmp/nnunet_full] [--cases 100] [--evict]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TRAIN_CASES = ("case0005", "case0006", "case0007", "case0009", "case0010", "case0021", "case0023", "case0024",
               "case0026", "case0027", "case0028", "case0030", "case0031", "case0033", "case0034", "case0037",
               "case0039", "case0040")
TEST_DEPTHS = {"case0001": 147, "case0002": 139, "case0003": 198, "case0004": 140, "case0008": 148,
               "case0022": 89, "case0025": 85, "case0029": 100, "case0032": 144, "case0035": 94, "case0036": 184,
               "case0038": 100}


def slice_counts(total: int, val_cases: tuple[str, ...], val_total: int) -> dict[str, int]:
    """Slices per training case: ``val_total`` over the validation cases, the rest over the others, evenly."""
    counts = {}
    rest = [c for c in TRAIN_CASES if c not in val_cases]
    for group, n in ((list(val_cases), val_total), (rest, total - val_total)):
        for i, case in enumerate(group):
            counts[case] = n // len(group) + (i < n % len(group))
    return counts


def ct_slice(rng: np.random.Generator, size: int, z: float) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like slice: body ellipse of soft tissue, organ blobs, noise, in HU steps of 1/400 (float32)."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.32) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, (size, size))
    label = np.zeros((size, size), np.float32)
    for k, (cx, cy, r) in enumerate(((-0.15, -0.05, 0.12), (0.15, 0.0, 0.06), (0.0, 0.12, 0.04), (0.2, -0.1, 0.05))):
        organ = (xx - cx) ** 2 + (yy - cy - 0.05 * np.sin(z * 6)) ** 2 < r ** 2
        hu[organ] += 30 + 15 * k
        label[organ] = 1 + (k * 2 + int(z * 8)) % 8
    image = (np.clip(np.round(hu), -125, 275) + 125) / 400
    return image.astype(np.float32), label


def _write_case(args: tuple[str, int, int, str, int]) -> list[str]:
    root, seed, size, case, n = args
    rng = np.random.default_rng(seed)
    names = []
    for s in range(n):
        image, label = ct_slice(rng, size, s / max(n, 1))
        name = f"{case}_slice{s:03d}"
        np.savez_compressed(Path(root) / "train_npz" / f"{name}.npz", image=image, label=label)
        names.append(name)
    return names


def _write_volume(args: tuple[str, int, int, str, int]) -> str:
    import h5py

    root, seed, size, case, depth = args
    rng = np.random.default_rng(seed)
    with h5py.File(Path(root) / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
        image = f.create_dataset("image", (depth, size, size), np.float32)
        label = f.create_dataset("label", (depth, size, size), np.float32)
        for z in range(depth):
            image[z], label[z] = ct_slice(rng, size, z / depth)
    return case


def write_layout(root: Path, train_slices: int, size: int, test_volumes: int, depth_scale: float,
                 processes: int) -> None:
    """The synthetic layout (see the module docstring); skipped when ``root`` already holds a complete one."""
    from lightning_selfreg.data import SYNAPSE_VAL_CASES

    lists = root / "lists" / "lists_Synapse"
    if (lists / "test_vol.txt").is_file():
        return
    for sub in ("train_npz", "test_vol_h5", "lists/lists_Synapse"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    val_total = round(503 * train_slices / 2211)
    counts = slice_counts(train_slices, SYNAPSE_VAL_CASES, val_total)
    cases = list(TEST_DEPTHS.items())[:test_volumes]
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        jobs = [(str(root), i, size, case, n) for i, (case, n) in enumerate(counts.items())]
        names = [name for batch in pool.map(_write_case, jobs) for name in batch]
        jobs = [(str(root), 100 + i, size, case, max(1, round(d * depth_scale))) for i, (case, d) in enumerate(cases)]
        list(pool.map(_write_volume, jobs))
    (lists / "train.txt").write_text("\n".join(names) + "\n")
    (lists / "test_vol.txt").write_text("\n".join(c for c, _ in cases) + "\n")
    print(f"wrote {len(names)} slices and {len(cases)} volumes in {time.perf_counter() - start:.0f} s")


def _write_nnunet_case(args: tuple[str, int, str, str, int, int]) -> str:
    import nibabel as nib

    root, seed, images, labels, depth, size = args
    rng = np.random.default_rng(seed)
    case = f"case_{seed:03d}"
    hu = np.empty((size, size, depth), np.int16)  # NIfTI (x, y, z)
    label = np.zeros((size, size, depth), np.uint8)
    for z in range(depth):
        image, mask = ct_slice(rng, size, z / depth)
        hu[:, :, z] = np.round(image.T * 400 - 125).astype(np.int16)
        label[:, :, z] = (mask.T > 0) + (mask.T > 4)  # 2 foreground classes
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), Path(root) / images / f"{case}_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), Path(root) / labels / f"{case}.nii.gz")
    return case


def write_nnunet_layout(root: Path, cases: int, size: int, processes: int) -> None:
    """The synthetic nnU-Net dataset (see the module docstring); skipped when ``root`` already holds one."""
    import json

    if (root / "dataset.json").is_file():
        return
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n_test = max(1, cases // 10)
    depths = np.random.default_rng(0).integers(60, 121, cases)
    jobs = [(str(root), i, "imagesTr" if i < cases - n_test else "imagesTs",
             "labelsTr" if i < cases - n_test else "labelsTs", int(depths[i]), size) for i in range(cases)]
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_nnunet_case, jobs))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "organ": 1, "lesion": 2}, "numTraining": cases - n_test, "file_ending": ".nii.gz"}))
    print(f"wrote {cases} cases in {time.perf_counter() - start:.0f} s")


def layout_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def evict(root: Path) -> None:
    """Drop the layout's files (only those) from the page cache, so the next reads come from the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("synapse", "nnunet"), default="synapse")
    parser.add_argument("--dir", type=Path, help="layout folder (kept; reused when complete); default: a temp dir")
    parser.add_argument("--train-slices", type=int, default=2211, help="synapse")
    parser.add_argument("--test-volumes", type=int, default=12, help="synapse")
    parser.add_argument("--depth-scale", type=float, default=1.0, help="synapse: scale the test volumes' depths")
    parser.add_argument("--cases", type=int, default=100, help="nnunet: cases (a tenth of them in imagesTs)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2, help="processes that write the layout")
    parser.add_argument("--workers", type=int, default=None, help="validate(workers=...); default: its own")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--evict", action="store_true", help="evict the files from the page cache before cold runs")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_selfreg.data import NnUNetDataModule, SynapseDataModule

    root = args.dir or Path(tempfile.mkdtemp(prefix=f"{args.dataset}_full_"))
    caches = []
    try:
        if args.dataset == "synapse":
            write_layout(root, args.train_slices, args.size, args.test_volumes, args.depth_scale, args.processes)
        else:
            write_nnunet_layout(root, args.cases, args.size, args.processes)
        n_files, n_bytes = layout_size(root)
        print(f"layout {root}: {n_files} files, {n_bytes / 2**30:.2f} GiB; {os.cpu_count()} CPU cores")
        for repeat in range(args.repeats):
            cache = Path(tempfile.mkdtemp(prefix="preflight_cache_"))
            caches.append(cache)
            for phase in ("cold", "warm"):
                if phase == "cold" and args.evict:
                    evict(root)
                dm = SynapseDataModule(root, cache_dir=cache) if args.dataset == "synapse" else \
                    NnUNetDataModule(root, cache_dir=cache, progress=False)
                start, start_cpu = time.perf_counter(), time.process_time()
                counts = dm.validate(workers=args.workers)
                wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
                print(f"run {repeat + 1} {phase}{' (evicted)' if phase == 'cold' and args.evict else ''}: "
                      f"{counts}; wall {wall:.2f} s, CPU {cpu:.2f} s, load average {os.getloadavg()[0]:.1f}",
                      flush=True)
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
