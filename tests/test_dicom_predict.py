"""predict with a DICOM CT series as --input: --format nifti|rtstruct|seg agree with each other and with the
prediction on the NIfTI image the series was written from."""
import nibabel as nib
import numpy as np

from medadapt.cli import main
from medadapt.dicom.rtstruct import rasterise, read_rtstruct
from medadapt.dicom.series import load_series


def _canonical(path):
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


def _predict_seg_with(world, series, seg_zyx, out):
    """predict --format seg's writing path (cli_dicom.predict_series) with the network's answer given."""
    import argparse

    from medadapt.cli import dicom as cli_dicom
    from medadapt.models import load_model_folder

    class Given:
        folder = load_model_folder(world["fm"])
        classes = dict(folder.foreground)

        def check_memory(self, case_id, shape, spacing, channels=1):  # the Predictor's pre-flight check
            assert tuple(shape) == seg_zyx.shape

        def predict_case(self, images):
            assert images[0].array.shape == seg_zyx.shape
            return seg_zyx

    args = argparse.Namespace(out=out, format="seg", quiet=True)
    assert cli_dicom.predict_series(Given(), [series], args) == 0


def test_predict_dicom_series_in_every_format(world, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["dataset-to-dicom", str(world["tgt"]), "--out", str(exp), "--cases", "1", "--quiet"]) == 0
    case_dir = next(p for p in exp.iterdir() if p.is_dir())
    case = case_dir.name
    fm = str(world["fm"])
    for fmt in ("nifti", "rtstruct"):  # seg: below, on the same prediction (a network run less)
        assert main(["predict", "--model", fm, "--input", str(case_dir), "--out", str(tmp_path / fmt), "--format",
                     fmt, "--quiet"]) == 0
    assert main(["predict", "--model", fm, "--input", str(world["tgt"] / "imagesTr" / f"{case}_0000.nii.gz"),
                 "--out", str(tmp_path / "ref"), "--quiet"]) == 0
    err = capsys.readouterr().err

    # the DICOM series' prediction is the NIfTI image's prediction, in the series' own orientation
    pred, aff = _canonical(tmp_path / "nifti" / f"{case}.nii.gz")
    ref, ref_aff = _canonical(tmp_path / "ref" / f"{case}.nii.gz")
    assert np.allclose(aff, ref_aff, atol=1e-3)
    assert np.mean(pred == ref) >= 0.999

    series = load_series(case_dir / "CT")
    seg_zyx = np.asarray(nib.load(str(tmp_path / "nifti" / f"{case}.nii.gz")).dataobj).transpose(2, 1, 0)
    ss = read_rtstruct(tmp_path / "rtstruct" / f"{case}_rtstruct.dcm")
    assert [r.name for r in ss.rois] == ["lymph_node"]  # the model's label names
    assert np.array_equal(rasterise(ss.rois[0], series).mask, seg_zyx == 1)
    seg_file = tmp_path / "seg" / f"{case}_seg.dcm"
    _predict_seg_with(world, series, seg_zyx, tmp_path / "seg")
    err += capsys.readouterr().err
    if seg_zyx.any():
        from medadapt.dicom.seg import read_seg_labelmap

        back, names = read_seg_labelmap(seg_file, series)
        assert np.array_equal(back, seg_zyx) and names == {1: "lymph_node"}
    else:  # an untrained tiny model may find nothing: said, not written
        assert "nothing predicted, no DICOM-SEG written" in err and not seg_file.exists()


def test_predict_rtstruct_needs_a_dicom_input(world, tmp_path, capsys):
    image = next((world["tgt"] / "imagesTr").iterdir())
    assert main(["predict", "--model", str(world["fm"]), "--input", str(image), "--out", str(tmp_path / "o"),
                 "--format", "rtstruct", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medadapt predict: error: --format rtstruct: needs a DICOM CT series")
    assert not (tmp_path / "o").exists()
