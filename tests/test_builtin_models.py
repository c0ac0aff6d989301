"""The built-in foundation (issue 31): shipped with its identity, reproducible by the documented commands, found
by name wherever --model is taken, listed by 'medadapt models'; a wrong name or a damaged file is one line."""
import json
import shutil

import pytest

from medadapt.cli import main
from medadapt.errors import MedadaptError
from medadapt.models.builtin import builtin_info, builtin_names, builtin_path, package_root, resolve_model
from medadapt.workflows import demo

NAME = demo.BUILTIN_FOUNDATION


def test_the_demo_foundation_ships_with_its_identity():
    assert NAME in builtin_names()
    info = builtin_info(NAME)
    folder = builtin_path(NAME)  # every file's digest checked
    assert (folder / "plans.json").is_file() and (folder / "weights.pt").is_file()
    assert info["segments"] == ["lymph_node"] and info["made"]["commit"]
    assert info["made"]["commands"][0].startswith("medadapt synth hn-source --cases 40")
    assert info["made"]["commands"][1].startswith("medadapt pretrain --data DATA --preset cpu-bench")
    assert (folder / "weights.pt").stat().st_size < 3_000_000


def test_the_shipped_identity_is_what_the_demo_would_pretrain(tmp_path):
    """The shipped record names the demo's own recipe: the same source cohort (regenerated here, byte for byte)
    and the settings 'medadapt pretrain' resolves from the demo's PRETRAIN with seed 0."""
    from medadapt.synth import load_domain, write_dataset
    from medadapt.utils.digests import dataset_digest
    from medadapt.workflows.pretrain import PretrainRequest, resolve_pretrain

    info = builtin_info(NAME)
    source = load_domain(demo.SOURCE_DOMAIN).downsampled(demo.DOWNSAMPLE)
    data = write_dataset(source, tmp_path / source.name, num_cases=demo.SOURCE_CASES, seed=0, progress=False)
    assert dataset_digest(data) == info["data"]["sha256"]
    assert (info["data"]["cases"], info["data"]["downsample"]) == (demo.SOURCE_CASES, list(demo.DOWNSAMPLE))

    def portable(identity: dict) -> dict:  # where the data lived is not part of the recipe
        out = {k: v for k, v in identity.items() if k not in ("data", "settings_digest")}
        out["datasets"] = [{k: v for k, v in d.items() if k != "path"} for d in identity["datasets"]]
        return out

    from medadapt.workflows.common import load_datasets
    from medadapt.workflows.pretrain import pretrain_identity

    settings = resolve_pretrain(PretrainRequest(data, seed=0, **demo.PRETRAIN))
    expected = pretrain_identity(settings, load_datasets(list(settings.data)))
    assert portable(info["settings"]) == portable(expected)


def test_models_command_lists_and_shows(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"| {NAME} " in out and "lymph_node" in out and "cpu-bench" in out
    assert main(["models", "--show", NAME]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == NAME
    assert main(["models", "--show", "nope"]) == 2
    assert NAME in capsys.readouterr().err


def test_every_model_option_takes_the_name(capsys):
    assert resolve_model(NAME) == builtin_path(NAME)
    assert main(["methods", "--model", NAME]) == 0
    assert "| dgst " in capsys.readouterr().out
    from medadapt.models import load_model_folder

    assert load_model_folder(NAME).labels == {"background": 0, "lymph_node": 1}


def test_an_unknown_model_name_is_one_line(tmp_path, capsys):
    assert main(["finetune", "--model", "no-such-model", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--method", "full", "--shots", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medadapt finetune: error: --model no-such-model: ")
    assert "no such model folder and not a built-in foundation" in err and NAME in err
    assert "Traceback" not in err


def test_a_damaged_builtin_says_reinstall(tmp_path):
    root = tmp_path / "foundations"
    shutil.copytree(package_root() / NAME, root / NAME)
    assert builtin_path(NAME, root) == root / NAME
    weights = root / NAME / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(MedadaptError, match="missing or damaged.*reinstall medadapt"):
        builtin_path(NAME, root)
