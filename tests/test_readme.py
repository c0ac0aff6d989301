"""README's Python API example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs():
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert not any("parametrizations" in k for k in model.state_dict())


def test_readme_starts_with_the_two_commands():
    lines = [l for l in README.read_text().splitlines() if l.strip()]
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].endswith("medadapt demo")
    assert block[1].endswith("python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci


def test_torch_outside_the_declared_range_is_one_line(monkeypatch, capsys):
    """The package declares a torch range (pyproject) and the suite's versions; an installed torch outside the
    range is refused by every command in one line (exit 2), one inside it but untested is only a warning."""
    import tomllib

    from medadapt.cli import main
    from medadapt.utils import torch_version

    declared = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (low, high) = torch_version.SUPPORTED
    assert f"torch>={low[0]}.{low[1]},<{high[0]}" in declared
    assert "torch==2.13.0" in (README.parent / "constraints" / "cpu.txt").read_text()
    assert torch_version.check() is None  # CI runs a tested torch
    assert torch_version.check("2.13.0+cpu") is None
    kind, message = torch_version.check("2.5.1")
    assert kind == "untested" and "2.5.1" in message and ">=2.4,<3" in message
    monkeypatch.setattr(torch_version, "installed", lambda: "2.1.2")
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch 2.1.2" in err and ">=2.4,<3" in err
    monkeypatch.setattr(torch_version, "installed", lambda: None)
    assert main(["models"]) == 2 and "not installed" in capsys.readouterr().err
