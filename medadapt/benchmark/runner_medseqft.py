"""Run a MedSeqFT grid: the stream's data and the foundation once, then every unfinished cell, locally or on Ray.

Work folder::

    <workdir>/grid.json                                   the config as last run (for the record)
    <workdir>/data/<task>-<hash>/                         each task's (and unseen task's) dataset
    <workdir>/data/<stream>-<hash>/stream.yaml            the stream: its tasks' datasets, in order
    <workdir>/data/<source>-<hash>/                       the foundation's pretraining cohorts
    <workdir>/foundation-<hash>/                          the foundation model folder (pretrained once)
    <workdir>/cells/stream/<row>-seed<S>-<hash>/cell.json a finished stream cell (written last, atomically)
    <workdir>/cells/stream/<row>-seed<S>-<hash>/stream/   its seqft run folder while it runs (medadapt.workflows.seqft)
    <workdir>/cells/stream/<row>-seed<S>-<hash>/run/      the same folder once the cell has finished
    <workdir>/cells/stream/<row>-seed<S>-<hash>/final_model/  the model the stream left (the refined_by row's
                                                          cells: what fft-mn cells start from)
    <workdir>/cells/unseen/<task>/<row>-seed<S>-<hash>/   an unseen-task cell: cell.json and run/ (finetune)
    <workdir>/report/                                     tables and figures (report_medseqft)

A cell is finished exactly when its ``cell.json`` exists (and holds the cell's key). A killed run loses at most
the cells in progress, and not all of those: a seqft run resumes at its task in progress, which resumes from
its last epoch checkpoint. A stream cell takes longer than a sitting may last, so its run folder is called
``stream/`` while it runs: a work folder kept in git (``benchmarks/``, whose ``.gitignore`` leaves out every
``run/``, predictions and checkpoints) then keeps its finished tasks (their records and models) from one
sitting to the next; once the cell is stored, the folder is renamed ``run/`` and leaves git, and the
``final_model/`` a later cell starts from is kept beside ``cell.json``. An ``fft-mn`` cell starts from the model its ``refined_by`` stream cell left after
the last task, so it runs after that cell; on Ray it is submitted as soon as that cell has finished.
"""
from __future__ import annotations

import contextlib
import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

import yaml


from medadapt.benchmark import report_medseqft
from medadapt.benchmark.cell import Cell
from medadapt.benchmark.config import GridPaths
from medadapt.benchmark.config import prepare_inputs as prepare_shared
from medadapt.benchmark.harness import Benchmark
from medadapt.benchmark.harness import run_grid as harness_run_grid
from medadapt.benchmark.medseqft import CELL_FORMAT, UNSEEN_ROWS, MedseqftConfig, enumerate_cells, grid_paths
from medadapt.benchmark.runner import epoch_losses, read_rows
from medadapt.errors import MedadaptError
from medadapt.workflows.seqft import train_seconds
from medadapt.utils.atomic import atomic_write_json, atomic_write_text


def prepare_inputs(config: MedseqftConfig, paths: GridPaths, progress: bool = True) -> None:
    """The grid's shared inputs (:func:`medadapt.benchmark.config.prepare_inputs`: datasets, the foundation) and
    the stream file its stream cells run (``stream.yaml``: the tasks' datasets, in order, with their splits)."""
    prepare_shared(config, paths, progress=progress)
    workdir = Path(paths.workdir)
    tasks = []
    for t in config.tasks:
        folder = Path(paths.datasets[t.name])
        entry = {"name": t.name, "data": f"../{folder.name}" if folder.parent == workdir / "data" else str(folder)}
        if t.name in paths.splits:
            entry["split"] = paths.splits[t.name]["path"]
            if paths.splits[t.name]["fold"] is not None:
                entry["fold"] = paths.splits[t.name]["fold"]
        tasks.append(entry)
    Path(paths.stream_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.stream_file, yaml.safe_dump({"name": config.stream["name"], "tasks": tasks},
                                                        sort_keys=False))
    for cell_dir in sorted((workdir / "cells" / "stream").glob(f"*/{STREAM_RUN}")):  # killed while renaming
        finish_stream_folder(cell_dir.parent)


# ---------------------------------------------------------------------------------------------- one cell

def run_cell(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run one cell (everything it needs is in its key); store its record atomically in ``cell.json``."""
    from medadapt.utils.checkpoints import trusting

    with trusting(True) if paths.trust else contextlib.nullcontext():
        return _run_cell_here(cell, paths, executor, progress)


def _run_cell_here(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    out = paths.cell_dir(cell.cell_id)
    record = _stream_cell(cell, paths, out, progress) if cell.kind == "stream" else \
        _unseen_cell(cell, paths, out, progress)
    env = record["environment"]
    if cell.kind == "stream" and "final_model" in record and "table6" in cell.experiments:
        # fft-mn cells start from this model: kept beside the record (run/ is not kept in a committed grid)
        kept = out / FINAL_MODEL
        if not (kept / "plans.json").is_file():
            _copy_model(out / STREAM_RUN / Path(record["final_model"]).relative_to("run"), kept)
        record["final_model"] = FINAL_MODEL
    record.update({
        "format": CELL_FORMAT, **cell.to_dict(),
        "executor": {**(executor or {"kind": "local"}), "host": socket.gethostname(), "machine": platform.machine(),
                     "threads": torch.get_num_threads(), "cuda": env.get("cuda")},
        "cell_seconds": time.perf_counter() - started})
    atomic_write_json(out / "cell.json", record)
    finish_stream_folder(out)
    for checkpoint in (out / "run").glob("**/checkpoint_latest.pt"):  # resume state, not needed once stored
        checkpoint.unlink(missing_ok=True)
    return record


FINAL_MODEL = "final_model"
STREAM_RUN = "stream"  # a stream cell's seqft run folder while it runs (renamed run/ when the cell is stored)


def _copy_model(src: Path, dest: Path) -> None:
    """A model folder's plans and weights (what inference and fine-tuning read), ``plans.json`` last."""
    import shutil

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("weights.pt", "pretext.pt", "plans.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def finish_stream_folder(cell_dir: Path) -> None:
    """A stored stream cell's ``stream/`` becomes ``run/`` (a kill between the two is tidied on the next run)."""
    running, done = cell_dir / STREAM_RUN, cell_dir / "run"
    if running.is_dir() and (cell_dir / "cell.json").is_file():
        import shutil

        shutil.rmtree(done, ignore_errors=True)
        running.rename(done)


def _stream_cell(cell: Cell, paths: GridPaths, out: Path, progress: bool) -> dict[str, Any]:
    from medadapt.engine.recipe import load_recipe
    from medadapt.sequential.stream import load_stream
    from medadapt.workflows.seqft import SeqftRequest, carried_model, resolve_seqft, seqft, task_folder

    key, row = cell.key, cell.key["row"]
    kwargs: dict[str, Any] = {"shots": key["shots"], "seed": cell.seed, "split_seed": key["split_seed"],
                              "recipe": load_recipe(key["recipe"]), "postprocess": key["postprocess"]}
    if "overlap" in key:
        kwargs["overlap"] = key["overlap"]
    if "options" in row:  # the strategy's record: its options, and the decoder policy when it is not the default
        options = dict(row["options"])
        kwargs["pretext_decoder"] = options.pop("decoder", "pretrained")
        kwargs["method_options"] = options
    if "buffer" in row:
        kwargs.update(buffer=row["buffer"], retention=row["retention"])
        if row["buffer"] != "none":  # the reading the key names (absent: the earlier one), whatever seqft's default
            kwargs.update(kd_fft=row.get("kd_fft", "separate"), kd_weight=row.get("kd_weight", 1.0))
    for name in ("buffer_size", "mds_repeats", "kd_rank", "kd_until"):
        if name in row:
            kwargs[name] = row[name]
    if "kd_recipe" in row:
        kwargs["kd_recipe"] = load_recipe(row["kd_recipe"])
    stream = load_stream(paths.stream_file)
    run_dir = out / STREAM_RUN
    summary = seqft(resolve_seqft(SeqftRequest(stream, paths.foundation, row["method"], **kwargs)), run_dir, resume=True,
                    progress=progress)
    tasks = []
    for t, task in zip(summary["tasks"], stream.tasks):
        folder = task_folder(run_dir, t["index"], task)
        entry = {"task": t["task"], "index": t["index"], "metrics": t["metrics"], "seconds": t["seconds"],
                 "per_case": read_rows(folder / "metrics_per_case.csv")}
        if t.get("refined_metrics") is not None:  # the refined M_t (merged encoder), scored beside M_{t-mid}
            entry.update(refined_metrics=t["refined_metrics"],
                         refined_per_case=read_rows(folder / "refined" / "metrics_per_case.csv"))
        if t.get("refinement") is not None:  # L_refine: its curve, its epochs, whether it levelled off
            entry["refinement"] = t["refinement"]
        if t.get("mds") is not None:  # the MDS buffer: R, the buffer of the first r maskings, where it settled
            entry["mds"] = t["mds"]
        if (folder / "run.json").is_file():  # a parallel method's finetune run
            run = json.loads((folder / "run.json").read_text())
            entry.update(parameters=run["parameters"], timing=run["timing"], training=run["training"],
                         loss_curve=epoch_losses(folder / "training" / "history.json"))
        elif (folder / "stage1" / "training" / "history.json").is_file():  # a sequential task's fine-tuning
            entry.update(training=summary["identity"]["training"],
                         loss_curve=epoch_losses(folder / "stage1" / "training" / "history.json"))
        elif (run_dir / "joint" / "training" / "history.json").is_file():  # joint training: one curve (n x)
            entry.update(training=summary["identity"]["training"],
                         loss_curve=epoch_losses(run_dir / "joint" / "training" / "history.json"))
        tasks.append(entry)
    record: dict[str, Any] = {"tasks": tasks, "seeds": summary.get("seeds"), "environment": summary["environment"]}
    if "transfer" in summary:
        n = len(stream.tasks)
        change = run_dir / "encoder_change.csv"
        record["transfer"] = {k: v for k, v in summary["transfer"].items() if k != "encoder_change"}
        record["encoder_change"] = [[r["layer"], float(r["mean_abs_change"])] for r in read_rows(change)]
        # where the model will be once the cell is stored (run/: stream/ renamed)
        final = carried_model(task_folder(run_dir, n, stream.tasks[-1])).relative_to(run_dir)
        record["final_model"] = str(Path("run") / final)
    return record


def _unseen_cell(cell: Cell, paths: GridPaths, out: Path, progress: bool) -> dict[str, Any]:
    from medadapt.engine.recipe import load_recipe
    from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune

    key = cell.key
    model = Path(paths.foundation)
    if UNSEEN_ROWS[cell.row][1] == "refined":
        source = paths.cell_dir(cell.depends) / "cell.json"
        if not source.is_file():
            raise MedadaptError(f"cell {cell.cell_id}: starts from the model of stream cell {cell.depends}, which has "
                                "not finished; run the grid (stream cells first)")
        model = source.parent / json.loads(source.read_text())["final_model"]
        if not (model / "plans.json").is_file():
            raise MedadaptError(f"cell {cell.cell_id}: the model stream cell {cell.depends} left ({model}) is not "
                                "there; delete that cell's cell.json to re-run it")
    settings = resolve_finetune(FinetuneRequest(
        model, paths.datasets[cell.task], key["method"], key["shots"], seed=cell.seed, split_seed=key["split_seed"],
        head="fresh", recipe=load_recipe(key["recipe"]), postprocess=key["postprocess"],
        split=paths.split(cell.task, key["split_seed"]), **({"overlap": key["overlap"]} if "overlap" in key else {})))
    run = finetune(settings, out / "run", resume=True, progress=progress)
    return {"start": str(model), "per_case": read_rows(out / "run" / "metrics_per_case.csv"),
            "metrics": run["metrics"], "parameters": run["parameters"], "timing": run["timing"],
            "split": run["split"], "shot_cases": run["shot_cases"], "training": run["training"],
            "seeds": run.get("seeds"),
            "loss_curve": epoch_losses(out / "run" / "training" / "history.json"),
            "seconds": {"finetune": train_seconds(out / "run" / "training" / "history.json")},
            "environment": run["environment"]}


# ---------------------------------------------------------------------------------------------- scheduling

#: run order: the cells others wait for and the longest first (two at a time, the long tail shrinks)
_PRIORITY = {"sequential": 0, "joint": 1, "parallel": 2}


def schedule(cells: list[Cell], config: MedseqftConfig) -> list[Cell]:
    """``cells`` in run order: the ``refined_by`` row's stream cells, the other sequential rows, joint, the
    parallel rows (head fine-tuning, the cheapest, last), then the unseen cells (those with a dependency last)."""
    kinds = {r.name: r.kind for r in config.rows}

    def rank(cell: Cell) -> tuple:
        if cell.kind == "stream":
            return (0, cell.row != config.refined_by, _PRIORITY[kinds[cell.row]], cell.row == "linear-probe")
        return (1, cell.depends is not None)

    return sorted(cells, key=rank)  # stable: ties keep the config's order


def _run_cell(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None = None,
              progress: bool = False) -> dict[str, Any]:
    return run_cell(cell, paths, executor=executor, progress=progress)  # looked up when called: tests replace it


def _describe(cell: Cell, record: dict) -> str:
    metrics = [t["metrics"] for t in record["tasks"]] if cell.kind == "stream" else [record["metrics"]]
    dsc = [m["foreground_mean"].get("dsc") for m in metrics]
    mean = sum(d for d in dsc if d is not None) / max(1, sum(d is not None for d in dsc))
    return f"mean Dice {100 * mean:.1f}%"


#: the MedSeqFT paper's grid (Tables II, III, VI, VII, Fig. 4): stream cells (a seqft run each) and unseen-task
#: cells, an fft-mn cell after the stream cell it starts from
MEDSEQFT = Benchmark(name="medseqft", paths=grid_paths, cells=enumerate_cells, prepare=prepare_inputs,
                     run_cell=_run_cell, report=report_medseqft.write_report, describe=_describe,
                     order=schedule)


def run_grid(config: MedseqftConfig, workdir: str | Path, ray_address: str | None = None, progress: bool = True,
             report: bool = True) -> dict[str, Any]:
    """Run every unfinished cell of ``config`` in ``workdir``, then write the report (:func:`harness.run_grid`)."""
    return harness_run_grid(MEDSEQFT, config, workdir, ray_address=ray_address, progress=progress, report=report)
