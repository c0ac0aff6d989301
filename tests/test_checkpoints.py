"""Checkpoints load without running code from them (medadapt.utils.checkpoints); ``--trust-model`` opts in."""
import numpy as np
import pytest
import torch

from medadapt.cli import main
from medadapt.errors import MedadaptError
from medadapt.utils import checkpoints


class _Touch:
    """An object whose unpickling creates a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_checkpoint_naming_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pth"
    torch.save({"network_weights": {"w": torch.zeros(2)}, "payload": _Touch(marker)}, ckpt)
    with pytest.raises(MedadaptError) as exc:
        checkpoints.load(ckpt, "nnU-Net checkpoint")
    message = str(exc.value)
    assert "--trust-model" in message and "\n" not in message and str(ckpt) in message
    assert not marker.exists()
    with checkpoints.trusting():  # the opt-in: as nnU-Net loads its own files
        loaded = checkpoints.load(ckpt)
    assert marker.exists() and torch.equal(loaded["network_weights"]["w"], torch.zeros(2))
    marker.unlink()
    with pytest.raises(MedadaptError):  # the opt-in ends with its block
        checkpoints.load(ckpt)
    assert not marker.exists()


def test_numpy_metadata_and_a_device_load_as_data(tmp_path):
    """What nnU-Net's and MONAI's checkpoints hold beside the weights: numpy arrays, scalars, a torch.device."""
    ckpt = tmp_path / "ok.pth"
    meta = {"spacing": np.array([1.0, 0.5, 0.5]), "best": np.float64(0.91), "epoch": np.int64(3),
            "mask": np.zeros((2, 2), dtype=np.uint8), "flag": np.bool_(True)}
    torch.save({"network_weights": {"w": torch.ones(3)}, "init_args": meta, "device": torch.device("cpu")}, ckpt)
    loaded = checkpoints.load(ckpt)
    assert torch.equal(loaded["network_weights"]["w"], torch.ones(3))
    assert np.array_equal(loaded["init_args"]["spacing"], meta["spacing"]) and loaded["init_args"]["best"] == 0.91
    assert loaded["device"] == torch.device("cpu")


@pytest.mark.parametrize("content, message", [(b"not a checkpoint", "not a readable checkpoint"), (None, "no such")])
def test_broken_checkpoints_are_one_line(tmp_path, content, message):
    path = tmp_path / "c.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MedadaptError, match=message) as exc:
        checkpoints.load(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("command", ["finetune", "predict", "zero-shot", "export-nnunet"])
def test_commands_that_read_a_model_offer_trust_model(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--trust-model" in capsys.readouterr().out


def test_identical_weights_save_to_identical_bytes(tmp_path):
    """atomic_torch_save writes through a random temporary name; torch would name the archive's records after it
    (``tmpab12/data.pkl``), so the same weights saved twice differed in bytes and in every file digest."""
    import zipfile

    from medadapt.utils.atomic import atomic_torch_save
    from medadapt.utils.digests import file_sha256

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    atomic_torch_save(tmp_path / "a.pt", state)
    (tmp_path / "other").mkdir()
    atomic_torch_save(tmp_path / "other" / "b.pt", {k: v.clone() for k, v in state.items()})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other" / "b.pt").read_bytes()
    assert file_sha256(tmp_path / "a.pt") == file_sha256(tmp_path / "other" / "b.pt")
    assert all(n.startswith("archive/") for n in zipfile.ZipFile(tmp_path / "a.pt").namelist())
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"])
