"""Data pipeline: nnU-Net v2 raw datasets, preprocessing and its inverse, splits, patch sampling, augmentation."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medadapt.data import preprocessing as pp
from medadapt.data.augmentation import Augmentation
from medadapt.data.dataset import RawDataset, find_images
from medadapt.data.io import Volume, affine_from_spacing, read_image, read_label, write_volume
from medadapt.data.cache import CachedCase, preprocess_dataset, sample_class_locations
from medadapt.data.preprocessing import (
    IntensityProperties, PreprocessingPlan, compute_intensity_properties, normalize, plan_from_dataset,
    preprocess_case, revert_prediction,
)
from medadapt.data.resampling import resample, resample_to_shape
from medadapt.data.sampling import PatchSampler
from medadapt.data.splits import draw_shots, train_test_split
from medadapt.errors import MedadaptError

SHAPE = (8, 12, 10)  # z, y, x
SPACING = (2.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ helpers
def _case_arrays(i: int, shape=SHAPE, num_labels=2):
    rng = np.random.default_rng(i)
    img = rng.normal(40, 20, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    z, y, x = (s // 2 for s in shape)
    lab[z - 2:z + 2, y - 3:y + 2, x - 2:x + 3] = 1
    img[lab == 1] += 100
    if num_labels > 2:
        lab[0:2, 0:3, 0:3] = 2
    return img, lab


def make_dataset(root: Path, n: int = 4, channels=("CT",), labels=None, shape=SHAPE, spacing=SPACING,
                 affine=None) -> Path:
    labels = labels or {"background": 0, "node": 1}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    aff = affine if affine is not None else affine_from_spacing(spacing, origin_xyz=(-10.0, 5.0, 3.0))
    for i in range(n):
        img, lab = _case_arrays(i, shape, num_labels=len(labels))
        for c in range(len(channels)):
            write_volume(img + 10 * c, aff, root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", dtype=np.float32)
        write_volume(lab, aff, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {"channel_names": {str(c): name for c, name in enumerate(channels)}, "labels": labels,
            "numTraining": n, "file_ending": ".nii.gz", "name": "Tiny"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(MedadaptError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "user errors are one line"
    return msg


# ------------------------------------------------------------------------------------------------ dataset
def test_load_valid_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3, channels=("CT", "PET"), labels={"background": 0, "a": 1, "b": 2})
    ds = RawDataset.load(root)
    assert ds.name == "Tiny" and ds.root == root
    assert ds.case_ids == ["case_000", "case_001", "case_002"]
    assert ds.num_channels == 2 and ds.num_classes == 3 and ds.file_ending == ".nii.gz"
    assert ds.labels == {"background": 0, "a": 1, "b": 2}
    assert [p.name for p in ds.image_paths("case_001")] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert ds.label_path("case_001").name == "case_001.nii.gz"
    images, label = ds.load_case("case_001")
    assert len(images) == 2 and images[0].array.shape == SHAPE and images[0].array.dtype == np.float32
    assert label.array.dtype == np.int16 and set(np.unique(label.array)) == {0, 1, 2}
    assert np.allclose(images[0].spacing, SPACING)


def test_missing_dataset_json(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "dataset.json").unlink()
    assert "dataset.json" in _err(RawDataset.load, root)
    assert "nope" in _err(RawDataset.load, tmp_path / "nope")


@pytest.mark.parametrize("edit, expect", [
    ("not json {", "not valid JSON"),
    ({"labels": {"background": 0, "node": 2}}, "consecutive"),
    ({"labels": {"background": 0, "node": [1, 2]}}, "not supported"),
    ({"labels": {"0": "background", "1": "node"}}, "v1"),
    ({"file_ending": ".mha"}, "file_ending"),
    ({"channel_names": {}}, "channel_names"),
    ({"numTraining": 7}, "numTraining"),
])
def test_malformed_dataset_json(tmp_path, edit, expect):
    root = make_dataset(tmp_path / "ds")
    djson = root / "dataset.json"
    if isinstance(edit, str):
        djson.write_text(edit)
    else:
        meta = json.loads(djson.read_text())
        meta.update(edit)
        djson.write_text(json.dumps(meta))
    msg = _err(RawDataset.load, root)
    assert "dataset.json" in msg and expect in msg


def test_missing_label_image_channel_and_folders(tmp_path):
    root = make_dataset(tmp_path / "a")
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    msg = _err(RawDataset.load, root)
    assert "case_001_0000.nii.gz" in msg and "case_001.nii.gz" in msg

    root = make_dataset(tmp_path / "b")
    (root / "imagesTr" / "case_002_0000.nii.gz").unlink()
    assert "case_002.nii.gz" in _err(RawDataset.load, root)

    root = make_dataset(tmp_path / "c", channels=("CT", "PET"))
    (root / "imagesTr" / "case_000_0001.nii.gz").unlink()
    assert "case_000_0001.nii.gz" in _err(RawDataset.load, root)

    root = make_dataset(tmp_path / "d")
    os.rename(root / "imagesTr" / "case_000_0000.nii.gz", root / "imagesTr" / "case_000.nii.gz")
    assert "case_000.nii.gz" in _err(RawDataset.load, root)

    root = make_dataset(tmp_path / "e")
    for p in (root / "labelsTr").iterdir():
        p.unlink()
    (root / "labelsTr").rmdir()
    assert "labelsTr" in _err(RawDataset.load, root)


def _overwrite_label(root: Path, case: str, array, affine):
    write_volume(array, affine, root / "labelsTr" / f"{case}.nii.gz")


def test_mismatched_shape_and_geometry(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = RawDataset.load(root)
    aff = affine_from_spacing(SPACING, origin_xyz=(-10.0, 5.0, 3.0))
    _, lab = _case_arrays(0)

    _overwrite_label(root, "case_000", np.zeros((8, 12, 11), np.uint8), aff)
    msg = _err(ds.load_case, "case_000")
    assert "case_000.nii.gz" in msg and "shape" in msg

    _overwrite_label(root, "case_000", lab, affine_from_spacing((2.0, 1.0, 1.2), origin_xyz=(-10.0, 5.0, 3.0)))
    msg = _err(ds.load_case, "case_000")
    assert "case_000.nii.gz" in msg and "spacing" in msg

    _overwrite_label(root, "case_000", lab, affine_from_spacing(SPACING, origin_xyz=(-10.0, 5.5, 3.0)))
    msg = _err(ds.load_case, "case_000")
    assert "case_000.nii.gz" in msg and "origin" in msg

    flipped = aff.copy()
    flipped[0, :] *= -1
    flipped[0, 3] = -10.0
    _overwrite_label(root, "case_000", lab, flipped)
    assert "case_000.nii.gz" in _err(ds.load_case, "case_000")

    # tiny header noise (float32 rounding) is accepted
    noisy = aff.copy()
    noisy[:3, 3] += 2e-4
    _overwrite_label(root, "case_000", lab, noisy)
    ds.load_case("case_000")


def test_geometry_mismatch_between_channels(tmp_path):
    root = make_dataset(tmp_path / "ds", channels=("CT", "PET"))
    img, _ = _case_arrays(1)
    write_volume(img, affine_from_spacing(SPACING, origin_xyz=(0.0, 0.0, 0.0)),
                 root / "imagesTr" / "case_001_0001.nii.gz", dtype=np.float32)
    msg = _err(RawDataset.load(root).load_case, "case_001")
    assert "case_001_0001.nii.gz" in msg and "origin" in msg


def test_label_values_not_in_dataset_json(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _, lab = _case_arrays(2)
    lab[0, 0, 0] = 3
    _overwrite_label(root, "case_002", lab, affine_from_spacing(SPACING, origin_xyz=(-10.0, 5.0, 3.0)))
    msg = _err(RawDataset.load(root).load_case, "case_002")
    assert "case_002.nii.gz" in msg and "[3]" in msg


def test_non3d_and_nan_images(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ds = RawDataset.load(root)
    p4 = root / "imagesTr" / "case_000_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 8, 2), np.float32), np.eye(4)), str(p4))
    assert "case_000_0000.nii.gz" in _err(ds.load_case, "case_000")

    img, _ = _case_arrays(1)
    img[1, 2, 3] = np.nan
    write_volume(img, affine_from_spacing(SPACING, origin_xyz=(-10.0, 5.0, 3.0)),
                 root / "imagesTr" / "case_001_0000.nii.gz", dtype=np.float32)
    msg = _err(ds.load_case, "case_001")
    assert "case_001_0000.nii.gz" in msg and "NaN" in msg


def test_find_images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    aff = affine_from_spacing(SPACING)
    img, _ = _case_arrays(0)
    for name in ("b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "b_0001.nii.gz"):
        write_volume(img, aff, folder / name, dtype=np.float32)
    found = find_images(folder, num_channels=2)
    assert [c for c, _ in found] == ["a", "b"]
    assert [p.name for p in found[0][1]] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert find_images(folder / "a_0000.nii.gz", num_channels=2)[0][1][1].name == "a_0001.nii.gz"
    assert find_images(folder / "b_0000.nii.gz") == [("b", [folder / "b_0000.nii.gz"])]
    (folder / "b_0001.nii.gz").unlink()
    assert "b_0001.nii.gz" in _err(find_images, folder, num_channels=2)
    single = tmp_path / "single"
    single.mkdir()
    write_volume(img, aff, single / "scan.nii.gz", dtype=np.float32)
    assert find_images(single) == [("scan", [single / "scan.nii.gz"])]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _err(find_images, empty)


# ------------------------------------------------------------------------------------------------ normalization
def test_ct_normalization_by_hand():
    props = IntensityProperties(mean=50.0, std=25.0, percentile_00_5=-100.0, percentile_99_5=200.0,
                                min=-500.0, max=900.0, median=40.0)
    x = np.array([[[-1000.0, 0.0, 50.0, 100.0, 3000.0]]], dtype=np.float32)
    out = normalize(x, "CT", props)
    np.testing.assert_allclose(out, [[[-6.0, -2.0, 0.0, 2.0, 6.0]]], rtol=1e-6)
    assert out.dtype == np.float32 and x[0, 0, 0] == -1000.0  # input untouched
    z = normalize(np.arange(10, dtype=np.float32).reshape(1, 2, 5), "ZScore", None)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    assert np.all(normalize(np.full((2, 2, 2), 7.0), "ZScore", None) == 0)  # std 0 -> no division by 0


def test_unknown_normalization_scheme(tmp_path):
    assert "normalization" in _err(normalize, np.zeros((2, 2, 2)), "minmax", None)
    assert "'minmax'" in _err(normalize, np.zeros((2, 2, 2)), "minmax", None)
    ds = RawDataset.load(make_dataset(tmp_path / "ds", n=2))
    assert "normalization" in _err(plan_from_dataset, ds, ds.case_ids, normalization=["bogus"], progress=False)
    assert "normalization" in _err(plan_from_dataset, ds, ds.case_ids, normalization=["CT", "CT"], progress=False)


def test_intensity_properties():
    imgs = [np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.full((3, 3, 3), 100.0, np.float32)]
    labs = [np.zeros((3, 3, 3), np.int16), np.zeros((3, 3, 3), np.int16)]
    labs[0][0] = 1  # values 0..8
    labs[1][0, 0, 0] = 2  # value 100
    p = compute_intensity_properties(imgs, labs)
    fg = np.array(list(range(9)) + [100.0])
    assert p.mean == pytest.approx(fg.mean()) and p.std == pytest.approx(fg.std())
    assert p.median == pytest.approx(np.median(fg)) and p.min == 0 and p.max == 100
    assert p.percentile_99_5 == pytest.approx(np.percentile(fg, 99.5))
    assert IntensityProperties.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # sampling caps each case at num_samples voxels, deterministically for a seed
    big = [np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)]
    lab = [np.ones((20, 20, 20), np.int16)]
    a = compute_intensity_properties(big, lab, num_samples=100, seed=1)
    assert a == compute_intensity_properties(big, lab, num_samples=100, seed=1)
    assert a != compute_intensity_properties(big, lab, num_samples=100, seed=2)
    with pytest.raises(MedadaptError):
        compute_intensity_properties(imgs, [np.zeros((3, 3, 3))] * 2)


# ------------------------------------------------------------------------------------------------ resampling
def test_resample_shapes_and_labels():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(10, 20, 30)).astype(np.float32)
    out = resample(img, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), is_label=False)
    assert out.shape == (20, 20, 30) and out.dtype == np.float32
    assert resample(img, (1.0, 0.7, 0.7), (1.5, 1.0, 1.0), is_label=False).shape == (7, 14, 21)
    same = resample(img, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), is_label=False)
    np.testing.assert_array_equal(same, img)

    lab = np.zeros((10, 20, 30), np.int16)
    lab[2:8, 4:16, 5:25] = 1
    lab[4:6, 8:12, 10:20] = 2
    for spacing, target in [((2.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((1.0, 1.0, 1.0), (1.5, 2.0, 2.0)),
                            ((5.0, 1.0, 1.0), (2.5, 0.8, 0.8))]:  # the last is anisotropic (separate z)
        r = resample(lab, spacing, target, is_label=True)
        assert r.dtype == np.int16
        assert set(np.unique(r)) == {0, 1, 2}
        ratio = np.prod(spacing) / np.prod(target)
        for v in (1, 2):
            assert abs((r == v).sum() / ratio - (lab == v).sum()) / (lab == v).sum() < 0.3
    # anisotropic images: nearest along the low-res axis keeps slices intact
    r = resample(img, (5.0, 1.0, 1.0), (2.5, 1.0, 1.0), is_label=False)
    np.testing.assert_allclose(r[0], img[0], atol=1e-5)
    np.testing.assert_allclose(r[1], img[0], atol=1e-5)

    probs = torch.rand(3, 5, 6, 7)
    assert resample_to_shape(probs, (10, 12, 14)).shape == (3, 10, 12, 14)
    assert resample_to_shape(probs.numpy(), (5, 6, 7)).shape == (3, 5, 6, 7)


def test_fullres_target_spacing_anisotropy_rule():
    spacings = [(5.0, 0.8, 0.8), (5.0, 0.7, 0.7), (2.5, 0.8, 0.8), (1.25, 0.7, 0.7), (5.0, 0.9, 0.9)]
    shapes = [(40, 512, 512)] * 5
    t = pp.fullres_target_spacing(spacings, shapes)
    assert t[1:] == (0.8, 0.8)
    assert t[0] == pytest.approx(np.percentile([5.0, 5.0, 2.5, 1.25, 5.0], 10))
    # not anisotropic: plain median
    assert pp.fullres_target_spacing([(1, 1, 1), (2, 1, 1), (3, 1, 1)], [(100, 100, 100)] * 3) == (2.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ orientation
def _one_hot(seg: np.ndarray, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(seg.astype(np.int64)), n).permute(3, 0, 1, 2).float()


def _vol(array, affine) -> Volume:
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return Volume(array, (float(zooms[2]), float(zooms[1]), float(zooms[0])), affine)


@pytest.mark.parametrize("kind", ["LPS", "permuted"])
def test_orientation_round_trip(kind, tmp_path):
    rng = np.random.default_rng(0)
    shape = (6, 9, 11)  # z, y, x = voxel axes k, j, i
    if kind == "LPS":
        aff = np.diag([-0.8, -0.9, 2.0, 1.0])
        aff[:3, 3] = (40.0, 30.0, -12.0)
    else:  # voxel axis i -> A (flipped), j -> S, k -> R: axis codes "PSR"
        aff = np.zeros((4, 4))
        aff[1, 0], aff[2, 1], aff[0, 2], aff[3, 3] = -0.8, 1.5, 0.9, 1.0
        aff[:3, 3] = (5.0, 6.0, 7.0)
    # go through a file so that io's conventions are exercised too
    lab_arr = rng.integers(0, 3, size=shape).astype(np.uint8)
    write_volume(lab_arr, aff, tmp_path / "lab.nii.gz")
    write_volume(rng.normal(size=shape).astype(np.float32), aff, tmp_path / "img.nii.gz", dtype=np.float32)
    label, image = read_label(tmp_path / "lab.nii.gz"), read_image(tmp_path / "img.nii.gz")
    assert image.orientation != "RAS"

    arr, spacing, new_aff = pp.reorient(label, "RAS")
    assert "".join(nib.aff2axcodes(new_aff)) == "RAS"
    np.testing.assert_allclose(spacing[::-1], np.linalg.norm(new_aff[:3, :3], axis=0), rtol=1e-5)
    # every voxel keeps its world position: sample a few
    for k, j, i in [(0, 0, 0), (5, 8, 10), (2, 3, 4)]:
        world = label.affine @ np.array([i, j, k, 1.0])
        ni, nj, nk = np.round(np.linalg.solve(new_aff, world)[:3]).astype(int)
        assert arr[nk, nj, ni] == label.array[k, j, i]

    plan = PreprocessingPlan(target_spacing=spacing, normalization=["ZScore"], intensity_properties=[None],
                             orientation="RAS")
    pre = preprocess_case([image], label, plan)
    assert pre.data.shape == (1, *arr.shape) and pre.seg.dtype == np.int16
    np.testing.assert_array_equal(pre.seg, arr)
    back = revert_prediction(_one_hot(pre.seg, 3), pre.properties)
    np.testing.assert_array_equal(back, label.array)  # exact without resampling
    json.dumps(pre.properties)  # JSON-friendly

    # with resampling the round trip is approximate (blocky labels survive)
    block = np.zeros(shape, np.uint8)
    block[1:5, 2:8, 3:9] = 1
    lab2 = Volume(block.astype(np.int16), label.spacing, label.affine)
    plan2 = PreprocessingPlan(target_spacing=tuple(s / 2 for s in spacing), normalization=["ZScore"],
                              intensity_properties=[None], orientation="RAS")
    pre2 = preprocess_case([image], lab2, plan2)
    assert pre2.seg.shape == tuple(2 * s for s in arr.shape)
    back2 = revert_prediction(_one_hot(pre2.seg, 2), pre2.properties)
    np.testing.assert_array_equal(back2, block)


# ------------------------------------------------------------------------------------------------ plan and cache
def test_plan_from_dataset(tmp_path):
    ds = RawDataset.load(make_dataset(tmp_path / "ds", n=3))
    plan = plan_from_dataset(ds, ds.case_ids, progress=False)
    assert plan.normalization == ["CT"] and plan.orientation == "RAS"
    assert plan.target_spacing == pytest.approx(SPACING)
    props = plan.intensity_properties[0]
    fg = []
    for c in ds.case_ids:
        (img,), lab = ds.load_case(c)
        fg.append(img.array[lab.array > 0])
    fg = np.concatenate(fg)  # fewer than 10,000 per case: all voxels are used
    assert props.mean == pytest.approx(fg.mean(), rel=1e-5) and props.std == pytest.approx(fg.std(), rel=1e-4)
    again = PreprocessingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.key() == plan.key()
    zs = plan_from_dataset(ds, ds.case_ids, normalization=["zscorenormalization"], progress=False)
    assert zs.normalization == ["ZScore"] and zs.intensity_properties == [None] and zs.key() != plan.key()


def test_cache_reuse(tmp_path, monkeypatch):
    ds = RawDataset.load(make_dataset(tmp_path / "ds", n=3, labels={"background": 0, "a": 1, "b": 2}))
    plan = plan_from_dataset(ds, ds.case_ids[:2], progress=False)
    cache = tmp_path / "cache"
    cases = preprocess_dataset(ds, ds.case_ids, plan, cache, progress=False)
    assert [c.case_id for c in cases] == ds.case_ids
    c0 = cases[0]
    assert isinstance(c0, CachedCase) and c0.data_path.parent.name == f"plan_{plan.key()}"
    assert c0.data.dtype == np.float32 and c0.data.shape == (1, *SHAPE) and isinstance(c0.data, np.memmap)
    assert c0.seg.dtype == np.int16 and c0.seg.shape == SHAPE
    assert set(c0.class_locations) == {1, 2}
    locs = c0.class_locations[1]
    assert locs.shape[1] == 3 and np.all(np.asarray(c0.seg)[tuple(locs.T)] == 1)
    assert c0.channel_min == [pytest.approx(float(np.min(c0.data)))]
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def boom(*a, **k):
        raise AssertionError("cached case was preprocessed again")

    monkeypatch.setattr(pp, "preprocess_case", boom)
    again = preprocess_dataset(ds, ds.case_ids, plan, cache, progress=False)
    assert [c.case_id for c in again] == ds.case_ids
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    np.testing.assert_array_equal(again[1].data, cases[1].data)
    monkeypatch.undo()

    other = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.0), normalization=["ZScore"], intensity_properties=[None],
                              orientation="RAS")
    third = preprocess_dataset(ds, ds.case_ids[:1], other, cache, progress=False)
    assert third[0].folder != c0.folder and third[0].data.shape == (1, 16, 12, 10)
    clone = pickle.loads(pickle.dumps(c0))
    np.testing.assert_array_equal(clone.seg, c0.seg)


# ------------------------------------------------------------------------------------------------ splits
def test_splits_deterministic_and_sizes():
    ids = [f"case_{i:02d}" for i in range(10)]
    train, test = train_test_split(ids, seed=3)
    assert len(test) == 2 and len(train) == 8 and not set(train) & set(test) and set(train) | set(test) == set(ids)
    assert (train, test) == train_test_split(list(reversed(ids)), seed=3)
    assert train_test_split(ids, seed=4) != (train, test)
    sizes = [len(train_test_split([f"c{i}" for i in range(n)])[1]) for n in (1, 2, 3, 5, 7, 13, 20)]
    assert sizes == [0, 1, 1, 1, 1, 3, 4]


def test_draw_shots_nested_and_errors():
    train = [f"c{i}" for i in range(12)]
    s3, s5, s10 = (draw_shots(train, k, seed=7) for k in (3, 5, 10))
    assert s5[:3] == s3 and s10[:5] == s5 and len(set(s10)) == 10
    assert draw_shots(list(reversed(train)), 5, seed=7) == s5
    assert draw_shots(train, 5, seed=8) != s5
    msg = _err(draw_shots, train, 13, seed=0)
    assert "--shots" in msg and "12" in msg
    assert "--shots" in _err(draw_shots, train, 0, seed=0)


# ------------------------------------------------------------------------------------------------ sampling
class _Case:
    def __init__(self, shape=(20, 30, 40), seed=0, fg=True):
        rng = np.random.default_rng(seed)
        self.data = rng.normal(size=(1, *shape)).astype(np.float32)
        self.seg = np.zeros(shape, np.int16)
        if fg:
            self.seg[3:5, 25:28, 2:4] = 1  # small, near a corner
            self.seg[15:17, 4:6, 35:38] = 2
        self.class_locations = sample_class_locations(self.seg, [1, 2])


def test_patch_sampler_shapes_and_reproducibility():
    cases = [_Case(seed=0), _Case(shape=(8, 10, 12), seed=1)]  # the second is smaller than the patch
    aug = Augmentation((16, 24, 24), p_rotation=0.5, p_scaling=0.5)
    s = PatchSampler(cases, (16, 24, 24), batch_size=3, augmentation=aug)
    b = s.sample(np.random.default_rng(5))
    assert b["image"].shape == (3, 1, 16, 24, 24) and b["image"].dtype == torch.float32
    assert b["label"].shape == (3, 1, 16, 24, 24) and b["label"].dtype == torch.int64
    for _ in range(5):
        b2 = s.sample(np.random.default_rng(5))
        assert torch.equal(b["image"], b2["image"]) and torch.equal(b["label"], b2["label"])
    b3 = PatchSampler(cases, (16, 24, 24), 3, augmentation=aug).sample(np.random.default_rng(6))
    assert not torch.equal(b["image"], b3["image"])


def test_forced_foreground_and_padding():
    s = PatchSampler([_Case(seed=2)], (8, 8, 8), batch_size=2, oversample_foreground=0.33)
    assert [s.force_foreground(j) for j in range(2)] == [False, True]
    s3 = PatchSampler([_Case()], (8, 8, 8), batch_size=3, oversample_foreground=0.33)
    assert [s3.force_foreground(j) for j in range(3)] == [False, False, True]
    rng = np.random.default_rng(0)
    for _ in range(30):
        b = s.sample(rng)
        assert b["label"][1].sum() > 0  # forced-foreground sample
    # a case smaller than the patch is centred and padded with its minimum / label 0
    small = _Case(shape=(4, 5, 6), seed=3)
    small.seg[:] = 1
    small.class_locations = sample_class_locations(small.seg, [1])
    b = PatchSampler([small], (8, 9, 10), batch_size=1).sample(np.random.default_rng(0))
    img, lab = b["image"][0, 0], b["label"][0, 0]
    assert int(lab.sum()) == 4 * 5 * 6
    assert float(img[0, 0, 0]) == pytest.approx(float(small.data.min()))
    assert float(img[lab == 0].max()) == pytest.approx(float(small.data.min()))


# ------------------------------------------------------------------------------------------------ augmentation
def test_augmentation_shapes_labels_identity():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(2, 20, 30, 30)).astype(np.float32))
    label = torch.zeros(1, 20, 30, 30, dtype=torch.int64)
    label[0, 5:15, 8:20, 10:22] = 1
    label[0, 8:12, 12:16, 12:18] = 3
    ident = Augmentation.identity((12, 16, 16))
    out_img, out_lab = ident(image, label, np.random.default_rng(1))
    assert torch.equal(out_img, image[:, 4:16, 7:23, 7:23]) and torch.equal(out_lab, label[:, 4:16, 7:23, 7:23])

    full = Augmentation((12, 16, 16), p_rotation=1, p_scaling=1, p_noise=1, p_blur=1, p_blur_per_channel=1,
                        p_brightness=1, p_contrast=1, p_lowres=1, p_lowres_per_channel=1, p_gamma=1,
                        p_inverted_gamma=1)
    for seed in range(4):
        oi, ol = full(image, label, np.random.default_rng(seed))
        assert oi.shape == (2, 12, 16, 16) and ol.shape == (1, 12, 16, 16)
        assert oi.dtype == torch.float32 and ol.dtype == torch.int64 and torch.isfinite(oi).all()
        assert set(torch.unique(ol).tolist()) <= {0, 1, 3}
    lin = Augmentation((12, 16, 16), p_rotation=1, label_interpolation="linear")
    assert set(torch.unique(lin(image, label, rng)[1]).tolist()) <= {0, 1, 3}

    # mirroring moves image and label together
    mirror = Augmentation((20, 30, 30), p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0,
                          p_contrast=0, p_lowres=0, p_gamma=0, p_inverted_gamma=0, p_mirror=1.0)
    mi, ml = mirror(label.float(), label, rng)
    assert torch.equal(mi, ml.float()) and torch.equal(ml, label.flip([1, 2, 3]))
    # a 90-degree rotation about z moves image and label together too
    rot = Augmentation((20, 30, 30), rotation_deg=90, p_rotation=1, p_scaling=0, p_noise=0, p_blur=0,
                       p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=0, p_inverted_gamma=0, p_mirror=0)
    m = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)  # out (z, y, x) reads in (z, 29 - x, y)
    ri, rl = rot.apply(label.float(), label, m, [9.5, 14.5, 14.5], rng)
    assert torch.equal(ri.round().long(), rl) and torch.equal(rl, label.flip(2).transpose(2, 3))


def test_augmentation_input_size_and_errors():
    aug = Augmentation((32, 64, 64))
    z, y, x = aug.input_size
    assert z > 32 and y > 64 and x > 64
    assert Augmentation((8, 128, 128)).dummy_2d and Augmentation((8, 128, 128)).input_size[0] == 8
    with pytest.raises(MedadaptError):
        Augmentation((32, 64))
    with pytest.raises(MedadaptError):
        PatchSampler([_Case()], (8, 8, 8), 2, augmentation=Augmentation((16, 16, 16)))
