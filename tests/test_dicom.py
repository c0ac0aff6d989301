"""medadapt.dicom: CT series geometry and HU, contour rasterisation and writing, ROI-name matching, import-dicom,
to-dicom and every bad input of issue 24 (one line, exit 2, nothing written). Data are made here with pydicom."""
import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medadapt.cli import main
from medadapt.data.dataset import RawDataset
from medadapt.data.io import read_image, read_label, write_volume
from medadapt.dicom.names import normalise, parse_roi_options, assign
from medadapt.dicom.rtstruct import Contour, Roi, mask_contours, rasterise, read_rtstruct, write_rtstruct
from medadapt.dicom.series import load_series
from tests.dicom_phantom import ORIGIN, SHAPE, SPACING, phantom, rtstruct, write_ct


@pytest.fixture
def export(tmp_path):
    """One patient: CT series (pydicom) + RTSTRUCT with clinic names for a ring, two islands, a body outline."""
    hu, ring, islands = phantom()
    uids = write_ct(tmp_path / "exp" / "P001" / "CT", hu, slope=0.5, intercept=-1000.0)
    series = load_series(tmp_path / "exp" / "P001" / "CT")
    body = hu > -500
    rtstruct(tmp_path / "exp" / "P001" / "RS.dcm", series,
             {"LN_IIa_L": ring, "Lnn Neck R": islands, "BODY": body})
    return {"root": tmp_path / "exp", "hu": hu, "ring": ring, "islands": islands, "body": body, "uids": uids,
            "series": series}


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "warning" not in line]
    assert len(err) == 1, err
    assert err[0].startswith(f"medadapt {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------------- series
def test_series_sorted_along_normal_hu_and_affine(export):
    s = export["series"]
    # files were written shuffled with scrambled InstanceNumbers: sorted by position along the normal
    z = s.positions @ s.normal
    assert np.all(np.diff(z) > 0)
    assert np.array_equal(s.read_hu(), export["hu"])  # slope 0.5, intercept -1000 undone exactly
    expected = np.array([[-SPACING[2], 0, 0, -ORIGIN[0]], [0, -SPACING[1], 0, -ORIGIN[1]],
                         [0, 0, SPACING[0], ORIGIN[2]], [0, 0, 0, 1]])  # LPS -> RAS: x and y negated
    assert np.allclose(s.affine, expected)
    assert s.spacing == SPACING


def test_rotated_axial_series_affine(tmp_path):
    """Rows running posterior (an in-plane rotation): the affine follows ImageOrientationPatient."""
    hu, _, _ = phantom()
    write_ct(tmp_path / "ct", hu, row=(0, 1, 0), col=(-1, 0, 0))
    s = load_series(tmp_path / "ct")
    lps = s.affine_lps
    assert np.allclose(lps[:3, 0], [0, SPACING[2], 0]) and np.allclose(lps[:3, 1], [-SPACING[1], 0, 0])
    assert np.allclose(lps[:3, 2], [0, 0, SPACING[0]])  # normal = row x col = +z


# ---------------------------------------------------------------------------------------------------- contours
def _roi(series, polygons_by_slice):
    contours = []
    for k, polys in polygons_by_slice.items():
        for poly in polys:  # (i, j) voxel coordinates
            ij = np.asarray(poly, float)
            pts = (series.positions[k][None] + ij[:, :1] * series.pixel_spacing[1] * series.row_dir
                   + ij[:, 1:2] * series.pixel_spacing[0] * series.col_dir)
            contours.append(Contour(points=pts, geometric_type="CLOSED_PLANAR", referenced_sop=None))
    return Roi(number=1, name="r", contours=contours)


def test_rasterise_voxel_centres_even_odd(export):
    s = export["series"]
    square = [(2.5, 2.5), (12.5, 2.5), (12.5, 12.5), (2.5, 12.5)]  # edges half-way between voxel centres
    hole = [(5.5, 5.5), (9.5, 5.5), (9.5, 9.5), (5.5, 9.5)]
    island = [(20.2, 20.2), (24.8, 20.2), (24.8, 24.8), (20.2, 24.8)]  # centres 21..24 inside
    m = rasterise(_roi(s, {4: [square, hole, island]}), s).mask
    expected = np.zeros(SHAPE, bool)
    expected[4, 3:13, 3:13] = True
    expected[4, 6:10, 6:10] = False
    expected[4, 21:25, 21:25] = True
    assert np.array_equal(m, expected)


def test_contours_written_give_back_the_mask_exactly(export, tmp_path):
    s = export["series"]
    lab = np.zeros(SHAPE, np.uint8)
    lab[export["ring"]] = 1
    lab[export["islands"]] = 2
    lab[0, 0:5, 0:7] = 3  # touching the image's edge
    lab[10, 30, 30] = 3  # a single voxel
    lab[10, 31, 31] = 3  # diagonal neighbour (a saddle for marching squares)
    path = write_rtstruct(lab, s, {1: "Ring", 2: "Islands", 3: "Edge"}, tmp_path / "rs.dcm")
    ss = read_rtstruct(path)
    assert [r.name for r in ss.rois] == ["Ring", "Islands", "Edge"]
    for v, roi in enumerate(ss.rois, start=1):
        assert np.array_equal(rasterise(roi, s).mask, lab == v), roi.name
    # two contours per ring slice (outer + hole), two per islands slice
    ring_slices = np.flatnonzero(export["ring"].any(axis=(1, 2)))
    assert len(ss.rois[0].contours) == 2 * len(ring_slices)
    ds = pydicom.dcmread(path)
    refs = {img.ReferencedSOPInstanceUID for c in ds.ROIContourSequence[0].ContourSequence
            for img in c.ContourImageSequence}
    assert refs <= set(s.sop_uids)
    assert ds.StudyInstanceUID == s.study_uid and ds.SeriesInstanceUID != s.uid
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == s.frame_of_reference
    # every point lies on its referenced slice's plane
    c0 = ds.ROIContourSequence[0].ContourSequence[0]
    k = s.sop_uids.index(c0.ContourImageSequence[0].ReferencedSOPInstanceUID)
    pts = np.asarray(c0.ContourData, float).reshape(-1, 3)
    assert np.allclose(pts @ s.normal, s.positions[k] @ s.normal)


def test_mask_contours_hole_is_a_separate_contour():
    m = np.zeros((12, 12), bool)
    m[2:10, 2:10] = True
    m[4:7, 4:7] = False
    cs = mask_contours(m)
    assert len(cs) == 2
    assert sorted(len(c) for c in cs) == [8, 8]  # collinear vertices dropped: two squares with cut corners


# ---------------------------------------------------------------------------------------------------- names
def test_name_matching_rules():
    assert normalise("LN_IIa L") == normalise("ln-iia_l") == "lniial"
    rules = parse_roi_options(["lymph_node=LN*,Lnn*,GTVn*", "Parotid_L", "spinal_cord=Myelon"])
    assert assign(rules, "LN_IIa_L")[0] == 0
    assert assign(rules, "gtvn 2")[0] == 0
    assert assign(rules, "Lt Parotid")[:2] == (1, "TG-263 Lt_Parotid")  # TG-263 alias of Parotid_L
    assert assign(rules, "Parotid_R")[0] is None
    assert assign(rules, "Spinal Cord")[0] == 2  # the label name is TG-263 SpinalCord
    assert assign(rules, "myelon")[0] == 2
    assert assign(rules, "BODY")[0] is None


# ---------------------------------------------------------------------------------------------------- import
def test_import_dicom_writes_a_raw_dataset_with_the_mapping(export, tmp_path, capsys):
    root = export["root"]
    hu2, _, _ = phantom()
    write_ct(root / "P002" / "CT", hu2, patient="P002")  # no structure set: goes to imagesTs
    out = tmp_path / "Dataset503_MyClinic"
    assert main(["import-dicom", str(root), "--out", str(out), "--roi", "lymph_node=LN_II*,GTVn*",
                 "--roi", "islands=Lnn*", "--quiet"]) == 0
    text = capsys.readouterr()
    assert "imagesTs: P002" in text.out
    assert "pattern 'GTVn*' matches no ROI in any case" in text.err
    ds = RawDataset.load(out)  # the rest of medadapt reads it unchanged
    assert ds.case_ids == ["P001"] and ds.labels == {"background": 0, "lymph_node": 1, "islands": 2}
    (img,), lab = ds.load_case("P001")
    assert np.array_equal(img.array, export["hu"])
    assert np.allclose(img.affine, export["series"].affine)
    assert np.array_equal(lab.array == 1, export["ring"]) and np.array_equal(lab.array == 2, export["islands"])
    assert (out / "imagesTs" / "P002_0000.nii.gz").is_file()
    rows = list(csv.DictReader((out / "dicom_import.csv").open()))
    by_roi = {r["roi"]: r for r in rows}
    assert by_roi["LN_IIa_L"]["label"] == "lymph_node" and by_roi["Lnn Neck R"]["label"] == "islands"
    assert by_roi["BODY"]["label"] == "" and "no --roi pattern matches" in by_roi["BODY"]["reason"]
    mapping = json.loads((out / "dicom_import.json").read_text())
    assert mapping["test"] == ["P002"] and mapping["precedence"] == ["lymph_node", "islands"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_overlap_first_roi_wins(export, tmp_path):
    out = tmp_path / "ds"
    assert main(["import-dicom", str(export["root"]), "--out", str(out), "--roi", "ring=LN_II*",
                 "--roi", "body=External", "--quiet"]) == 0  # BODY matches by the TG-263 alias of External
    lab = read_label(out / "labelsTr" / "P001.nii.gz").array
    assert np.array_equal(lab == 1, export["ring"])  # listed first: keeps the voxels it shares with the body
    assert np.array_equal(lab == 2, export["body"] & ~export["ring"])
    case = json.loads((out / "dicom_import.json").read_text())["cases"][0]
    assert case["overlaps"] == [{"label": "body", "voxels": int((export["ring"] & export["body"]).sum()),
                                 "kept_by": ["ring"]}]


def test_absent_referenced_images_import_by_position_with_a_warning(export, tmp_path, capsys):
    """The CT re-exported by another system (new SOP and series UIDs, same frame of reference and positions)."""
    root = export["root"]
    ct = root / "P001" / "CT"
    for f in ct.iterdir():
        f.unlink()
    write_ct(ct, export["hu"], slope=0.5, intercept=-1000.0, study=export["uids"]["study"],
             frame_of_reference=export["uids"]["for"])
    out = tmp_path / "ds"
    assert main(["import-dicom", str(root), "--out", str(out), "--roi", "lymph_node=LN_II*", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "matched to" in err and "by frame of reference" in err
    assert "images its contours reference are not in the export; those contours are placed by slice position" in err
    lab = read_label(out / "labelsTr" / "P001.nii.gz").array
    assert np.array_equal(lab == 1, export["ring"])
    mapping = json.loads((out / "dicom_import.json").read_text())
    assert any("placed by slice position" in w for w in mapping["cases"][0]["warnings"])


def test_series_option_chooses_among_several(export, tmp_path):
    root = export["root"]
    hu, _, _ = phantom()
    write_ct(root / "P001" / "CT2", hu, study=export["uids"]["study"], description="CT 2")
    out = tmp_path / "ds"
    assert main(["import-dicom", str(root), "--out", str(out), "--roi", "lymph_node=LN_II*", "--quiet",
                 "--series", export["series"].uid]) == 0
    assert RawDataset.load(out).case_ids == ["P001"]


# ---------------------------------------------------------------------------------------------------- to-dicom
def test_to_dicom_rtstruct_and_seg_from_a_ras_label_map(export, tmp_path):
    s = export["series"]
    lab = np.zeros(SHAPE, np.uint8)
    lab[export["ring"]] = 1
    lab[export["islands"]] = 2
    # written in RAS voxel order (x and y flipped against the series): put back on the series' grid
    data = lab.transpose(2, 1, 0)[::-1, ::-1, :]
    aff = s.affine.copy()
    aff[:3, 0], aff[:3, 1] = -aff[:3, 0], -aff[:3, 1]
    aff[:3, 3] = s.affine[:3, 3] + s.affine[:3, 0] * (SHAPE[2] - 1) + s.affine[:3, 1] * (SHAPE[1] - 1)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), aff), str(tmp_path / "lab.nii.gz"))
    ct = export["root"] / "P001" / "CT"
    assert main(["to-dicom", str(tmp_path / "lab.nii.gz"), "--reference", str(ct), "--out",
                 str(tmp_path / "rs.dcm"), "--format", "rtstruct", "--labels", "1=GTVn,2=Parotid_L"]) == 0
    ss = read_rtstruct(tmp_path / "rs.dcm")
    assert [r.name for r in ss.rois] == ["GTVn", "Parotid_L"]
    assert np.array_equal(rasterise(ss.rois[0], s).mask, lab == 1)
    assert np.array_equal(rasterise(ss.rois[1], s).mask, lab == 2)
    assert main(["to-dicom", str(tmp_path / "lab.nii.gz"), "--reference", str(ct), "--out",
                 str(tmp_path / "seg.dcm"), "--format", "seg", "--labels", "GTVn,Parotid_L"]) == 0
    from medadapt.dicom.seg import read_seg_labelmap

    back, names = read_seg_labelmap(tmp_path / "seg.dcm", s)
    assert np.array_equal(back, lab) and names == {1: "GTVn", 2: "Parotid_L"}


def test_dataset_to_dicom_and_back(tmp_path):
    from tests.test_cli_errors import make_dataset

    data = make_dataset(tmp_path / "data", n=2)
    assert main(["dataset-to-dicom", str(data), "--out", str(tmp_path / "exp"), "--roi-name",
                 "lymph_node=LN_Neck_L", "--quiet"]) == 0
    assert main(["import-dicom", str(tmp_path / "exp"), "--out", str(tmp_path / "back"), "--roi",
                 "lymph_node=LN*", "--quiet"]) == 0
    for case in ("c_000", "c_001"):
        a, b = read_image(data / "imagesTr" / f"{case}_0000.nii.gz"), read_image(tmp_path / "back" / "imagesTr" / f"{case}_0000.nii.gz")
        la = read_label(data / "labelsTr" / f"{case}.nii.gz")
        lb = read_label(tmp_path / "back" / "labelsTr" / f"{case}.nii.gz")
        # same voxels in world space: map both to RAS-ordered arrays
        for va, vb in ((a, b), (la, lb)):
            xa = nib.as_closest_canonical(nib.Nifti1Image(va.array.transpose(2, 1, 0), va.affine))
            xb = nib.as_closest_canonical(nib.Nifti1Image(vb.array.transpose(2, 1, 0), vb.affine))
            assert np.allclose(xa.affine, xb.affine, atol=1e-4)
            assert np.array_equal(np.rint(np.asarray(xa.dataobj)), np.asarray(xb.dataobj))


# ---------------------------------------------------------------------------------------------------- bad input
def _import(root, out, *extra):
    return main(["import-dicom", str(root), "--out", str(out), "--roi", "lymph_node=LN_II*", "--quiet", *extra])


def test_bad_no_ct_series(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not DICOM")
    assert _import(tmp_path / "src", tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "no CT series found" in line and "1 not DICOM" in line
    assert not (tmp_path / "out").exists()


def test_bad_several_series_for_one_patient(export, tmp_path, capsys):
    hu, _, _ = phantom()
    write_ct(export["root"] / "P001" / "CT2", hu, description="second")
    assert _import(export["root"], tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "patient 'P001' has 2 CT series" in line and "--series UID" in line and "second" in line
    assert not (tmp_path / "out").exists()


def test_bad_rtstruct_frame_of_reference_matches_no_series(export, tmp_path, capsys):
    rs = export["root"] / "P001" / "RS.dcm"
    ds = pydicom.dcmread(rs)
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = generate_uid()
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
        .SeriesInstanceUID = generate_uid()
    for item in ds.StructureSetROISequence:
        item.ReferencedFrameOfReferenceUID = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    ds.save_as(rs)
    assert _import(export["root"], tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "RS.dcm" in line and "frame of reference" in line and "matches no CT series" in line
    assert not (tmp_path / "out").exists()


def test_bad_compressed_import_names_the_package(export, tmp_path, capsys):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    ct = export["root"] / "P001" / "CT"
    for f in ct.iterdir():
        f.unlink()
    write_ct(ct, export["hu"], study=export["uids"]["study"], frame_of_reference=export["uids"]["for"],
             transfer_syntax=JPEGLosslessSV1, pixel_bytes=b"\xff\xd8\xff\xd9")
    assert _import(export["root"], tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "JPEG Lossless" in line and "no decoder for it is installed; pip install" in line
    assert "pylibjpeg" in line and "python-gdcm" in line
    assert not (tmp_path / "out").exists()


def test_bad_roi_pattern_matches_nothing_lists_the_names(export, tmp_path, capsys):
    assert main(["import-dicom", str(export["root"]), "--out", str(tmp_path / "out"), "--roi", "lymph_node=LN_II*",
                 "--roi", "parotid=Parotis*", "--quiet"]) == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "--roi 'parotid=Parotis*': matches no ROI in any case" in line
    assert "'LN_IIa_L'" in line and "'Lnn Neck R'" in line and "'BODY'" in line
    assert not (tmp_path / "out").exists()


def test_bad_contours_outside_the_image(export, tmp_path, capsys):
    rs = export["root"] / "P001" / "RS.dcm"
    ds = pydicom.dcmread(rs)
    c = ds.ROIContourSequence[0].ContourSequence[0]
    pts = np.asarray(c.ContourData, float).reshape(-1, 3)
    pts[:, 0] += 60.0  # 60 mm to the left: beyond the 80 mm wide image
    c.ContourData = [f"{v:.3f}" for v in pts.ravel()]
    ds.save_as(rs)
    assert _import(export["root"], tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert "RS.dcm" in line and "'LN_IIa_L' has contours outside the image" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["non-axial", "tilt", "missing slice", "non-uniform", "duplicate"])
def test_bad_geometry_is_one_line_naming_the_series(tmp_path, capsys, kind):
    hu, _, _ = phantom()
    ct = tmp_path / "src" / "CT"
    z = np.arange(SHAPE[0]) * SPACING[0]
    if kind == "non-axial":
        write_ct(ct, hu, row=(1, 0, 0), col=(0, 0, -1))  # coronal
    elif kind == "tilt":
        write_ct(ct, hu, tilt_mm=0.5)
    elif kind == "missing slice":
        write_ct(ct, hu, skip=(7,))
    elif kind == "non-uniform":
        write_ct(ct, hu, z_positions=z + np.where(np.arange(SHAPE[0]) > 10, 0.8, 0.0))
    elif kind == "duplicate":
        z[5] = z[4]
        write_ct(ct, hu, z_positions=z)
    assert _import(tmp_path / "src", tmp_path / "out") == 2
    line = _one_error_line(capsys, "import-dicom")
    assert str(ct) in line
    assert {"non-axial": "is not axial", "tilt": "gantry tilt", "missing slice": "1 slice(s) missing",
            "non-uniform": "slice spacing is not uniform", "duplicate": "two slices at position"}[kind] in line
    assert not (tmp_path / "out").exists()


def test_bad_to_dicom_label_map_on_another_grid(export, tmp_path, capsys):
    write_volume(np.ones((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8), export["series"].affine,
                 tmp_path / "lab.nii.gz")
    assert main(["to-dicom", str(tmp_path / "lab.nii.gz"), "--reference", str(export["root"] / "P001" / "CT"),
                 "--out", str(tmp_path / "rs.dcm"), "--format", "rtstruct"]) == 2
    line = _one_error_line(capsys, "to-dicom")
    assert "lab.nii.gz" in line and "predict --input SERIES" in line
    assert not (tmp_path / "rs.dcm").exists()


def test_bad_out_not_empty_and_bad_roi_option(export, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert _import(export["root"], tmp_path / "out") == 2
    assert "exists and is not empty" in _one_error_line(capsys, "import-dicom")
    assert main(["import-dicom", str(export["root"]), "--out", str(tmp_path / "o2"), "--roi", "bad name=LN*"]) == 2
    assert "is not a label name" in _one_error_line(capsys, "import-dicom")
