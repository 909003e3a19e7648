"""Time the data pre-flight (``SynapseDataModule.validate()``) on a synthetic full-size Synapse layout.

Writes, into a temporary folder (or ``--dir``, kept for re-runs), the TransUNet layout at its real size:
2,211 training slices of 512 x 512 as ``np.savez_compressed`` ``.npz`` (``image`` float32 CT-like values in
[0, 1], ``label`` float32 organ masks, as TransUNet's files) over the 18 training case names, and 12 test volumes
``test_vol_h5/<case>.npy.h5`` (``image``, ``label`` float32, D x 512 x 512, contiguous) with depths 85-198
(1,568 slices in all), plus ``lists/lists_Synapse`` as TransUNet's repository ships it. The default validation
cases (``SYNAPSE_VAL_CASES``: 4 cases, 503 slices) hold the same slice counts as the real ones.

Then times ``validate()`` ``--repeats`` times and each of its phases once: headers of every file, validation
slices read in full, test volumes read in full. ``--cold`` evicts the layout's files from the page cache
(``posix_fadvise(DONTNEED)`` on those files only) before every timing, so the reads come from the disk.

    python benchmarks/preflight_speed.py [--dir /tmp/synapse_full] [--cold] [--repeats 3]
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
    parser.add_argument("--dir", type=Path, help="layout folder (kept; reused when complete); default: a temp dir")
    parser.add_argument("--train-slices", type=int, default=2211)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--test-volumes", type=int, default=12)
    parser.add_argument("--depth-scale", type=float, default=1.0, help="scale the test volumes' depths")
    parser.add_argument("--processes", type=int, default=2, help="processes that write the layout")
    parser.add_argument("--workers", type=int, default=None, help="validate(workers=...); default: its own")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_selfreg.data import SynapseDataModule
    from lightning_selfreg.data.preflight import run_checks

    root = args.dir or Path(tempfile.mkdtemp(prefix="synapse_full_"))
    try:
        write_layout(root, args.train_slices, args.size, args.test_volumes, args.depth_scale, args.processes)
        n_files, n_bytes = layout_size(root)
        print(f"layout {root}: {n_files} files, {n_bytes / 2**30:.2f} GiB; {os.cpu_count()} CPU cores")
        dm = SynapseDataModule(root)  # the default validation cases; lists found in lists/lists_Synapse
        workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
        times, cpu = [], []
        for _ in range(args.repeats):
            if args.cold:
                evict(root)
            start, start_cpu = time.perf_counter(), time.process_time()
            counts = dm.validate(workers=workers)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(f"validate(): {counts}; wall " + ", ".join(f"{t:.2f} s" for t in times) +
              f" (best {min(times):.2f} s); CPU time (all threads) " + ", ".join(f"{t:.2f} s" for t in cpu) +
              f"; {'cold' if args.cold else 'warm'} page cache, {workers} threads, load average "
              f"{os.getloadavg()[0]:.1f}")
        splits = dm.splits()
        phases = {
            "headers (all files)": (dm._check_header, [i for items in splits.values() for i in items]),
            "validation slices, full": (dm._read_sample, splits["val"]),
            "test volumes, full": (dm._check_case, splits["test"]),
        }
        for name, (check, items) in phases.items():
            if args.cold:
                evict(root)
            start, start_cpu = time.perf_counter(), time.process_time()
            run_checks(check, items, workers)
            print(f"  {name}: {len(items)} items, wall {time.perf_counter() - start:.2f} s, CPU "
                  f"{time.process_time() - start_cpu:.2f} s")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
