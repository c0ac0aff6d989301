"""The few-shot benchmark grid: config and cells, a quick grid end to end, resumption, report rebuild, Ray."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medadapt.benchmark import runner
from medadapt.benchmark.config import builtin_config_path
from medadapt.benchmark.grid import enumerate_cells, load_config, parse_config
from medadapt.benchmark import stats
from medadapt.benchmark.report import write_report
from medadapt.benchmark.harness import grid_cells
from medadapt.cli import main
from medadapt.errors import MedadaptError


def quick_raw() -> dict:
    return yaml.safe_load(builtin_config_path("quick").read_text())


def small_config(**changes):
    """The quick grid cut to one dataset and Table 1 only: a handful of cells."""
    raw = quick_raw()
    raw["datasets"] = {"hn-center-b": raw["datasets"]["hn-center-b"]}
    raw["table1"] = {"methods": ["full", "dgst"], "all_shot": None, "zero_shot": False}
    raw.pop("table2")
    raw.pop("gamma")
    raw.update(changes)
    return parse_config(raw, source="small.yaml")


def cell_files(workdir: Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in (workdir / "cells").rglob("cell.json")}


# ------------------------------------------------------------------------------------------------ config, cells

def test_default_grid_mirrors_the_paper():
    config = load_config("default")
    cells = enumerate_cells(config)
    by_exp = {e: [c for c in cells if e in c.experiments] for e in ("table1", "all_shot", "table2", "gamma")}
    assert [d.shots for d in config.datasets] == [(3, 5, 10), (5, 10, 20)]
    assert config.seeds == (0, 1, 2) and config.head == "fresh"
    zero = [c for c in by_exp["table1"] if c.method == "zero-shot"]
    assert len(zero) == 2                                              # one per dataset, no training, no seeds
    assert len(by_exp["table1"]) == 8 * 3 * 2 * 3 + 2                  # 8 methods x 3 shots x 2 datasets x 3 seeds
    assert {(c.dataset, c.shots) for c in by_exp["all_shot"]} == {("hn-center-b", 24), ("mediastinum", 24)}
    assert {c.shots for c in by_exp["table2"] if c.dataset == "mediastinum"} == {5, 20}  # smallest and largest
    assert sorted({c.options.get("gamma", 0) for c in by_exp["gamma"] if c.dataset == "mediastinum"}) == \
        [0, 1, 2, 3, 5, 10]                                           # full (no gamma) + the five values
    # shared cells run once: DGST gamma=1 at the largest shot count serves all three experiments
    shared = [c for c in cells if c.method == "dgst" and c.shots == 20 and c.options == {"gamma": 1}]
    assert len(shared) == 3 and all(set(c.experiments) == {"table1", "table2", "gamma"} for c in shared)
    assert len(cells) == len({c.cell_id for c in cells}) == 78 * 3 + 2
    # from scratch and all-shot train on the foundation's own schedule, every fine-tuning cell on one budget
    foundation = {"epochs": config.foundation["epochs"], "iterations_per_epoch":
                  config.foundation["iterations_per_epoch"]}
    assert all(c.key["training"] == foundation for c in cells if c.method == "scratch")
    assert {json.dumps(c.key["training"]) for c in cells if c.method not in ("scratch", "zero-shot")} == \
        {json.dumps(config.training)}
    assert len(enumerate_cells(load_config("paper"))) == 78 * 3 + 2   # three seeds


def test_changed_config_reruns_only_changed_cells():
    base = {c.cell_id for c in enumerate_cells(load_config("quick"))}
    raw = quick_raw()
    raw["gamma"]["values"] = [1, 3, 7]
    more_gamma = {c.cell_id for c in enumerate_cells(parse_config(raw))}
    assert base <= more_gamma and len(more_gamma - base) == 2           # gamma=7 on each dataset, nothing else
    raw = quick_raw()
    raw["datasets"]["mediastinum"]["cases"] = 7
    changed = {c.cell_id for c in enumerate_cells(parse_config(raw))}
    assert {c for c in base if c.startswith("hn-center-b/")} <= changed  # the other dataset's cells survive
    assert not {c for c in base if c.startswith("mediastinum/")} & changed
    raw = quick_raw()
    raw["training"]["epochs"] = 2          # the budget is part of every cell that trains on it ...
    trained = {c.cell_id for c in enumerate_cells(load_config("quick")) if c.method not in ("scratch", "zero-shot")}
    assert not trained & {c.cell_id for c in enumerate_cells(parse_config(raw))}
    # ... and the rows with a budget of their own (scratch, all-shot) or none (zero-shot) keep theirs
    assert base - trained <= {c.cell_id for c in enumerate_cells(parse_config(raw))}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["table1"].update(methods=["full", "nope"]), "table1.methods: unknown method 'nope'"),
    (lambda r: r["datasets"]["hn-center-b"].update(shots=[1, 9]), "datasets.hn-center-b.shots: 9 shots"),
    (lambda r: r.update(colour="red"), "unknown key(s) ['colour']"),
    (lambda r: r["gamma"].update(method="full"), "gamma.method: 'full' has no γ"),
    (lambda r: r["foundation"].update(preset="huge"), "foundation.preset: unknown preset 'huge'"),
])
def test_config_errors_name_the_key(edit, message):
    raw = quick_raw()
    edit(raw)
    with pytest.raises(MedadaptError, match=None) as err:
        parse_config(raw, source="my.yaml")
    assert str(err.value).startswith("my.yaml: ") and message in str(err.value)


def test_cli_bench_errors(tmp_path, capsys):
    assert main(["bench", "no-such-grid"]) == 2
    assert "not a built-in config" in capsys.readouterr().err
    assert main(["bench", "quick", "--report", "--workdir", str(tmp_path / "empty")]) == 2
    assert "no finished cells of grid 'quick'; run 'medadapt bench quick' first" in capsys.readouterr().err
    assert main(["bench", "quick", "--list", "--workdir", str(tmp_path / "empty")]) == 0
    assert "0/34 cells finished" in capsys.readouterr().out


def test_budgets_per_row_and_head_policy_are_part_of_the_cells():
    raw = quick_raw()
    raw["budgets"] = {"scratch": {"epochs": 3, "iterations_per_epoch": 5, "lr": 0.01},
                      "all_shot": {"epochs": 4, "iterations_per_epoch": 5}}
    config = parse_config(raw)
    cells = enumerate_cells(config)
    scratch = [c for c in cells if c.method == "scratch" and not c.all_shot]
    assert scratch and all(c.key["training"] == {"epochs": 3, "iterations_per_epoch": 5, "lr": 0.01} for c in scratch)
    assert [c.key["training"]["epochs"] for c in cells if c.all_shot] == [4, 4]
    assert all(c.key["training"] == {"epochs": 1, "iterations_per_epoch": 3}
               for c in cells if c.method in ("full", "dgst"))
    assert all(c.key["head"] == "fresh" for c in cells if c.method != "zero-shot")
    zero = [c for c in cells if c.method == "zero-shot"]
    assert [(c.dataset, c.shots) for c in zero] == [("hn-center-b", 0), ("mediastinum", 0)]
    raw["head"] = "keep"
    kept = {c.cell_id for c in enumerate_cells(parse_config(raw))}
    assert kept & {c.cell_id for c in cells} == {c.cell_id for c in zero}  # only the zero-shot cells survive
    raw["budgets"] = {"scratch": {"epochs": 0, "iterations_per_epoch": 5}}
    with pytest.raises(MedadaptError, match="budgets.scratch.epochs: 0 is not an integer >= 1"):
        parse_config(raw)
    raw["budgets"] = {"nope": {"epochs": 1, "iterations_per_epoch": 5}}
    with pytest.raises(MedadaptError, match=r"budgets: unknown key\(s\) \['nope'\]"):
        parse_config(raw)


def test_paired_statistics():
    a = {(seed, f"c{i}"): 0.5 + 0.01 * i + 0.1 for seed in (0, 1, 2) for i in range(6)}
    b = {(seed, f"c{i}"): 0.5 + 0.01 * i + (0.002 if i % 2 else -0.002) for seed in (0, 1, 2) for i in range(6)}
    comp = stats.paired_comparison(a, b)
    assert comp.n_pairs == 18 and abs(comp.mean_difference - 0.1) < 1e-9
    assert comp.ci_low > 0.09 and comp.ci_high < 0.11 and comp.p_value < 1e-3 and comp.significant
    same = stats.paired_comparison(a, dict(a))
    assert same.p_value == 1.0 and same.mean_difference == 0.0 and not same.significant
    # a side without seeds (the zero-shot row) pairs each case with that case under every seed
    zero = {(None, f"c{i}"): 0.5 for i in range(6)}
    assert stats.paired_comparison(a, zero).n_pairs == 18
    # NaN (undefined) values drop out of the pairs and count as undefined in the summary
    b_nan = dict(b)
    b_nan[(0, "c0")] = float("nan")
    assert stats.paired_comparison(a, b_nan).n_pairs == 17
    summary = stats.seed_summary(b_nan)
    assert summary.n_undefined == 1 and summary.n_seeds == 3 and summary.n_values == 17


def test_marks_only_what_a_paired_test_separates():
    rng = __import__("numpy").random.default_rng(0)
    base = {(s, f"c{i}"): float(v) for s in (0, 1, 2) for i, v in enumerate(rng.uniform(0.4, 0.8, 6))}
    noise = lambda k: {key: v + float(rng.normal(0, 0.02)) for key, v in base.items()}  # noqa: E731
    values = {"best": {k: v + 0.2 for k, v in base.items()}, "tie": noise(0), "tie2": noise(1),
              "worst": {k: v - 0.3 for k, v in base.items()}}
    values["tie"] = {k: v + 0.005 for k, v in values["tie"].items()}
    marks = stats.rank_marks(list(values), values)
    assert marks["best"] == "bold" and marks["worst"] == ""
    assert marks["tie"] == marks["tie2"] == "underline"  # not separable from each other: both underlined
    close = {"a": values["tie"], "b": values["tie2"]}
    assert stats.rank_marks(["a", "b"], close) == {"a": "bold", "b": "bold"}  # nothing separates them


# ------------------------------------------------------------------------------------------------ quick grid

@pytest.fixture(scope="session")
def quick_grid(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench") / "quick"
    config = load_config("quick")
    result = runner.run_grid(config, workdir, progress=False)
    return config, workdir, result


def test_quick_grid_end_to_end(quick_grid):
    config, workdir, result = quick_grid
    cells = grid_cells(runner.benchmark_for(config), config, workdir)
    assert result["ran"] == len(cells) == 34 and result["report"]["missing"] == []
    report = Path(result["report"]["dir"])
    for name in ("table1.md", "table1.csv", "table1_hd95.md", "table2.md", "table2.csv", "paired.md",
                 "paired.csv", "gamma.md", "gamma.csv", "gamma.png", "curves.png", "qualitative.png", "cells.csv",
                 "per_case.csv", "report.md"):
        assert (report / name).stat().st_size > 0, name
    table1 = (report / "table1.md").read_text()
    for label in ("Foundation, no fine-tuning", "From scratch", "Full", "LinearProb", "LoRA", "DGST",
                  "All-shot (5-shot, from scratch)", "1-shot DSC (%)", "3-shot NSD (%)", "spread over seeds"):
        assert label in table1
    assert "DGST − Full" in (report / "paired.md").read_text()
    # the zero-shot cell: the foundation with its own head, evaluated on the same test split, no training
    zero = [c for c in cells if c.method == "zero-shot"]
    assert len(zero) == 2
    zrec = json.loads((workdir / "cells" / zero[0].cell_id / "cell.json").read_text())
    frec = json.loads((workdir / "cells" / next(c for c in cells if c.method == "full").cell_id
                       / "cell.json").read_text())
    assert zrec["head"] == "keep" and zrec["parameters"]["trainable"] == 0 and zrec["split"] == frec["split"]
    assert frec["head"] == "fresh" and len(frec["loss_curve"]) == frec["training"]["epochs"]
    table2 = (report / "table2.md").read_text()
    assert "1.00×" in table2 and "Bias+Norm" in table2 and "SGST" in table2
    # every cell record is self-contained: config, seed, per-case metrics, parameters, timing
    first = next(c for c in cells if c.method != "zero-shot")
    record = json.loads((workdir / "cells" / first.cell_id / "cell.json").read_text())
    assert record["key"] == first.key and record["seed"] == 0 and record["shots"] == first.shots
    assert record["per_case"] and {"case", "class", "dsc", "nsd"} <= set(record["per_case"][0])
    assert record["parameters"]["trainable"] > 0 and record["timing"]["median_iteration_seconds"] > 0
    assert record["executor"]["kind"] == "local"
    # a second run finds everything finished and runs nothing
    again = runner.run_grid(config, workdir, progress=False, report=False)
    assert again["ran"] == 0


def test_report_rebuilds_from_cell_records_alone(quick_grid, tmp_path):
    config, workdir, result = quick_grid
    copy_dir = tmp_path / "copy"
    for cell_json in (workdir / "cells").rglob("cell.json"):  # records and qualitative slices, nothing else
        dest = copy_dir / cell_json.parent.relative_to(workdir)
        dest.mkdir(parents=True)
        shutil.copy(cell_json, dest)
        shutil.copy(cell_json.parent / "qualitative.npz", dest)
    shutil.copy(workdir / "inputs.json", copy_dir / "inputs.json")  # the digests the cells' keys name
    rebuilt = write_report(config, copy_dir, progress=False)
    original = Path(result["report"]["dir"])
    for name in ("table1.md", "table1.csv", "table2.md", "table2.csv", "gamma.md", "gamma.csv"):
        assert (Path(rebuilt["dir"]) / name).read_text() == (original / name).read_text(), name
    assert (Path(rebuilt["dir"]) / "qualitative.png").stat().st_size > 0
    # a lost cell shows up as missing instead of failing the report
    victim = next((copy_dir / "cells").rglob("cell.json"))
    victim.unlink()
    partial = write_report(config, copy_dir, progress=False)
    assert len(partial["missing"]) == 1 and "Missing cells (1)" in Path(partial["files"]["report.md"]).read_text()



def _committed_copy(workdir: Path, dest: Path) -> Path:
    """What a grid commits (benchmarks/<config>/): records, inputs.json, the foundation; no data, no runs."""
    for cell_json in (workdir / "cells").rglob("cell.json"):
        target = dest / cell_json.parent.relative_to(workdir)
        target.mkdir(parents=True)
        shutil.copy(cell_json, target)
    shutil.copy(workdir / "inputs.json", dest / "inputs.json")
    foundation = next(workdir.glob("foundation-*"))
    (dest / foundation.name).mkdir()
    for name in ("plans.json", "weights.pt"):
        shutil.copy(foundation / name, dest / foundation.name / name)
    return dest


def _listing(workdir: Path, capsys) -> dict[str, str]:
    assert main(["bench", "quick", "--list", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out.splitlines()
    return {line.split()[1]: line for line in out[:-1]} | {"summary": out[-1]}


def test_committed_records_are_finished_without_their_data(quick_grid, tmp_path, capsys):
    """A grid folder as git keeps it (no data, no runs): every cell is finished by the digests inputs.json
    recorded; regenerated data with the same bytes keeps them finished, other bytes make them stale."""
    config, workdir, _ = quick_grid
    copy_dir = _committed_copy(workdir, tmp_path / "quick")
    listing = _listing(copy_dir, capsys)
    assert listing["summary"].startswith("34/34 cells finished") and "stale" not in listing["summary"]
    # the same data regenerated: same bytes, same keys
    from medadapt.benchmark.harness import input_digests, write_datasets
    from medadapt.benchmark.config import dataset_keys
    from medadapt.benchmark.grid import grid_paths

    paths = grid_paths(config, copy_dir)
    write_datasets(dataset_keys(config), paths, progress=False)
    assert input_digests(paths) == input_digests(grid_paths(config, workdir))
    assert _listing(copy_dir, capsys)["summary"].startswith("34/34 cells finished")
    # data with other bytes (a regenerated cohort that differs): its cells are stale, with the reason
    label = next(Path(paths.datasets["mediastinum"]).glob("labelsTr/*.nii.gz"))
    label.write_bytes(label.read_bytes() + b"\0")
    listing = _listing(copy_dir, capsys)
    stale = [line for line in listing.values() if line.startswith("stale")]
    assert len(stale) == 17 and all("/mediastinum/" in line or line.split()[1].startswith("mediastinum/")
                                    for line in stale)
    assert all("its data's bytes are not the ones its record names (inputs.data" in line for line in stale)
    assert "17 stale" in listing["summary"]


def test_stale_records_are_listed_with_the_reason_and_rerun(quick_grid, tmp_path, capsys, monkeypatch):
    config, workdir, _ = quick_grid
    copy_dir = _committed_copy(workdir, tmp_path / "quick")
    cells = sorted((copy_dir / "cells").rglob("cell.json"))
    # a truncated record: stale, never read as finished, no traceback
    truncated = cells[0]
    truncated.write_text(truncated.read_text()[:100])
    # a record from another numerics version of the code
    older = cells[1]
    record = json.loads(older.read_text())
    record["key"]["numerics"] = 0
    older.write_text(json.dumps(record))
    listing = _listing(copy_dir, capsys)
    by_path = {str(p.parent.relative_to(copy_dir / "cells")): line for p, line in
               ((p, listing.get(str(p.parent.relative_to(copy_dir / "cells")), "")) for p in cells[:2])}
    assert by_path[str(truncated.parent.relative_to(copy_dir / "cells"))].startswith("stale")
    assert "cannot be read (truncated or damaged)" in by_path[str(truncated.parent.relative_to(copy_dir / "cells"))]
    assert "the code's numerics version changed (numerics: 0 -> 1)" in by_path[
        str(older.parent.relative_to(copy_dir / "cells"))]
    assert listing["summary"].startswith("32/34 cells finished") and "2 stale" in listing["summary"]
    # the foundation's file is not the one the cells name: every trained cell and zero-shot cell is stale
    weights = next(copy_dir.glob("foundation-*")) / "weights.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    listing = _listing(copy_dir, capsys)
    assert listing["summary"].startswith("0/34 cells finished") and "34 stale" in listing["summary"]
    # (all but the truncated record, whose reason stays that it cannot be read)
    assert sum("the foundation's weights are not the ones its record names" in v for v in listing.values()) == 33
    # running the grid re-runs exactly the stale cells (here: records replaced by a stand-in run)
    ran = []
    monkeypatch.setattr(runner, "run_cell", lambda cell, paths, **kw: (ran.append(cell.cell_id), {
        "cell_seconds": 0.0, "metrics": {"classes": {"x": {"dsc": {"mean": 0.5}}}}})[1])
    weights.write_bytes(weights.read_bytes()[:-1])  # the committed weights again: only the two records are stale
    runner.run_grid(config, copy_dir, progress=False, report=False)
    assert sorted(ran) == sorted(str(p.parent.relative_to(copy_dir / "cells")) for p in cells[:2])


# ------------------------------------------------------------------------------------------------ resumption

def test_interrupted_grid_resumes_without_recomputing(tmp_path, monkeypatch):
    raw = copy.deepcopy(quick_raw())
    config = small_config(seeds=[0, 1])
    cells = enumerate_cells(config)
    assert len(cells) == 8
    real_run_cell = runner.run_cell
    calls = []

    def interrupted(cell, paths, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while the 4th cell is in progress
        calls.append(cell.cell_id)
        return real_run_cell(cell, paths, **kw)

    monkeypatch.setattr(runner, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(config, tmp_path, progress=False)
    finished = cell_files(tmp_path)
    assert len(finished) == 3

    calls.clear()
    monkeypatch.setattr(runner, "run_cell", lambda cell, paths, **kw: (calls.append(cell.cell_id),
                                                                          real_run_cell(cell, paths, **kw))[1])
    result = runner.run_grid(config, tmp_path, progress=False)
    assert result["ran"] == 5 and len(calls) == 5
    after = cell_files(tmp_path)
    assert len(after) == 8
    assert {k: after[k] for k in finished} == finished  # no finished cell was rewritten
    assert raw == quick_raw()


def test_killed_process_loses_no_finished_cell(quick_grid, tmp_path, capsys):
    """SIGKILL the CLI mid-grid, then re-run: finished cells are kept as they were, the rest are run. The work
    folder starts with the quick grid's inputs (its cohort and foundation, made from the same recipes), so the
    two processes spend their time on cells."""
    _, quick, _ = quick_grid
    workdir = tmp_path / "work"
    shutil.copytree(quick, workdir, ignore=lambda folder, names: [n for n in names if Path(folder) == quick
                                                                  and n in ("cells", "report", "grid.json")])
    config_path = tmp_path / "small.yaml"
    raw = quick_raw()
    raw["datasets"] = {"hn-center-b": raw["datasets"]["hn-center-b"]}
    raw["table1"] = {"methods": ["full", "bias", "dgst"], "all_shot": "scratch"}
    raw.pop("table2")
    raw["gamma"]["values"] = [1, 2, 3]
    config_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "medadapt.cli", "bench", str(config_path), "--workdir", str(workdir), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 900  # generous: a loaded machine must not make this flaky
    while time.time() < deadline and len(cell_files(workdir) if (workdir / "cells").exists() else {}) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = cell_files(workdir)
    total = len(enumerate_cells(parse_config(raw)))
    assert 2 <= len(finished) < total
    for path in finished:  # atomic writes: whatever exists is complete
        assert json.loads((workdir / path).read_text())["per_case"]
    assert main(cmd[3:-1]) == 0  # the re-run (in this process: what matters is what the killed one left)
    assert f"{len(finished)} already finished, {total - len(finished)} to run" in capsys.readouterr().out
    after = cell_files(workdir)
    assert len(after) == total and {k: after[k] for k in finished} == finished


# ------------------------------------------------------------------------------------------------ Ray

def test_ray_runs_cells_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    config = small_config(table1={"methods": ["full", "dgst"], "all_shot": None, "zero_shot": False})
    raw = copy.deepcopy(config.raw)
    raw["datasets"]["hn-center-b"]["shots"] = [2]
    config = parse_config(raw, source="ray.yaml")
    assert len(enumerate_cells(config)) == 2
    result = runner.run_grid(config, tmp_path, ray_address="local", progress=False)
    cells = grid_cells(runner.benchmark_for(config), config, tmp_path)  # keyed by the inputs the run made
    assert result["ran"] == 2 and result["report"]["missing"] == []
    records = [json.loads((tmp_path / "cells" / c.cell_id / "cell.json").read_text()) for c in cells]
    assert {r["executor"]["kind"] for r in records} == {"ray"}
    assert all(r["executor"]["threads"] == 1 for r in records)  # ray.cpus_per_cell of the quick config
    assert {r["method"] for r in records} == {"full", "dgst"}


def test_a_cut_grid_runs_its_rows_at_the_shot_counts_it_names(tmp_path):
    """table1.shots / every_shot, table2.shots and gamma.shots cut a grid (the openkbp-dgst plan) without
    changing any cell's key: each cell is the uncut grid's cell of the same setting."""
    import yaml

    from medadapt.benchmark import benchmarks

    full_doc = yaml.safe_load(builtin_config_path("quick").read_text())
    cut_doc = yaml.safe_load(builtin_config_path("quick").read_text())
    cut_doc["table1"].update({"shots": [2], "every_shot": ["full", "dgst"]})
    cut_doc["table2"]["shots"] = [2]
    cut_doc["gamma"].update({"shots": 2, "values": [3]})
    files = []
    for name, doc in (("full.yaml", full_doc), ("cut.yaml", cut_doc)):
        files.append(tmp_path / name)
        files[-1].write_text(yaml.safe_dump(doc))
    (b_full, c_full), (b_cut, c_cut) = benchmarks.load(files[0]), benchmarks.load(files[1])
    full = {c.cell_id: c for c in b_full.cells(c_full, None)}
    cut = b_cut.cells(c_cut, None)
    hn = [c for c in cut if c.dataset == "hn-center-b" and not c.all_shot]  # shots [1, 2]: γ at 2 in both
    assert hn and all(c.cell_id in full and c.key == full[c.cell_id].key for c in hn)
    assert {c.method for c in hn if c.shots == 1} == {"full", "dgst"}  # the headline rows at every count
    assert {c.method for c in hn if c.shots == 2} >= {"scratch", "linear-probe", "lora", "bias-norm", "sgst"}
    assert {c.options.get("gamma") for c in hn if c.method == "dgst" and c.shots == 2} == {1, 3}
    assert c_cut.focus_shots(c_cut.datasets[0]) == 2 and c_full.focus_shots(c_full.datasets[0]) == 2
