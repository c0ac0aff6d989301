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


# ================================================================================== multi-structure cohorts
import hashlib  # noqa: E402

from scipy import ndimage  # noqa: E402

from medadapt.data.dataset import RawDataset  # noqa: E402
from medadapt.synth import STRUCTURES, load_assembly, load_task_stream, structures_of  # noqa: E402

LYMPH_ONLY = ("hn-source", "hn-center-b", "mediastinum")
MULTI = [n for n in builtin_domains() if n not in LYMPH_ONLY]

# sha256[:16] of the image, label and tissue arrays and of the node list (json) of lymph-node-only built-ins,
# computed with the generator *before* structure labels existed (commit 49775c4) and checked again against a
# pristine export of that commit: adding the structure map and the labels map must not change them by one bit.
# (They depend on numpy/scipy: regenerate them from 49775c4 if a dependency upgrade changes the floats.)
_BEFORE = {
    ("hn-source", "full", 0): ("f2aac0e4cf33968e", "0481653bfa1d0e26", "b28cde0d0eec732f", "9f9ece998bd308c2"),
    ("hn-source", "half", 0): ("4b34d1b3e5a4bc29", "33b0826cbaf93d6f", "c6a4ac4237d549b3", "87db9c7686dccb53"),
    ("hn-source", "half", 1): ("ffe7b4fdaa95edad", "bb15ce6334076fac", "28429a8cecd69327", "524799518f2423a3"),
    ("hn-center-b", "full", 0): ("7ad5325e0b60d028", "fb616107779e3142", "cb2bdec1452918ec", "99c5aea3d28f71e5"),
    ("hn-center-b", "half", 0): ("55d1f954e06079b0", "af842566775043d2", "771c55f0f98f0845", "e642862836a89e50"),
    ("hn-center-b", "half", 1): ("a6b08d761fba94fc", "efbfc1d2b6fcc765", "0750049e40bcbdbc", "546da23af8218c32"),
    ("mediastinum", "full", 0): ("911bcc43dca377ec", "8441ff937949e183", "3c267aea139cc8c1", "6a3eaacb563b9f24"),
    ("mediastinum", "half", 0): ("81dc4dec2af1dd07", "c76677fcb12f91a2", "6b9be974c384afc9", "823b33ded272b1e2"),
    ("mediastinum", "half", 1): ("2f94035583d96856", "638c1a076d447307", "9b7624b32a5801fe", "224148313f9365c4"),
}
# sha256[:16] of json.dumps(provenance(spec, 0), sort_keys=True), full and half size, same origin: the
# dataset.json provenance (and so resuming and the benchmark's cache keys) of the old domains is unchanged.
_PROV_BEFORE = {"hn-source": ("778e35147b30157d", "13093a0aa508c54f"),
                "hn-center-b": ("e84a5f9c4b87cada", "e94ebeda0611f813"),
                "mediastinum": ("b253e6cbb202d02f", "dd98cfb4f2e3032c")}


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", LYMPH_ONLY)
def test_existing_domains_unchanged_bit_for_bit(name):
    spec = load_domain(name)
    assert spec.labels is None and "labels" not in spec.to_dict()
    assert spec.dataset_labels == {"background": 0, "lymph_node": 1}
    for (dom, size, index), want in _BEFORE.items():
        if dom != name:
            continue
        case = generate_case(spec if size == "full" else spec.downsampled(2), seed=0, index=index)
        got = (_sha(case.image), _sha(case.label), _sha(case.tissue),
               hashlib.sha256(json.dumps(case.nodes).encode()).hexdigest()[:16])
        assert got == want, (dom, size, index)
    for s, want in zip((spec, spec.downsampled(2)), _PROV_BEFORE[name]):
        assert hashlib.sha256(json.dumps(provenance(s, 0), sort_keys=True).encode()).hexdigest()[:16] == want


def test_builtin_multi_structure_domains():
    assert len(MULTI) == 12
    regions = set()
    for name in MULTI:
        spec = load_domain(name)
        assert spec.labels is not None, name
        ids = [lab.id for lab in spec.labels]
        assert ids == list(range(1, len(ids) + 1))
        assert list(spec.dataset_labels) == ["background"] + [lab.name for lab in spec.labels]
        for lab in spec.labels:  # built-ins label one structure per class, named after it
            assert lab.structures == (lab.name,) and spec.region in STRUCTURES[lab.name].regions
        assert DomainSpec.from_dict(spec.to_dict()) == spec
        assert spec.downsampled(2).labels == spec.labels
        regions.add(spec.region)
    assert regions == {"head_neck", "mediastinum"}


# ------------------------------------------------------------------------------------ labels vs the phantom
# Median HU of a structure's labelled voxels in the clean image (no blur, no noise, no calibration), per
# contrast phase (none, arterial, venous): the tissue values of docs/domains.md, widened for partial volume.
_ART, _VEN = ((20, 70), (180, 480), (100, 240)), ((20, 70), (40, 220), (100, 240))
_BONE = ((200, 900),) * 3
_HU = {
    "thyroid": ((60, 130), (90, 200), (85, 180)), "parotid_gland": ((0, 50), (10, 65), (15, 75)),
    "submandibular_gland": ((15, 70), (25, 85), (30, 95)), "carotid_artery": _ART, "vertebral_artery": _ART,
    "internal_jugular_vein": _VEN, "mandible": _BONE, "hyoid": _BONE, "clavicle": _BONE, "sternum": _BONE,
    "vertebrae": _BONE, "ribs": _BONE, "intervertebral_disc": ((50, 130),) * 3,
    "spinal_cord": ((10, 70), (15, 80), (20, 90)), "trachea": ((-1024, -850),) * 3,
    "upper_airway": ((-1024, -850),) * 3, "bronchi": ((-1024, -700),) * 3,
    "laryngeal_cartilage": ((60, 450),) * 3, "costal_cartilage": ((60, 200),) * 3,
    "esophagus": ((-150, 90),) * 3, "lung": ((-950, -750),) * 3, "aorta": _ART, "supraaortic_arteries": _ART,
    "pulmonary_artery": _ART, "superior_vena_cava": ((20, 70), (100, 500), (100, 240)),
    "brachiocephalic_vein": ((20, 70), (100, 500), (100, 240)), "azygos_vein": ((20, 70), (40, 220), (60, 240)),
    "pulmonary_vessels": ((-400, 300),) * 3,
    "lymph_node": ((-60, 70),) * 3,
}
_PHASE = {"none": 0, "arterial": 1, "venous": 2}


def test_structure_table_complete():
    assert set(_HU) == set(STRUCTURES)
    assert set(structures_of("head_neck")) | set(structures_of("mediastinum")) == set(STRUCTURES)


@pytest.mark.parametrize("name", MULTI)
def test_labels_match_phantom_geometry(name):
    spec = load_domain(name)
    clean_spec = spec.replace(scanner={"noise_std_hu": 0.0, "blur_sigma_mm": 0.0, "hu_offset": 0.0, "hu_scale": 1.0,
                                       "slice_thickness_mm": spec.scanner.spacing_mm[0]})
    phase = _PHASE[spec.scanner.contrast_phase]
    node_voxels = 0
    for index in (0, 1):
        case = generate_case(spec, seed=0, index=index)
        clean = generate_case(clean_spec, seed=0, index=index)
        plain = generate_case(spec.replace(labels=None), seed=0, index=index)  # the same patient, nodes only
        assert np.array_equal(case.image, plain.image)  # the labels map changes the label map only
        assert np.array_equal(case.structures, clean.structures) and np.array_equal(case.label, clean.label)
        assert set(np.unique(case.label).tolist()) <= set(spec.dataset_labels.values())
        for lab in spec.labels:
            on = case.label == lab.id
            if lab.structures == ("lymph_node",):
                # the annotation policy's voxels, exactly those of the lymph-node-only label map
                assert np.array_equal(on, plain.label == 1)
                if on.any():
                    assert (case.tissue[on] == T["lymph_node"]).mean() > 0.9
                node_voxels += int(on.sum())
                if on.sum() < 300:
                    continue
            else:
                # exactly the voxels the phantom drew for the structure, all of the structure's tissue classes
                assert np.array_equal(on, np.isin(case.structures, [STRUCTURES[s].id for s in lab.structures]))
                tissues = [t for s in lab.structures for t in STRUCTURES[s].tissues]
                assert np.isin(case.tissue[on], tissues).all(), lab.name
                assert on.sum() * np.prod(case.spacing) > 500.0, (lab.name, int(on.sum()))  # > 0.5 mL in view
            lo, hi = _HU[lab.structures[0]][phase]
            med = float(np.median(clean.image[on]))
            assert lo <= med <= hi, (lab.name, med, (lo, hi))
    if "lymph_node" in spec.dataset_labels:
        assert node_voxels > 0


def _centroid(mask: np.ndarray, spacing) -> np.ndarray:
    """Centroid in mm, (z, y, x) = (superior, anterior, patient's right), origin at the volume centre."""
    sp = np.asarray(spacing)
    return np.argwhere(mask).mean(axis=0) * sp - (np.asarray(mask.shape) - 1) * sp / 2


def _big_parts(mask: np.ndarray, frac: float = 0.1) -> list[np.ndarray]:
    lab, n = ndimage.label(mask)
    sizes = np.bincount(lab.ravel())[1:]
    return [lab == k + 1 for k in np.nonzero(sizes >= frac * sizes.max())[0]] if n else []


# volume in view (mL) of every structure: generous bounds around anatomy for the built-in fields of view
_VOLUME_ML = {
    "thyroid": (5, 40), "parotid_gland": (6, 40), "submandibular_gland": (4, 25), "carotid_artery": (4, 30),
    "vertebral_artery": (1, 8), "internal_jugular_vein": (8, 80), "mandible": (15, 100), "hyoid": (0.2, 5),
    "clavicle": (3, 70), "vertebrae": (30, 300), "intervertebral_disc": (3, 55), "spinal_cord": (3, 20),
    "trachea": (3, 50), "upper_airway": (8, 60), "laryngeal_cartilage": (2, 15), "esophagus": (2, 60),
    "lung": (2, 5000), "sternum": (20, 100), "aorta": (40, 330), "supraaortic_arteries": (4, 30),
    "pulmonary_artery": (20, 140), "superior_vena_cava": (12, 110), "brachiocephalic_vein": (5, 30),
    "azygos_vein": (2, 15), "bronchi": (8, 55), "pulmonary_vessels": (40, 270), "ribs": (60, 350),
    "costal_cartilage": (20, 110),
}


@pytest.mark.parametrize("name", ["src-a-hn", "src-b-chest"])
def test_structures_have_plausible_shape_and_position(name):
    """Every structure of the region, from the phantom's structure map: size, pieces, and where it lies
    relative to the others (head & neck and chest anatomy)."""
    spec = load_domain(name)
    for index in (0, 1, 2):
        case = generate_case(spec, seed=0, index=index)
        m = {s: case.structure_mask(s) for s in structures_of(spec.region) if s != "lymph_node"}
        c = {s: _centroid(v, case.spacing) for s, v in m.items()}
        z, y, x = ({s: v[k] for s, v in c.items()} for k in range(3))
        for s, v in m.items():
            ml = v.sum() * np.prod(case.spacing) / 1000.0
            lo, hi = _VOLUME_ML[s]
            assert lo <= ml <= hi, (s, ml)
        mid = x["spinal_cord"]

        def bilateral(s, n=2):
            parts = _big_parts(m[s])
            assert len(parts) == n, (s, len(parts))
            xs = sorted(_centroid(p, case.spacing)[2] - mid for p in parts)
            assert xs[0] < -5 and xs[-1] > 5, (s, xs)
            return parts

        def one_piece(s):
            assert len(_big_parts(m[s], 0.02)) == 1, s

        zext = lambda s: np.nonzero(m[s].any(axis=(1, 2)))[0]  # noqa: E731
        for s in ("spinal_cord", "vertebrae"):  # the spine runs through the whole field of view
            assert zext(s).size >= 0.9 * case.image.shape[0], s
        one_piece("spinal_cord")
        assert len(_big_parts(m["intervertebral_disc"])) >= 4
        assert y["spinal_cord"] < y["intervertebral_disc"] - 8  # the cord lies behind the vertebral bodies
        assert y["esophagus"] > y["vertebrae"] + 5 and y["trachea"] > y["esophagus"] + 5
        one_piece("esophagus")
        one_piece("trachea")
        if spec.region == "head_neck":
            assert y["thyroid"] > y["vertebrae"] + 20 and z["thyroid"] < z["upper_airway"] - 30
            assert z["trachea"] < z["upper_airway"] and z["laryngeal_cartilage"] > z["trachea"]
            assert z["thyroid"] < z["hyoid"] < z["mandible"] and y["hyoid"] > y["trachea"]
            assert y["mandible"] > y["vertebrae"] + 30 and z["mandible"] - z["thyroid"] > 50
            assert z["parotid_gland"] > z["submandibular_gland"] > z["thyroid"]
            assert y["parotid_gland"] < y["submandibular_gland"]
            assert z["lung"] < z["thyroid"] and z["clavicle"] < z["thyroid"]
            for s in ("parotid_gland", "submandibular_gland", "lung", "clavicle", "vertebral_artery"):
                bilateral(s)
            # per side, the internal jugular vein lies lateral to the carotid artery
            car = {np.sign(_centroid(p, case.spacing)[2] - mid): p for p in bilateral("carotid_artery")}
            ijv = {np.sign(_centroid(p, case.spacing)[2] - mid): p for p in bilateral("internal_jugular_vein")}
            for side in (-1, 1):
                assert side * (_centroid(ijv[side], case.spacing)[2] - _centroid(car[side], case.spacing)[2]) > 3
            one_piece("mandible")
            one_piece("upper_airway")
        else:
            assert y["sternum"] > max(y["aorta"], y["pulmonary_artery"], y["superior_vena_cava"]) + 30
            assert y["costal_cartilage"] > y["ribs"] + 30
            assert x["superior_vena_cava"] > x["trachea"] + 15  # the SVC on the right
            assert z["supraaortic_arteries"] > z["aorta"] + 20 and z["pulmonary_artery"] < z["trachea"]
            assert z["brachiocephalic_vein"] > z["superior_vena_cava"] + 10
            assert x["brachiocephalic_vein"] < x["superior_vena_cava"]  # crosses from the left
            assert z["trachea"] > z["bronchi"] + 10 and y["azygos_vein"] < y["trachea"]
            xb = np.nonzero(m["bronchi"].any(axis=(0, 1)))[0] * case.spacing[2] - (case.image.shape[2] - 1) * case.spacing[2] / 2
            assert xb.min() < x["trachea"] - 20 and xb.max() > x["trachea"] + 20  # both main bronchi
            assert 0.02 < m["pulmonary_vessels"].sum() / m["lung"].sum() < 0.12
            assert len(_big_parts(m["ribs"])) >= 8
            for s in ("aorta", "pulmonary_artery", "superior_vena_cava", "azygos_vein", "brachiocephalic_vein"):
                one_piece(s)
            lung_x = np.nonzero(m["lung"].any(axis=(0, 1)))[0]
            assert lung_x.size > 0.6 * case.image.shape[2]


# ----------------------------------------------------------------------------------------- bad labels maps
@pytest.mark.parametrize("body,key,hint", [
    ("labels:\n  thyroyd: 1\n", "labels.thyroyd", "did you mean thyroid"),
    ("labels:\n  aorta: 1\n", "labels.aorta", "does not draw"),
    ("labels:\n  thyroid: 1\n  parotid_gland: 1\n", "labels.parotid_gland", "already the id"),
    ("labels:\n  thyroid: 0\n", "labels.thyroid", "background"),
    ("labels:\n  thyroid: 1\n  parotid_gland: 3\n", "'labels'", "consecutive"),
    ("labels:\n  thyroid: one\n", "labels.thyroid", "integer"),
    ("labels:\n  background: 0\n  thyroid: 1\n", "labels.background", "reserved"),
    ("labels:\n  1: thyroid\n", "labels.1", "name: id"),
    ("labels: [thyroid]\n", "'labels'", "mapping"),
    ("labels: {}\n", "'labels'", "empty"),
    ("labels:\n  glands: {id: 1, structures: [thyroid]}\n  thyroid: 2\n", "labels.thyroid", "second label"),
    ("labels:\n  glands: {id: 1, structures: thyroid}\n", "labels.glands.structures", "list"),
    ("labels:\n  glands: {id: 1, structures: [thyroid, aorta]}\n", "labels.glands.structures[1]", "does not draw"),
    ("labels:\n  thyroid: {id: 1, colour: red}\n", "labels.thyroid.colour", "not a known key"),
    ("labels:\n  thyroid: {structures: [thyroid]}\n", "labels.thyroid.id", "missing"),
    ("labels:\n  thyroid: {id: 1, structures: [parotid_gland]}\n", "labels.thyroid.structures", "named after"),
])
def test_bad_labels_map_names_file_and_key(tmp_path, body, key, hint):
    p = _write(tmp_path, "bad_labels.yaml", "region: head_neck\n" + body)
    with pytest.raises(MedadaptError) as exc:
        load_domain(p)
    msg = str(exc.value)
    assert str(p) in msg and key in msg and hint in msg and "\n" not in msg, msg


@pytest.mark.parametrize("name,text", [
    ("dup.yaml", "region: head_neck\nlabels:\n  thyroid: 1\n  thyroid: 2\n"),
    ("dup.json", '{"region": "head_neck", "labels": {"thyroid": 1, "thyroid": 2}}'),
])
def test_repeated_key_refused(tmp_path, name, text):
    p = _write(tmp_path, name, text)
    with pytest.raises(MedadaptError, match=r"'thyroid' appears twice") as exc:
        load_domain(p)
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)


def test_merged_label_and_replace(tmp_path):
    spec = load_domain("src-a-hn").replace(
        labels={"neck_vessels": {"id": 1, "structures": ["carotid_artery", "internal_jugular_vein"]}, "thyroid": 2})
    assert spec.dataset_labels == {"background": 0, "neck_vessels": 1, "thyroid": 2}
    assert DomainSpec.from_dict(spec.to_dict()) == spec
    case = generate_case(spec.downsampled(2), seed=0, index=0)
    ids = [STRUCTURES[s].id for s in ("carotid_artery", "internal_jugular_vein")]
    assert np.array_equal(case.label == 1, np.isin(case.structures, ids))
    assert np.array_equal(case.label == 2, case.structure_mask("thyroid"))
    assert load_domain("src-a-hn").replace(labels=None).labels is None


# ------------------------------------------------------------------------------------ nnU-Net dataset output
def test_multi_structure_dataset_written_as_nnunet(tmp_path):
    spec = load_domain("tgt-chest").downsampled(2)
    out = write_dataset(spec, tmp_path / "tgt", num_cases=2, seed=0, progress=False)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "aorta": 1, "esophagus": 2, "azygos_vein": 3,
                            "brachiocephalic_vein": 4, "sternum": 5, "lymph_node": 6}
    assert ds["medadapt_synth"]["spec"]["labels"]["aorta"] == 1
    raw = RawDataset.load(out)  # medadapt's own nnU-Net v2 reader accepts it
    assert raw.labels == ds["labels"] and raw.case_ids == ["tgtchest_000", "tgtchest_001"]
    _, lab = raw.load_case("tgtchest_001")
    case = generate_case(spec, seed=0, index=1)
    assert np.array_equal(lab.array, case.label)
    meta = json.loads((out / "synth_meta" / "tgtchest_001.json").read_text())
    assert meta["label_voxels"] == {n: int((case.label == i).sum()) for n, i in ds["labels"].items() if i}


# ------------------------------------------------------------------------------------------------ task sets
def test_task_stream_and_unseen_tasks():
    stream = load_task_stream()
    assert stream.name == "ct-stream" and len(stream.tasks) == 5 and len(stream.unseen) == 2
    all_tasks = stream.tasks + stream.unseen
    assert len({t.domain for t in all_tasks}) == 7 and len({t.name for t in all_tasks}) == 7
    regions = [load_domain(t.domain).region for t in stream.tasks]
    assert set(regions) == {"head_neck", "mediastinum"}
    seen = {s for t in stream.tasks for s in t.labels}
    for t in all_tasks:
        spec = t.spec()
        assert list(spec.dataset_labels)[1:] == list(t.labels) and spec.name == load_domain(t.domain).name
    for t in stream.unseen:
        assert not seen & set(t.labels), t.name  # unseen: no stream task labels these structures
    # a task may use a subset of its domain's labels: renumbered 1..N, same images
    sub = type(stream.tasks[0])(name="parotid", domain="seq1-hn-glands", labels=("parotid_gland",))
    assert sub.spec().dataset_labels == {"background": 0, "parotid_gland": 1}
    a, b = generate_case(sub.spec().downsampled(2), 0, 0), generate_case(load_domain("seq1-hn-glands").downsampled(2), 0, 0)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label == 1, b.label == 2)


def test_partially_labelled_assembly():
    asm = load_assembly()
    assert len(asm.sources) == 3 and len(asm.targets) == 2
    specs = {t.name: load_domain(t.domain) for t in asm.sources + asm.targets}
    src = [specs[t.name] for t in asm.sources]
    assert {s.region for s in src} == {"head_neck", "mediastinum"}
    assert len({s.scanner for s in src}) == 3  # three scanners
    label_sets = [set(t.labels) for t in asm.sources]
    assert all(a != b for i, a in enumerate(label_sets) for b in label_sets[i + 1:])
    assert any(a & b for i, a in enumerate(label_sets) for b in label_sets[i + 1:])  # some overlap
    assert set(asm.classes) == set().union(*label_sets)
    for t in asm.sources:
        assert [c for c, on in zip(asm.classes, asm.annotated(t)) if on] == [c for c in asm.classes if c in t.labels]
    for t in asm.targets:
        spec = specs[t.name]
        assert set(t.labels) - set(asm.classes), t.name  # structures that no source labels
        assert set(t.labels) & set(asm.classes), t.name  # and some that a source labels
        assert all(spec.scanner != s.scanner for s in src)


@pytest.mark.parametrize("body,key", [
    ("tasks:\n  - domain: nowhere\nunseen: []\n", "tasks[0].domain"),
    ("tasks:\n  - domain: seq1-hn-glands\n    labels: [aorta]\nunseen: []\n", "tasks[0].labels[0]"),
    ("tasks:\n  - domain: seq1-hn-glands\n  - {domain: seq1-hn-glands, name: again}\nunseen: []\n", "tasks[1].domain"),
    ("tasks:\n  - domain: seq1-hn-glands\n", "'unseen'"),
    ("tasks: []\nunseen: []\n", "'tasks'"),
    ("tasks:\n  - {domain: seq1-hn-glands, colour: red}\nunseen: []\n", "tasks[0].colour"),
])
def test_bad_task_stream_names_file_and_key(tmp_path, body, key):
    p = _write(tmp_path, "stream.yaml", body)
    with pytest.raises(MedadaptError) as exc:
        load_task_stream(p)
    msg = str(exc.value)
    assert str(p) in msg and key in msg and "\n" not in msg, msg


def test_cli_list_shows_regions_and_labels(capsys):
    from medadapt.cli import main

    assert main(["synth", "--list"]) == 0
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(builtin_domains())
    assert rows["hn-source"] == ["head_neck", "lymph_node"]
    assert rows["src-b-chest"] == ["mediastinum", "aorta, pulmonary_artery, superior_vena_cava, trachea, esophagus"]
