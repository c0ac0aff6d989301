"""The MedSeqFT benchmark grid (`medadapt bench medseqft`): config, cells, a tiny grid end to end, resumption."""
import copy
import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from medadapt.benchmark import runner_medseqft as runner
from medadapt.benchmark.config import builtin_config_path, paper_of
from medadapt.benchmark.medseqft import enumerate_cells, load_config, parse_config
from medadapt.benchmark.harness import grid_cells
from medadapt.cli import main
from medadapt.errors import MedadaptError

STREAM_ROWS = ["scratch", "full", "linear-probe", "linear-probe-decoderpretrained", "lora-rank2", "lora-rank4",
               "adapter-reduction2", "joint", "seq-ft", "seq-ft-random", "seq-ft-mds", "seq-ft-kgrft", "medseqft"]


def raw_config(name: str = "medseqft-quick") -> dict:
    return yaml.safe_load(builtin_config_path(name).read_text())


def ids(raw: dict) -> set[str]:
    return {c.cell_id for c in enumerate_cells(parse_config(copy.deepcopy(raw)))}


# ------------------------------------------------------------------------------------------------ config, cells

def test_medseqft_grid_cells():
    config = load_config("medseqft")
    cells = enumerate_cells(config)
    assert len(cells) == len({c.cell_id for c in cells}) == 48
    stream = [c for c in cells if c.kind == "stream"]
    assert Counter(c.row for c in stream) == {r.name: 2 for r in config.rows} and len(config.rows) == 18
    assert [r.display for r in config.rows if r.method == "lora"] == [f"LoRA (r={r})" for r in (2, 4, 8, 16, 32)]
    assert [r.display for r in config.rows if r.method == "adapter"] == [f"Adapter (γ={g})" for g in (2, 4, 8)]
    unseen = [c for c in cells if c.kind == "unseen"]
    assert Counter((c.task, c.row) for c in unseen) == {(t, r): 2 for t in ("cervical-spine", "lung-vessels")
                                                        for r in ("tfs", "fft-m0", "fft-mn")}
    by_id = {c.cell_id: c for c in cells}
    for c in unseen:  # FFT from M_n starts from the MedSeqFT cell of its own seed
        if c.row == "fft-mn":
            assert by_id[c.depends].row == "medseqft" and by_id[c.depends].seed == c.seed
            assert c.key["refined_from"]["cell"] == by_id[c.depends].hash
        else:
            assert c.depends is None and "refined_from" not in c.key
    # only what a row uses enters its key
    rows = {c.row: c.key["row"] for c in stream}
    assert rows["full"] == {"method": "full", "options": {}}
    # on the MAE foundation the PEFT rows train the decoder (docs/methods.md); one row keeps the other reading
    assert rows["lora-rank8"] == {"method": "lora", "options": {"rank": 8, "alpha": 8.0, "decoder": "new"}}
    assert rows["linear-probe"] == {"method": "linear-probe", "options": {"decoder": "new"}}
    assert rows["linear-probe-decoderpretrained"] == {"method": "linear-probe", "options": {}}
    assert rows["seq-ft"] == {"method": "seq-ft", "buffer": "none", "retention": "none"}
    assert set(rows["seq-ft-random"]) == {"method", "buffer", "retention", "buffer_size"}
    assert set(rows["medseqft"]) == {"method", "buffer", "retention", "buffer_size", "mds_repeats", "kd_rank",
                                     "kd_recipe", "kd_until"}
    # the recipe: AdamW + cosine + Dice/CE scaled for the CPU; the KD stage at a tenth of its lr, constant, until
    # L_refine levels off, at most the fine-tuning epochs
    assert config.recipe["optimizer"]["name"] == "adamw" and config.recipe["loss"]["name"] == "dice_ce"
    assert config.kd_until == rows["medseqft"]["kd_until"] == "levelled"
    assert config.kd_recipe["epochs"] == config.recipe["epochs"] and config.kd_recipe["schedule"]["name"] == "constant"
    assert config.kd_recipe["lr"] == pytest.approx(0.1 * config.recipe["lr"])
    assert config.foundation["objective"] == "mae" and config.stream["downsample"] == [1, 2, 2]
    assert config.seeds == (0, 1)


def test_edits_rerun_exactly_the_affected_cells():
    raw = raw_config()
    base = ids(raw)
    config = parse_config(copy.deepcopy(raw))
    cells = enumerate_cells(config)
    mds = {c.cell_id for c in cells if c.row in ("seq-ft-mds", "medseqft")}
    from_medseqft = {c.cell_id for c in cells if c.row == "fft-mn"}
    edited = copy.deepcopy(raw)
    edited["medseqft"]["mds_repeats"] = 3
    assert base - ids(edited) == mds | from_medseqft                       # MDS rows and what starts from them
    edited = copy.deepcopy(raw)
    edited["medseqft"]["kd_rank"] = 4
    assert {c.split("/")[-1].rsplit("-", 2)[0] for c in base - ids(edited)} == {"seq-ft-kgrft", "medseqft", "fft-mn"}
    edited = copy.deepcopy(raw)
    edited["medseqft"]["buffer_size"] = 2
    assert {c.split("/")[-1].rsplit("-", 2)[0] for c in base - ids(edited)} == {
        "seq-ft-random", "seq-ft-mds", "medseqft", "fft-mn"}
    edited = copy.deepcopy(raw)
    edited["medseqft"]["kd_fft"] = "joint"  # the grid of record pins the earlier reading: the buffer rows change
    assert {c.split("/")[-1].rsplit("-", 2)[0] for c in base - ids(edited)} == {
        "seq-ft-random", "seq-ft-mds", "medseqft", "fft-mn"}
    edited = copy.deepcopy(raw)
    edited["medseqft"]["kd_lr_fraction"] = 1.0
    assert {c.split("/")[-1].rsplit("-", 2)[0] for c in base - ids(edited)} == {"seq-ft-kgrft", "medseqft", "fft-mn"}
    edited["medseqft"]["kd_lr_fraction"] = 0.1  # the default written out
    assert ids(edited) == base
    edited = copy.deepcopy(raw)
    edited["medseqft"]["kd_until"] = "budget"
    edited["medseqft"].pop("kd_max_epochs")
    assert {c.split("/")[-1].rsplit("-", 2)[0] for c in base - ids(edited)} == {"seq-ft-kgrft", "medseqft", "fft-mn"}
    edited = copy.deepcopy(raw)
    edited["medseqft"]["parallel"][4]["rank"] = [2, 4, 8]
    assert base < ids(edited) and len(ids(edited) - base) == 1             # one new LoRA rank, one seed
    edited = copy.deepcopy(raw)
    edited["recipe"]["epochs"] = 4
    assert not base & ids(edited)                                          # every cell trains with the recipe
    edited = copy.deepcopy(raw)
    edited["stream"]["unseen"] = []
    edited["medseqft"]["unseen"] = []
    assert ids(edited) == {c for c in base if c.startswith("stream/")}
    # the test predictions' tile overlap: every cell predicts, so every cell is new; nnU-Net's default written
    # out is the same grid as no overlap at all (the committed cells' keys stay)
    edited = copy.deepcopy(raw)
    edited["overlap"] = 0.25
    assert not base & ids(edited)
    assert all(c.key["overlap"] == 0.25 for c in enumerate_cells(parse_config(copy.deepcopy(edited))))
    edited["overlap"] = 0.5
    assert ids(edited) == base


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["medseqft"].update(colour="red"), "medseqft: unknown key(s) ['colour']"),
    (lambda r: r["medseqft"].update(sequential=["seq-ft", "seq-ft+ewc"]),
     "medseqft.sequential[1]: unknown sequential row 'seq-ft+ewc'"),
    (lambda r: r["medseqft"].update(parallel=["full", "nope"]), "medseqft.parallel[1].method: unknown"),
    (lambda r: r["medseqft"].update(parallel=[{"method": "lora", "reduction": 2}]),
     "medseqft.parallel[0]: unknown option(s) ['reduction'] of lora"),
    (lambda r: r["medseqft"].update(parallel=[{"method": "lora", "rank": [2, 2]}]),
     "medseqft.parallel[0].rank: [2, 2] is empty or repeats a value"),
    (lambda r: r["medseqft"].update(parallel=[{"method": "lora", "rank": 0}]),
     "medseqft.parallel[0]: method 'lora', option rank (--lora-rank): 0 is not"),
    (lambda r: r["medseqft"].update(unseen=["fft-m7"]), "medseqft.unseen[0]: unknown unseen row 'fft-m7'"),
    (lambda r: r["medseqft"].update(refined_by="full"), "medseqft.refined_by: 'full' is not a sequential row"),
    (lambda r: r["medseqft"].update(buffer_size=50), "medseqft.buffer_size: 50 but task 'neck-glands' trains on"),
    (lambda r: r["medseqft"].update(kd_max_epochs=5), "at least 10 epochs"),
    (lambda r: r["medseqft"].update(kd_until="forever"), "medseqft.kd_until: unknown 'forever'"),
    (lambda r: r["medseqft"].update(kd_lr_fraction=0), "medseqft.kd_lr_fraction: the LoRA-based KD's lr"),
    (lambda r: r["medseqft"].update(kd_fft="both"), "medseqft.kd_fft: unknown 'both'"),
    (lambda r: r["medseqft"].update(parallel=[{"method": "lora", "decoder": "frozen"}]),
     "medseqft.parallel[0].decoder: unknown decoder policy 'frozen'"),
    (lambda r: r["foundation"].update(objective="supervised"),
     "medseqft.sequential: ['seq-ft-mds', 'medseqft'] select the buffer by MDS"),
    (lambda r: r["foundation"].update(objective="contrastive"), "foundation.objective: unknown objective"),
    (lambda r: r["foundation"].update(preset="gpu-huge"), "foundation.preset: unknown preset 'gpu-huge'"),
    (lambda r: r["stream"].update(tasks=["neck-glands", "liver"]), "stream.tasks[1]: 'liver' is not a task"),
    (lambda r: r["stream"].update(name="mr-stream"), "stream.name: task set 'mr-stream'"),
    (lambda r: r["stream"].update(cases=3), "stream.cases: 3 is not an integer >= 5"),
    (lambda r: r.update(shots=40), "shots: 40 but task"),
    (lambda r: r.update(postprocess="smooth"), "postprocess: unknown 'smooth'"),
    (lambda r: r.update(overlap=1.0), "overlap: 1.0 is not a tile overlap in [0, 1)"),
    (lambda r: r.pop("recipe"), "config: missing ['recipe']"),
    (lambda r: r.update(table1={"methods": ["full"]}), "config: unknown key(s) ['table1']"),
])
def test_config_errors_name_the_key(edit, message):
    raw = raw_config()
    edit(raw)
    with pytest.raises(MedadaptError) as err:
        parse_config(raw, source="my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: ") and message in text and "\n" not in text


def test_bad_config_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    raw = raw_config()
    raw["medseqft"]["kd_rank"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert paper_of(raw) == "medseqft" and paper_of(raw_config()) == "medseqft"
    assert main(["bench", str(bad), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medadapt bench: error: ") and "medseqft.kd_rank: 0 is not an integer >= 1" in err
    assert len(err.splitlines()) == 1
    (tmp_path / "broken.yaml").write_text("medseqft: [unclosed\n")
    assert main(["bench", str(tmp_path / "broken.yaml"), "--list"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_ray_submits_a_dependent_cell_after_the_cell_it_starts_from(monkeypatch):
    """The Ray executor (with a stand-in Ray): fft-mn cells go out only once their MedSeqFT cell is back."""
    config = parse_config(raw_config())
    cells = runner.schedule(enumerate_cells(config), config)
    submitted, finished = [], []

    class Ref:
        def __init__(self, cell):
            self.cell = cell

    class FakeRay:
        def remote(self, **resources):
            assert resources == {"num_cpus": 1, "num_gpus": 0.0, "max_retries": 1}

            class Task:
                @staticmethod
                def remote(cell_dict, paths, threads):
                    submitted.append(cell_dict["id"])
                    return Ref(cell_dict)
            return lambda fn: Task

        def wait(self, refs, num_returns):
            return [refs[-1]], refs[:-1]   # the latest submission finishes first: the worst order for deps

        def get(self, ref):
            finished.append(ref.cell["id"])
            return {}

        def cancel(self, ref, force):
            raise AssertionError("nothing is left to cancel")

    class Session:
        def __enter__(self):
            return FakeRay()

        def __exit__(self, *exc):
            return False

    from medadapt.benchmark import harness

    monkeypatch.setattr(harness, "ray_session", lambda address: Session())
    harness.run_on_ray(runner.MEDSEQFT.run_cell, cells, None, config.ray, "local", lambda cell, record: None)
    assert sorted(submitted) == sorted(finished) == sorted(c.cell_id for c in cells)
    for c in cells:
        if c.depends:
            assert finished.index(c.depends) < submitted.index(c.cell_id)


def test_kd_fine_tuning_with_adamw(tiny_unet):
    """The KD-based FFT builds its distillation optimiser from AdamW too (the MedSeqFT recipe's optimiser)."""
    from medadapt.tuning.base import StepContext
    from medadapt.tuning.distill import KDFineTuning, frozen_copy

    class Buffer:
        def sample(self, rng):
            return {"image": torch.randn(2, 1, 16, 32, 32)}

    model = tiny_unet(seed=1)
    strategy = KDFineTuning(frozen_copy(tiny_unet(seed=2)), Buffer(), seed=0)
    model = strategy.prepare(model)
    opt = torch.optim.AdamW(strategy.parameters(model), lr=1e-3, weight_decay=1e-5)
    strategy.attach(opt)
    ctx = StepContext(model=model, forward=model, optimizer=opt,
                      loss=lambda m, b, o: (o[0] if isinstance(o, (list, tuple)) else o).pow(2).mean())
    strategy.train_step(ctx, {"image": torch.randn(2, 1, 16, 32, 32)})
    assert isinstance(strategy.kd_optimizer, torch.optim.AdamW)
    assert strategy.kd_optimizer.defaults["weight_decay"] == 0.0 and strategy.last_kd_loss > 0


# ------------------------------------------------------------------------------------------------ tiny grid

@pytest.fixture(scope="module")
def quick_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("medseqft")
    workdir = root / "medseqft-quick"
    config = load_config("medseqft-quick")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only costs
    try:
        result = runner.run_grid(config, workdir, progress=False)
        yield config, workdir, result
    finally:
        torch.set_num_threads(threads)


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_medseqft_quick_end_to_end(quick_grid):
    config, workdir, result = quick_grid
    cells = grid_cells(runner.MEDSEQFT, config, workdir)
    assert result["ran"] == len(cells) == 16 and result["report"]["missing"] == []
    assert [r.name for r in config.rows] == STREAM_ROWS
    report = Path(result["report"]["dir"])
    for name in ("table2", "table3", "table6", "table7", "transfer", "paired", "refinement"):
        for ext in ("md", "csv"):
            assert (report / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for name in ("fig4.png", "fig4.csv", "refinement.png", "cells.csv", "per_case.csv", "report.md"):
        assert (report / name).stat().st_size > 0, name
    tasks = ["neck-glands", "thoracic-arteries"]
    metric_columns = [f"{t} {m}" for t in tasks for m in ("Dice", "HD95")] + ["Average Dice ↑", "Average HD95 ↓"]
    header, rows = _table(report / "table2.md")
    assert header == ["Method", *metric_columns]
    assert [r[0] for r in rows] == ["TFS", "FFT", "Head fine-tuning", "Head fine-tuning (decoder pretrained)",
                                    "LoRA (r=2)", "LoRA (r=4)", "Adapter (γ=2)", "Joint multi-task (task heads)",
                                    "MedSeqFT", "MedSeqFT (refined M_t)"]
    assert all(v.strip("*") not in ("", "–") for r in rows for v in r[1:3] + r[5:6])   # Dice everywhere
    assert "†: the training loss" in (report / "table2.md").read_text()
    assert "refined M_t: the same cells' models" in (report / "table2.md").read_text()
    header, rows = _table(report / "table3.md")
    assert header == ["Method", "FFT", "Seq. FT", "MDS", "Random", "K&G RFT", *metric_columns]
    assert [r[:6] for r in rows] == [["FFT", "✓", "", "", "", ""], ["Seq. FT", "", "✓", "", "", ""],
                                     ["Seq. FT + Random", "", "✓", "", "✓", ""],
                                     ["Seq. FT + MDS", "", "✓", "✓", "", ""],
                                     ["Seq. FT + K&G RFT", "", "✓", "", "", "✓"],
                                     ["Seq. FT + K&G RFT (refined M_t)", "", "✓", "", "", "✓"],
                                     ["MedSeqFT", "", "✓", "✓", "", "✓"],
                                     ["MedSeqFT (refined M_t)", "", "✓", "✓", "", "✓"]]
    header, rows = _table(report / "table6.md")
    assert header == ["Method"] + [f"{c} {m}" for c in ("vertebrae", "intervertebral_disc", "spinal_cord", "mean")
                                   for m in ("Dice", "HD95")]
    assert [r[0] for r in rows] == ["TFS", "FFT (from M0)", "FFT w/ MedSeqFT (from its M_n)"]
    header, rows = _table(report / "table7.md")
    assert header == ["Method", "First-task FFT (s)", "(KD-based) FFT, tasks 2–n (s)", "LoRA-based KD (s)",
                      "Buffer selection (MDS / random) (s)", "Buffer selection per task (s)", "Sum (s)", "× FFT",
                      "× FFT without buffer selection"]
    assert [r[0] for r in rows] == ["FFT", "Joint multi-task (task heads)", "Seq. FT", "Seq. FT + Random",
                                    "Seq. FT + MDS", "Seq. FT + K&G RFT", "MedSeqFT"]
    assert rows[0][-2] == rows[0][-1] == "1.00" and rows[-1][3] != "–" and rows[-1][4] != "–"
    assert rows[2][3] == rows[2][4] == "–" and rows[2][-2] == rows[2][-1]  # Seq. FT: no buffer, one ratio
    ratio, paper = (float(x.split(" ")[0]) for x in rows[-1][-2:])  # MedSeqFT: the paper's stages cost less
    assert paper < ratio
    assert "target: at most 1.3×" in (report / "table7.md").read_text()
    fig4 = list(csv.DictReader(open(report / "fig4.csv")))
    assert {r["row"] for r in fig4} == {"seq-ft", "seq-ft-random", "seq-ft-mds", "seq-ft-kgrft", "medseqft"}
    assert all(float(r["mean_abs_change"]) >= 0 for r in fig4) and any(float(r["mean_abs_change"]) > 0 for r in fig4)
    transfer = list(csv.DictReader(open(report / "transfer.csv")))
    assert {(r["kind"], r["task"]) for r in transfer if r["row"] == "medseqft"} == {
        ("forgetting", "neck-glands"), ("bwt", "mean"), ("forward", "neck-glands"),
        ("forward", "thoracic-arteries"), ("forward", "average")}
    assert {(r["kind"], r["task"]) for r in transfer if r["row"] == "medseqft@refined"} == {
        ("forward", "neck-glands"), ("forward", "thoracic-arteries"), ("forward", "average")}
    # L_refine: every K&G RFT row's LoRA-based KD per task, at most its ceiling (10 epochs in the quick config)
    kd = list(csv.DictReader(open(report / "refinement.csv")))
    assert {(r["row"], r["task"]) for r in kd} == {(row, t) for row in ("seq-ft-kgrft", "medseqft") for t in tasks}
    assert all(1 <= float(r["epochs"]) <= 10 and r["ceiling_epochs"] == "10" for r in kd)
    # MDS: every MDS row's buffer per task and seed, with where it settled within R = 2 maskings
    mds = list(csv.DictReader(open(report / "mds.csv")))
    assert {r["row"] for r in mds} == {"seq-ft-mds", "medseqft"} and mds
    assert all(r["repeats"] == "2" and r["settled_repeats"] in ("", "1") and len(r["buffer"].split(";")) == 1
               for r in mds)
    assert "## MDS: where each buffer settled" in (report / "report.md").read_text()
    paired = list(csv.DictReader(open(report / "paired.csv")))
    stream_pairs = [r for r in paired if r["comparison"] == "stream"]
    assert {r["b"] for r in stream_pairs} == (set(STREAM_ROWS) - {"medseqft"}) | {"seq-ft-kgrft@refined",
                                                                                "medseqft@refined"}
    assert all(r["a"] == "medseqft" for r in stream_pairs)
    # pairs: (seed, task, test case) on the stream, (seed, test case) on an unseen task; one seed here
    med = json.loads(next((workdir / "cells" / "stream").glob("medseqft-seed0-*/cell.json")).read_text())
    n_stream = sum(len({r["case"] for r in t["per_case"]}) for t in med["tasks"])
    assert n_stream >= 2 and all(int(r["n_pairs"]) == n_stream for r in stream_pairs if r["metric"] == "dsc")
    n_test = len(json.loads(next((workdir / "cells" / "unseen").glob("*/tfs-*/cell.json")).read_text())["split"]
                 ["test"])
    unseen_pairs = [r for r in paired if r["comparison"] == "unseen"]
    assert {(r["a"], r["b"]) for r in unseen_pairs} == {("fft-mn", "tfs"), ("fft-mn", "fft-m0")}
    assert all(int(r["n_pairs"]) == n_test for r in unseen_pairs if r["metric"] == "dsc")
    # the records: per-case rows per task, stage seconds, the buffer's selection, the refined model
    def record(row: str) -> dict:
        return json.loads(next((workdir / "cells" / "stream").glob(f"{row}-seed0-*/cell.json")).read_text())

    med = record("medseqft")
    assert [t["task"] for t in med["tasks"]] == tasks and all(t["per_case"] for t in med["tasks"])
    assert set(med["tasks"][0]["seconds"]) == {"stage1", "stage2", "buffer"}
    assert set(med["tasks"][1]["seconds"]) == {"stage1", "stage2"}  # no buffer after the stream's last task
    assert med["tasks"][1]["refined_per_case"] and med["tasks"][1]["refinement"]["ceiling_epochs"] == 10
    assert med["tasks"][1]["loss_curve"] and med["tasks"][1]["training"]["epochs"] == config.recipe["epochs"]
    assert med["encoder_change"] and med["transfer"]["bwt"] is not None
    final = workdir / "cells" / med["id"] / med["final_model"]
    assert (final / "plans.json").is_file()
    mn = json.loads(next((workdir / "cells" / "unseen").glob("*/fft-mn-*/cell.json")).read_text())
    assert Path(mn["start"]) == final and mn["depends"] == med["id"]
    buffer = json.loads((workdir / "cells" / med["id"] / "run" / "buffer.json").read_text())
    assert buffer["selection"] == "mds" and buffer["repeats"] == config.mds_repeats
    assert [e["task"] for e in buffer["entries"]] == tasks[:-1]  # one case (buffer_size 1) per task but the last
    assert set(record("lora-rank4")["tasks"][0]["seconds"]) == {"finetune"}
    assert record("lora-rank4")["tasks"][0]["parameters"]["trainable"] > 0
    assert not list((workdir / "cells").glob("**/checkpoint_latest.pt"))   # resume state dropped once stored


def test_resume_reruns_only_the_deleted_cell(quick_grid, capsys):
    config, workdir, _ = quick_grid
    files = {p: p.stat().st_mtime_ns for p in (workdir / "cells").glob("**/cell.json")}
    deleted = next(p for p in files if "/seq-ft-random-" in str(p))
    deleted.unlink()
    assert main(["bench", "medseqft-quick", "--list", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "15/16 cells finished" in out and f"todo  {deleted.parent.relative_to(workdir / 'cells')}" in out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = runner.run_grid(config, workdir, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again["ran"] == 1 and again["report"]["missing"] == []
    assert deleted.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in files.items() if p != deleted)   # nothing else re-ran
    assert main(["bench", "medseqft-quick", "--list", "--workdir", str(workdir)]) == 0
    assert "16/16 cells finished" in capsys.readouterr().out
    assert main(["bench", "medseqft-quick", "--report", "--quiet", "--workdir", str(workdir)]) == 0
    assert main(["bench", "medseqft", "--list", "--workdir", str(workdir / "none")]) == 0
    assert "0/48 cells finished" in capsys.readouterr().out


def test_retime_reruns_cells_alone_and_checks_their_numbers(quick_grid, capsys):
    config, workdir, _ = quick_grid
    committed = {p: p.read_bytes() for p in (workdir / "cells").glob("**/cell.json")}
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "medseqft-quick", "--workdir", str(workdir), "--retime", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(workdir / "table7-idle.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["full", "medseqft"] and {r["threads"] for r in rows} == {"1"}
    # one thread, as the grid's cells: the re-run reproduces every number of the committed record
    assert [r["same_numbers_as_record"] for r in rows] == ["True", "True"], rows
    fft, medseqft = rows
    assert float(fft["ratio_to_fft"]) == 1.0 and fft["buffer_seconds"] == ""
    for stage in ("first", "later", "lora_kd", "buffer"):  # MDS computed afresh: its time is this run's
        assert float(medseqft[f"{stage}_seconds"]) > 0, stage
    total = sum(float(medseqft[f"{s}_seconds"]) for s in ("first", "later", "lora_kd", "buffer"))
    assert float(medseqft["total_seconds"]) == pytest.approx(total)
    assert float(medseqft["ratio_to_fft"]) == pytest.approx(total / float(fft["total_seconds"]))
    text = (workdir / "table7-idle.md").read_text()
    assert "MedSeqFT's training time on idle cores is" in text and "Where MedSeqFT's time goes" in text
    assert list((workdir / "retime" / "cells" / "stream").iterdir())  # the re-runs live apart from the records
    assert {p: p.read_bytes() for p in (workdir / "cells").glob("**/cell.json")} == committed


@pytest.mark.parametrize("argv, message", [
    (["medseqft-quick", "--retime", "full,nope"], "nope is not a stream row"),
    (["medseqft-quick", "--retime", "medseqft"], "must include full"),
    (["medseqft-quick", "--retime", "--retime-seed", "7"], "--retime-seed: 7 is not a seed"),
    (["medseqft-quick", "--retime"], "not finished in"),
    (["medseqft-quick", "--threads", "2"], "add --retime"),
    (["medseqft-quick", "--retime", "--list"], "--retime runs on its own"),
    (["quick", "--retime"], "belongs to MedSeqFT grids"),
])
def test_retime_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--workdir", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medadapt bench: error: ") and message in err and len(err.splitlines()) == 1


def test_the_reports_refinement_note_says_how_the_stage_ran():
    """The L_refine section names the stage's rule: until levelled off (the grid of record), or the whole
    schedule (issue 43's decision, openkbp-medseqft)."""
    from medadapt.benchmark.report_medseqft import _refinement_note

    raw = raw_config()
    levelled = _refinement_note(parse_config(copy.deepcopy(raw)))
    assert "until L_refine" in levelled and "(until: levelled)" in levelled
    raw["medseqft"]["kd_until"] = "ceiling"
    raw["medseqft"].pop("kd_lr_fraction")
    ceiling = _refinement_note(parse_config(raw))
    assert "whole schedule" in ceiling and "(until: ceiling)" in ceiling
