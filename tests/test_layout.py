"""The layout the architecture promises: no import circle in medadapt/, a core that never imports the optional
medadapt.nnunet (it finds what that package adds through medadapt.plugins), a CLI whose every command has
--help and whose choice lists come from their registries."""
import ast
import re
from pathlib import Path

import pytest

import medadapt
from medadapt import plugins
from medadapt.cli import commands, main
from medadapt.errors import MedadaptError

ROOT = Path(medadapt.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> the medadapt modules it imports (every import, also inside functions), by file; a module's
    own enclosing packages do not count (as ../shared/tools/import_cycles.py, which this mirrors)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:  # the module a dotted name lives in
                    t = t.rpartition(".")[0]
                # a module importing a package it lives in (its __init__) is how packages work, not a circle
                if t and t != name and t != "medadapt" and not name.startswith(t + "."):
                    found.add(t)
        edges[name] = found
    return edges


def test_no_import_circle_in_medadapt():
    edges = _imports()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_core_never_imports_the_nnunet_package():
    offenders = {m: sorted(t for t in targets if t == "medadapt.nnunet" or t.startswith("medadapt.nnunet."))
                 for m, targets in _imports().items() if not m.startswith("medadapt.nnunet")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_nnunet_plugin_registers_its_parts():
    registry = plugins.load_plugins()
    assert {"nnunet"} <= set(registry.model_loaders) and {"nnunet"} <= set(registry.case_backends)
    assert {"export-nnunet", "nnunet-train"} <= set(registry.commands)
    assert "nnunet" in registry.speed_references
    assert list(commands())[:3] == ["synth", "pretrain", "pretrain-ssl-head"]
    assert {"export-nnunet", "nnunet-train"} <= set(commands())


def test_without_the_plugin_the_core_works_and_names_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plugins, "registry", plugins.Registry())  # nothing registered, nothing to load
    monkeypatch.setattr(plugins, "_loaded", True)
    assert "export-nnunet" not in commands() and "finetune" in commands()
    with pytest.raises(MedadaptError, match=r"pip install 'medadapt\[nnunet\]'"):
        plugins.case_backend("nnunet", "a model with nnU-Net plans")
    with pytest.raises(MedadaptError, match=r"bench-speed --against-nnunet.*medadapt\[nnunet\]"):
        plugins.speed_reference("nnunet")
    (tmp_path / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    assert main(["methods", "--model", str(tmp_path / "Dataset001_X")]) == 2
    err = capsys.readouterr().err
    assert "not a medadapt model folder" in err and "medadapt[nnunet]" in err


def test_a_broken_plugin_is_skipped_with_a_warning(monkeypatch):
    class EntryPoint:
        name, value = "broken", "somewhere:register"

        def load(self):
            raise ImportError("no module named somewhere")

    monkeypatch.setattr(plugins, "registry", plugins.Registry())
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [EntryPoint()])
    with pytest.warns(UserWarning, match="'broken'.*skipped"):
        registry = plugins.load_plugins()
    assert registry.commands == {}


def test_every_command_has_help_and_the_list_names_them_all(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    listing = capsys.readouterr().out
    assert exc.value.code == 0
    for name, (help_line, _) in commands().items():
        assert re.search(rf"^\s+{re.escape(name)}\b", listing, re.M), name
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: medadapt {name}" in capsys.readouterr().out


def test_choice_lists_come_from_their_registries(capsys, monkeypatch):
    from medadapt.engine.precision import PRECISIONS
    from medadapt.tuning import method_names
    from medadapt.workflows.finetune import HEAD_POLICIES

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help lines at hyphens otherwise
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(m in text for m in method_names())  # spatial-adapter and generalization included
    assert "{" + ",".join(HEAD_POLICIES) + "}" in text and "{" + ",".join(PRECISIONS) + "}" in text
    from medadapt.engine.recipe import builtin_recipe_names

    assert ", ".join(builtin_recipe_names()) in text  # --recipe: every built-in recipe, by name


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore is its module's own: another module that needs it gets a public name."""
    found = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medadapt"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.module} {private}")
    assert found == []


def test_the_training_engine_imports_neither_ssl_nor_tuning():
    """The engine trains whatever strategy and loss it is given: the strategy interface and the losses it builds
    are defined below it (medadapt.engine.strategy, medadapt.engine.reconstruction), never imported from the
    methods or the self-supervised package (not even inside a function)."""
    offenders = {m: sorted(t for t in targets if t.startswith(("medadapt.ssl", "medadapt.tuning")))
                 for m, targets in _imports().items() if m.startswith("medadapt.engine")}
    assert {m: t for m, t in offenders.items() if t} == {}


def _functions(package: str):
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
                if params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                yield f"{package}/{path.name}:{node.name}", len(params), node.end_lineno - node.lineno + 1


def test_workflow_and_benchmark_functions_take_settings_objects():
    """No function of the workflows or benchmark packages takes more than 10 parameters (a settings or request
    object instead), and the two workflows readers start from stay short enough to read."""
    wide = [f"{name} ({n})" for package in ("workflows", "benchmark") for name, n, _ in _functions(package) if n > 10]
    assert wide == []
    sizes = {name: lines for name, _, lines in _functions("workflows")}
    assert sizes["workflows/finetune.py:finetune"] < 60 and sizes["workflows/seqft.py:_sequential_task"] < 60


def test_tests_set_the_cache_only_through_the_fixture():
    """MEDADAPT_CACHE is set in one place (conftest's ``medadapt_cache``, restored after the session): no test
    assigns os.environ or setenv's it itself, where it could stay set for the tests after it."""
    tests = Path(__file__).parent
    found = []
    for path in tests.rglob("*.py"):
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "MEDADAPT_CACHE" in line and path.name not in ("conftest.py", Path(__file__).name) \
                    and "data" not in path.relative_to(tests).parts:
                found.append(f"{path.name}:{i}")
    assert found == [] and re.search(r"os\.environ\[\"MEDADAPT_CACHE\"\]\s*=", (tests / "conftest.py").read_text()) \
        is None
