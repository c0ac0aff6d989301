"""Tests of medadapt.metrics against values computed by hand (the computation is in a comment by each test).

Conventions used in the comments: arrays are (z, y, x); a "k-cube at [a:b]" occupies a:b on every axis.
Surfels (surface elements, as in DeepMind's surface-distance package): one per 2x2x2 block of voxels that mixes
foreground and background, at the block centre (half-integer voxel coordinates), with the area of the
marching-cubes surface inside the block. For a box of voxels, with spacing (sz, sy, sx), the surfels are
  - face blocks (4 of the 8 voxels inside, one face of the box): a flat square, e.g. sy*sx on a z face;
  - edge blocks (2 voxels inside): a bevel strip, e.g. 0.5 * sx * sqrt(sz^2 + sy^2) along an x edge;
  - corner blocks (1 voxel inside): a triangle, 1/8 * sqrt(sy^2 sx^2 + sz^2 sx^2 + sz^2 sy^2).
A box of Z x Y x X voxels has 2(Y-1)(X-1) face blocks on its z faces (likewise y, x), 4(X-1) edge blocks along x
(likewise z, y) and 8 corner blocks. At 1 mm isotropic, a 4-cube: 54 face blocks (area 1), 36 edge blocks (area
sqrt(2)/2), 8 corners (sqrt(3)/8): 98 surfels, area 54 + 18 sqrt(2) + sqrt(3).
NSD weights each surfel by its area; HD95 is the area-weighted 95th percentile: the smallest distance d such that
the surfels at distance <= d hold at least 95 % of the area.
"""
from __future__ import annotations

import csv
import json
import math
import types
import warnings

import numpy as np
import pytest

from medadapt.data.io import affine_from_spacing, write_volume
from medadapt.errors import MedadaptError
from medadapt.metrics import EMPTY_POLICY, case_metrics, evaluate_folders, format_mean_std, summarize
from medadapt.metrics.overlap_surface import binary_metrics, surfel_area_table, surfels

LN = {"background": 0, "node": 1}


def cube(shape, lo, size, value=1, dtype=np.int16):
    """A label map of ``shape`` with a cube of edge ``size`` (int or per-axis tuple) starting at ``lo``."""
    a = np.zeros(shape, dtype=dtype)
    size = (size,) * 3 if isinstance(size, int) else size
    a[tuple(slice(l, l + s) for l, s in zip(lo, size))] = value
    return a


def one(pred, gt, spacing=(1.0, 1.0, 1.0), tol=1.0, labels=LN):
    rows = case_metrics(pred, gt, spacing, labels, tol)
    assert len(rows) == 1
    return rows[0]


# ------------------------------------------------------------------------------------------- surfels
R2, R3, R10, R19 = math.sqrt(2), math.sqrt(3), math.sqrt(10), math.sqrt(19)


def test_surfels_of_boxes():
    # 4-cube at [2:6], 1 mm: blocks 1..5 on every axis (block g holds voxels g and g+1) minus the all-foreground
    # blocks 2..4: 125 - 27 = 98 surfels with area 54 + 18 sqrt(2) + sqrt(3) (module docstring).
    blocks, areas = surfels(cube((10, 10, 10), (2, 2, 2), 4).astype(bool), (1.0, 1.0, 1.0))
    assert len(blocks) == 98 and blocks.min() == 1 and blocks.max() == 5
    assert areas.sum() == pytest.approx(54 + 18 * R2 + R3)
    assert sorted(set(np.round(areas, 9))) == pytest.approx([R3 / 8, R2 / 2, 1.0])
    # The same cube at (sz, sy, sx) = (3, 1, 2): face blocks 2*9*(sy sx + sz sx + sz sy) = 18 * 11 = 198;
    # edge blocks 4*3*0.5*(sx sqrt(sz^2+sy^2) + sy sqrt(sz^2+sx^2) + sz sqrt(sy^2+sx^2))
    #   = 6 * (2 sqrt(10) + sqrt(13) + 3 sqrt(5)); corners sqrt(4 + 36 + 9) = 7.
    _, areas = surfels(cube((10, 10, 10), (2, 2, 2), 4).astype(bool), (3.0, 1.0, 2.0))
    assert areas.sum() == pytest.approx(198 + 6 * (2 * R10 + math.sqrt(13) + 3 * math.sqrt(5)) + 7)
    # One voxel at (4, 0.9, 0.9): 8 corner blocks whose triangles make an octahedron with vertices on the voxel's
    # face centres: area sqrt(0.9^4 + 2 * 4^2 0.9^2).
    one_voxel = np.zeros((3, 3, 3), bool)
    one_voxel[1, 1, 1] = True
    blocks, areas = surfels(one_voxel, (4.0, 0.9, 0.9))
    assert len(blocks) == 8
    assert areas.sum() == pytest.approx(math.sqrt(0.9**4 + 2 * 16 * 0.81))
    # A mask filling a 3x4x5 volume: everything outside counts as background, so the surface closes half a voxel
    # outside the volume (blocks -1..n-1): 4*5*6 - 2*3*4 = 96 surfels; area (1 mm) = 2(2*3 + 2*4 + 3*4) faces
    # + 4(2 + 3 + 4) sqrt(2)/2 edges + sqrt(3) corners = 52 + 18 sqrt(2) + sqrt(3).
    blocks, areas = surfels(np.ones((3, 4, 5), bool), (1.0, 1.0, 1.0))
    assert len(blocks) == 96 and blocks.min() == -1
    assert areas.sum() == pytest.approx(52 + 18 * R2 + R3)
    assert len(surfels(np.zeros((3, 4, 5), bool), (1.0, 1.0, 1.0))[0]) == 0


def test_surfel_area_table_by_hand():
    # Codes use the reference's bit order: voxel (a, b, c) of the block is bit 7 - (4a + 2b + c).
    sz, sy, sx = 2.5, 0.7, 1.1
    t = surfel_area_table((sz, sy, sx))
    corner = math.sqrt((sy * sx) ** 2 + (sz * sx) ** 2 + (sz * sy) ** 2) / 8
    assert t[0] == 0 and t[255] == 0
    assert t[1] == pytest.approx(corner) and t[128] == pytest.approx(corner) and t[254] == pytest.approx(corner)
    assert t[1 | 2] == pytest.approx(0.5 * sx * math.hypot(sz, sy))  # voxels (1,1,0), (1,1,1): an x edge
    assert t[1 | 4] == pytest.approx(0.5 * sy * math.hypot(sz, sx))  # a y edge
    assert t[1 | 16] == pytest.approx(0.5 * sz * math.hypot(sy, sx))  # a z edge
    assert t[1 | 2 | 4 | 8] == pytest.approx(sy * sx)  # the four voxels with a = 1: a z face
    # Two voxels diagonal on a face (ambiguous face): two separate corner triangles.
    assert t[1 | 8] == pytest.approx(2 * corner)
    # A code and its complement have the same area.
    assert np.allclose(t, t[::-1])
    # 2D: contour lengths; one pixel -> half the pixel diagonal; two pixels along axis 1 -> one step s1.
    t2 = surfel_area_table((0.7, 1.1))
    assert t2[1] == pytest.approx(0.5 * math.hypot(0.7, 1.1)) and t2[1 | 2] == pytest.approx(1.1)
    assert t2[1 | 4] == pytest.approx(0.7) and t2[1 | 8] == pytest.approx(math.hypot(0.7, 1.1))


# ------------------------------------------------------------------------------------------- identical
def test_identical_masks():
    # Same 3x3x3 cube: DSC = 2*27/(27+27) = 1; every boundary voxel has distance 0 -> NSD 1, HD95 0.
    gt = cube((7, 7, 7), (2, 2, 2), 3)
    r = one(gt.copy(), gt, spacing=(3.0, 0.7, 0.7))
    assert r == {
        "class": "node", "label": 1, "dsc": 1.0, "nsd": 1.0, "hd95": 0.0,
        "gt_voxels": 27, "pred_voxels": 27, "tolerance_mm": 1.0,
    }


# ------------------------------------------------------------------------------------------- one-voxel shift
# GT = 4-cube at [2:6], pred = the same cube shifted by +1 voxel along one axis. Overlap 4*4*3 = 48 ->
# DSC = 2*48/(64+64) = 0.75. Blocks are named by their index g (block g holds voxels g, g+1; centre g + 0.5):
# GT surfels are the blocks of [1, 5]^3 with some index in {1, 5}; pred's are shifted by one along the axis.
# T(1, 1, 1) = 54 + 18 sqrt(2) + sqrt(3) and T(3, 1, 1) = 126 + 18 sqrt(2) + 12 sqrt(10) + sqrt(19) are the total
# surface areas of one cube (module docstring: faces 2*9*(sy sx + sz sx + sz sy), edges 4*3*(sqrt(10)/2 +
# sqrt(10)/2 + 3 sqrt(2)/2), corners sqrt(1 + 9 + 9)).
T_ISO = 54 + 18 * R2 + R3
T_Z3 = 126 + 18 * R2 + 12 * R10 + R19


def test_shift_isotropic():
    # Shift along x, 1 mm. Pred surfel (z, y, x), pred x blocks 2..6:
    #   - z or y in {1, 5} and x in 2..5: also a GT surfel -> 0 mm. Area: for x in 3..5 the ring of 12 face
    #     blocks (1) and 4 x-edge blocks (sqrt(2)/2) -> 3 * (12 + 2 sqrt(2)); for x = 2, 12 edge blocks and 4
    #     corners -> 6 sqrt(2) + sqrt(3)/2. Together A = 36 + 12 sqrt(2) + sqrt(3)/2 (~ 53.8 of T ~ 81.2).
    #   - x = 6 (pred's far x face, all of it): GT's (z, y, 5) is 1 mm away.
    #   - x = 2 with z, y in 2..4 (9 face blocks): GT's (z, y, 1) is 1 mm away.
    # GT -> pred mirrors it. NSD(1 mm) = 1, NSD(0.5 mm) = A / T. HD95: 66 % of the area at 0, the rest at 1 mm
    # -> 1 mm.
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (2, 2, 3), 4)
    r = one(pred, gt, tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx(1.0)
    assert r["hd95"] == pytest.approx(1.0)
    assert (r["gt_voxels"], r["pred_voxels"]) == (64, 64)
    r = one(pred, gt, tol=0.5)
    assert r["nsd"] == pytest.approx((36 + 12 * R2 + R3 / 2) / T_ISO)
    assert r["hd95"] == pytest.approx(1.0)


def test_shift_anisotropic_along_z():
    # spacing (3, 1, 1) mm, shift +1 slice along z (pred z blocks 2..6); DSC still 0.75 (voxel counting).
    # Areas: face blocks on a z face sy*sx = 1, on a y or x face 3; edge blocks along z 0.5*3*sqrt(2), along y or
    # x 0.5*1*sqrt(3^2 + 1) = sqrt(10)/2; corners sqrt(1 + 9 + 9)/8 = sqrt(19)/8. Pred surfel (z, y, x):
    #   - y or x in {1, 5} and z in 2..5: also a GT surfel -> 0 mm. z in 3..5: 12 face blocks (3) and 4 z-edge
    #     blocks (1.5 sqrt(2)) per slice -> 108 + 18 sqrt(2); z = 2: 12 edge blocks (sqrt(10)/2) and 4 corners
    #     -> 6 sqrt(10) + sqrt(19)/2. A = 108 + 18 sqrt(2) + 6 sqrt(10) + sqrt(19)/2.
    #   - z = 2 with y, x in 2..4 (9 face blocks, area 1 each): GT's (1, y, x) is 3 mm away, but GT's y/x face
    #     blocks (2, 1 or 5, x) and (2, y, 1 or 5) are |dy| or |dx| mm away: 1 mm for the 8 blocks with y or x in
    #     {2, 4}, 2 mm for the centre (2, 3, 3).
    #   - z = 6 (pred's far z face, area 9 + 6 sqrt(10) + sqrt(19)/2): GT's (5, y, x) is 3 mm away.
    # GT -> pred mirrors it. NSD(1 mm) = (A + 8) / T, NSD(2 mm) = NSD(2.9 mm) = (A + 9) / T, NSD(3 mm) = 1.
    # HD95: (A + 9) / T ~ 163.6 / 193.8 = 84 % of the area within 2 mm, the rest at 3 mm -> 3 mm.
    a = 108 + 18 * R2 + 6 * R10 + R19 / 2
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)
    r = one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx((a + 8) / T_Z3)
    assert r["hd95"] == pytest.approx(3.0)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=2.0)["nsd"] == pytest.approx((a + 9) / T_Z3)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=2.9)["nsd"] == pytest.approx((a + 9) / T_Z3)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=3.0)["nsd"] == pytest.approx(1.0)


def test_shift_anisotropic_along_x():
    # spacing (3, 1, 1) mm, shift +1 voxel along x (1 mm): as in the isotropic test every distance is 0 or 1 mm,
    # so NSD(1 mm) = 1 and HD95 = 1 mm; the areas differ. At 0 mm (z or y in {1, 5}, x in 2..5): for x in 3..5
    # the ring has 4 x-edge blocks (sqrt(10)/2), 6 z-face blocks (1) and 6 y-face blocks (3) -> 3 * (24 +
    # 2 sqrt(10)); for x = 2, 4 corners (sqrt(19)/8), 6 y-edge blocks (sqrt(10)/2) and 6 z-edge blocks
    # (1.5 sqrt(2)) -> sqrt(19)/2 + 3 sqrt(10) + 9 sqrt(2). NSD(0.5 mm) = (72 + 9 sqrt(10) + 9 sqrt(2) +
    # sqrt(19)/2) / T. (A nearest-block search in index units would be right here but wrong for the z shift.)
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (2, 2, 3), 4)
    r = one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx(1.0)
    assert r["hd95"] == pytest.approx(1.0)
    nsd_half = (72 + 9 * R10 + 9 * R2 + R19 / 2) / T_Z3
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=0.5)["nsd"] == pytest.approx(nsd_half)


def test_tolerance_equal_to_non_dyadic_spacing_counts():
    # Shift by one voxel along x with x spacing 0.7 mm: every distance is 0 or 0.7 mm. In floating point
    # 5 * 0.7 - 4 * 0.7 > 0.7 (rounding), so computed distances may be 0.7 + 1e-16; they must still count
    # as d <= tau for tau = 0.7 mm -> NSD 1; HD95 = 0.7.
    assert 5 * 0.7 - 4 * 0.7 > 0.7
    gt = cube((10, 10, 10), (2, 2, 1), 4)
    pred = cube((10, 10, 10), (2, 2, 2), 4)
    r = one(pred, gt, spacing=(2.0, 0.7, 0.7), tol=0.7)
    assert r["nsd"] == 1.0
    assert r["hd95"] == pytest.approx(0.7)


def test_two_single_voxels():
    # One voxel each, 3 voxels apart along x, spacing (4, 0.9, 0.9). Each has 8 corner-block surfels of equal
    # area at x offsets -0.45 and +0.45 mm from its centre. Pred -> GT: the 4 near ones are 2 * 0.9 = 1.8 mm
    # from GT's near ones, the 4 far ones 2.7 mm; GT -> pred the same. NSD(2 mm) = 1/2, NSD(1 mm) = 0.
    # HD95: half the area at 1.8 mm, the rest at 2.7 mm -> 2.7 mm. DSC 0.
    gt = np.zeros((3, 3, 8), np.int16)
    pred = gt.copy()
    gt[1, 1, 2] = 1
    pred[1, 1, 5] = 1
    r = one(pred, gt, spacing=(4.0, 0.9, 0.9), tol=2.0)
    assert (r["dsc"], r["nsd"]) == (0.0, pytest.approx(0.5))
    assert r["hd95"] == pytest.approx(2.7)
    assert one(pred, gt, spacing=(4.0, 0.9, 0.9), tol=1.0)["nsd"] == 0.0


# ------------------------------------------------------------------------------------------- far voxel
def test_single_voxel_far_from_blob():
    # GT = 3-cube at [1:4] (surfels: the blocks of [0, 3]^3 with an index in {0, 3}, 56 of them; area
    # 24 + 12 sqrt(2) + sqrt(3) ~ 42.70 at 1 mm); pred = one voxel at (2, 2, 15): 8 corner blocks
    # {1, 2} x {1, 2} x {14, 15}, equal areas. DSC = 0; NSD(1 mm) = 0 (no distance <= 1 mm).
    # pred -> GT: blocks at x = 14 are 11 mm from GT's x-face blocks (z, y, 3), those at x = 15 12 mm:
    #   half the area at 11, half at 12 -> P95 = 12.
    # GT -> pred: d^2 = dx^2 + dz^2 + dy^2 with dx = 14 - x and dz (dy) = 0 for z in {1, 2}, 1 for z in {0, 3}.
    #   The farthest blocks are GT's x = 0 face: 4 face blocks (area 1) at 14, 8 edge blocks (sqrt(2)/2) at
    #   sqrt(197), 4 corners (sqrt(3)/8) at sqrt(198); every other block is within sqrt(13^2 + 2) < 14.
    #   Area beyond 14 mm: 4 sqrt(2) + sqrt(3)/2 ~ 6.52 (15 % > 5 %); at sqrt(198): sqrt(3)/2 ~ 0.87 (2 % < 5 %)
    #   -> the 95 % point falls among the sqrt(197) blocks: P95 = sqrt(197).
    # HD95 = max(12, sqrt(197)) = sqrt(197).
    gt = cube((5, 5, 20), (1, 1, 1), 3)
    pred = np.zeros_like(gt)
    pred[2, 2, 15] = 1
    r = one(pred, gt)
    assert r["dsc"] == 0.0
    assert r["nsd"] == 0.0
    assert r["hd95"] == pytest.approx(math.sqrt(197))
    assert (r["gt_voxels"], r["pred_voxels"]) == (27, 1)


# ------------------------------------------------------------------------------------------- empty masks
def test_empty_policy():
    z = np.zeros((6, 6, 6), np.int16)
    c = cube((6, 6, 6), (1, 1, 1), 2)
    # Both empty: DSC 1, NSD 1, HD95 0.
    r = one(z, z.copy())
    assert (r["dsc"], r["nsd"], r["hd95"], r["gt_voxels"], r["pred_voxels"]) == (1.0, 1.0, 0.0, 0, 0)
    # Prediction empty, GT not (missed node): DSC 0, NSD 0, HD95 undefined (NaN).
    r = one(z, c)
    assert (r["dsc"], r["nsd"], r["gt_voxels"], r["pred_voxels"]) == (0.0, 0.0, 8, 0)
    assert math.isnan(r["hd95"])
    # GT empty, prediction not (false positive): the same.
    r = one(c, z)
    assert (r["dsc"], r["nsd"]) == (0.0, 0.0) and math.isnan(r["hd95"])
    assert "HD95 0" in EMPTY_POLICY and "hd95_undefined" in EMPTY_POLICY


# ------------------------------------------------------------------------------------------- multi-class
def test_multiclass_evaluated_separately():
    # Class 1: identical 3-cubes -> (1, 1, 0). Class 2: 4-cube shifted one voxel along x, 1 mm isotropic
    # -> (0.75, 1, 1) as in test_shift_isotropic. The class-1 cube sits in the same volume and must not
    # change class 2's boundaries; value 7 is not in labels and is ignored by case_metrics.
    gt = np.zeros((12, 12, 20), np.int16)
    pred = np.zeros_like(gt)
    gt[1:4, 1:4, 1:4] = 1
    pred[1:4, 1:4, 1:4] = 1
    gt[6:10, 6:10, 10:14] = 2
    pred[6:10, 6:10, 11:15] = 2
    pred[0, 0, 19] = 7
    labels = {"background": 0, "vessel": 2, "node": 1}
    rows = case_metrics(pred, gt, (1.0, 1.0, 1.0), labels, 1.0, case="c1")
    assert [(r["case"], r["class"], r["label"]) for r in rows] == [("c1", "node", 1), ("c1", "vessel", 2)]
    assert (rows[0]["dsc"], rows[0]["nsd"], rows[0]["hd95"]) == (1.0, 1.0, 0.0)
    assert rows[1]["dsc"] == pytest.approx(0.75)
    assert rows[1]["nsd"] == pytest.approx(1.0)
    assert rows[1]["hd95"] == pytest.approx(1.0)
    assert (rows[1]["gt_voxels"], rows[1]["pred_voxels"]) == (64, 64)


def test_case_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), LN)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1), LN)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), LN)
    with pytest.raises(ValueError, match="foreground"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1), {"background": 0})
    with pytest.raises(ValueError, match="tolerance"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1), LN, tolerance_mm=-1)


# ------------------------------------------------------------------------------------------- reference agreement
SPACINGS = [(4.0, 0.9, 0.9), (2.5, 0.7, 1.1), (0.8, 3.0, 0.6)]


def _random_pairs(seed, n):
    """``n`` (pred, gt, spacing, tolerance) cases: blobby random masks of various sizes, noisy copies, masks of a
    few voxels, and masks touching the volume border (every mask non-empty)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        k = len(cases)
        shape = tuple(int(v) for v in rng.integers(4, 22, 3))
        sigma, thr = rng.uniform(0.7, 2.5), rng.uniform(0.5, 0.56)
        gt = gaussian_filter(rng.random(shape), sigma) > thr
        pred = gaussian_filter(rng.random(shape), sigma) > thr
        if k % 4 == 1:  # a noisy copy of the ground truth
            pred = gt ^ (rng.random(shape) < 0.05)
        elif k % 4 == 2:  # a few voxels each, as a random walk
            gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
            for m in (gt, pred):
                c = [int(rng.integers(0, v)) for v in shape]
                for _ in range(int(rng.integers(1, 6))):
                    c = [min(max(ci + int(rng.integers(-1, 2)), 0), v - 1) for ci, v in zip(c, shape)]
                    m[tuple(c)] = True
        elif k % 4 == 3:  # on the volume border
            gt[0] |= rng.random(gt[0].shape) < 0.3
            pred[:, -1] = True
        if gt.any() and pred.any():
            cases.append((pred, gt, SPACINGS[k % len(SPACINGS)], (1.0, 2.0, 1.5)[k % 3]))
    return cases


def _reference_module(monkeypatch):
    """DeepMind's surface-distance package, with scipy.ndimage standing in for the deprecated scipy.ndimage.filters
    and scipy.ndimage.morphology namespaces it calls (gone in future scipy). Its np.Inf/np.NaN (removed in numpy 2)
    are only reached for empty masks, which these tests never pass."""
    sd = pytest.importorskip("surface_distance")
    import scipy.ndimage

    monkeypatch.setattr(sd.metrics, "ndimage", types.SimpleNamespace(filters=scipy.ndimage, morphology=scipy.ndimage))
    return sd


def test_surfel_area_table_equals_reference(monkeypatch):
    # Our table is built from the marching-cubes geometry (overlap_surface._unit_surfel_elements); it must give
    # the reference lookup table's area for each of the 256 codes (16 in 2D) at any spacing.
    sd = _reference_module(monkeypatch)
    for spacing in [(1.0, 1.0, 1.0), *SPACINGS, (0.3, 5.0, 1.7)]:
        ref = sd.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
        np.testing.assert_allclose(surfel_area_table(spacing), ref, rtol=1e-12, atol=0)
    for spacing in [(1.0, 1.0), (4.0, 0.9), (0.7, 1.1)]:
        ref = sd.lookup_tables.create_table_neighbour_code_to_contour_length(spacing)
        np.testing.assert_allclose(surfel_area_table(spacing), ref, rtol=1e-12, atol=0)


def test_matches_surface_distance_reference_on_random_anisotropic_masks(monkeypatch):
    # Not a hand computation: NSD and HD95 against compute_surface_dice_at_tolerance and
    # compute_robust_hausdorff(..., 95) of DeepMind's package (it takes (gt, pred), spacing per array axis).
    # Required: |dNSD| <= 0.005, |dHD95| <= 0.25 mm; the same algorithm gives the same numbers up to rounding.
    sd = _reference_module(monkeypatch)
    worst_nsd = worst_hd = 0.0
    cases = _random_pairs(0, 120)
    for pred, gt, spacing, tol in cases:
        r = binary_metrics(pred, gt, spacing, tol)
        dists = sd.compute_surface_distances(gt, pred, spacing)
        worst_nsd = max(worst_nsd, abs(r["nsd"] - sd.compute_surface_dice_at_tolerance(dists, tol)))
        worst_hd = max(worst_hd, abs(r["hd95"] - sd.compute_robust_hausdorff(dists, 95)))
    assert worst_nsd <= 0.005 and worst_hd <= 0.25
    assert worst_nsd < 1e-9 and worst_hd < 1e-9  # in fact identical up to floating-point rounding
    # 2D (case_metrics accepts 2D label maps): the reference's contour-length version.
    rng = np.random.default_rng(1)
    for _ in range(10):
        gt, pred = rng.random((12, 15)) < 0.3, rng.random((12, 15)) < 0.3
        r = binary_metrics(pred, gt, (2.5, 0.7), 1.0)
        dists = sd.compute_surface_distances(gt, pred, (2.5, 0.7))
        assert r["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(dists, 1.0), abs=1e-9)
        assert r["hd95"] == pytest.approx(sd.compute_robust_hausdorff(dists, 95), abs=1e-9)


def test_nsd_matches_monai_subvoxel_surface_dice():
    # MONAI's compute_surface_dice(use_subvoxels=True) implements the same NSD (in float32).
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_surface_dice

    for pred, gt, spacing, tol in _random_pairs(2, 16):
        r = binary_metrics(pred, gt, spacing, tol)
        p = torch.from_numpy(pred)[None, None].float()
        g = torch.from_numpy(gt)[None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nsd = float(
                compute_surface_dice(p, g, [tol], include_background=True, spacing=spacing, use_subvoxels=True)
            )
        assert r["nsd"] == pytest.approx(nsd, abs=1e-5)


# ------------------------------------------------------------------------------------------- summarize
def test_summarize_and_format():
    rows = [
        {"case": "a", "class": "node", "label": 1, "dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "tolerance_mm": 1.0},
        {"case": "b", "class": "node", "label": 1, "dsc": 0.5, "nsd": 0.5, "hd95": 4.0, "tolerance_mm": 1.0},
        {"case": "c", "class": "node", "label": 1, "dsc": 0.0, "nsd": 0.0, "hd95": float("nan"),
         "tolerance_mm": 1.0},
    ]
    s = summarize(rows)
    n = s["classes"]["node"]
    # dsc: mean 0.5, population std sqrt((0.25 + 0 + 0.25) / 3) = sqrt(1/6).
    assert n["dsc"]["mean"] == pytest.approx(0.5)
    assert n["dsc"]["std"] == pytest.approx(math.sqrt(1 / 6))
    # hd95 over defined values {0, 4}: mean 2, std 2; one undefined (case c).
    assert n["hd95"] == {"mean": pytest.approx(2.0), "std": pytest.approx(2.0), "n": 2}
    assert n["hd95_undefined"] == 1 and n["hd95_undefined_cases"] == ["c"]
    assert (n["n_cases"], s["n_cases"], s["cases"], s["tolerance_mm"]) == (3, 3, ["a", "b", "c"], 1.0)
    assert s["empty_policy"] == EMPTY_POLICY
    json.dumps(s, allow_nan=False)  # no NaN in the summary
    # All HD95 undefined -> mean None.
    s2 = summarize([rows[2]])
    assert s2["classes"]["node"]["hd95"] == {"mean": None, "std": None, "n": 0}
    with pytest.raises(ValueError, match="tolerance"):
        summarize([rows[0], {**rows[1], "tolerance_mm": 2.0}])
    with pytest.raises(ValueError, match="several rows"):
        summarize([rows[0], rows[0]])

    assert format_mean_std(0.7134, 0.0521, percent=True) == "71.3 ± 5.2"
    assert format_mean_std(12.34, 1.5) == "12.3 ± 1.5"
    assert format_mean_std(None, None) == "n/a"
    assert format_mean_std(0.5, None, percent=True, digits=2) == "50.00"


# ------------------------------------------------------------------------------------------- evaluate_folders
def _write(path, arr, spacing):
    write_volume(arr, affine_from_spacing(spacing), path)


def _dataset(tmp_path, labels=None):
    """gt/ and pred/ with 3 cases, dataset.json in the parent (nnU-Net layout)."""
    gt_dir, pred_dir = tmp_path / "labelsTs", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    labels = labels or {"background": 0, "node": 1, "other": 2}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    sp_a, sp_b, sp_c = (1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (2.0, 0.8, 0.8)
    # case_a: node identical, other identical -> both (1, 1, 0).
    a = cube((8, 8, 8), (1, 1, 1), 3)
    a[6, 6, 6] = 2
    _write(gt_dir / "case_a.nii.gz", a, sp_a)
    _write(pred_dir / "case_a.nii.gz", a, sp_a)
    # case_b: node 4-cube shifted +1 along x at spacing (3, 1, 1) -> (0.75, 1, 1 mm); other absent in both
    # -> (1, 1, 0).
    _write(gt_dir / "case_b.nii.gz", cube((10, 10, 10), (2, 2, 2), 4), sp_b)
    _write(pred_dir / "case_b.nii.gz", cube((10, 10, 10), (2, 2, 3), 4), sp_b)
    # case_c: node in GT, prediction empty -> (0, 0, NaN); other absent -> (1, 1, 0).
    _write(gt_dir / "case_c.nii.gz", cube((6, 6, 6), (1, 1, 1), 2), sp_c)
    _write(pred_dir / "case_c.nii.gz", np.zeros((6, 6, 6), np.int16), sp_c)
    return pred_dir, gt_dir, tmp_path / "eval"


def test_evaluate_folders_end_to_end(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    s = evaluate_folders(pred_dir, gt_dir, out, progress=False)
    with open(out / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "class", "label", "dsc", "nsd", "hd95", "gt_voxels", "pred_voxels"]
    got = [(r["case"], r["class"], r["label"], float(r["dsc"]), float(r["nsd"]), r["hd95"],
            r["gt_voxels"], r["pred_voxels"]) for r in rows]
    assert got == [
        ("case_a", "node", "1", 1.0, 1.0, "0.0", "27", "27"),
        ("case_a", "other", "2", 1.0, 1.0, "0.0", "1", "1"),
        ("case_b", "node", "1", 0.75, 1.0, "1.0", "64", "64"),
        ("case_b", "other", "2", 1.0, 1.0, "0.0", "0", "0"),
        ("case_c", "node", "1", 0.0, 0.0, "nan", "8", "0"),
        ("case_c", "other", "2", 1.0, 1.0, "0.0", "0", "0"),
    ]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == s
    assert s["cases"] == ["case_a", "case_b", "case_c"] and s["n_cases"] == 3
    assert s["tolerance_mm"] == 1.0 and s["empty_policy"] == EMPTY_POLICY
    assert s["labels"] == {"node": 1, "other": 2}
    node = s["classes"]["node"]
    # dsc 1, 0.75, 0: mean 1.75/3 = 0.58333; population std = sqrt(((5/12)^2 + (1/6)^2 + (7/12)^2) / 3)
    #   = sqrt((25/144 + 4/144 + 49/144) / 3) = sqrt(78/432) = 0.42492.
    assert node["dsc"]["mean"] == pytest.approx(1.75 / 3)
    assert node["dsc"]["std"] == pytest.approx(math.sqrt(78 / 432))
    # nsd 1, 1, 0: mean 2/3, std sqrt((1/9 + 1/9 + 4/9) / 3) = sqrt(2/9).
    assert node["nsd"]["mean"] == pytest.approx(2 / 3)
    assert node["nsd"]["std"] == pytest.approx(math.sqrt(2 / 9))
    # hd95 defined for a (0) and b (1): mean 0.5, std 0.5; c undefined.
    assert node["hd95"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.5), "n": 2}
    assert node["hd95_undefined"] == 1 and node["hd95_undefined_cases"] == ["case_c"]
    other = s["classes"]["other"]
    assert (other["dsc"]["mean"], other["dsc"]["std"], other["hd95"]["mean"], other["hd95_undefined"]) == (
        1.0, 0.0, 0.0, 0)
    assert s["foreground_mean"]["dsc"] == pytest.approx((1.75 / 3 + 1.0) / 2)
    assert sorted(p.name for p in out.iterdir()) == ["metrics_per_case.csv", "summary.json"]  # no temp files


def test_evaluate_folders_infers_labels_without_dataset_json(tmp_path):
    # No dataset.json: classes are the nonzero values found (1 in both cases, 2 only in case y).
    # Case x has no value 2 anywhere -> its label_2 row is the both-empty result (1, 1, 0).
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    x = cube((6, 6, 6), (1, 1, 1), 2)
    y = x.copy()
    y[5, 5, 5] = 2
    for d in (gt_dir, pred_dir):
        _write(d / "x.nii.gz", x, (1, 1, 1))
        _write(d / "y.nii.gz", y, (1, 1, 1))
    s = evaluate_folders(pred_dir, gt_dir, tmp_path / "out", progress=False)
    assert s["labels"] == {"label_1": 1, "label_2": 2}
    assert s["classes"]["label_2"]["n_cases"] == 2
    with open(tmp_path / "out" / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["label"], r["dsc"], r["gt_voxels"]) for r in rows] == [
        ("x", "1", "1.0", "8"), ("x", "2", "1.0", "0"), ("y", "1", "1.0", "8"), ("y", "2", "1.0", "1"),
    ]


def test_evaluate_folders_accepts_small_affine_differences(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    a = cube((6, 6, 6), (1, 1, 1), 2)
    write_volume(a, affine_from_spacing((1, 1, 1)), gt_dir / "x.nii.gz")
    write_volume(a, affine_from_spacing((1, 1, 1.0005), origin_xyz=(0.0004, 0, 0)), pred_dir / "x.nii.gz")
    s = evaluate_folders(pred_dir, gt_dir, tmp_path / "out", labels=LN, progress=False)
    assert s["classes"]["node"]["dsc"]["mean"] == 1.0


def _expect_error(pred_dir, gt_dir, out, *needles, **kw):
    with pytest.raises(MedadaptError) as exc:
        evaluate_folders(pred_dir, gt_dir, out, progress=False, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists(), "nothing may be written on error"
    return msg


def test_error_missing_folders(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    _expect_error(tmp_path / "nope", gt_dir, out, "nope", "pred_dir")
    _expect_error(pred_dir, tmp_path / "nogt", out, "nogt", "gt_dir")


def test_error_no_prediction_files(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    for p in pred_dir.iterdir():
        p.unlink()
    (pred_dir / "notes.txt").write_text("x")
    _expect_error(pred_dir, gt_dir, out, str(pred_dir), "no prediction files", ".nii.gz")


def test_error_ground_truth_without_prediction(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    (pred_dir / "case_b.nii.gz").unlink()
    _expect_error(pred_dir, gt_dir, out, "case_b", "no prediction")


def test_error_prediction_without_ground_truth(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    _write(pred_dir / "case_z.nii.gz", np.zeros((4, 4, 4), np.int16), (1, 1, 1))
    _expect_error(pred_dir, gt_dir, out, "case_z", "no ground truth")


def test_error_label_value_not_in_labels(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    bad = cube((10, 10, 10), (2, 2, 3), 4)
    bad[0, 0, 0] = 5
    _write(pred_dir / "case_b.nii.gz", bad, (3.0, 1.0, 1.0))
    _expect_error(pred_dir, gt_dir, out, "case_b.nii.gz", "[5]", "not in the labels")
    # Same with labels given explicitly: value 2 of case_a is not in {node: 1}.
    _write(pred_dir / "case_b.nii.gz", cube((10, 10, 10), (2, 2, 3), 4), (3.0, 1.0, 1.0))
    _expect_error(pred_dir, gt_dir, out, "case_a.nii.gz", "[2]", labels=LN)


def test_error_geometry_mismatch(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    # Wrong spacing (affine differs by far more than 1e-3).
    _write(pred_dir / "case_b.nii.gz", cube((10, 10, 10), (2, 2, 3), 4), (1.0, 1.0, 1.0))
    _expect_error(pred_dir, gt_dir, out, str(pred_dir / "case_b.nii.gz"), "ground truth's geometry")
    # Wrong shape.
    _write(pred_dir / "case_b.nii.gz", cube((10, 10, 12), (2, 2, 3), 4), (3.0, 1.0, 1.0))
    _expect_error(pred_dir, gt_dir, out, str(pred_dir / "case_b.nii.gz"), "ground truth's geometry")


def test_error_bad_labels_and_dataset_json(tmp_path):
    pred_dir, gt_dir, out = _dataset(tmp_path)
    _expect_error(pred_dir, gt_dir, out, "labels", labels={"background": 0, "node": [1, 2]})
    (tmp_path / "dataset.json").write_text("{not json")
    _expect_error(pred_dir, gt_dir, out, "dataset.json")
