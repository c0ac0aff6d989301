"""medadapt's DICOM against tools no one in this project wrote: plastimatch (makes a CT + RTSTRUCT from a NIfTI
phantom; rasterises medadapt's RTSTRUCT), dciodvfy (dicom3tools: validates medadapt's RTSTRUCT and SEG) and
highdicom (reads medadapt's SEG back). Tests skip, saying so, where a tool is absent; .ci/run installs both
Debian packages (plastimatch, dicom3tools)."""
import shutil
import subprocess
import zlib

import nibabel as nib
import numpy as np
import pytest

from medadapt.cli import main
from medadapt.data.io import read_image, read_label
from medadapt.dicom.rtstruct import write_rtstruct
from medadapt.dicom.seg import read_seg_labelmap, write_seg
from medadapt.dicom.series import load_series
from tests.dicom_phantom import dsc, phantom, write_ct


def _need(tool: str, package: str):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is absent (Debian package {package}; .ci/run installs it)")


def _run(*cmd, cwd=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def read_mha(path) -> tuple[np.ndarray, dict]:
    """A MetaImage (.mha) as a (z, y, x) array and its header (plastimatch's --prefix-format mha)."""
    raw = path.read_bytes()
    marker = b"ElementDataFile = LOCAL\n"
    head, data = raw[: raw.index(marker)].decode(), raw[raw.index(marker) + len(marker):]
    header = dict(line.split(" = ", 1) for line in head.splitlines() if " = " in line)
    dims = [int(v) for v in header["DimSize"].split()]
    if header.get("CompressedData", "False") == "True":
        data = zlib.decompress(data)
    dtype = {"MET_UCHAR": np.uint8, "MET_USHORT": np.uint16, "MET_UINT": np.uint32}[header["ElementType"]]
    return np.frombuffer(data, dtype).reshape(dims[::-1]), header


@pytest.fixture
def masks():
    hu, ring, islands = phantom()
    return hu, {"Ring": ring, "Islands": islands}


def test_plastimatch_export_imports_to_the_same_image_and_labels(tmp_path, masks):
    """plastimatch writes a CT series + RTSTRUCT from a NIfTI phantom and its structure-set image; import-dicom
    gives back the same HU image and label maps with DSC >= 0.99 (its contours: marching squares + keyholes)."""
    _need("plastimatch", "plastimatch")
    hu, structures = masks
    aff = np.diag([-1.25, -1.5, 2.5, 1.0])  # LPS-ordered voxels, as ITK writes DICOM without flips
    aff[:3, 3] = [25.0, 48.0, -40.0]
    ss = np.zeros(hu.shape, np.uint32)
    for bit, m in enumerate(structures.values()):
        ss[m] |= 1 << bit
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), aff), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(ss.transpose(2, 1, 0), aff), str(tmp_path / "ss.nii.gz"))
    (tmp_path / "ss.txt").write_text("".join(f"{i}|255 0 0|{n}\n" for i, n in enumerate(structures)))
    _run("plastimatch", "convert", "--input", "ct.nii.gz", "--input-ss-img", "ss.nii.gz", "--input-ss-list",
         "ss.txt", "--output-dicom", "export/P1", "--patient-id", "P1", cwd=tmp_path)
    out = tmp_path / "ds"
    assert main(["import-dicom", str(tmp_path / "export"), "--out", str(out), "--roi", "ring=Ring",
                 "--roi", "islands=Islands", "--quiet"]) == 0
    case = next((out / "imagesTr").iterdir()).name[: -len("_0000.nii.gz")]
    img = read_image(out / "imagesTr" / f"{case}_0000.nii.gz")
    lab = read_label(out / "labelsTr" / f"{case}.nii.gz").array
    assert np.array_equal(img.array, hu)  # plastimatch's rescale (intercept -1000) undone exactly
    assert np.allclose(img.affine, aff, atol=1e-4)
    for v, (name, m) in enumerate(structures.items(), start=1):
        assert dsc(lab == v, m) >= 0.99, name
        print(f"DSC imported plastimatch {name}: {dsc(lab == v, m):.4f}")


def test_plastimatch_rasterises_medadapts_rtstruct_like_the_label_map(tmp_path, masks):
    """medadapt's RTSTRUCT (outer contours + holes, two islands per slice), rasterised by plastimatch with
    --xor-contours (its even-odd reading of holes), gives DSC >= 0.98 per structure against the label map."""
    _need("plastimatch", "plastimatch")
    hu, structures = masks
    write_ct(tmp_path / "CT", hu)
    series = load_series(tmp_path / "CT")
    lab = np.zeros(hu.shape, np.uint8)
    for v, m in enumerate(structures.values(), start=1):
        lab[m] = v
    write_rtstruct(lab, series, {1: "Ring", 2: "Islands"}, tmp_path / "rs.dcm")
    _run("plastimatch", "convert", "--input", "rs.dcm", "--referenced-ct", "CT", "--output-prefix", "pm",
         "--prefix-format", "mha", "--xor-contours", cwd=tmp_path)
    for v, name in ((1, "Ring"), (2, "Islands")):
        mask, header = read_mha(tmp_path / "pm" / f"{name}.mha")
        assert np.allclose([float(t) for t in header["Offset"].split()], series.positions[0], atol=1e-3)
        assert dsc(mask > 0, lab == v) >= 0.98, name
        print(f"DSC plastimatch-rasterised {name}: {dsc(mask > 0, lab == v):.4f}")
        if name == "Ring":  # the hole (radius 4 voxels, inside the ring) is there, not filled
            z, y, x = np.mgrid[0:hu.shape[0], 0:hu.shape[1], 0:hu.shape[2]]
            hole = ((x - 22) ** 2 + (y - 24) ** 2 < 4 ** 2) & (z >= 3) & (z < 15)
            assert hole.sum() > 400 and not (mask > 0)[hole].any()


def _dciodvfy_errors(path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors_in_rtstruct_and_seg_and_highdicom_reads_the_seg(tmp_path, masks):
    hu, structures = masks
    write_ct(tmp_path / "CT", hu)
    series = load_series(tmp_path / "CT")
    lab = np.zeros(hu.shape, np.uint8)
    for v, m in enumerate(structures.values(), start=1):
        lab[m] = v
    rs = write_rtstruct(lab, series, {1: "Ring", 2: "Islands"}, tmp_path / "rs.dcm", model_name="dgst/model",
                        software_version="medadapt 0.1.0")
    seg = write_seg(lab, series, {1: "Ring", 2: "Islands"}, tmp_path / "seg.dcm", model_name="dgst/model",
                    software_version="0.1.0")
    back, names = read_seg_labelmap(seg, series)  # highdicom as the reader
    assert np.array_equal(back, lab) and names == {1: "Ring", 2: "Islands"}
    import highdicom as hd

    s = hd.seg.segread(str(seg))
    algo = s.get_segment_description(1).algorithm_identification[0]
    assert algo.AlgorithmName == "medadapt" and algo.AlgorithmVersion == "0.1.0"
    assert "dgst/model" in str(algo.AlgorithmParameters)
    assert s.StudyInstanceUID == series.study_uid and s.SeriesInstanceUID != series.uid
    _need("dciodvfy", "dicom3tools")
    assert _dciodvfy_errors(rs) == []
    assert _dciodvfy_errors(seg) == []
