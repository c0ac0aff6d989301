"""Bad input at the command line: one error line naming the file or option and the fix, exit 2, no output."""
import json

import nibabel as nib
import numpy as np
import pytest

from medadapt.cli import main
from medadapt.data.io import affine_from_spacing, write_volume

SPACING = (3.0, 2.0, 2.0)


def make_dataset(root, n=5, shape=(8, 16, 16)):
    """A valid tiny nnU-Net v2 raw dataset: noise images with a labelled cube."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        image = rng.normal(40, 20, shape).astype(np.int16)
        label = np.zeros(shape, np.uint8)
        label[2:5, 4:9, 4:9] = 1
        write_volume(image, affine_from_spacing(SPACING), root / "imagesTr" / f"c_{i:03d}_0000.nii.gz", np.int16)
        write_volume(label, affine_from_spacing(SPACING), root / "labelsTr" / f"c_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lymph_node": 1},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def _run_finetune(world, data, out, *extra, method="full", shots="4"):
    return main(["finetune", "--model", str(world["fm"]), "--data", str(data), "--out", str(out),
                 "--method", method, "--shots", shots, "--epochs", "1", "--iterations-per-epoch", "1",
                 "--quiet", *extra])


def _corrupt(root, kind):
    img = root / "imagesTr" / "c_000_0000.nii.gz"
    lab = root / "labelsTr" / "c_000.nii.gz"
    aff = affine_from_spacing(SPACING)
    if kind == "missing label":
        lab.unlink()
    elif kind == "missing image":
        img.unlink()
    elif kind == "shape":
        write_volume(np.zeros((8, 16, 15), np.uint8), aff, lab)
    elif kind == "geometry":
        write_volume(np.zeros((8, 16, 16), np.uint8), affine_from_spacing((3.0, 2.0, 2.5)), lab)
    elif kind == "label values":
        write_volume(np.full((8, 16, 16), 3, np.uint8), aff, lab)
    elif kind == "not 3D":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.int16), aff), str(img))
    elif kind == "NaN":
        data = np.zeros((8, 16, 16), np.float32)
        data[1, 2, 3] = np.nan
        write_volume(data, aff, img, np.float32)
    return {"missing label": "c_000.nii.gz", "missing image": "c_000", "shape": "c_000",
            "geometry": "c_000", "label values": "c_000.nii.gz", "not 3D": "c_000_0000.nii.gz",
            "NaN": "c_000_0000.nii.gz"}[kind]


@pytest.mark.parametrize("kind", ["missing label", "missing image", "shape", "geometry", "label values",
                                  "not 3D", "NaN"])
def test_bad_dataset_is_one_clear_line(world, tmp_path, capsys, kind):
    data = make_dataset(tmp_path / "data")
    named = _corrupt(data, kind)
    out = tmp_path / "out"
    assert _run_finetune(world, data, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medadapt finetune: error: "), err
    assert named in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not out.exists(), "no half-written output"


def test_a_file_that_fails_to_load_keeps_its_cause(world, tmp_path, capsys):
    """A truncated image: one line for the user, naming the file and the reader's error; ``--debug`` adds the
    traceback down to the reader's own exception (the error's cause), and nothing is written either way."""
    from medadapt.data.io import read_image
    from medadapt.errors import MedadaptError

    data = make_dataset(tmp_path / "data")
    img = data / "imagesTr" / "c_000_0000.nii.gz"
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(MedadaptError) as caught:
        read_image(img)
    assert caught.value.__cause__ is not None and str(img) in str(caught.value)
    cause = type(caught.value.__cause__).__name__
    assert _run_finetune(world, data, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c_000_0000.nii.gz" in err[0] and cause in err[0]
    assert main(["--debug", "finetune", "--model", str(world["fm"]), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--method", "full", "--shots", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medadapt finetune: error: ") and "Traceback" in err
    assert "The above exception was the direct cause of the following exception" in err and cause in err
    assert not (tmp_path / "out").exists()


def test_unknown_method(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    assert _run_finetune(world, data, tmp_path / "out", method="magic") == 2
    err = capsys.readouterr().err
    assert "--method 'magic'" in err and "dgst" in err
    assert not (tmp_path / "out").exists()


def test_more_shots_than_training_cases(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")  # 5 cases: 4 train, 1 test
    assert _run_finetune(world, data, tmp_path / "out", shots="5") == 2
    err = capsys.readouterr().err
    assert "--shots" in err and "4" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    code = main(["finetune", "--model", str(tmp_path / "nope"), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--method", "dgst", "--shots", "2", "--quiet"])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_predict_rejects_bad_image(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    _corrupt(data, "NaN")
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(world["fm"]), "--input", str(data / "imagesTr" / "c_000_0000.nii.gz"),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "c_000_0000.nii.gz" in err and "NaN" in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_dataset_json(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (data / "dataset.json").unlink()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "dataset.json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option,value", [("--workers", "-1"), ("--workers", "two"), ("--precision", "fp8")])
def test_bad_engine_options_are_one_line(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        # (--model names a folder that exists: a missing one is refused first, in its own line)
        main(["finetune", "--model", str(tmp_path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
              "--method", "full", "--shots", "1", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert option in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists()
