"""``medadapt import-openkbp``: small patients written in OpenKBP's sparse CSV format, converted and checked
(HU, axes, spacing, overlaps, partial labels, the challenge's split, skipped and damaged patients)."""
import json

import nibabel as nib
import numpy as np
import pytest

from medadapt.cli import main
from medadapt.data.dataset import RawDataset
from medadapt.data.io import read_image, read_label
from medadapt.data.openkbp import GRID
from medadapt.data.partial import annotation_records


def _write_sparse(path, index, values=None):
    rows = [",data"] + [f"{i},{'' if values is None else values[n]}" for n, i in enumerate(index)]
    path.write_text("\n".join(rows) + "\n")


def _lin(i, j, k):
    return int(np.ravel_multi_index((i, j, k), GRID))


def write_patient(root, subset, number, spacing=(3.5, 4.0, 2.0), structures=None, ct=True):
    """A patient: CT body = a block of soft tissue (stored 1040) with one bright voxel (stored 5000, 16-bit) and
    the rest absent (air); ``structures``: name -> list of (i, j, k) grid voxels."""
    folder = root / subset / f"pt_{number}"
    folder.mkdir(parents=True)
    (folder / "voxel_dimensions.csv").write_text("\n".join(f"{v:.18e}" for v in spacing) + "\n")
    if ct:
        body = [_lin(i, j, k) for i in range(40, 44) for j in range(60, 64) for k in range(60, 62)]
        values = [1040.0] * len(body)
        body.append(_lin(50, 50, 50))
        values.append(5000.0)
        _write_sparse(folder / "ct.csv", body, values)
    for name, voxels in (structures or {}).items():
        _write_sparse(folder / f"{name}.csv", [_lin(*v) for v in voxels])
    return folder


@pytest.fixture
def provided(tmp_path):
    root = tmp_path / "provided-data"
    # LeftParotid on the patient's left (high axis-1 index), anterior (low axis 0) and superior (low axis 2);
    # Mandible overlaps it in one voxel
    write_patient(root, "train-pats", 1, structures={"LeftParotid": [(10, 100, 5), (10, 101, 5)],
                                                     "Mandible": [(10, 101, 5), (5, 64, 20)]})
    write_patient(root, "train-pats", 2, structures={"Mandible": [(6, 64, 20)]})          # no parotid
    write_patient(root, "train-pats", 3, ct=False, structures={"Mandible": [(6, 64, 20)]})  # no ct.csv
    write_patient(root, "validation-pats", 201, structures={"LeftParotid": [(12, 90, 8)]})
    write_patient(root, "test-pats", 241, structures={"LeftParotid": [(12, 90, 8)], "Mandible": [(7, 64, 20)]})
    write_patient(root, "test-pats", 242, structures={"PTV70": [(40, 60, 60)]})  # none of the chosen
    return root


def test_import_openkbp_converts_hu_axes_spacing_overlaps_and_the_split(provided, tmp_path, capsys):
    out = tmp_path / "Dataset600_OpenKBP"
    assert main(["import-openkbp", str(provided), "--out", str(out), "--structures", "LeftParotid,Mandible",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "train/pt_3" in captured.err and "no ct.csv" in captured.err  # listed and skipped, exit 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "LeftParotid": 1, "Mandible": 2}
    assert meta["numTraining"] == 4 and meta["channel_names"] == {"0": "CT"}

    # HU: stored + offset 1000, 16-bit values clipped to 4095 first, outside the body (absent) air
    ct = read_image(out / "imagesTr" / "pt_001_0000.nii.gz")
    img = nib.load(str(out / "imagesTr" / "pt_001_0000.nii.gz"))
    assert img.get_data_dtype() == np.int16
    values = set(np.unique(ct.array).tolist())
    assert values == {-1000.0, 40.0, 3095.0}
    # spacing on the right axes: axis 0 (A-P) 3.5 mm -> y, axis 1 (R-L) 4.0 mm -> x, axis 2 (slices) 2.0 -> z
    assert ct.spacing == pytest.approx((2.0, 3.5, 4.0))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")

    # axes: the parotid's voxel lies on the patient's left (RAS x < 0), anterior (y > 0) and superior (z > 0)
    label = read_label(out / "labelsTr" / "pt_001.nii.gz")
    z, y, x = np.argwhere(label.array == 1)[0]
    world = img.affine @ np.array([x, y, z, 1.0])
    assert world[0] < 0 and world[1] > 0 and world[2] > 0
    # and the mandible's lone voxel (axis 0 index 5: most anterior, mid-line, lower) is anterior of the parotid
    zm, ym, xm = np.argwhere(label.array == 2)[0]
    assert (img.affine @ np.array([xm, ym, zm, 1.0]))[1] > world[1]
    # the structure named first keeps the overlap, and what the other gave up is recorded
    assert int((label.array == 1).sum()) == 2 and int((label.array == 2).sum()) == 1
    record = json.loads((out / "openkbp_import.json").read_text())
    case1 = next(c for c in record["cases"] if c["case"] == "pt_001")
    assert case1["gave_up"] == {"Mandible": {"LeftParotid": 1}}
    assert record["skipped_without_ct"] == ["train/pt_3"]

    # partial labels: pt_002 has no parotid: unknown, not background
    ds = RawDataset.load(out)
    records, per_case = annotation_records(ds)
    assert per_case and records["pt_002"] == ["Mandible"] and sorted(records["pt_001"]) == ["LeftParotid", "Mandible"]
    # no chosen structure: imagesTs, unlabelled
    assert (out / "imagesTs" / "pt_242_0000.nii.gz").is_file() and not (out / "labelsTr" / "pt_242.nii.gz").exists()
    # the challenge's split: fold 0 train -> validation, fold 1 validation -> test
    folds = json.loads((out / "splits_final.json").read_text())
    assert folds == [{"train": ["pt_001", "pt_002"], "val": ["pt_201"]}, {"train": ["pt_201"], "val": ["pt_241"]}]
    assert json.loads((out / "openkbp_sets.json").read_text())["pt_241"] == "test"


def test_import_openkbp_sets_and_fully_labelled(provided, tmp_path):
    out = tmp_path / "d"
    assert main(["import-openkbp", str(provided), "--out", str(out), "--structures", "leftparotid",
                 "--sets", "validation,test", "--quiet"]) == 0
    assert sorted(RawDataset.load(out).case_ids) == ["pt_201", "pt_241"]
    assert not (out / "annotated_classes.json").exists()  # every labelled case has it: fully labelled


@pytest.mark.parametrize("damage,expect", [
    ("index", "outside the 128x128x128 grid"),
    ("value", "not a number"),
    ("spacing", "voxel_dimensions.csv"),
    ("header", "header"),
])
def test_a_damaged_file_is_one_line_and_nothing_is_written(provided, tmp_path, capsys, damage, expect):
    folder = provided / "test-pats" / "pt_241"
    if damage == "index":
        (folder / "Mandible.csv").write_text(",data\n7,\n2097152,\n")
        named = folder / "Mandible.csv"
    elif damage == "value":
        (folder / "ct.csv").write_text(",data\n7,1000\n8,abc\n")
        named = folder / "ct.csv"
    elif damage == "spacing":
        (folder / "voxel_dimensions.csv").unlink()
        named = folder / "voxel_dimensions.csv"
    else:
        (folder / "ct.csv").write_text("index;value\n7;1000\n")
        named = folder / "ct.csv"
    out = tmp_path / "out"
    assert main(["import-openkbp", str(provided), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(named) in err[0] and expect in err[0] and "Traceback" not in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


@pytest.mark.parametrize("args,expect", [
    (["--structures", "Parotid"], "--structures"),
    (["--sets", "train,holdout"], "--sets"),
])
def test_bad_options_are_one_line(provided, tmp_path, capsys, args, expect):
    assert main(["import-openkbp", str(provided), "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]
    assert not (tmp_path / "o").exists()


def test_not_openkbp_and_existing_output(provided, tmp_path, capsys):
    assert main(["import-openkbp", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "provided-data" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["import-openkbp", str(provided), "--out", str(tmp_path / "full"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_crop_body_keeps_world_positions_and_every_contour(provided, tmp_path):
    full, crop = tmp_path / "full", tmp_path / "crop"
    common = ["--structures", "LeftParotid,Mandible", "--sets", "train", "--quiet"]
    assert main(["import-openkbp", str(provided), "--out", str(full), *common]) == 0
    assert main(["import-openkbp", str(provided), "--out", str(crop), "--crop", "body", *common]) == 0
    for case in ("pt_001", "pt_002"):
        a_img, b_img = (read_image(d / "imagesTr" / f"{case}_0000.nii.gz") for d in (full, crop))
        a_lab, b_lab = (read_label(d / "labelsTr" / f"{case}.nii.gz") for d in (full, crop))
        assert np.prod(b_img.array.shape) < np.prod(a_img.array.shape) / 10
        assert a_lab.array.sum() == b_lab.array.sum()  # every contour voxel kept (outside the body too)

        def world(vol, mask):
            z, y, x = np.argwhere(mask).T
            return np.sort((vol.affine @ np.stack([x, y, z, np.ones_like(x)]).astype(float))[:3].T, axis=0)

        np.testing.assert_allclose(world(a_lab, a_lab.array > 0), world(b_lab, b_lab.array > 0))
        np.testing.assert_allclose(world(a_img, a_img.array == 40), world(b_img, b_img.array == 40))
    box = json.loads((crop / "openkbp_import.json").read_text())["cases"][0]["crop_zyx"]
    assert all(lo >= 0 and hi <= 128 for lo, hi in box)
