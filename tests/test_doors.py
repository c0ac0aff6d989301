"""Doors that hold: an unreadable image is one line naming it, and a folder in use by a live process is refused
with one line naming that process (a lock left by a killed process is taken over)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from medadapt.cli import main
from medadapt.errors import MedadaptError
from medadapt.utils.lock import LOCK_NAME, folder_lock
from tests.test_cli_errors import _run_finetune, make_dataset


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medadapt {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------------------------------------ files

@pytest.mark.parametrize("which", ["image", "label"])
def test_truncated_nifti_in_a_dataset_is_one_line(world, tmp_path, capsys, which):
    data = make_dataset(tmp_path / "data")
    path = data / ("imagesTr/c_000_0000.nii.gz" if which == "image" else "labelsTr/c_000.nii.gz")
    _truncate(path)
    out = tmp_path / "out"
    assert _run_finetune(world, data, out) == 2
    line = _one_line(capsys, "finetune")
    assert path.name in line and "truncated" in line, line
    assert not out.exists(), "no half-written output"


def test_truncated_predict_input_is_one_line(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    image = data / "imagesTr" / "c_000_0000.nii.gz"
    _truncate(image)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(world["fm"]), "--input", str(image), "--out", str(out), "--quiet"]) == 2
    line = _one_line(capsys, "predict")
    assert image.name in line and "truncated" in line, line
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------ folders

HOLDER = textwrap.dedent("""
    import sys, time
    from medadapt.utils.lock import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder():
    """Start a process that holds a folder's lock; yields a function (folder) -> the process."""
    started = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        assert proc.stdout.readline().strip() == "held"
        started.append(proc)
        return proc

    yield hold
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_folder_in_use_is_refused_naming_its_owner_and_taken_over_after_a_kill(tmp_path, holder):
    folder = tmp_path / "run"
    proc = holder(folder)
    info = json.loads((folder / LOCK_NAME).read_text())
    assert info["pid"] == proc.pid and info["host"]
    with pytest.raises(MedadaptError) as exc:
        with folder_lock(folder):
            pass
    assert f"process {proc.pid} on {info['host']}" in str(exc.value) and str(folder) in str(exc.value)
    os.killpg(proc.pid, signal.SIGKILL)  # a killed owner: the kernel releases its lock
    proc.wait()
    with folder_lock(folder):  # taken over
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        with folder_lock(folder):  # re-entrant within one process
            pass
    assert (folder / LOCK_NAME).read_text() == ""  # released: nobody named


def test_a_lock_that_made_the_folder_removes_it_when_nothing_was_written(tmp_path):
    folder = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with folder_lock(folder):
            raise RuntimeError("refused before any output")
    assert not (tmp_path / "a").exists()
    with folder_lock(folder):
        (folder / "kept.txt").write_text("output")
    assert (folder / "kept.txt").is_file()


def test_finetune_resume_into_a_folder_in_use_is_refused(world, tmp_path, capsys, holder):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    proc = holder(out)
    for extra in ((), ("--resume",)):  # a second run and a resume alike, before any work
        assert _run_finetune(world, data, out, *extra) == 2
        line = _one_line(capsys, "finetune")
        assert f"process {proc.pid}" in line and "in use" in line, line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside the owner's lock


def test_bench_workdir_in_use_is_refused(tmp_path, capsys, holder):
    workdir = tmp_path / "work"
    proc = holder(workdir)
    assert main(["bench", "medseqft-quick", "--workdir", str(workdir), "--quiet"]) == 2
    line = _one_line(capsys, "bench")
    assert f"process {proc.pid}" in line and "benchmark work folder" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]
