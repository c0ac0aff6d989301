"""Grids on real data named the nnU-Net way (issue 42): a dataset and a foundation's data given by their nnU-Net
names under ``$nnUNet_raw``, cell keys that depend on the data's content (the same OpenKBP patients imported
elsewhere find the same cells), one line naming the folder and the import command when the data is missing,
and the built-in openkbp configs' shape."""
from __future__ import annotations

import json

import pytest
import yaml

from medadapt.benchmark import benchmarks
from medadapt.benchmark.config import BUILTIN_CONFIGS, REAL_DATA_CONFIGS, builtin_config_path
from medadapt.cli import main
from tests.test_openkbp import write_patient


def fake_openkbp(root):
    """Three training patients with organs (one without a brainstem), four validation and three test patients
    with a larynx (one test patient without)."""
    for n in (1, 2, 3):
        organs = {"SpinalCord": [(60, 64, 40 + n)], "Mandible": [(20, 64, 30)]}
        if n != 2:
            organs["Brainstem"] = [(55, 64, 10)]
        write_patient(root, "train-pats", n, structures=organs)
    for n in (201, 202, 203, 204):
        write_patient(root, "validation-pats", n, structures={"Larynx": [(30, 64, 50 + n % 3)]})
    for n in (241, 242):
        write_patient(root, "test-pats", n, structures={"Larynx": [(31, 64, 51)]})
    write_patient(root, "test-pats", 243, structures={"PTV70": [(40, 62, 60)]})
    return root


def import_all(provided, raw):
    assert main(["import-openkbp", str(provided), "--out", str(raw / "Dataset900_Fake_OARs"), "--structures",
                 "Brainstem,SpinalCord,Mandible", "--sets", "train", "--quiet"]) == 0
    assert main(["import-openkbp", str(provided), "--out", str(raw / "Dataset901_Fake_Larynx"), "--structures",
                 "Larynx", "--sets", "validation,test", "--quiet", "--crop", "body"]) == 0


def config_doc(labels=None):
    larynx = {"data": "Dataset901_Fake_Larynx", "split": "splits_final.json", "fold": 1, "shots": [1, 2],
              "import": "medadapt import-openkbp PROVIDED_DATA --out $nnUNet_raw/Dataset901_Fake_Larynx"}
    organs = {"data": "Dataset900_Fake_OARs", "shots": [1]}
    if labels:
        organs["labels"] = labels
    return {"name": "fake-openkbp",
            "foundation": {"data": "Dataset900_Fake_OARs", "preset": "cpu-tiny", "epochs": 1,
                           "iterations_per_epoch": 2, "seed": 0,
                           "import": "medadapt import-openkbp PROVIDED_DATA --out $nnUNet_raw/Dataset900_Fake_OARs"},
            "datasets": {"larynx": larynx, **({"organs": organs} if labels else {})},
            "seeds": [0], "overlap": 0.25, "training": {"epochs": 1, "iterations_per_epoch": 2},
            "table1": {"methods": ["full", "dgst"], "zero_shot": True}}


@pytest.fixture(scope="module")
def two_imports(tmp_path_factory):
    """The same fake OpenKBP imported twice, into two $nnUNet_raw folders (other paths, times, gzip headers)."""
    base = tmp_path_factory.mktemp("openkbp")
    provided = fake_openkbp(base / "provided-data")
    roots = []
    for name in ("raw-a", "raw-b"):
        import_all(provided, base / name)
        roots.append(base / name)
    config = base / "cfg" / "fake.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(config_doc()))
    return {"roots": roots, "config": config, "base": base}


def test_cells_depend_on_the_datas_content_not_where_or_when_it_was_imported(two_imports, monkeypatch):
    keys = []
    for root in two_imports["roots"]:
        monkeypatch.setenv("nnUNet_raw", str(root))
        benchmark, config = benchmarks.load(two_imports["config"])
        cells = benchmark.cells(config, None)
        assert {c.method for c in cells} == {"full", "dgst"}  # the larynx is new to the foundation: no zero-shot
        keys.append(sorted((c.cell_id, json.dumps(c.key, sort_keys=True)) for c in cells))
        paths = benchmark.paths(config, two_imports["base"] / "work")
        assert paths.datasets["larynx"] == str(root / "Dataset901_Fake_Larynx")  # found under $nnUNet_raw
        assert str(root) not in json.dumps(config.foundation_key())  # the foundation's key names no path
    assert keys[0] == keys[1]
    # the split file is the dataset's own (fold 1: validation -> test), the test patient without a larynx absent
    monkeypatch.setenv("nnUNet_raw", str(two_imports["roots"][0]))
    _, config = benchmarks.load(two_imports["config"])
    larynx = config.datasets[0]
    assert larynx.train_cases == 4 and larynx.split["fold"] == 1


def test_missing_data_names_the_folder_and_the_import_command(two_imports, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "empty"))
    assert main(["bench", str(two_imports["config"]), "--workdir", str(tmp_path / "w"), "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(tmp_path / "empty" / "Dataset900_Fake_OARs") in err[0] and "medadapt import-openkbp" in err[0]
    monkeypatch.delenv("nnUNet_raw")
    assert main(["bench", str(two_imports["config"]), "--workdir", str(tmp_path / "w"), "--list"]) == 2
    err = capsys.readouterr().err
    assert "$nnUNet_raw" in err and "not set" in err and "import-openkbp" in err
    assert not (tmp_path / "w").exists()


def test_a_structure_no_imported_patient_has_is_one_line(two_imports, tmp_path, monkeypatch, capsys):
    """The organs dataset lists Brainstem, SpinalCord and Mandible; a task on a structure none of its patients
    annotates is refused before any cell."""
    monkeypatch.setenv("nnUNet_raw", str(two_imports["roots"][0]))
    raw = two_imports["roots"][0] / "Dataset900_Fake_OARs"
    records = json.loads((raw / "annotated_classes.json").read_text())
    assert any("Brainstem" not in r for r in records.values())  # partially labelled: pt_002 has no brainstem
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_doc(labels=["Larynx"])))
    assert main(["bench", str(config), "--workdir", str(tmp_path / "w"), "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Larynx" in err[0] and "datasets.organs.labels" in err[0]


@pytest.mark.parametrize("name", REAL_DATA_CONFIGS)
def test_the_openkbp_configs_name_their_data_the_nnunet_way(name, monkeypatch, tmp_path, capsys):
    assert BUILTIN_CONFIGS[name] in ("dgst", "fseft", "medseqft")
    doc = yaml.safe_load(builtin_config_path(name).read_text())
    if BUILTIN_CONFIGS[name] == "medseqft":  # a stream of tasks (read first) and unseen tasks
        tasks = [*doc["stream"]["tasks"], *doc["stream"]["unseen"]]
        assert len(doc["stream"]["tasks"]) == 5 and len(doc["stream"]["unseen"]) == 2
        assert doc["foundation"]["objective"] == "mae"
        first = tasks[0]["data"]
    else:
        tasks = list(doc["datasets"].values())
        first = doc["foundation"]["data"]
    names = [entry["data"] for entry in tasks]
    assert len(set(names)) == len(names)  # one dataset per task
    for entry in [doc["foundation"], *tasks]:
        assert entry["data"].startswith("Dataset6") and "import-openkbp" in entry["import"]
        assert "--crop body" in entry["import"] and f"$nnUNet_raw/{entry['data']} " in entry["import"]
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["bench", name, "--workdir", str(tmp_path / "w"), "--list"]) == 2
    err = capsys.readouterr().err
    assert first in err and "import-openkbp" in err


def test_a_folder_named_like_a_dataset_beside_the_config_still_works(two_imports, tmp_path, monkeypatch):
    """A config written before nnU-Net names, whose data folder beside it is called DatasetNNN_Name, keeps
    working when $nnUNet_raw does not hold that name."""
    import shutil

    monkeypatch.delenv("nnUNet_raw", raising=False)
    for name in ("Dataset900_Fake_OARs", "Dataset901_Fake_Larynx"):
        shutil.copytree(two_imports["roots"][0] / name, tmp_path / name)
    doc = config_doc()
    doc["datasets"]["larynx"]["split"] = "Dataset901_Fake_Larynx/splits_final.json"  # relative to the config
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(doc))
    _, parsed = benchmarks.load(config)
    assert parsed.datasets[0].data == str((tmp_path / "Dataset901_Fake_Larynx").resolve())


def test_a_medseqft_grid_pretrains_its_mae_foundation_on_real_data(two_imports, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(two_imports["roots"][0]))
    foundation = {"data": "Dataset900_Fake_OARs", "objective": "mae", "preset": "cpu-tiny", "epochs": 1,
                  "iterations_per_epoch": 2}
    doc = {"name": "fake-stream", "foundation": foundation,
           "stream": {"name": "fake", "tasks": [{"name": "larynx", "data": "Dataset901_Fake_Larynx",
                                                "split": "splits_final.json", "fold": 1}]},
           "seeds": [0], "recipe": "cpu-finetune", "medseqft": {"parallel": ["full"], "sequential": ["seq-ft"]}}
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(doc))
    _, parsed = benchmarks.load(config)
    assert parsed.foundation_spec.pretext and parsed.foundation_spec.settings["objective"] == "mae"
    assert parsed.foundation_spec.key(0)["objective"] == "mae"
    del foundation["objective"]
    config.write_text(yaml.safe_dump(doc))
    assert main(["bench", str(config), "--workdir", str(tmp_path / "w"), "--list"]) == 2
    assert "objective" in capsys.readouterr().err
