"""A run's identity is its whole resolved settings: a recipe edited under the same name, or another batch size,
does not resume an old run; a folder of an older run format is refused with one line."""
import json

import yaml

from medadapt.engine.recipe import load_recipe
from tests.test_cli_errors import _run_finetune, make_dataset


def _recipe(path, **changes):
    raw = load_recipe("cpu-finetune").to_dict()
    raw.update(name="mine", **changes)
    path.write_text(yaml.safe_dump(raw))
    return path


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medadapt finetune: error: "), err
    return err[0]


def test_an_edited_recipe_or_batch_does_not_resume_an_old_run(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "mine.yaml", batch_size=2)
    assert _run_finetune(world, data, out, "--recipe", str(recipe), shots="2") == 0
    identity = json.loads((out / "identity.json").read_text())
    assert identity["format"] == "medadapt-run/3" and identity["recipe"]["name"] == "mine"
    assert identity["batch_size"] == 2 and identity["patch_size"] and len(identity["settings_digest"]) == 16
    capsys.readouterr()
    _recipe(recipe, batch_size=2, description="edited")  # the same name, other contents
    assert _run_finetune(world, data, out, "--recipe", str(recipe), "--resume", shots="2") == 2
    assert "recipe.description" in _err(capsys)
    _recipe(recipe, batch_size=1)
    assert _run_finetune(world, data, out, "--recipe", str(recipe), "--resume", shots="2") == 2
    assert "batch_size" in _err(capsys)


def test_a_run_folder_of_an_older_format_is_refused(world, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "old"
    out.mkdir()
    (out / "identity.json").write_text(json.dumps({"format": "medadapt-run/2", "method": {"name": "full"}}))
    assert _run_finetune(world, data, out, "--resume") == 2
    line = _err(capsys)
    assert "medadapt-run/2" in line and "older medadapt" in line and "new --out" in line


def test_pretrain_records_its_settings_and_refuses_an_edited_recipe(world, tmp_path, capsys):
    from medadapt.cli import main

    raw = load_recipe("cpu-pretrain").to_dict()
    raw.update(name="mine-pretrain")
    recipe = tmp_path / "pre.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "fm"
    args = ["pretrain", "--data", str(world["src"]), "--out", str(out), "--preset", "cpu-tiny", "--epochs", "1",
            "--iterations-per-epoch", "1", "--recipe", str(recipe), "--quiet"]
    assert main(args) == 0
    identity = json.loads((out / "training" / "identity.json").read_text())
    assert identity["format"] == "medadapt-pretrain/1" and identity["recipe"]["name"] == "mine-pretrain"
    assert identity["patch_size"] and identity["batch_size"] and identity["datasets"][0]["cases"]
    capsys.readouterr()
    raw.update(description="edited")
    recipe.write_text(yaml.safe_dump(raw))
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.description" in err[0], err
