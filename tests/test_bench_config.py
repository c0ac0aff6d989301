"""Benchmark grids on your data and your foundation (issue 32): one config schema for every paper; a dataset
is an nnU-Net raw folder (``data:``, with ``labels:`` and ``split:``), the foundation a model you have
(``model:``); real inputs are keyed by their fingerprints; every bad input is one line before any cell runs.

The data here is written with nibabel alone (not medadapt's generator), the foundation is the package's
built-in one; tests/test_nnunet.py runs a grid on a foundation trained by nnunetv2's own trainer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medadapt.benchmark import benchmarks
from medadapt.benchmark.harness import grid_cells, list_cells
from medadapt.cli import main

FOUNDATION = "synth-hn-lymph-nodes"  # the built-in foundation: one class, lymph_node


def write_raw(root: Path, name: str, cases: int = 6, labels=("lymph_node", "nodule"), channels: int = 1,
              seed: int = 0, shape=(20, 40, 40), spacing=(3.0, 4.0, 4.0)) -> Path:
    """An nnU-Net v2 raw dataset of ``cases`` noisy volumes (z y x ``shape`` at ``spacing`` mm) with one bright
    ball per structure, written with nibabel (x y z on disk)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for i in range(cases):
        cid = f"{name}_{i:03d}"
        label = np.zeros(shape, dtype=np.uint8)
        for j, _ in enumerate(labels, start=1):
            c = [rng.integers(6, s - 6) for s in shape]
            r = rng.uniform(2.5, 4.0)
            label[((z - c[0]) * 0.75) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < (r * 1.5) ** 2] = j
        for ch in range(channels):
            image = rng.normal(0.0, 20.0, shape) + 60.0 * (label > 0) + 15.0 * label
            nib.save(nib.Nifti1Image(image.astype(np.float32).transpose(2, 1, 0), affine),
                     str(folder / "imagesTr" / f"{cid}_{ch:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(folder / "labelsTr" / f"{cid}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(ch): "CT" for ch in range(channels)},
        "labels": {"background": 0, **{n: j for j, n in enumerate(labels, start=1)}},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    data = write_raw(root, "mine")
    (root / "test_cases.txt").write_text("other_003\nother_004\n")
    return {"root": root, "data": data, "other": write_raw(root, "other", cases=5, seed=1)}


TRAINING = {"epochs": 1, "iterations_per_epoch": 1}


def dgst(raw) -> dict:
    """A DGST grid on two real datasets: one with all its structures (no zero-shot: the foundation knows only
    one), one cut to its lymph nodes and split by a test list (a zero-shot cell: the foundation knows them)."""
    return {"name": "my-dgst", "foundation": {"model": FOUNDATION},
            "datasets": {"mine": {"data": str(raw["data"]), "shots": [1, 2]},
                         "nodes": {"data": str(raw["other"]), "labels": ["lymph_node"], "split": "test_cases.txt",
                                   "shots": [2]}},
            "seeds": [0], "training": TRAINING, "table1": {"methods": ["full", "dgst"], "all_shot": None}}


def fseft(raw) -> dict:
    """An FSEFT grid with one task per structure of one multi-structure dataset."""
    return {"name": "my-fseft", "foundation": {"model": FOUNDATION},
            "datasets": {"lymph-node": {"data": str(raw["data"]), "labels": ["lymph_node"], "shots": [1]},
                         "nodule": {"data": str(raw["data"]), "labels": ["nodule"], "shots": [1]}},
            "seeds": [0], "training": TRAINING, "postprocess": "lcc",
            "fseft": {"methods": ["generalization", "linear-probe", "spatial-adapter"]}}


def medseqft(raw) -> dict:
    """A MedSeqFT grid over a stream of two raw datasets (the second cut to one structure)."""
    recipe = yaml.safe_load((Path(__file__).parent.parent / "medadapt" / "benchmark" / "configs" /
                             "medseqft-quick.yaml").read_text())["recipe"]
    return {"name": "my-stream", "foundation": {"model": FOUNDATION},
            "stream": {"name": "two-sites", "tasks": [{"name": "first", "data": str(raw["data"])},
                                                      {"name": "second", "data": str(raw["other"]),
                                                       "labels": ["nodule"]}]},
            "seeds": [0], "recipe": {**recipe, "epochs": 2},
            "medseqft": {"parallel": ["full"], "sequential": ["seq-ft"], "kd_max_epochs": 10}}


def write_config(raw, doc: dict, name: str = "grid.yaml") -> Path:
    path = raw["root"] / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(path: Path, workdir: Path, *extra: str) -> int:
    return main(["bench", str(path), "--workdir", str(workdir), "--quiet", *extra])


@pytest.mark.parametrize("make", [dgst, fseft, medseqft])
def test_grid_on_real_data_and_a_given_foundation_runs_to_its_report(make, raw, tmp_path):
    config_file = write_config(raw, make(raw), f"{make.__name__}.yaml")
    workdir = tmp_path / "work"
    assert run(config_file, workdir) == 0
    benchmark, config = benchmarks.load(config_file)
    cells = grid_cells(benchmark, config, workdir)
    assert all((workdir / "cells" / c.cell_id / "cell.json").is_file() for c in cells)
    assert (workdir / "report" / "report.md").is_file()
    assert all(c.key.get("foundation", {}) == {"model": config.foundation_spec.digest} for c in cells)
    if make is dgst:
        zero = [c for c in cells if c.method == "zero-shot"]
        assert [c.dataset for c in zero] == ["nodes"]  # the foundation knows lymph nodes, not the nodules
        record = json.loads((workdir / "cells" / zero[0].cell_id / "cell.json").read_text())
        assert record["split"]["test"] == ["other_003", "other_004"]  # the test list, not the random split
        cut = Path(benchmark.paths(config, workdir).datasets["nodes"])
        assert json.loads((cut / "dataset.json").read_text())["labels"] == {"background": 0, "lymph_node": 1}
        assert np.asarray(nib.load(str(cut / "labelsTr" / "other_000.nii.gz")).dataobj).max() == 1
    if make is fseft:
        untrained = {(c.dataset, c.method) for c in cells if c.method == "generalization"}
        assert untrained == {("lymph-node", "generalization")}
    # a second run finds every cell finished
    listing, _ = list_cells(benchmark, config, workdir)
    assert {status for _, status, _ in listing} == {"done"}
    if make is dgst:
        # the data's fingerprint is its content (labels, voxels, geometry), not its files' times: a label file
        # touched stays the same data ...
        label = next((raw["data"] / "labelsTr").glob("*.nii.gz"))
        stat = label.stat()
        os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
        benchmark, config = benchmarks.load(config_file)
        listing, _ = list_cells(benchmark, config, workdir)
        assert {status for _, status, _ in listing} == {"done"}
        # ... and one voxel of it edited makes exactly that dataset's cells stale; the other's stay finished
        img = nib.load(str(label))
        edited = np.asarray(img.dataobj).copy()
        edited[0, 0, 0] = 1 - edited[0, 0, 0]
        nib.save(nib.Nifti1Image(edited, img.affine, img.header), str(label))
        benchmark, config = benchmarks.load(config_file)
        listing, _ = list_cells(benchmark, config, workdir)
        stale = {c.dataset for c, status, why in listing if status == "stale" and "its data's files changed" in why}
        done = {c.dataset for c, status, _ in listing if status == "done"}
        assert stale == {"mine"} and done == {"nodes"}


# ------------------------------------------------------------------------------------------------ bad input

def _bad(raw, tmp_path) -> dict:
    """Each bad input: (config document or text, words the one line must hold)."""
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["mine_000", "mine_001"], "val": ["mine_002"]}]))
    wrong_cases = tmp_path / "wrong.txt"
    wrong_cases.write_text("mine_004\nnope_999\n")
    two_channels = write_raw(tmp_path, "two-channels", cases=3, channels=2)

    def with_dataset(**entry):
        doc = dgst(raw)
        doc["datasets"] = {"mine": {"data": str(raw["data"]), "shots": [1], **entry}}
        return doc

    stream = medseqft(raw)
    stream["medseqft"]["sequential"] = ["seq-ft-mds"]
    # a model folder whose weights file names code (what a malicious checkpoint does): refused when the config
    # is read, before any cell, and the code does not run
    import shutil

    import torch

    from medadapt.models.builtin import builtin_path
    from tests.test_checkpoints import _Touch

    unsafe = tmp_path / "unsafe-model"
    shutil.copytree(builtin_path(FOUNDATION), unsafe)
    state = torch.load(unsafe / "weights.pt", weights_only=True)
    torch.save({**state, "payload": _Touch(tmp_path / "ran")}, unsafe / "weights.pt")
    return {
        "not-raw": (with_dataset(data=str(empty)), ["datasets.mine.data", "not an nnU-Net raw dataset"]),
        "no-such-path": (with_dataset(data=str(tmp_path / "nowhere")), ["datasets.mine.data", "does not exist"]),
        "label": (with_dataset(labels=["spleen"]), ["datasets.mine.labels", "'spleen'", "lymph_node"]),
        "split-cases": (with_dataset(split=str(wrong_cases)), ["datasets.mine.split", "nope_999"]),
        "split-fold": (with_dataset(split=str(splits), fold=3), ["datasets.mine.split", "fold 3"]),
        "shots": (with_dataset(shots=[9]), ["datasets.mine.shots", "9 shots", "at most 5"]),
        "channels": (with_dataset(data=str(two_channels)), ["datasets.mine", "2 input channel", "reads 1"]),
        "mds": (stream, ["medseqft.sequential", "MDS", "pretext head"]),
        "model": ({**dgst(raw), "foundation": {"model": str(empty)}}, ["foundation.model", "not a medadapt model"]),
        "unsafe": ({**dgst(raw), "foundation": {"model": str(unsafe)}}, ["foundation.model", "trust: true"]),
        "same-name": ("name: twice\nfoundation: {model: %s}\ntraining: {epochs: 1, iterations_per_epoch: 1}\n"
                      "table1: {methods: [full]}\ndatasets:\n  mine: {data: %s, shots: [1]}\n"
                      "  mine: {data: %s, shots: [1]}\n" % (FOUNDATION, raw["data"], raw["other"]),
                      ["appears twice", "mine"]),
    }


BAD = ["not-raw", "no-such-path", "label", "split-cases", "split-fold", "shots", "channels", "mds", "model",
       "unsafe", "same-name"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, raw, tmp_path, capsys):
    doc, words = _bad(raw, tmp_path)[case]
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    workdir = tmp_path / "work"
    assert run(config_file, workdir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not workdir.exists()
    assert not (tmp_path / "ran").exists()  # no file's code ran
