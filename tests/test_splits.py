"""Splits as the field has them (issue 32, part 1): the fixed random split, a splits file (nnU-Net's
splits_final.json with a fold, or a list of test cases), no test part (a final model on every case), and
cross-validation with pooled held-out scores; each with its bad input."""
import csv
import json
import re

import numpy as np
import pytest

from medadapt.cli import main
from medadapt.data.splits import Split, cross_validation_folds, train_test_split
from medadapt.errors import MedadaptError
from tests.conftest import tiny_spec_yaml

IDS = [f"case_{i:03d}" for i in range(7)]
FAST = ["--method", "full", "--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medadapt {command}: error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------------ the splits
def test_default_split_is_the_fixed_random_split():
    for seed in (0, 1, 5):
        assert Split.random(seed).apply(IDS) == train_test_split(IDS, 0.2, seed)
        assert Split.parse(None, None, seed).apply(IDS) == train_test_split(IDS, 0.2, seed)


def test_cross_validation_tests_every_case_once_and_is_leave_one_out_at_n_folds():
    for n_folds in (2, 3, 7):
        folds = cross_validation_folds(IDS, n_folds, seed=3)
        tested = [c for _, test in folds for c in test]
        assert sorted(tested) == IDS  # each case in exactly one test part
        sizes = sorted(len(test) for _, test in folds)
        assert sizes[-1] - sizes[0] <= 1  # near-equal parts
        for train, test in folds:
            assert sorted(train + test) == IDS and not set(train) & set(test)
    assert all(len(test) == 1 for _, test in cross_validation_folds(IDS, 7))
    assert cross_validation_folds(IDS, 3, seed=0) != cross_validation_folds(IDS, 3, seed=1)
    assert cross_validation_folds(IDS, 3, seed=2) == cross_validation_folds(list(reversed(IDS)), 3, seed=2)


def test_split_none_trains_on_every_case():
    assert Split.parse("none").apply(IDS) == (IDS, [])
    assert not Split("none").evaluates


def test_nnunet_splits_file_and_test_list(tmp_path):
    splits = [{"train": IDS[2:], "val": IDS[:2]}, {"train": IDS[:5], "val": IDS[5:]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    split = Split.parse(tmp_path / "splits_final.json", fold=1)
    assert split.apply(IDS) == (IDS[:5], IDS[5:])
    assert split.record()["kind"] == "file" and split.record()["fold"] == 1 and len(split.record()["sha256"]) == 64
    (tmp_path / "test.txt").write_text("# the held-out cases\ncase_004\n\ncase_001\n")
    assert Split.parse(tmp_path / "test.txt").apply(IDS) == ([c for c in IDS if c not in ("case_001", "case_004")],
                                                            ["case_001", "case_004"])


@pytest.mark.parametrize("content, name, fold, message", [
    ("case_001\nnot_a_case\n", "t.txt", None, "names case(s) ['not_a_case']"),
    ('[{"train": ["case_000"], "val": ["case_001"]}]', "splits_final.json", 3, "has folds 0..0"),
    ('[{"train": ["case_000"], "val": ["case_001"]}]', "splits_final.json", None, "choose one with --fold"),
    ("case_001\n", "t.txt", 0, "has no folds"),
    ("{not json", "splits_final.json", 0, "not valid JSON"),
    ('{"train": []}', "splits_final.json", 0, "not an nnU-Net splits file"),
    ("\n# nothing\n", "t.txt", None, "names no test case"),
])
def test_bad_split_files(tmp_path, content, name, fold, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MedadaptError, match=re.escape(message)):
        Split.parse(path, fold=fold).apply(IDS)


def test_bad_fold_counts():
    for folds in (1, 8):
        with pytest.raises(MedadaptError, match="choose 2..7 folds"):
            Split.cross_validation(folds, 0).apply(IDS)
    with pytest.raises(MedadaptError, match="no such file"):
        Split.parse("/no/such/splits.json", fold=0)


# ------------------------------------------------------------------------------------------- runs on 5 cases
@pytest.fixture(scope="module")
def clinic(world, tmp_path_factory):
    """A clinic's 5 annotated scans (a tiny new-scanner cohort) and the world's foundation."""
    root = tmp_path_factory.mktemp("clinic")
    spec = root / "clinic.yaml"
    spec.write_text(tiny_spec_yaml("hn-center-b", "clinic"))
    assert main(["synth", str(spec), "--out", str(root / "data"), "--cases", "5", "--quiet"]) == 0
    return {"data": root / "data", "fm": world["fm"], "root": root}


def test_default_identity_is_unchanged_by_the_split_option(clinic):
    """A run with the default split has the same settings (and so identity) as before splits were options."""
    from medadapt.workflows.finetune import FinetuneRequest, resolve_finetune

    a = resolve_finetune(FinetuneRequest(clinic["fm"], clinic["data"], "full", 2, split_seed=1, epochs=1,
                                         iterations_per_epoch=1))
    b = resolve_finetune(FinetuneRequest(clinic["fm"], clinic["data"], "full", 2, split_seed=0, epochs=1,
                                         iterations_per_epoch=1, split=Split.random(1)))
    assert a == b and "split" not in a.to_dict() and a.to_dict()["split_seed"] == 1
    c = resolve_finetune(FinetuneRequest(clinic["fm"], clinic["data"], "full", 2, epochs=1, iterations_per_epoch=1,
                                         split=Split("none")))
    assert c.to_dict()["split"] == {"kind": "none"}


def test_five_shots_need_every_case_and_say_how(clinic, tmp_path, capsys):
    args = ["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), *FAST]
    assert main(args + ["--out", str(tmp_path / "a"), "--shots", "5"]) == 2
    err = _one_error_line(capsys, "finetune")
    assert "leaves 4 training case(s)" in err and "--split none" in err and "--folds" in err
    assert not (tmp_path / "a").exists()


def test_split_none_trains_the_final_model_on_all_five(clinic, tmp_path, capsys):
    out = tmp_path / "final"
    assert main(["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out", str(out),
                 "--split", "none", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["shots"] == 5 and len(record["shot_cases"]) == 5 and record["split"]["test"] == []
    assert record["metrics"] is None and record["split"]["how"] == {"kind": "none"}
    assert (out / "model" / "weights.pt").is_file() and not (out / "predictions").exists()
    assert "nothing evaluated" in capsys.readouterr().out


def test_splits_file_names_the_test_cases(clinic, tmp_path):
    ids = sorted(p.name.split(".")[0] for p in (clinic["data"] / "labelsTr").iterdir())
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ids[:3], "val": ids[3:]},
                                                             {"train": ids[2:], "val": ids[:2]}]))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out", str(out),
                 "--split", str(tmp_path / "splits_final.json"), "--fold", "1", "--shots", "all", *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["split"]["test"] == ids[:2] and sorted(record["shot_cases"]) == ids[2:]
    assert record["metrics"]["n_cases"] == 2
    # the identity holds the split: another fold into the same folder is refused
    assert main(["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out", str(out),
                 "--split", str(tmp_path / "splits_final.json"), "--fold", "0", "--shots", "all", "--resume",
                 *FAST]) == 2


def test_leave_one_out_pools_the_five_held_out_cases(clinic, tmp_path):
    out = tmp_path / "cv"
    args = ["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out", str(out),
            "--folds", "5", *FAST]
    assert main(args) == 0
    result = json.loads((out / "crossval.json").read_text())
    held_out = [c for f in result["per_fold"] for c in f["test"]]
    assert sorted(held_out) == sorted(p.name.split(".")[0] for p in (clinic["data"] / "labelsTr").iterdir())
    assert all(len(f["test"]) == 1 and len(f["train"]) == 4 for f in result["per_fold"])
    # the pooled score is the mean of the five held-out cases' scores
    for name, pooled in result["pooled"]["classes"].items():
        fold_scores = [f["summary"]["classes"][name]["dsc"]["mean"] for f in result["per_fold"]]
        assert pooled["n_cases"] == 5
        assert pooled["dsc"]["mean"] == pytest.approx(float(np.mean(fold_scores)), abs=1e-12)
        spread = result["spread_of_folds"][name]["dsc"]
        assert spread["std_of_folds"] == pytest.approx(float(np.std(fold_scores)), abs=1e-12)
    with open(out / "crossval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows if r["class"] == rows[0]["class"]] == ["0", "1", "2", "3", "4", "pooled"]
    assert "pooled" in (out / "crossval.md").read_text()
    # resumable fold by fold: a lost fold is re-run, the others reused
    weights = {k: (out / f"fold_{k}" / "model" / "weights.pt").read_bytes() for k in range(5)}
    import shutil

    shutil.rmtree(out / "fold_2")
    assert main(args + ["--resume", "--final"]) == 0
    assert all((out / f"fold_{k}" / "model" / "weights.pt").read_bytes() == weights[k] for k in (0, 1, 3, 4))
    # the re-run fold is the same model (torch.save's archive names its temporary file, so compare tensors)
    import io

    import torch

    redone = torch.load(out / "fold_2" / "model" / "weights.pt", weights_only=True)
    before = torch.load(io.BytesIO(weights[2]), weights_only=True)
    assert redone.keys() == before.keys() and all(torch.equal(redone[k], before[k]) for k in before)
    again = json.loads((out / "crossval.json").read_text())
    assert again["pooled"] == result["pooled"]
    final = json.loads((out / "final" / "run.json").read_text())
    assert len(final["shot_cases"]) == 5 and final["metrics"] is None
    # another number of folds into the same folder is refused
    assert main(args[:-len(FAST) - 2] + ["--folds", "4", "--resume", *FAST]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--folds", "6"], "choose 2..5 folds"),
    (["--final", "--shots", "2"], "--final: trains the model on every case after a cross-validation"),
    (["--folds", "3", "--split", "none"], "cross-validation makes its own splits"),
    (["--split", "none", "--fold", "1"], "--split none has no folds"),
    ([], "--shots: required"),
])
def test_bad_split_options(clinic, tmp_path, capsys, extra, message):
    assert main(["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out",
                 str(tmp_path / "x"), *FAST, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_one_fold_is_an_argparse_error(clinic, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: usage and one error line, exit status 2
        main(["finetune", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out",
              str(tmp_path / "x"), *FAST, "--folds", "1"])
    assert exc.value.code == 2
    assert "--folds: 1 must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_zero_shot_on_a_splits_file(clinic, tmp_path, capsys):
    ids = sorted(p.name.split(".")[0] for p in (clinic["data"] / "labelsTr").iterdir())
    (tmp_path / "test.txt").write_text("\n".join(ids[:3]) + "\n")
    out = tmp_path / "zs"
    assert main(["zero-shot", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out", str(out),
                 "--split", str(tmp_path / "test.txt"), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["split"]["test"] == ids[:3]
    assert main(["zero-shot", "--model", str(clinic["fm"]), "--data", str(clinic["data"]), "--out",
                 str(tmp_path / "zs2"), "--split", "none", "--quiet"]) == 2
    assert "--all-cases" in _one_error_line(capsys, "zero-shot")


def test_a_split_file_is_read_and_hashed_once_per_split(tmp_path, monkeypatch):
    """A run's split, identity and records all read one Split: its file is read (and hashed) once, so they agree
    even if the file changes meanwhile; a new Split (another run) reads it again."""
    import hashlib
    import json as _json
    from pathlib import Path as _Path

    f = tmp_path / "splits_final.json"
    f.write_text(_json.dumps([{"train": ["a", "b"], "val": ["c"]}]))
    reads = []
    real = _Path.read_bytes
    monkeypatch.setattr(_Path, "read_bytes", lambda self: reads.append(self) or real(self))
    split = Split.parse(f, fold=0)
    ids = ["a", "b", "c", "d"]
    first = (split.apply(ids), split.record())
    for _ in range(3):
        assert (split.apply(ids), split.record()) == first
    assert reads == [f]
    assert first[1]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_text(_json.dumps([{"train": ["a"], "val": ["b", "c"]}]))
    assert split.apply(ids) == first[0]  # this run keeps the split it started with
    assert Split.parse(f, fold=0).apply(ids) == (["a"], ["b", "c"])
