"""Tests of medadapt.metrics against values computed by hand (the computation is in a comment by each test).

Conventions used in the comments: arrays are (z, y, x); a "k-cube at [a:b]" occupies a:b on every axis.
Boundary voxels = foreground voxels with a face-neighbour in the background (or on the volume border).
A 4x4x4 cube has 64 - 2*2*2 = 56 boundary voxels.
HD95 uses numpy's linear percentile: P95 of n sorted values is at fractional index 0.95 * (n - 1).
"""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest

from medadapt.data.io import affine_from_spacing, write_volume
from medadapt.errors import MedadaptError
from medadapt.metrics import EMPTY_POLICY, case_metrics, evaluate_folders, format_mean_std, summarize
from medadapt.metrics.overlap_surface import boundary_coords

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


# ------------------------------------------------------------------------------------------- boundary
def test_boundary_definition_counts():
    # 4x4x4 cube inside the volume: 64 voxels - 8 interior = 56 boundary voxels.
    assert len(boundary_coords(cube((10, 10, 10), (2, 2, 2), 4).astype(bool))) == 56
    # A mask filling a 3x4x5 volume: everything outside counts as background, so all voxels on the volume
    # border are boundary: 60 - interior (1x2x3 = 6) = 54.
    assert len(boundary_coords(np.ones((3, 4, 5), bool))) == 54
    # Only face neighbours count: a voxel whose only background neighbours are diagonal is interior.
    # 3x3x3 cube with one corner removed: 26 voxels; the centre's six face neighbours are foreground and its
    # only background neighbour is the removed corner (diagonal) -> interior; boundary = 26 - 1 = 25.
    m = cube((5, 5, 5), (1, 1, 1), 3).astype(bool)
    m[1, 1, 1] = False
    assert len(boundary_coords(m)) == 25


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
# GT = 4-cube at [2:6], pred = the same cube shifted by +1 voxel along one axis (say x: pred x = 3..6).
# Overlap 4*4*3 = 48 -> DSC = 2*48/(64+64) = 0.75.
# Pred boundary (56 voxels):
#   - on a z- or y-face with x in 3..5: also GT boundary -> d = 0            (36 voxels)
#   - the x=6 face (16): nearest GT boundary is the x=5 face, 1 voxel away   (16 voxels, d = 1 voxel)
#   - x=3 with z, y interior (4): not GT boundary, nearest is (z, y, 2)      ( 4 voxels, d = 1 voxel)
# GT -> pred is the mirror image: 36 at 0, 20 at 1 voxel.
def test_shift_isotropic():
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (2, 2, 3), 4)
    # tau = 1 mm: all 112 boundary voxels within 1 mm -> NSD = 1.
    # HD95: 56 sorted distances = 36 zeros then 20 ones; index 0.95*55 = 52.25 -> 1 mm.
    r = one(pred, gt, tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx(1.0)
    assert r["hd95"] == pytest.approx(1.0)
    assert (r["gt_voxels"], r["pred_voxels"]) == (64, 64)
    # tau = 0.5 mm: only the zero distances count: (36 + 36) / (56 + 56) = 72/112.
    r = one(pred, gt, tol=0.5)
    assert r["nsd"] == pytest.approx(72 / 112)
    assert r["hd95"] == pytest.approx(1.0)


def test_shift_anisotropic_along_z():
    # spacing (3, 1, 1) mm, shift +1 voxel along z (pred z = 3..6) -> DSC still 0.75 (voxel counting).
    # Pred boundary:
    #   - on a y- or x-face with z in 3..5: also GT boundary -> 0 mm             (36)
    #   - the z=6 face: nearest GT boundary is z=5, 1 slice = 3 mm away         (16)
    #   - z=3 with y, x interior (4): (3, y, x) is not GT boundary; (2, y, x) is 3 mm away but the GT y-face
    #     voxel (3, 2, x) or (3, 5, x) is only 1 mm away (y in {3, 4})          ( 4 at 1 mm)
    # GT -> pred mirrors it: z=2 face 16 at 3 mm, z=5 with y, x interior 4 at 1 mm, 36 at 0.
    # NSD(1 mm) = (40 + 40) / 112 = 80/112; NSD(3 mm) = 1.
    # HD95: sorted = 36 x 0, 4 x 1, 16 x 3; index 52.25 lies in the 3s -> 3 mm.
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)
    r = one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx(80 / 112)
    assert r["hd95"] == pytest.approx(3.0)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=3.0)["nsd"] == pytest.approx(1.0)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=2.9)["nsd"] == pytest.approx(80 / 112)


def test_shift_anisotropic_along_x():
    # spacing (3, 1, 1) mm, shift +1 voxel along x: the same voxel distances as the isotropic test, and the
    # x step is 1 mm, so NSD(1 mm) = 1, NSD(0.5 mm) = 72/112 and HD95 = 1 mm.
    # (A nearest-voxel search in index units would be right here but wrong for the z shift above.)
    gt = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (2, 2, 3), 4)
    r = one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=1.0)
    assert r["dsc"] == pytest.approx(0.75)
    assert r["nsd"] == pytest.approx(1.0)
    assert r["hd95"] == pytest.approx(1.0)
    assert one(pred, gt, spacing=(3.0, 1.0, 1.0), tol=0.5)["nsd"] == pytest.approx(72 / 112)


def test_tolerance_equal_to_non_dyadic_spacing_counts():
    # Shift by one voxel along x with x spacing 0.7 mm: every distance is 0 or 0.7 mm. In floating point
    # 5 * 0.7 - 4 * 0.7 > 0.7 (rounding), so some computed distances are 0.7 + 1e-16; they must still count
    # as d <= tau for tau = 0.7 mm -> NSD 1; HD95 = 0.7.
    assert 5 * 0.7 - 4 * 0.7 > 0.7
    gt = cube((10, 10, 10), (2, 2, 1), 4)
    pred = cube((10, 10, 10), (2, 2, 2), 4)
    r = one(pred, gt, spacing=(2.0, 0.7, 0.7), tol=0.7)
    assert r["nsd"] == 1.0
    assert r["hd95"] == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------- far voxel
def test_single_voxel_far_from_blob():
    # GT = 3-cube at [1:4] (boundary: 26 voxels, all but the centre (2, 2, 2)); pred = one voxel at
    # (2, 2, 15), 1 mm isotropic. DSC = 0. NSD(1 mm) = 0 (no distance is <= 1 mm).
    # pred -> GT: nearest GT boundary voxel is (2, 2, 3): 12 mm.
    # GT -> pred: d^2 = dz^2 + dy^2 + (x - 15)^2 with dz, dy in {-1, 0, 1}:
    #   x=3 (9 voxels): 144, 145 x4, 146 x4;  x=2 (8, centre excluded): 170 x4, 171 x4;
    #   x=1 (9): 196, 197 x4, 198 x4.
    #   Sorted indices 22..25 are sqrt(198); P95 index 0.95*25 = 23.75 -> sqrt(198) = 14.071 mm.
    # HD95 = max(12, sqrt(198)) = sqrt(198).
    gt = cube((5, 5, 20), (1, 1, 1), 3)
    pred = np.zeros_like(gt)
    pred[2, 2, 15] = 1
    r = one(pred, gt)
    assert r["dsc"] == 0.0
    assert r["nsd"] == 0.0
    assert r["hd95"] == pytest.approx(math.sqrt(198))
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


# ------------------------------------------------------------------------------------------- MONAI agreement
def test_matches_monai_on_random_anisotropic_masks():
    # Not a hand computation: our scipy implementation must equal MONAI's compute_surface_dice
    # (use_subvoxels=False) and compute_hausdorff_distance(percentile=95) on non-empty masks.
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    spacing = (2.5, 0.7, 0.9)
    for _ in range(4):
        gt = gaussian_filter(rng.random((14, 20, 18)), 2.0) > 0.5
        pred = gaussian_filter(rng.random((14, 20, 18)), 2.0) > 0.5
        gt[0, 0, 0] = pred[13, 19, 17] = True  # non-empty, and voxels on the volume border
        r = one(pred.astype(np.int16), gt.astype(np.int16), spacing=spacing, tol=1.3)
        p = torch.from_numpy(pred)[None, None].float()
        g = torch.from_numpy(gt)[None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nsd = float(compute_surface_dice(p, g, [1.3], include_background=True, spacing=spacing))
            hd = float(compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing))
        assert r["nsd"] == pytest.approx(nsd, abs=1e-6)
        assert r["hd95"] == pytest.approx(hd, rel=1e-5)


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
