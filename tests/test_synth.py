"""Synthetic CT generator: specs, determinism, nnU-Net layout, HU plausibility, annotation policy."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from medadapt.data.io import read_image, read_label
from medadapt.errors import MedadaptError
from medadapt.synth import DomainSpec, builtin_domains, generate_case, load_domain, write_dataset
from medadapt.synth.canvas import TISSUE_CLASSES as T
from medadapt.synth.dataset import provenance
from medadapt.synth.spec import DOMAINS_DIR

NODE_KEYS = {"centre_mm", "centre_voxel", "axes_mm", "long_axis_mm", "short_axis_mm", "orientation", "hu",
             "necrotic", "necrotic_hu", "station", "eligible", "annotated", "label_voxels"}


@pytest.fixture(scope="module")
def hn_cases():
    spec = load_domain("hn-source")
    return [generate_case(spec, seed=0, index=i) for i in range(8)]


@pytest.fixture(scope="module")
def med_cases():
    spec = load_domain("mediastinum")
    return [generate_case(spec, seed=0, index=i) for i in range(8)]


@pytest.fixture(scope="module")
def hn_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "hn6"
    write_dataset("hn-source", out, num_cases=6, seed=0, progress=False)
    return out


# ------------------------------------------------------------------------------------------------------ specs
def test_builtin_domains_load_and_round_trip():
    names = builtin_domains()
    assert {"hn-source", "hn-center-b", "mediastinum"} <= set(names)
    for name in names:
        spec = load_domain(name)
        assert isinstance(spec, DomainSpec) and spec.name == name
        assert DomainSpec.from_dict(spec.to_dict()) == spec
        assert load_domain(DOMAINS_DIR / f"{name}.yaml") == spec
        assert all(a >= 32 for a in spec.shape[:1]) and all(a >= 64 for a in spec.shape[1:])  # > a [32,64,64] patch
    src, tgt = load_domain("hn-source"), load_domain("hn-center-b")
    assert src.region == tgt.region and src.scanner != tgt.scanner
    assert src.scanner.contrast_phase == "arterial" and tgt.scanner.contrast_phase == "venous"
    med = load_domain("mediastinum")
    assert med.region == "mediastinum" and med.annotation.annotated_fraction < 1
    assert med.annotation.min_annotated_diameter_mm >= 10


def test_json_spec_and_defaults(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({"region": "mediastinum", "shape": [16, 32, 32], "scanner": {"spacing_mm": [4, 4, 4]}}))
    spec = load_domain(p)
    assert spec.name == "tiny" and spec.case_prefix == "tiny" and spec.case_id(3) == "tiny_003"
    assert spec.scanner.slice_thickness_mm == 4.0  # defaults to the z spacing
    case = generate_case(spec, seed=1, index=0)
    assert case.image.shape == (16, 32, 32) and case.case_id == "tiny_000"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name,text,key", [
    ("unknown_top.yaml", "region: head_neck\nnoise: 3\n", "'noise'"),
    ("unknown_nested.yaml", "region: head_neck\nscanner:\n  nosie_std_hu: 3\n", "scanner.nosie_std_hu"),
    ("neg_spacing.yaml", "region: head_neck\nscanner:\n  spacing_mm: [3.0, -2.0, 2.0]\n", "scanner.spacing_mm[1]"),
    ("wrong_type.yaml", "region: head_neck\nshape: big\n", "'shape'"),
    ("str_number.yaml", "region: head_neck\nscanner:\n  noise_std_hu: '10'\n", "scanner.noise_std_hu"),
    ("bool_number.yaml", "region: head_neck\nannotation:\n  annotated_fraction: true\n", "annotation.annotated_fraction"),
    ("bad_range.yml", "region: head_neck\nnodes:\n  count: [5, 2]\n", "nodes.count"),
    ("bad_choice.yaml", "region: head_neck\nscanner:\n  contrast_phase: portal\n", "scanner.contrast_phase"),
    ("bad_region.json", '{"region": "thorax"}', "'region'"),
    ("no_region.yaml", "name: x\n", "'region'"),
    ("not_mapping.yaml", "region: head_neck\nscanner: 3\n", "'scanner'"),
    ("bad_prefix.yaml", "region: head_neck\ncase_prefix: 'a b'\n", "case_prefix"),
])
def test_bad_spec_names_file_and_key(tmp_path, name, text, key):
    p = _write(tmp_path, name, text)
    with pytest.raises(MedadaptError) as exc:
        load_domain(p)
    msg = str(exc.value)
    assert str(p) in msg and key in msg and "\n" not in msg


def test_bad_spec_syntax_and_missing(tmp_path):
    p = _write(tmp_path, "syntax.yaml", "region: [\n")
    with pytest.raises(MedadaptError, match="syntax.yaml.*YAML"):
        load_domain(p)
    p = _write(tmp_path, "spec.txt", "region: head_neck\n")
    with pytest.raises(MedadaptError, match=r"spec\.txt"):
        load_domain(p)
    with pytest.raises(MedadaptError, match="hn-sauce.*built-in"):
        load_domain("hn-sauce")
    with pytest.raises(MedadaptError, match="scanner.noise_std_hu"):
        load_domain("hn-source").replace(scanner={"noise_std_hu": -1})
    with pytest.raises(MedadaptError, match="seed"):
        generate_case("hn-source", seed=-1, index=0)


# ------------------------------------------------------------------------------------------------ determinism
def test_determinism_across_num_cases(hn_dataset, tmp_path):
    small = write_dataset("hn-source", tmp_path / "hn4", num_cases=4, seed=0, progress=False)
    for sub, name in (("imagesTr", "hnsource_003_0000.nii.gz"), ("labelsTr", "hnsource_003.nii.gz")):
        a, b = nib.load(str(small / sub / name)), nib.load(str(hn_dataset / sub / name))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert np.array_equal(a.affine, b.affine)
    again = generate_case("hn-source", seed=0, index=3)
    img = np.asarray(nib.load(str(small / "imagesTr" / "hnsource_003_0000.nii.gz")).dataobj).transpose(2, 1, 0)
    assert np.array_equal(img, again.image)
    assert json.loads((small / "synth_meta" / "hnsource_003.json").read_text())["nodes"] == json.loads(
        json.dumps(again.nodes))


def test_cases_differ_by_index_seed_and_domain():
    a = generate_case("hn-source", seed=0, index=0)
    b = generate_case("hn-source", seed=0, index=1)
    c = generate_case("hn-source", seed=1, index=0)
    spec = load_domain("hn-source")
    d = generate_case(spec.replace(name="hn-other"), seed=0, index=0)
    assert not np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, d.image)
    # same name, other scanner settings: same patient, different image
    e = generate_case(spec.replace(scanner={"noise_std_hu": 0.0}), seed=0, index=0)
    assert np.array_equal(a.label, e.label) and not np.array_equal(a.image, e.image)


# ------------------------------------------------------------------------------------------- nnU-Net layout
def test_dataset_layout(hn_dataset):
    spec = load_domain("hn-source")
    ds = json.loads((hn_dataset / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0, "lymph_node": 1}
    assert ds["numTraining"] == 6 and ds["file_ending"] == ".nii.gz"
    prov = ds["medadapt_synth"]
    assert prov["domain"] == "hn-source" and prov["seed"] == 0 and prov["generator_version"]
    assert prov["spec"] == json.loads(json.dumps(spec.to_dict()))
    assert not (hn_dataset / ".medadapt_synth.json").exists()
    images = sorted(p.name for p in (hn_dataset / "imagesTr").iterdir())
    labels = sorted(p.name for p in (hn_dataset / "labelsTr").iterdir())
    assert images == [f"hnsource_{i:03d}_0000.nii.gz" for i in range(6)]
    assert labels == [f"hnsource_{i:03d}.nii.gz" for i in range(6)]
    for i in (0, 5):
        img_p, lab_p = hn_dataset / "imagesTr" / images[i], hn_dataset / "labelsTr" / labels[i]
        assert nib.load(str(img_p)).get_data_dtype() == np.int16
        assert nib.load(str(lab_p)).get_data_dtype() == np.uint8
        img, lab = read_image(img_p), read_label(lab_p)
        assert img.array.shape == spec.shape == lab.array.shape
        assert np.allclose(img.spacing, spec.scanner.spacing_mm) and np.allclose(lab.spacing, spec.scanner.spacing_mm)
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), spec.scanner.spacing_mm[::-1])
        assert np.array_equal(img.affine, lab.affine)
        assert set(np.unique(lab.array).tolist()) <= set(ds["labels"].values())
        assert img.array.min() >= -1024 and img.array.max() <= 3071


def test_resume_shrink_and_refuse(tmp_path):
    out = tmp_path / "ds"
    write_dataset("hn-source", out, num_cases=3, seed=0, progress=False)
    kept = out / "imagesTr" / "hnsource_000_0000.nii.gz"
    mtime = kept.stat().st_mtime_ns
    # simulate an interrupted run: dataset.json not written yet, one case half written
    (out / "dataset.json").unlink()
    (out / ".medadapt_synth.json").write_text(json.dumps(provenance(load_domain("hn-source"), 0)))
    (out / "labelsTr" / "hnsource_002.nii.gz").unlink()
    write_dataset("hn-source", out, num_cases=3, seed=0, progress=False)
    assert kept.stat().st_mtime_ns == mtime  # finished case skipped
    lab = np.asarray(nib.load(str(out / "labelsTr" / "hnsource_002.nii.gz")).dataobj).transpose(2, 1, 0)
    assert np.array_equal(lab, generate_case("hn-source", 0, 2).label)
    assert (out / "dataset.json").is_file() and not (out / ".medadapt_synth.json").exists()
    # fewer cases: the extra case of this dataset goes
    write_dataset("hn-source", out, num_cases=2, seed=0, progress=False)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["hnsource_000.nii.gz", "hnsource_001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    # another seed / domain / spec into the same folder
    with pytest.raises(MedadaptError, match="seed"):
        write_dataset("hn-source", out, num_cases=2, seed=1, progress=False)
    with pytest.raises(MedadaptError, match="domain"):
        write_dataset("mediastinum", out, num_cases=2, seed=0, progress=False)
    with pytest.raises(MedadaptError, match="spec"):
        write_dataset(load_domain("hn-source").replace(scanner={"noise_std_hu": 1.0}), out, num_cases=2,
                      progress=False)
    # a folder with someone else's NIfTI files
    foreign = tmp_path / "foreign"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "imagesTr" / "x_0000.nii.gz").write_bytes(b"")
    with pytest.raises(MedadaptError, match="dataset.json"):
        write_dataset("hn-source", foreign, num_cases=1, progress=False)
    (foreign / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    with pytest.raises(MedadaptError, match="did not write"):
        write_dataset("hn-source", foreign, num_cases=1, progress=False)


# ------------------------------------------------------------------------------------------------ HU ranges
def _node_interior_hu(case) -> float:
    interior = binary_erosion(case.label.astype(bool), structure=np.ones((1, 3, 3), bool))
    return float(case.image[interior].mean())


def test_hu_plausible_arterial(hn_cases):
    spec = load_domain("hn-source")
    assert spec.scanner.contrast_phase == "arterial"
    for case in hn_cases[:4]:
        img, tis = case.image, case.tissue
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.spacing == spec.scanner.spacing_mm
        if (binary_erosion(case.label.astype(bool), structure=np.ones((1, 3, 3), bool))).sum() > 20:
            node = _node_interior_hu(case)
            assert 15 <= node <= 70, node
        artery = float(img[binary_erosion(tis == T["artery"])].mean()) if binary_erosion(tis == T["artery"]).any() \
            else float(img[tis == T["artery"]].mean())
        assert artery > 200
        air = img[tis == T["airway"]]
        assert air.size > 0 and float(np.median(air)) < -850
        assert float(np.median(img[tis == T["fat"]])) < -40
        assert -20 < float(np.median(img[tis == T["muscle"]])) < 90
        assert float(img[tis == T["cortical_bone"]].max()) > 500
        assert float(np.median(img[tis == T["air"]])) < -950
    node_all = np.mean([_node_interior_hu(c) for c in hn_cases if c.label.sum() > 100])
    assert 20 <= node_all <= 60
    art_all = np.mean([float(c.image[c.tissue == T["artery"]].mean()) for c in hn_cases])
    assert art_all - node_all > 150  # nodes are not vessels


def test_hu_plausible_mediastinum_venous(med_cases):
    for case in med_cases[:4]:
        img, tis = case.image, case.tissue
        lung = img[tis == T["lung"]]
        assert lung.size > 1000 and -950 < float(np.median(lung)) < -700
        assert float(np.median(img[tis == T["airway"]])) < -850
        assert float(np.median(img[binary_erosion(tis == T["artery"])])) > 110
        assert float(np.median(img[binary_erosion(tis == T["vein"])])) > 110
        assert float(np.median(img[tis == T["fat"]])) < -40


def test_scanner_calibration_noise_and_phase():
    spec = load_domain("hn-source").replace(scanner={"noise_std_hu": 0.0})
    base = generate_case(spec, 0, 0)
    shifted = generate_case(spec.replace(scanner={"hu_offset": 100.0, "hu_scale": 1.0}), 0, 0)
    body = (base.tissue == T["muscle"]) | (base.tissue == T["fat"])
    assert abs(float((shifted.image[body].astype(float) - base.image[body]).mean()) - 100) < 1
    noisy = generate_case(spec.replace(scanner={"noise_std_hu": 20.0}), 0, 0)
    diff = noisy.image[body].astype(float) - base.image[body]
    assert 18 < diff.std() < 22 and abs(diff.mean()) < 1
    plain = generate_case(spec.replace(scanner={"contrast_phase": "none"}), 0, 0)
    art = base.tissue == T["artery"]
    assert float(plain.image[art].mean()) < 100 < float(base.image[art].mean())
    sharp = generate_case(spec.replace(scanner={"blur_sigma_mm": 0.0, "slice_thickness_mm": 3.0}), 0, 0)
    thick = generate_case(spec.replace(scanner={"blur_sigma_mm": 0.0, "slice_thickness_mm": 8.0}), 0, 0)
    grad = lambda im, ax: float(np.abs(np.diff(im.astype(float), axis=ax)).mean())  # noqa: E731
    rz, rx = (grad(thick.image, a) / grad(sharp.image, a) for a in (0, 2))
    assert rz < 0.93 and rz < rx - 0.05  # thick slices blur along z, much more than in-plane


# ------------------------------------------------------------------------------------------- nodes, labels
def test_node_counts_shapes_and_necrosis(hn_cases, med_cases):
    for cases, name in ((hn_cases, "hn-source"), (med_cases, "mediastinum")):
        ns = load_domain(name).nodes
        necrotic = 0
        for case in cases:
            assert ns.count[0] <= len(case.nodes) <= ns.count[1]
            for n in case.nodes:
                assert NODE_KEYS <= set(n)
                long_, mid, short = n["axes_mm"]
                assert ns.long_axis_mm[0] - 1e-6 <= long_ <= ns.long_axis_mm[1] + 1e-6
                assert long_ >= mid >= short >= long_ * ns.short_to_long[0] - 1e-3
                assert ns.hu[0] <= n["hu"] <= ns.hu[1]
                if n["necrotic"]:
                    necrotic += 1
                    assert long_ >= ns.necrotic_min_long_axis_mm
                    assert ns.necrotic_hu[0] <= n["necrotic_hu"] <= ns.necrotic_hu[1]
                idx = np.round(n["centre_voxel"]).astype(int)
                assert np.all(idx >= 0) and np.all(idx < np.asarray(case.image.shape))
        assert necrotic > 0, name
    # nodes sit at several stations, on both sides
    stations = {n["station"] for c in hn_cases for n in c.nodes}
    assert len(stations) >= 6 and any(s.endswith("R") for s in stations) and any(s.endswith("L") for s in stations)


def test_full_annotation_policy(hn_cases):
    for case in hn_cases:
        assert all(n["annotated"] and n["label_voxels"] >= 1 for n in case.nodes)
        assert case.label.any() == bool(case.nodes)
        on = case.label.astype(bool)
        assert (case.tissue[on] == T["lymph_node"]).mean() > 0.9


def test_partial_annotation_policy(med_cases):
    spec = load_domain("mediastinum")
    ann = spec.annotation
    nodes = [n for c in med_cases for n in c.nodes]
    small = [n for n in nodes if n["short_axis_mm"] < ann.min_annotated_diameter_mm]
    assert small and not any(n["annotated"] for n in small) and not any(n["eligible"] for n in small)
    eligible = [n for n in nodes if n["eligible"]]
    assert all(n["short_axis_mm"] >= ann.min_annotated_diameter_mm for n in eligible)
    frac = np.mean([n["annotated"] for n in eligible])
    assert len(eligible) >= 20 and abs(frac - ann.annotated_fraction) < 0.2, (len(eligible), frac)
    assert any(n["eligible"] and not n["annotated"] for n in nodes)
    for case in med_cases:
        n_lab = sum(n["annotated"] for n in case.nodes)
        assert case.label.any() == (n_lab > 0)
        # unlabelled nodes are in the image (node tissue) but not in the label
        unl = (case.tissue == T["lymph_node"]) & (case.label == 0)
        if any(not n["annotated"] and n["long_axis_mm"] > 8 for n in case.nodes):
            assert unl.any()
        # every labelled voxel belongs to a node
        assert (case.tissue[case.label.astype(bool)] == T["lymph_node"]).mean() > 0.95
