"""Tests for lightning_selfreg.metrics: parity with medpy, brute force, hand-computed values, protocols, DDP."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from scipy.spatial.distance import cdist

from lightning_selfreg import metrics
from lightning_selfreg.metrics import (
    HD95_METHODS,
    KDTREE_BOX_PER_SURFACE,
    PerCaseMetrics,
    case_metrics,
    dice,
    hd95,
    summarize,
    surface_distances,
    worst_case_distance,
)

# medpy's directed surface distances (module-private helper; no name mangling outside a class body).
medpy_surface_distances = medpy_binary.__surface_distances


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def blob_pair(seed: int, shape: tuple[int, ...], touch_border: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping smooth random blobs (a 'prediction' perturbed from a 'ground truth')."""
    rng = np.random.default_rng(seed)
    sigma = max(shape) / 10
    base = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma / 2)
    base /= base.std()
    noise /= noise.std()
    gt = base > np.quantile(base, rng.uniform(0.6, 0.85))
    pred = (base + 0.6 * noise) > np.quantile(base + 0.6 * noise, rng.uniform(0.6, 0.85))
    if touch_border:
        # force both masks onto two opposite faces of the array
        gt[(0,) + (slice(None),) * (len(shape) - 1)] = True
        pred[(-1,) + (slice(None),) * (len(shape) - 1)] = True
    assert gt.any() and pred.any()
    return pred, gt


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxel coordinates: foreground voxels with a face neighbour that is background or off the grid."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[inner]
    return np.argwhere(mask & ~interior).astype(np.float64)


def brute_directed(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    sp = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    pairwise = cdist(brute_surface(pred) * sp, brute_surface(gt) * sp)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def medpy_calculate_metric_percase(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """`calculate_metric_percase` of the TransUNet / Swin-Unet / SelfReg-UNet scripts (utils.py), with medpy."""
    pred = pred.copy()
    gt = gt.copy()
    pred[pred > 0] = 1
    gt[gt > 0] = 1
    if pred.sum() > 0 and gt.sum() > 0:
        return medpy_binary.dc(pred, gt), medpy_binary.hd95(pred, gt)
    if pred.sum() > 0 and gt.sum() == 0:
        return 1, 0
    return 0, 0


def random_labels(seed: int, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Smooth random label map with values in [0, num_classes)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((num_classes, *shape)), [0] + [max(shape) / 8] * len(shape))
    labels = field.argmax(axis=0)
    labels[field.max(axis=0) < np.quantile(field.max(axis=0), 0.4)] = 0
    return labels


# ------------------------------------------------------------------------------------------------------------------
# parity with medpy on random smooth blobs (2D 48x48 and 3D 16x32x32, isotropic and anisotropic, border cases)
# ------------------------------------------------------------------------------------------------------------------
PARITY_CASES = (
    [((48, 48), None, s, s % 3 == 0) for s in range(10)]
    + [((48, 48), (0.7, 1.3), s, s % 3 == 1) for s in range(10, 20)]
    + [((16, 32, 32), None, s, s % 3 == 0) for s in range(20, 28)]
    + [((16, 32, 32), (2.5, 0.8, 0.8), s, s % 3 == 1) for s in range(28, 36)]
)


@pytest.mark.parametrize(("shape", "spacing", "seed", "touch_border"), PARITY_CASES)
def test_parity_with_medpy(shape, spacing, seed, touch_border):
    pred, gt = blob_pair(seed, shape, touch_border)
    assert dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-6)
    assert hd95(pred, gt, spacing) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
    for a, b in ((pred, gt), (gt, pred)):
        ours = surface_distances(a, b, spacing)
        ref = medpy_surface_distances(a, b, voxelspacing=spacing)
        np.testing.assert_allclose(ours, ref, atol=1e-6)  # same voxels, same (C) order


def test_parity_masks_on_array_border_only():
    # both masks live entirely on the outer faces, where border_value=0 of the erosion matters
    pred = np.zeros((12, 20, 20), dtype=bool)
    gt = np.zeros_like(pred)
    pred[:, 0, :] = True
    pred[0, :5, :5] = True
    gt[:, :3, -1] = True
    gt[-1] = True
    for spacing in (None, (3.0, 0.5, 0.7)):
        assert hd95(pred, gt, spacing) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)


def test_cropping_is_translation_invariant():
    pred, gt = blob_pair(3, (24, 24))
    sp = (0.9, 1.7)
    big_p = np.pad(pred, ((30, 5), (7, 40)))
    big_g = np.pad(gt, ((30, 5), (7, 40)))
    # the padded masks no longer touch the array border, so compare with medpy on the padded arrays
    assert hd95(big_p, big_g, sp) == pytest.approx(medpy_binary.hd95(big_p, big_g, voxelspacing=sp), abs=1e-6)
    np.testing.assert_allclose(surface_distances(big_p, big_g, sp), medpy_surface_distances(big_p, big_g, sp))


# ------------------------------------------------------------------------------------------------------------------
# brute force (pairwise distances between surface voxel coordinates)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [((9, 11), None, 0), ((9, 11), (0.6, 1.9), 1), ((12, 7), (2.0, 1.0), 2), ((5, 6, 7), None, 3),
     ((5, 6, 7), (3.0, 0.7, 1.1), 4), ((6, 8, 5), (1.0, 2.0, 0.5), 5)],
)  # fmt: skip
def test_modes_match_brute_force(shape, spacing, seed):
    pred, gt = blob_pair(seed, shape, touch_border=seed % 2 == 0)
    d_pg, d_gp = brute_directed(pred, gt, spacing)
    expected_max = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    expected_pooled = np.percentile(np.concatenate([d_pg, d_gp]), 95)
    for method in HD95_METHODS:
        assert hd95(pred, gt, spacing, mode="max_directed", method=method) == pytest.approx(expected_max, abs=1e-9)
        assert hd95(pred, gt, spacing, mode="pooled", method=method) == pytest.approx(expected_pooled, abs=1e-9)
        ours = surface_distances(pred, gt, spacing, method=method)
        np.testing.assert_allclose(np.sort(ours), np.sort(d_pg), atol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# the two distance engines (EDT of the bounding box, KD-tree of the surface voxels) against medpy and each other
# ------------------------------------------------------------------------------------------------------------------
def box_per_surface(pred: np.ndarray, gt: np.ndarray) -> float:
    """The ratio that ``method="auto"`` compares with KDTREE_BOX_PER_SURFACE (bounding box / surface voxels)."""
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(pred | gt))
    return (pred | gt)[box].size / (len(brute_surface(pred)) + len(brute_surface(gt)))


def noise_pair(seed: int, shape: tuple[int, ...], density: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Salt-noise masks: nearly every foreground voxel is a surface voxel (the EDT's side of the threshold)."""
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density, rng.random(shape) < density


def organ_pair(seed: int, shape: tuple[int, ...], fill: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, irregular ellipsoid (semi-axis ``fill_i * shape_i / 2``; > 1 crosses the array border) as the
    ground truth, and a perturbed copy shifted by up to 2 voxels per axis as the prediction."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((x - (n - 1) / 2) / (f * n / 2)) ** 2 for x, n, f in zip(grids, shape, fill, strict=True))
    noise = ndimage.gaussian_filter(rng.standard_normal((2, *shape)), [0] + [max(shape) / 12] * len(shape))
    noise /= noise.std(axis=tuple(range(1, len(shape) + 1)), keepdims=True)
    gt = r2 + 0.15 * noise[0] < 1
    shift = tuple(int(v) for v in rng.integers(-2, 3, len(shape)))
    pred = np.roll(r2 + 0.15 * noise[0] + 0.1 * noise[1], shift, axis=tuple(range(len(shape)))) < 1.05
    return pred, gt


# (shape, spacing, seed, kind, fill): smooth shapes above the auto threshold (KD-tree), salt noise below it (EDT);
# anisotropic spacings with ratios up to 4 between axes; 1D, 2D and 3D; masks crossing the array border
ENGINE_CASES = [
    ((160, 160), (0.6, 1.4), 0, "blob", None),
    ((120, 90), (2.0, 0.5), 1, "border", None),
    ((300,), (0.4,), 2, "blob", None),
    ((32, 72, 72), (2.5, 0.7, 0.9), 3, "organ", (0.7, 0.7, 0.7)),
    ((32, 72, 72), (0.8, 3.2, 1.1), 3, "organ", (1.3, 0.7, 0.7)),
    ((24, 80, 60), None, 3, "organ", (0.8, 1.2, 0.7)),
    ((40, 40), (1.3, 0.7), 5, "noise", None),
    ((10, 24, 24), (3.0, 0.75, 0.8), 6, "noise", None),
]


def engine_case(shape, seed, kind, fill) -> tuple[np.ndarray, np.ndarray]:
    if kind == "noise":
        return noise_pair(seed, shape)
    if kind == "organ":
        return organ_pair(seed, shape, fill)
    return blob_pair(seed, shape, touch_border=kind == "border")


@pytest.mark.parametrize(("shape", "spacing", "seed", "kind", "fill"), ENGINE_CASES)
def test_engines_match_medpy_and_each_other(shape, spacing, seed, kind, fill):
    pred, gt = engine_case(shape, seed, kind, fill)
    ratio = box_per_surface(pred, gt)
    assert (ratio > KDTREE_BOX_PER_SURFACE) == (kind != "noise"), ratio  # both sides of the auto threshold
    expected = medpy_binary.hd95(pred, gt, voxelspacing=spacing)
    ref = [medpy_surface_distances(a, b, voxelspacing=spacing) for a, b in ((pred, gt), (gt, pred))]
    expected_max = max(np.percentile(ref[0], 95), np.percentile(ref[1], 95))
    for method in HD95_METHODS:
        # the same values as medpy, to the last bits (the engines may differ only in ties between equidistant voxels)
        assert hd95(pred, gt, spacing, method=method) == pytest.approx(expected, rel=1e-12, abs=1e-12), method
        value = hd95(pred, gt, spacing, mode="max_directed", method=method)
        assert value == pytest.approx(expected_max, rel=1e-12, abs=1e-12), method
        for (a, b), r in zip(((pred, gt), (gt, pred)), ref, strict=True):
            np.testing.assert_allclose(surface_distances(a, b, spacing, method=method), r, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["blob", "noise"])
def test_auto_picks_the_engine_by_box_per_surface(kind, monkeypatch):
    pred, gt = noise_pair(1, (30, 30)) if kind == "noise" else organ_pair(1, (32, 72, 72), (0.7, 0.7, 0.7))
    expected = hd95(pred, gt, (1.5, 0.5, 0.5)[-pred.ndim:])
    unused = "_directed_edt" if kind == "blob" else "_directed_kdtree"

    def must_not_run(*args):
        raise AssertionError(f"method='auto' ran {unused} on a {kind} mask")

    monkeypatch.setattr(metrics.distance, unused, must_not_run)
    assert hd95(pred, gt, (1.5, 0.5, 0.5)[-pred.ndim:]) == expected  # auto: the other engine only
    assert case_metrics(pred.astype(np.int64), gt.astype(np.int64), 2, (1.5, 0.5, 0.5)[-pred.ndim:])[1][0] == expected
    with pytest.raises(AssertionError, match="ran"):
        hd95(pred, gt, method="edt" if kind == "blob" else "kdtree")


def test_engines_on_identical_and_nested_masks():
    # identical masks: every surface voxel is on the other surface (the KD-tree queries nothing) -> 0
    pred, gt = blob_pair(9, (16, 40, 40))
    for method in HD95_METHODS:
        assert hd95(gt, gt, (2.0, 0.7, 0.7), method=method) == 0.0
        assert not surface_distances(gt, gt, method=method).any()
    # a single voxel inside a block, and the block around it
    block = np.zeros((9, 9, 9), dtype=bool)
    block[2:7, 2:7, 2:7] = True
    point = np.zeros_like(block)
    point[4, 4, 4] = True
    for method in HD95_METHODS:
        np.testing.assert_allclose(surface_distances(point, block, (3.0, 1.0, 1.0), method=method), [2.0])
        assert hd95(block, point, (3.0, 1.0, 1.0), method=method) == pytest.approx(
            medpy_binary.hd95(block, point, voxelspacing=(3.0, 1.0, 1.0)), rel=1e-12
        )


# ------------------------------------------------------------------------------------------------------------------
# hand-computed values
# ------------------------------------------------------------------------------------------------------------------
def test_hand_computed_two_bars():
    # pred = row 1, cols 0..3; gt = row 1, cols 1..4 (5x5 grid). Every voxel of a 1-thick bar is surface.
    pred = np.zeros((5, 5), dtype=bool)
    gt = np.zeros((5, 5), dtype=bool)
    pred[1, 0:4] = True
    gt[1, 1:5] = True
    assert dice(pred, gt) == pytest.approx(2 * 3 / 8)
    np.testing.assert_allclose(surface_distances(pred, gt), [1, 0, 0, 0])  # (1,0) is 1 voxel from (1,1)
    np.testing.assert_allclose(surface_distances(gt, pred), [0, 0, 0, 1])
    # pooled: p95 of [0]*6 + [1]*2 -> position 0.95 * 7 = 6.65 between two 1s -> 1
    assert hd95(pred, gt) == pytest.approx(1.0)
    # directed: p95 of [0, 0, 0, 1] -> position 2.85 -> 0.85; max of the two directions -> 0.85
    assert hd95(pred, gt, mode="max_directed") == pytest.approx(0.85)
    # columns are 3 mm apart: every distance is along a row, so everything scales by 3
    assert hd95(pred, gt, spacing=(2.0, 3.0)) == pytest.approx(3.0)
    assert hd95(pred, gt, spacing=(2.0, 3.0), mode="max_directed") == pytest.approx(2.55)


def test_hand_computed_block_and_point():
    # pred = 3x3 block (ring of 8 surface voxels, centre eroded); gt = its centre voxel
    pred = np.zeros((5, 5), dtype=bool)
    gt = np.zeros((5, 5), dtype=bool)
    pred[1:4, 1:4] = True
    gt[2, 2] = True
    assert dice(pred, gt) == pytest.approx(2 * 1 / 10)
    np.testing.assert_allclose(np.sort(surface_distances(pred, gt)), [1] * 4 + [math.sqrt(2)] * 4)
    np.testing.assert_allclose(surface_distances(gt, pred), [1.0])
    # pooled: [1]*5 + [sqrt2]*4, position 0.95 * 8 = 7.6 -> sqrt2; directed: max(sqrt2, 1) = sqrt2
    assert hd95(pred, gt) == pytest.approx(math.sqrt(2))
    assert hd95(pred, gt, mode="max_directed") == pytest.approx(math.sqrt(2))
    assert hd95(pred, pred) == 0.0


def test_dice_edge_cases():
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    assert math.isnan(dice(empty, empty))
    assert dice(full, empty) == 0.0
    assert dice(full, full) == 1.0
    assert dice(np.array([0, 2, 3]), np.array([0, 1, 0])) == pytest.approx(2 / 3)  # non-zero is foreground


def test_worst_case_distance():
    assert worst_case_distance((3, 4)) == pytest.approx(5.0)
    assert worst_case_distance((10, 10, 12), (2.5, 0.8, 0.8)) == pytest.approx(math.sqrt(25**2 + 8**2 + 9.6**2))


# ------------------------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------------------------
def test_hd95_errors():
    a = np.zeros((6, 6), dtype=bool)
    b = np.zeros((6, 6), dtype=bool)
    a[1:3, 1:3] = True
    b[2:5, 2:5] = True
    with pytest.raises(ValueError, match="`mode`.*'mean'"):
        hd95(a, b, mode="mean")
    with pytest.raises(ValueError, match="`method`.*'kdtree'.*'brute'"):
        hd95(a, b, method="brute")
    with pytest.raises(ValueError, match="`method`"):
        surface_distances(a, b, method="EDT")
    with pytest.raises(ValueError, match="`spacing`.*expected length 2"):
        hd95(a, b, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="`spacing`.*positive"):
        hd95(a, b, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="`spacing`.*positive"):
        surface_distances(a, b, spacing=-1.0)
    with pytest.raises(ValueError, match=r"same shape.*\(6, 6\).*\(6, 7\)"):
        hd95(a, np.zeros((6, 7), dtype=bool))
    with pytest.raises(ValueError, match="`pred` is empty"):
        hd95(np.zeros_like(a), b)
    with pytest.raises(ValueError, match="`gt` is empty"):
        surface_distances(a, np.zeros_like(b))
    with pytest.raises(ValueError, match="both `pred` and `gt` are empty"):
        hd95(np.zeros_like(a), np.zeros_like(b))
    assert hd95(a, b, spacing=2.0) == pytest.approx(2 * hd95(a, b))  # a scalar spacing applies to every axis


# ------------------------------------------------------------------------------------------------------------------
# case_metrics: protocols
# ------------------------------------------------------------------------------------------------------------------
def special_case_volumes() -> tuple[np.ndarray, np.ndarray]:
    """Labels 1: in both; 2: pred only; 3: gt only; 4: in neither (num_classes=5)."""
    pred = np.zeros((6, 16, 18), dtype=np.int64)
    gt = np.zeros_like(pred)
    pred[1:4, 2:9, 3:10] = 1
    gt[2:5, 3:11, 2:9] = 1
    pred[0:2, 12:15, 12:16] = 2
    gt[4:6, 12:16, 11:17] = 3
    return pred, gt


@pytest.mark.parametrize("seed", range(4))
def test_transunet_protocol_matches_reference_script(seed):
    pred, gt = special_case_volumes() if seed == 0 else (random_labels(seed, (8, 24, 24), 5), None)
    if gt is None:
        gt = random_labels(seed + 100, (8, 24, 24), 5)
        gt[gt == 4] = 0  # class 4 absent from gt (pred-only) ...
        pred[pred == 3] = 0  # ... and class 3 absent from pred (missed organ)
    # spacing is ignored by the transunet protocol (voxel units, as in the scripts)
    d, h = case_metrics(pred, gt, num_classes=5, spacing=(3.0, 0.7, 0.7), protocol="transunet")
    for c in range(1, 5):
        ref_d, ref_h = medpy_calculate_metric_percase(pred == c, gt == c)
        assert d[c - 1] == pytest.approx(ref_d, abs=1e-6), c
        assert h[c - 1] == pytest.approx(ref_h, abs=1e-6), c
    if seed == 0:
        np.testing.assert_allclose(d[1:], [1.0, 0.0, 0.0])  # pred-only, missed, both empty
        np.testing.assert_allclose(h[1:], [0.0, 0.0, 0.0])


def test_strict_protocol_rules():
    pred, gt = special_case_volumes()
    sp = (3.0, 0.7, 0.8)
    worst = math.sqrt((6 * 3.0) ** 2 + (16 * 0.7) ** 2 + (18 * 0.8) ** 2)
    d, h = case_metrics(pred, gt, num_classes=5, spacing=sp)  # strict is the default
    assert d[0] == pytest.approx(medpy_binary.dc(pred == 1, gt == 1))
    assert h[0] == pytest.approx(medpy_binary.hd95(pred == 1, gt == 1, voxelspacing=sp))
    np.testing.assert_allclose(d[1:3], [0.0, 0.0])  # hallucinated, missed
    np.testing.assert_allclose(h[1:3], [worst, worst])
    assert math.isnan(d[3]) and math.isnan(h[3])  # both empty: excluded
    # hd95_mode overrides the pooled default
    _, h_max = case_metrics(pred, gt, num_classes=5, spacing=sp, hd95_mode="max_directed")
    assert h_max[0] == pytest.approx(hd95(pred == 1, gt == 1, sp, mode="max_directed"))
    np.testing.assert_allclose(h_max[1:3], [worst, worst])
    # without spacing: voxel units
    _, h_vox = case_metrics(pred, gt, num_classes=5, protocol="strict")
    assert h_vox[0] == pytest.approx(medpy_binary.hd95(pred == 1, gt == 1))
    assert h_vox[1] == pytest.approx(math.sqrt(6**2 + 16**2 + 18**2))


def test_case_metrics_label_dtypes():
    pred, gt = special_case_volumes()
    d, h = case_metrics(pred, gt, num_classes=5, protocol="transunet")
    d_f, h_f = case_metrics(pred.astype(np.float32), gt.astype(np.uint8), num_classes=5, protocol="transunet")
    np.testing.assert_array_equal(d, d_f)
    np.testing.assert_array_equal(h, h_f)
    assert d.shape == h.shape == (4,) and d.dtype == np.float64


def test_case_metrics_errors():
    pred, gt = special_case_volumes()
    with pytest.raises(ValueError, match=r"`gt`: expected class indices in \[0, 3\), found values in \[0, 3\]"):
        case_metrics(np.minimum(pred, 2), gt, num_classes=3)
    with pytest.raises(ValueError, match=r"`pred`: expected class indices in \[0, 5\), found values in \[-1, "):
        case_metrics(pred - 1, gt, num_classes=5)
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(pred, gt[:, :, :-1], num_classes=5)
    with pytest.raises(ValueError, match="`protocol`"):
        case_metrics(pred, gt, num_classes=5, protocol="medpy")
    with pytest.raises(ValueError, match="`hd95_mode`"):
        case_metrics(pred, gt, num_classes=5, hd95_mode="max")
    with pytest.raises(ValueError, match="`hd95_mode`.*transunet"):
        case_metrics(pred, gt, num_classes=5, protocol="transunet", hd95_mode="max_directed")
    with pytest.raises(ValueError, match="`num_classes`"):
        case_metrics(pred, gt, num_classes=1)
    with pytest.raises(ValueError, match="`spacing`"):
        case_metrics(pred, gt, num_classes=5, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="`pred`: expected class indices .* found non-integer values"):
        case_metrics(pred + 0.5, gt, num_classes=5)
    with pytest.raises(ValueError, match="`gt`: expected class indices .* found dtype complex64"):
        case_metrics(pred, gt.astype(np.complex64), num_classes=5)


# ------------------------------------------------------------------------------------------------------------------
# summarize and PerCaseMetrics
# ------------------------------------------------------------------------------------------------------------------
def test_summarize_nan_columns_and_json():
    nan = math.nan
    d = np.array([[0.8, nan, 0.5], [0.6, nan, nan]])
    h = np.array([[2.0, nan, 4.0], [4.0, nan, nan]])
    out = summarize(d, h, ["aorta", "gallbladder", "spleen"])
    iou_aorta = (0.8 / 1.2 + 0.6 / 1.4) / 2  # per-case IoU = D / (2 - D), then the mean over cases
    assert out["per_class"]["aorta"] == {"dice": pytest.approx(0.7), "iou": pytest.approx(iou_aorta),
                                         "hd95": pytest.approx(3.0)}
    assert out["per_class"]["gallbladder"] == {"dice": None, "iou": None, "hd95": None}
    assert out["per_class"]["spleen"] == {"dice": 0.5, "iou": pytest.approx(1 / 3), "hd95": 4.0}
    assert out["iou_mean"] == pytest.approx((iou_aorta + 1 / 3) / 2)
    assert out["dice_mean"] == pytest.approx(0.6)  # mean of 0.7 and 0.5; the all-NaN class is excluded
    assert out["hd95_mean"] == pytest.approx(3.5)
    assert all(type(v) is float for v in (out["dice_mean"], out["hd95_mean"], out["per_class"]["aorta"]["dice"]))
    assert '"gallbladder": {"dice": null, "iou": null, "hd95": null}' in json.dumps(out)

    empty = summarize(np.full((2, 2), nan), np.full((2, 2), nan), ["a", "b"])
    assert empty["dice_mean"] is None and empty["hd95_mean"] is None
    json.dumps(empty)
    assert summarize(np.zeros((0, 2)), np.zeros((0, 2)), ["a", "b"])["dice_mean"] is None


def test_summarize_errors():
    with pytest.raises(ValueError, match="`class_names`.*K=2"):
        summarize(np.zeros((3, 2)), np.zeros((3, 2)), ["a"])
    with pytest.raises(ValueError, match="2-D"):
        summarize(np.zeros(2), np.zeros(2), ["a", "b"])
    with pytest.raises(ValueError, match="same shape"):
        summarize(np.zeros((3, 2)), np.zeros((2, 2)), ["a", "b"])


def per_case_arrays(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, h = rng.uniform(0, 1, (n, k)), rng.uniform(0, 30, (n, k))
    mask = rng.uniform(size=(n, k)) < 0.2
    d[mask], h[mask] = math.nan, math.nan
    return d, h


def assert_same_summary(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["per_class"].keys() == b["per_class"].keys()
    for key in ("dice_mean", "hd95_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    for name, vals in a["per_class"].items():
        for key, v in vals.items():
            assert v == pytest.approx(b["per_class"][name][key], rel=1e-12)


def test_per_case_metrics_accumulates():
    names = ["lv", "myo", "rv"]
    d, h = per_case_arrays(7, 3)
    metric = PerCaseMetrics(num_classes=4, class_names=names)
    for i in range(5):  # one case at a time, as tensors ...
        metric.update(torch.from_numpy(d[i]), torch.from_numpy(h[i]))
    metric.update(d[5:], h[5:])  # ... and a (N, K) batch as arrays
    out = metric.compute()
    assert_same_summary(out, summarize(d, h, names))
    json.dumps(out)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["dice_mean"] is None


def test_per_case_metrics_errors():
    with pytest.raises(ValueError, match="`class_names`.*expected num_classes - 1 = 3"):
        PerCaseMetrics(num_classes=4, class_names=["bg", "lv", "myo", "rv"])
    metric = PerCaseMetrics(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(N, 2\)"):
        metric.update(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="found"):
        metric.update(torch.zeros(2), torch.zeros(1, 2))
    assert PerCaseMetrics.full_state_update is False
    assert PerCaseMetrics.is_differentiable is False


@pytest.mark.parametrize("rank0_cases", [3, 0])
def test_per_case_metrics_ddp_gathers_every_case(rank0_cases):
    """Simulate a 2-rank all_gather: the result must be the summary over the union of cases, not a mean of means."""
    names = ["a", "b"]
    d, h = per_case_arrays(8, 2, seed=1)
    rank1 = PerCaseMetrics(num_classes=3, class_names=names)
    for i in range(rank0_cases, 8):
        rank1.update(d[i], h[i])
    remote = iter([torch.cat(rank1.dice), torch.cat(rank1.hd95)])  # what rank 1 contributes, in state order

    def fake_all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        return [tensor, next(remote)]

    rank0 = PerCaseMetrics(
        num_classes=3, class_names=names, dist_sync_fn=fake_all_gather, distributed_available_fn=lambda: True
    )
    for i in range(rank0_cases):
        rank0.update(d[i], h[i])
    # a rank that saw no case warns (torchmetrics) but still contributes an empty state to the gather
    no_case = pytest.warns(UserWarning, match="before the ``update``") if rank0_cases == 0 else nullcontext()
    with no_case:
        out = rank0.compute()
    assert_same_summary(out, summarize(d, h, names))
