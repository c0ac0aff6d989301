"""A method is one definition (issue 33, part 1): its options, label and capabilities are its definition's, and
the command line, the tables, grid configs, bench-speed and the nnU-Net trainer's checks are generated from
them; no other module names a method; an unknown or bad option is one line in the Python API, a grid config and
the command line."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import medadapt
from medadapt.cli import main
from medadapt.errors import MedadaptError
from medadapt.tuning import Method, get_method, make_strategy, method_names, methods
from medadapt.tuning.registry import builtin_method_names, cli_options
from tests.conftest import assert_refused_in_one_line

ROOT = Path(medadapt.__file__).parent
#: where a method may be named: its definition module, and the papers' benchmark definitions (their rows)
DEFINITIONS = {"tuning/dense.py", "tuning/subset.py", "tuning/sparse.py", "tuning/lowrank.py", "tuning/spatial.py"}
PAPERS = {"benchmark/grid.py", "benchmark/config.py", "benchmark/report.py", "benchmark/report_fseft.py",
          "benchmark/runner.py", "benchmark/medseqft.py", "benchmark/report_medseqft.py",
          "benchmark/runner_medseqft.py", "benchmark/retime_medseqft.py"}
#: the same word, not a method: (file, word) -> what it is
NOT_A_METHOD = {("tuning/delta.py", "full"): "a delta entry that holds the whole tensor",
                ("models/parts.py", "bias"): "a layer's bias attribute",
                ("utils/seeds.py", "drst"): "a seed stream's name, recorded in every run's identity",
                ("models/spatial_adapter.py", "spatial-adapter"): "the extension record's type in plans.json"}


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_names_a_method_outside_its_definition_and_the_papers_benchmarks():
    names = set(builtin_method_names())
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in DEFINITIONS or rel in PAPERS:
            continue
        for line, value in _string_constants(ast.parse(path.read_text())):
            if value in names and (rel, value) not in NOT_A_METHOD:
                found.append(f"{rel}:{line} {value!r}")
    assert found == []


def test_every_built_in_method_is_one_complete_definition():
    assert builtin_method_names() == method_names()  # no plugin here
    for name, d in methods().items():
        assert isinstance(d, Method) and d.name == name and d.strategy.__dict__["name"] == name
        assert d.summary and d.label
        strategy = make_strategy(name, seed=0)
        recorded = {k for k in strategy.config() if k not in ("name", "seed", "decoder")}
        assert recorded == set(d.option_names), name  # every option is recorded: runs and cells are keyed by it
        assert d.exportable == (d.extension is None)
    assert [n for n, d in methods().items() if d.cacheable] == ["linear-probe", "spatial-adapter"]
    assert [n for n, d in methods().items() if not d.exportable] == ["adapter", "spatial-adapter"]
    assert method_names(exportable_only=True) == [n for n in method_names(training_only=True)
                                                  if n not in ("adapter", "spatial-adapter")]


def test_the_command_line_flags_come_from_the_definitions(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    flags = cli_options()
    assert set(flags) == {"--gamma", "--lora-rank", "--lora-alpha", "--adapter-reduction", "--adapter-kernel-size",
                          "--adapter-width", "--adapter-norm"}  # the flags users have: unchanged
    assert flags["--gamma"][1] == ["drst", "sgst", "dgst"]
    for command in ("finetune", "seqft", "methods", "bench-speed"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag, (option, names) in flags.items():
            assert flag in text and option.cli_help(names) in text and option.describe() in text, (command, flag)


@pytest.mark.parametrize("method, options, message", [
    ("full", {"gamma": 2}, "method 'full' takes no option 'gamma'; it takes no options"),
    ("lora", {"reduction": 2}, "method 'lora' takes no option 'reduction'; its options are rank, alpha"),
    ("dgst", {"gamma": 0}, r"method 'dgst', option gamma \(--gamma\): 0 is not an integer >= 1"),
    ("dgst", {"gamma": 1.5}, r"option gamma \(--gamma\): 1.5 is not an integer"),
    ("dgst", {"gamma": True}, r"option gamma \(--gamma\): True is not an integer"),
    ("lora", {"alpha": -1.0}, r"option alpha \(--lora-alpha\): -1.0 is not a number > 0"),
    ("spatial-adapter", {"kernel_size": 2}, r"option kernel_size .*: 2 is not an integer >= 1, odd"),
    ("spatial-adapter", {"norm": "group"}, r"option norm .*: 'group' is not one of instance, batch"),
    ("nope", {}, "method 'nope' is unknown; choose one of: generalization, scratch, full"),
])
def test_bad_options_in_the_python_api_are_one_line(method, options, message):
    with pytest.raises(MedadaptError, match=message):
        make_strategy(method, **options)


def test_bad_options_on_the_command_line_are_one_line_and_write_nothing(world, tmp_path, capsys):
    base = ["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--shots", "2", "--quiet"]
    for extra, expected in ((["--method", "full", "--gamma", "2"], "--gamma: --method full has no such option"),
                            (["--method", "lora", "--adapter-reduction", "2"], "(adapter only)"),
                            (["--method", "magic"], "--method 'magic' is unknown"),
                            (["--method", "dgst", "--gamma", "0"], "--gamma 0: not an integer >= 1"),
                            (["--method", "spatial-adapter", "--adapter-kernel-size", "4"], "odd")):
        out = tmp_path / "out"
        assert_refused_in_one_line([*base, "--out", str(out), *extra], out, expected, capsys)


def test_a_grid_config_checks_method_options_by_the_definitions(world, tmp_path, capsys):
    def config(options):
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({
            "name": "bad", "foundation": {"model": str(world["fm"])},
            "datasets": {"tgt": {"data": str(world["tgt"]), "shots": [1]}}, "seeds": [0],
            "training": {"epochs": 1, "iterations_per_epoch": 1},
            "table1": {"methods": ["full", "dgst"], "all_shot": None}, "method_options": options}))
        return path

    for options, expected in (({"dgst": {"rank": 2}}, "method_options.dgst: unknown key(s) ['rank']"),
                              ({"dgst": {"gamma": 0}}, "method_options.dgst: method 'dgst', option gamma"),
                              ({"full": {"gamma": 1}}, "method_options.full: unknown key(s) ['gamma']")):
        assert main(["bench", str(config(options)), "--workdir", str(tmp_path / "work"), "--list"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_labels_and_capabilities_reach_the_reports_bench_speed_and_the_nnunet_check():
    from medadapt.benchmark import medseqft, report

    assert report.display_name("linear-probe") == get_method("linear-probe").label == "LinearProb"
    assert report.display_name("spatial-adapter") == "Spatial adapter"
    assert medseqft.display_name("lora", {"rank": 4}) == "LoRA (r=4)"  # the definition's label, the paper's r
    assert medseqft.display_name("full") == "FFT"  # the paper's own name for its row
    from medadapt.benchmark.speed import SpeedRequest, run_bench_speed

    with pytest.raises(MedadaptError, match=r"--methods: unknown adapter\+cache; .*spatial-adapter\+cache"):
        run_bench_speed(SpeedRequest(preset_name="cpu-tiny", methods=["adapter+cache"], memory=False), progress=False)


def test_a_model_folder_rebuilds_a_methods_modules_through_its_definition(tiny_unet):
    from medadapt.models.model_folder import apply_extension

    net = tiny_unet()
    adapted = make_strategy("adapter", reduction=2)
    record = adapted.architecture(adapted.prepare(tiny_unet()))[0]
    apply_extension(net, record)
    assert set(net.state_dict()) == set(adapted.prepare(tiny_unet()).state_dict())
    with pytest.raises(MedadaptError, match=re.escape("unknown network extension {'type': 'warp'}")):
        apply_extension(tiny_unet(), {"type": "warp"})
