"""A run's identity is its whole resolved settings: a recipe edited under the same name, or another batch size,
does not resume an old run; a folder of an older run format is refused with one line."""
import json

import yaml

from medadapt.engine.recipe import load_recipe
from medadapt.workflows.finetune import RUN_FORMAT
from medadapt.workflows.pretrain import PRETRAIN_FORMAT
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
    assert identity["format"] == RUN_FORMAT and identity["recipe"]["name"] == "mine"
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
    assert identity["format"] == PRETRAIN_FORMAT and identity["recipe"]["name"] == "mine-pretrain"
    assert identity["patch_size"] and identity["batch_size"] and identity["datasets"][0]["cases"]
    capsys.readouterr()
    raw.update(description="edited")
    recipe.write_text(yaml.safe_dump(raw))
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.description" in err[0], err


def test_finetune_takes_one_settings_object_and_its_identity_is_that_whole_object(world, tmp_path):
    import dataclasses

    import pytest

    from medadapt.errors import MedadaptError
    from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune
    from medadapt.workflows.identity import settings_digest

    data = make_dataset(tmp_path / "data")
    settings = resolve_finetune(FinetuneRequest(world["fm"], data, "full", 2, epochs=1, iterations_per_epoch=1,
                                                recipe="cpu-finetune"))
    # resolved: the recipe's contents, the model folder's patch and batch, absolute paths
    assert settings.recipe.name == "cpu-finetune" and settings.training.epochs == 1
    assert settings.patch_size and settings.batch_size and settings.model.startswith("/")
    out = tmp_path / "run"
    record = finetune(settings, out, progress=False)
    identity = json.loads((out / "identity.json").read_text())
    assert identity["settings_digest"] == settings_digest(settings.to_dict())
    assert record["identity"]["settings_digest"] == identity["settings_digest"]
    # the same object resumes the finished run; any field changed is refused on --resume, naming the field
    assert finetune(settings, out, resume=True, progress=False)["metrics"] == record["metrics"]
    for change, field in (({"batch_size": settings.batch_size + 1}, "batch_size"),
                          ({"postprocess": "lcc"}, "postprocess"), ({"split_seed": 1}, "split_seed")):
        with pytest.raises(MedadaptError, match=field):
            finetune(dataclasses.replace(settings, **change), out, resume=True, progress=False)


def test_an_mae_pretraining_records_its_settings_and_refuses_other_ones(world, tmp_path, capsys):
    from medadapt.cli import main

    out = tmp_path / "mae"
    args = ["pretrain", "--objective", "mae", "--data", str(world["src"]), "--out", str(out), "--preset",
            "cpu-tiny", "--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]
    assert main(args) == 0
    identity = json.loads((out / "training" / "identity.json").read_text())
    assert identity["format"] == PRETRAIN_FORMAT and identity["objective"] == "mae"
    assert identity["activation"] is None and identity["recipe"]["loss"]["name"] == "mae"
    capsys.readouterr()
    assert main(args[:-1] + ["--lr", "0.5", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr" in err[0], err
