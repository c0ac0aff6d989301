"""A method from a plugin (issue 33, part 2): docs/extending.md's "Adding a method" module, installed as a
plugin (a distribution on sys.path whose entry point names it), appears in ``medadapt methods``, trains with
``medadapt finetune --method NAME`` and runs in a grid config; bad options and broken plugins get one clear
line or one warning."""
from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from medadapt import plugins
from medadapt.cli import main
from tests.conftest import assert_refused_in_one_line

DOCS = Path(__file__).parent.parent / "docs" / "extending.md"
NAME = "freeze-shallow"


def docs_module() -> str:
    """The first Python code block of the section "## Adding a method"."""
    text = DOCS.read_text()
    section = text[text.index("## Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def install(site: Path, module: str, source: str, entry: str) -> None:
    """Install ``source`` as module ``module`` with a medadapt.plugins entry point, the way pip leaves a
    package: the module and a ``.dist-info`` with ``entry_points.txt``, on a folder on sys.path."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[medadapt.plugins]\n{entry} = {module}:register\n")


@pytest.fixture
def fresh_plugins(monkeypatch, tmp_path):
    """A site folder on sys.path and a registry that loads the plugins found then."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "registry", plugins.Registry())
    monkeypatch.setattr(plugins, "_loaded", False)
    yield site
    for name in [m for m in sys.modules if m.startswith("medadapt_")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture
def plugin(fresh_plugins):
    install(fresh_plugins, "medadapt_freeze_shallow", docs_module(), NAME)
    importlib.invalidate_caches()
    return fresh_plugins


def test_the_docs_method_is_listed_trained_and_run_in_a_grid(plugin, world, tmp_path, capsys):
    from medadapt.models import load_model_folder
    from medadapt.models.parts import model_parts
    from medadapt.tuning import method_names

    assert NAME in method_names(training_only=True)
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^\| {NAME}\s+\| every parameter but the shallowest", listing, re.M)
    assert "--freeze-shallow-frozen=0.5" in listing
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--freeze-shallow-frozen" in capsys.readouterr().out

    out = tmp_path / "run"
    assert main(["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--out", str(out),
                 "--method", NAME, "--freeze-shallow-frozen", "0.5", "--shots", "2", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--recipe", "cpu-finetune", "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["method"] == {"name": NAME, "frozen": 0.5}
    # what it froze did not move, and what it trains did
    foundation = load_model_folder(world["fm"]).load_network()
    tuned = load_model_folder(out / "model").load_network()
    before = list(model_parts(foundation).encoder.parameters())
    after = list(model_parts(tuned).encoder.parameters())
    k = round(0.5 * len(before))
    assert k > 0 and all(torch.equal(a, b) for a, b in zip(before[:k], after[:k]))
    assert any(not torch.equal(a, b) for a, b in zip(before[k:], after[k:]))

    # a grid config runs it like a built-in method, its rows labelled by the definition's display name
    from tests.test_bench_config import FOUNDATION, write_raw

    data = write_raw(tmp_path / "raw", "mine")
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "name": "plugin-grid", "foundation": {"model": FOUNDATION},
        "datasets": {"mine": {"data": str(data), "shots": [1]}}, "seeds": [0],
        "training": {"epochs": 1, "iterations_per_epoch": 1},
        "table1": {"methods": ["full", NAME], "all_shot": None, "zero_shot": False},
        "method_options": {NAME: {"frozen": 0.25}}}))
    assert main(["bench", str(config), "--workdir", str(tmp_path / "work"), "--quiet"]) == 0
    cells = [json.loads(p.read_text()) for p in (tmp_path / "work" / "cells").glob("**/cell.json")]
    mine = [c for c in cells if c["method"] == NAME]
    assert len(mine) == 1, [(c["method"], c["options"]) for c in cells] and mine[0]["options"] == {"frozen": 0.25}
    assert "Freeze shallow" in (tmp_path / "work" / "report" / "report.md").read_text()


def test_a_plugin_methods_bad_options_are_one_line(plugin, world, tmp_path, capsys):
    base = ["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--shots", "2", "--quiet"]
    # out of range, and an option of another method: one line, exit 2, nothing written
    for extra, expected in ((["--method", NAME, "--freeze-shallow-frozen", "2"], "at most 1"),
                            (["--method", "full", "--freeze-shallow-frozen", "0.5"], f"{NAME} only")):
        out = tmp_path / f"bad{len(extra)}{extra[1]}"
        assert_refused_in_one_line([*base, "--out", str(out), *extra], out, expected, capsys)
    # in the Python API and in a grid config alike
    from medadapt.errors import MedadaptError
    from medadapt.tuning import make_strategy

    with pytest.raises(MedadaptError, match=rf"method '{NAME}', option frozen .*'x' is not a number"):
        make_strategy(NAME, frozen="x")
    with pytest.raises(MedadaptError, match=rf"method '{NAME}' takes no option 'rank'; its options are frozen"):
        make_strategy(NAME, rank=2)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bad", "foundation": {"model": str(world["fm"])},
        "datasets": {"tgt": {"data": str(world["tgt"]), "shots": [1]}}, "seeds": [0],
        "training": {"epochs": 1, "iterations_per_epoch": 1}, "table1": {"methods": [NAME], "all_shot": None},
        "method_options": {NAME: {"frozen": -1}}}))
    assert main(["bench", str(config), "--workdir", str(tmp_path / "work"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"method_options.{NAME}" in err and "frozen" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work" / "cells").exists()


BROKEN = {
    "nameless": '''
        from medadapt.tuning import Method, Strategy

        class Nameless(Strategy):
            pass

        def register(registry):
            registry.method(Method(Nameless, summary="no name"))
    ''',
    "clash": '''
        from medadapt.tuning import Method, Strategy

        class Full(Strategy):
            name = "full"

        def register(registry):
            registry.method(Method(Full, summary="another full"))
    ''',
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_plugin_method_is_a_warning_and_the_rest_works(kind, fresh_plugins):
    install(fresh_plugins, f"medadapt_{kind}", textwrap.dedent(BROKEN[kind]), kind)
    install(fresh_plugins, "medadapt_freeze_shallow", docs_module(), NAME)
    importlib.invalidate_caches()
    from medadapt.tuning import get_method, method_names

    with pytest.warns(UserWarning, match=rf"plugin '{kind}'.*(skipped: .*no name|already a method.*skipped)"):
        names = method_names()
    assert NAME in names and "full" in names  # the good plugin and the built-in methods work
    assert get_method("full").strategy.__module__ == "medadapt.tuning.dense"
