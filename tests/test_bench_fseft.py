"""The FSEFT benchmark grid (`medadapt bench fseft`): config, cells, a tiny grid end to end, resumption."""
import copy
import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from medadapt.benchmark import runner
from medadapt.benchmark.config import builtin_config_path
from medadapt.benchmark.grid import enumerate_cells, load_config, parse_config
from medadapt.benchmark.harness import grid_cells
from medadapt.cli import main
from medadapt.errors import MedadaptError


def raw_config(name: str = "fseft-quick") -> dict:
    return yaml.safe_load(builtin_config_path(name).read_text())


def ids(raw: dict) -> set[str]:
    return {c.cell_id for c in enumerate_cells(parse_config(copy.deepcopy(raw)))}


# ------------------------------------------------------------------------------------------------ config, cells

def test_fseft_grid_counts():
    config = load_config("fseft")
    cells = enumerate_cells(config)
    assert len(cells) == len({c.cell_id for c in cells}) == 471
    by = Counter(e for c in cells for e in c.experiments)
    # the text's readings (BN at lr 0.5, FT-Last at 1e-4, TI with λ = 1), cached features and full fine-tuning
    # at 10x its epochs (the row that had not levelled off) at k = 5
    assert by["variants"] == 5 * 5 * 3
    # Table 1: 3 Generalization (known tasks only) + 4 methods x 3 k x 5 tasks x 3 seeds + TI 3 x 5 x 3
    assert by["table1"] == 3 + 180 + 45 and by["all_shot"] == 4 * 5 * 3
    # Fig. 2b: 4 margins x both λ (the commands' 0.1, the text's 1) + the no-TI reference, 3 tasks x 3 seeds
    assert by["fig2a"] == 2 * 3 * 5 * 3 and by["fig2b"] == (4 * 2 + 1) * 3 * 3
    gen = [c for c in cells if c.method == "generalization"]
    assert sorted(c.dataset for c in gen) == ["aorta", "esophagus", "thyroid"]  # azygos, parotid: new structures
    assert config.foundation_classes and "azygos_vein" not in config.foundation_classes
    assert [d.labels for d in config.datasets][:2] == [("aorta",), ("esophagus",)]
    # shared cells run once: the 3x3x3 adapter serves Table 1 and Fig. 2a, its TI cell at k=10 Table 1 and Fig. 2b
    k3 = [c for c in cells if c.method == "spatial-adapter" and c.shots == 10 and c.dataset == "aorta"
          and c.options == {"kernel_size": 3, "width": None, "norm": "instance"}]
    assert len(k3) == 3 and all(set(c.experiments) == {"table1", "fig2a", "fig2b"} for c in k3)
    ti = [c for c in cells if c.options.get("ti_margin") == 0.3 and c.shots == 10 and c.dataset == "aorta"
          and "variant" not in c.options and c.options["ti_weight"] == 0.1]
    assert len(ti) == 3 and all(set(c.experiments) == {"table1", "fig2b"} for c in ti)
    assert ti[0].options == {"kernel_size": 3, "width": None, "norm": "instance", "ti_mode": "query",
                             "ti_margin": 0.3, "ti_weight": 0.1, "ti_error": "max", "ti_step": "epoch"}
    # heads, recipe and post-processing are in the keys: a fresh classifier for every method (the first commit)
    assert {c.key["head"] for c in cells if c.method != "generalization"} == {"fresh"}
    assert all(c.key["postprocess"] == "lcc" for c in cells)
    assert {c.key["recipe"]["name"] for c in cells if "recipe" in c.key} == {"fseft-paper-cpu"}
    # the authors' budgets, per method: epochs of one pass over the k support volumes
    budgets = {c.method: json.dumps(c.key["training"]) for c in cells if "variant" not in c.options
               and c.method != "generalization"}
    assert budgets == {m: json.dumps({"epochs": e, "iterations_per_epoch": "cases"}) for m, e in
                       (("linear-probe", 50), ("ft-last", 100), ("full", 150), ("scratch", 150),
                        ("spatial-adapter", 100))}
    text_adapter = [c for c in cells if c.options.get("variant") == "text-adapter"]
    assert text_adapter[0].options["norm"] == "batch" and text_adapter[0].key["training"]["lr"] == 0.5
    assert "domains" in cells[0].key["foundation"] and "domain" not in cells[0].key["foundation"]


def test_dgst_grids_keep_their_cells():
    """The generic extensions enter a key only when set: the DGST grids' cells (and hashes) are unchanged by
    them. (The digests are those of the purposeful random streams, medadapt-seeds/2, which moved every cell on
    purpose: a fresh head no longer repeats the foundation's initial one; before it: 5a229a0a0dc5330a,
    5354a921c165e68c, 1cb1e7d9d8076bd3. Issue 30 then added the inputs' digests and the numerics version to
    every key, here with no inputs made (None); before it: ac904115c41f70d6, b7b5f84ff8ccb416,
    8633f6de0ae2f972. The committed grids' keys are checked against their records in test_results_of_record.)"""
    expected = {"default": "39d2ff3ca3aaa183", "quick": "ca3474098ffbc72d", "paper": "0ebbcfb1c6843d33"}
    for name, digest in expected.items():
        cell_ids = sorted(c.cell_id for c in enumerate_cells(load_config(name)))
        assert hashlib.sha256("\n".join(cell_ids).encode()).hexdigest()[:16] == digest, name


def test_edits_rerun_exactly_the_affected_cells():
    raw = raw_config()
    base = ids(raw)
    more = copy.deepcopy(raw)
    more["fseft"]["fig2b"]["margins"] = [0.1, 0.3, 0.2]
    assert base < ids(more) and len(ids(more) - base) == 2       # one new margin on one task, one seed, both λ
    recipe = copy.deepcopy(raw)
    recipe["recipe"]["epochs"] = 3
    changed = ids(recipe)
    generalization = {c for c in base if "/generalization-" in c}
    assert generalization and base & changed == generalization              # no training: no recipe in the key
    post = copy.deepcopy(raw)
    post["postprocess"] = "none"
    assert not base & ids(post)                                              # every cell is evaluated after it
    ti = copy.deepcopy(raw)
    ti["fseft"]["transductive"]["weight"] = 2.0
    moved = base - ids(ti)
    assert moved and all("ti_" in c for c in moved)                          # only the TI cells
    labels = copy.deepcopy(raw)
    labels["datasets"]["parotid"]["labels"] = ["submandibular_gland"]
    assert {c for c in base if c.startswith("aorta/")} <= ids(labels)        # the other task keeps its cells
    assert not {c for c in base if c.startswith("parotid/")} & ids(labels)
    sources = copy.deepcopy(raw)
    sources["foundation"]["domains"] = ["src-a-hn", "src-b-chest"]
    assert not base & ids(sources)                                           # another foundation


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["fseft"].update(colour="red"), "fseft: unknown key(s) ['colour']"),
    (lambda r: r["datasets"]["aorta"].update(labels=["aorta", "liver"]),
     "datasets.aorta.labels[1]: 'liver' is not a label of domain 'tgt-chest'"),
    (lambda r: r.update(table1={"methods": ["full"]}), "needs exactly one of table1"),
    (lambda r: r["foundation"].update(domain="src-a-hn"), "foundation: needs exactly one of domain"),
    (lambda r: r["fseft"].update(methods=["spatial-adapter", "nope"]), "fseft.methods: unknown method 'nope'"),
    (lambda r: r["fseft"].update(all_shot=["generalization"]), "'generalization' trains nothing"),
    (lambda r: r["fseft"].pop("transductive"), "fseft.fig2b: sweeps the transductive margin"),
    (lambda r: r["fseft"]["transductive"].update(mode="sometimes"), "fseft.transductive: --transductive"),
    (lambda r: r["fseft"]["fig2b"].update(datasets=["liver"]), "fseft.fig2b.datasets[0]: unknown dataset"),
    (lambda r: r["fseft"]["fig2b"].update(margins=[0.1, 1.5]), "fseft.fig2b.margins[1]: 1.5 is not a number"),
    (lambda r: r["fseft"]["fig2b"].update(shots=9), "fseft.fig2b.shots: 9 shots but aorta's train split"),
    (lambda r: r.update(heads={"scratch": "maybe"}), "heads.scratch: unknown head policy 'maybe'"),
    (lambda r: r.update(postprocess="smooth"), "postprocess: unknown 'smooth'"),
    (lambda r: r.update(recipe="no-such-recipe"), "recipe: 'no-such-recipe': not a built-in recipe"),
    (lambda r: r["recipe"].update(epochs=0), "recipe: "),
    (lambda r: r.update(method_options={"spatial-adapter": {"rank": 2}}),
     "method_options.spatial-adapter: unknown key(s) ['rank']"),
])
def test_config_errors_name_the_key(edit, message):
    raw = raw_config()
    edit(raw)
    with pytest.raises(MedadaptError) as err:
        parse_config(raw, source="my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: ") and message in text and "\n" not in text


def test_recipe_file_relative_to_the_config(tmp_path):
    raw = raw_config()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw["recipe"]))
    raw["recipe"] = "r.yaml"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    from_file = {c.cell_id for c in enumerate_cells(load_config(tmp_path / "grid.yaml"))}
    assert from_file == ids(raw_config())                          # same recipe, same cells
    raw["recipe"] = "fseft-paper"                                  # a built-in name; training from the recipe
    config = parse_config(raw)
    assert config.recipe["name"] == "fseft-paper" and \
        config.training == {"epochs": 100, "iterations_per_epoch": "cases"}


# ------------------------------------------------------------------------------------------------ tiny grid

@pytest.fixture(scope="module")
def fseft_grid(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench") / "fseft-quick"
    config = load_config("fseft-quick")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only costs (and on a busy machine, a lot)
    try:
        result = runner.run_grid(config, workdir, progress=False)
    finally:
        torch.set_num_threads(threads)
    return config, workdir, result


def test_fseft_quick_end_to_end(fseft_grid):
    config, workdir, result = fseft_grid
    cells = grid_cells(runner.benchmark_for(config), config, workdir)
    assert result["ran"] == len(cells) == 22 and result["report"]["missing"] == []
    report = Path(result["report"]["dir"])
    for name in ("table1.md", "table1.csv", "paired.md", "paired.csv", "fig2a.png", "fig2a.csv", "fig2b.png",
                 "fig2b.csv", "qualitative.png", "cells.csv", "per_case.csv", "report.md"):
        assert (report / name).stat().st_size > 0, name
    # Table 1: structures as columns + Avg, row groups (all-shot first, then k from largest), methods as rows
    lines = (report / "table1.md").read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Method", "aorta", "parotid", "Avg"]
    labels = [line.split("|")[1].strip() for line in lines[2:] if line.startswith("|")]
    assert labels == ["**All training cases (and no adaptation)**", "Generalization", "From scratch",
                      "**k = 2**", "LinearProb", "Spatial adapter", "Spatial adapter + TI",
                      "Adapter (text: BN, lr 0.5)", "Adapter (cached features)",
                      "**k = 1**", "LinearProb", "Spatial adapter", "Spatial adapter + TI",
                      "Adapter (text: BN, lr 0.5)", "Adapter (cached features)"]
    assert "†: the training loss" in (report / "table1.md").read_text()   # the levelled-off legend
    generalization = next(line for line in lines if line.startswith("| Generalization"))
    assert "n/a" in generalization                                         # parotid: new to the foundation
    rows = list(csv.DictReader(open(report / "table1.csv")))
    assert {r["dataset"] for r in rows} == {"aorta", "parotid", "Avg"}
    assert "Spatial adapter + TI − Spatial adapter" in (report / "paired.md").read_text()
    fig2b = list(csv.DictReader(open(report / "fig2b.csv")))
    assert [(r["weight"], r["margin"]) for r in fig2b] == [("", ""), ("0.1", "0.1"), ("0.1", "0.3"), ("1.0", "0.1"),
                                                          ("1.0", "0.3")] and all(r["dsc_mean"] for r in fig2b)
    # the foundation: one sigmoid model over the three sources' structures
    plans = json.loads(next(workdir.glob("foundation-*/plans.json")).read_text())
    assert plans["activation"] == "sigmoid"
    assert {"aorta", "thyroid", "lung", "esophagus"} <= set(plans["labels"])
    # the cells: generalization (no training), a per-query TI cell, LCC post-processing, head match
    by_method = {(c.method, "ti_mode" in c.options): c for c in cells}
    gen = json.loads((workdir / "cells" / by_method["generalization", False].cell_id / "cell.json").read_text())
    assert gen["parameters"]["trainable"] == 0 and gen["head"] == "keep"
    ti_cell = by_method["spatial-adapter", True]
    ti = json.loads((workdir / "cells" / ti_cell.cell_id / "cell.json").read_text())
    run = json.loads((workdir / "cells" / ti_cell.cell_id / "run" / "run.json").read_text())
    assert run["transductive"]["mode"] == "query" and run["transductive"]["margin"] in (0.1, 0.3)
    assert run["postprocess"] == "lcc" and run["recipe"]["name"] == "fseft-quick" and run["head"] == "fresh"
    assert ti["convergence"]["levelled_off"] is None  # 2 epochs: too short to tell, and said so
    queries = sorted(p.name for p in (workdir / "cells" / ti_cell.cell_id / "run" / "queries").iterdir())
    assert queries == sorted(ti["split"]["test"]) and ti["loss_curve"]
    assert not list((workdir / "cells").glob("**/checkpoint_latest.pt"))    # checkpoints dropped once stored
    scratch = json.loads((workdir / "cells" / by_method["scratch", False].cell_id / "cell.json").read_text())
    assert scratch["head"] == "fresh" and scratch["all_shot"] and scratch["shots"] == len(scratch["split"]["train"])


def test_fseft_resume_and_cli(fseft_grid, capsys):
    config, workdir, _ = fseft_grid
    again = runner.run_grid(config, workdir, progress=False, report=False)
    assert again["ran"] == 0
    assert main(["bench", "fseft-quick", "--list", "--workdir", str(workdir)]) == 0
    assert "22/22 cells finished" in capsys.readouterr().out
    assert main(["bench", "fseft-quick", "--report", "--quiet", "--workdir", str(workdir)]) == 0
    assert main(["bench", "fseft", "--list", "--workdir", str(workdir / "none")]) == 0
    assert "0/471 cells finished" in capsys.readouterr().out
