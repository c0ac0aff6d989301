"""Run a benchmark grid: data and foundation once, then every unfinished cell, locally or on a Ray cluster.

Work folder::

    <workdir>/grid.json                      the config as last run (for the record)
    <workdir>/data/<dataset>-<hash>/         synthetic cohorts (nnU-Net raw format)
    <workdir>/foundation-<hash>/             the foundation model folder, pretrained once
    <workdir>/cells/<dataset>/<cell>-<hash>/cell.json   a finished cell: config, seed, per-case metrics,
                                                         parameter counts, timing (written last, atomically)
    <workdir>/cells/<dataset>/<cell>-<hash>/run/        the fine-tuning run (model, predictions, run.json)
    <workdir>/report/                        tables and figures (``medadapt.benchmark.report``)

A cell is finished exactly when its ``cell.json`` exists. A killed run loses at most the cell in progress, and
not even all of that: the cell's fine-tuning resumes from its last epoch checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np


from medadapt.benchmark import report_fseft
from medadapt.benchmark.report import write_report as dgst_report
from medadapt.benchmark.cell import Cell
from medadapt.benchmark.config import GridPaths, prepare_inputs
from medadapt.benchmark.harness import Benchmark, cell_file
from medadapt.benchmark.harness import run_grid as harness_run_grid
from medadapt.benchmark.grid import (CELL_FORMAT, NO_TRAINING, TI_PREFIX, GridConfig, enumerate_cells,
                                     grid_paths)
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path, atomic_write_json


def run_cell(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Fine-tune and evaluate one cell; store its record atomically in ``cell.json`` and return it."""
    from medadapt.utils.checkpoints import trusting

    with trusting(True) if paths.trust else contextlib.nullcontext():
        return _run_cell_here(cell, paths, executor, progress)


def _run_cell_here(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    from medadapt.inference.predictor import DEFAULT_OVERLAP
    from medadapt.workflows.finetune import finetune, resolve_finetune, zero_shot

    started = time.perf_counter()
    out = paths.cell_dir(cell.cell_id)
    postprocess = cell.key.get("postprocess", "none")
    overlap = cell.key.get("overlap", DEFAULT_OVERLAP)
    if cell.method in NO_TRAINING:  # zero-shot / generalization: the foundation's own outputs, by name
        try:
            run = zero_shot(paths.foundation, paths.datasets[cell.dataset], out / "run",
                            split_seed=cell.key["split_seed"], resume=True, progress=progress,
                            postprocess=postprocess, split=paths.split(cell.dataset, cell.key["split_seed"]),
                            overlap=overlap)
        except MedadaptError as exc:  # (a dataset whose labels the foundation lacks gets no zero-shot cell)
            raise MedadaptError(f"{exc} (grid cell {cell.cell_id})") from None
    else:
        run = finetune(resolve_finetune(_finetune_request(cell, paths, postprocess, overlap)), out / "run",
                       resume=True, progress=progress)
    qualitative = _store_qualitative_slice(run, out)
    record = {
        "format": CELL_FORMAT,
        **cell.to_dict(),
        "per_case": read_rows(out / "run" / "metrics_per_case.csv"),
        "metrics": run["metrics"],
        "parameters": run["parameters"],
        "timing": run["timing"],
        "split": run["split"],
        "shot_cases": run["shot_cases"],
        "head": run["head"],
        "training": run["training"],
        "seeds": run.get("seeds"),
        "qualitative": qualitative,
        "executor": {**(executor or {"kind": "local"}), "host": socket.gethostname(),
                     "machine": platform.machine(), "threads": run["environment"]["cpu_threads"],
                     "cuda": run["environment"]["cuda"]},
        "environment": run["environment"],
        "cell_seconds": time.perf_counter() - started,
    }
    # the resume checkpoint (weights + optimizer state) is no longer needed once the cell is stored
    if cell.method not in NO_TRAINING:
        from medadapt.engine.convergence import levelled_off

        history = json.loads(_history_file(out / "run").read_text())
        record["loss_curve"] = [float(v) for v in history["epoch_loss"]]
        record["convergence"] = levelled_off(record["loss_curve"], lr=history.get("lr"))
    atomic_write_json(cell_file(paths, cell), record)
    for checkpoint in (out / "run").glob("**/training/checkpoint_latest.pt"):  # per-query TI runs: one per query
        checkpoint.unlink(missing_ok=True)
    return record


def _finetune_request(cell: Cell, paths: GridPaths, postprocess: str, overlap: float):
    """A training cell as a fine-tuning run: its key's budget, head, recipe and split, and its options: its
    method's (by the method's definition) and the run's (variant label, cached features, transductive
    inference)."""
    from medadapt.engine.recipe import load_recipe
    from medadapt.tuning import get_method
    from medadapt.tuning.transductive import Transductive
    from medadapt.workflows.finetune import FinetuneRequest

    training = cell.key["training"]
    options, run_options = get_method(cell.method).split_options(cell.options)
    ti = {k[len(TI_PREFIX):]: v for k, v in run_options.items() if k.startswith(TI_PREFIX)}
    recipe = cell.key.get("recipe")
    return FinetuneRequest(
        paths.foundation, paths.datasets[cell.dataset], cell.method, cell.shots, seed=cell.seed,
        split_seed=cell.key["split_seed"], epochs=training["epochs"],
        iterations_per_epoch=training["iterations_per_epoch"], lr=training.get("lr"), method_options=options,
        head=cell.key["head"], recipe=load_recipe(recipe) if recipe is not None else None,
        postprocess=postprocess, overlap=overlap, transductive=Transductive(**ti) if ti else None,
        feature_cache=bool(run_options.get("feature_cache", False)),
        split=paths.split(cell.dataset, cell.key["split_seed"]))


def _history_file(run: Path) -> Path:
    """The training history of a run; a per-query transductive run trains one model per test volume
    (``queries/<case>/training``): the first query's curve stands for them."""
    path = run / "training" / "history.json"
    if path.is_file():
        return path
    histories = sorted(run.glob("queries/*/training/history.json"))
    if not histories:
        raise MedadaptError(f"{run}: no training history; the run is incomplete")
    return histories[0]


def epoch_losses(path: Path) -> list[float]:
    """The training loss per epoch (mean over its iterations), kept in the cell for the convergence figure."""
    return [float(v) for v in json.loads(path.read_text())["epoch_loss"]]


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return None if np.isnan(value) else value


def _store_qualitative_slice(run: dict[str, Any], out: Path) -> str:
    """One axial slice for the qualitative figure, chosen from the ground truth alone (so every method of a
    dataset shows the same slice): the test case with the most foreground, its slice with the most."""
    from medadapt.data.dataset import RawDataset
    from medadapt.data.io import read_image, read_label
    from medadapt.viz import pick_slices

    dataset = RawDataset.load(run["dataset"])
    test_ids = run["split"]["test"]
    gts = {cid: read_label(dataset.label_path(cid)) for cid in test_ids}
    case = max(test_ids, key=lambda cid: (int((gts[cid].array > 0).sum()), cid))
    gt = gts[case]
    z = pick_slices(gt.array, n=1)[0]
    image = read_image(dataset.image_paths(case)[0])
    pred = read_label(out / "run" / "predictions" / f"{case}{dataset.file_ending}")
    with atomic_path(out / "qualitative.npz", suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, image=image.array[z].astype(np.float32), gt=gt.array[z].astype(np.uint8),
                                prediction=pred.array[z].astype(np.uint8), spacing=np.asarray(gt.spacing),
                                case=np.asarray(case), z=np.asarray(z))
    return "qualitative.npz"


# ---------------------------------------------------------------------------------------------- the definitions

def _run_cell(cell: Cell, paths: GridPaths, executor: dict[str, Any] | None = None,
              progress: bool = False) -> dict[str, Any]:
    return run_cell(cell, paths, executor=executor, progress=progress)  # looked up when called: tests replace it


def _describe(cell: Cell, record: dict) -> str:
    summary = next(iter(record["metrics"]["classes"].values()))
    return f"DSC {100 * (summary['dsc']['mean'] or 0):.1f}%"


#: the DGST paper's grids (Tables 1-2, Fig. 3) and the FSEFT paper's (a config with an ``fseft`` section):
#: one config format, one cell runner, two reports
DGST = Benchmark(name="dgst", paths=grid_paths, cells=enumerate_cells, prepare=prepare_inputs, run_cell=_run_cell,
                 report=dgst_report, describe=_describe)
FSEFT = dataclasses.replace(DGST, name="fseft", report=report_fseft.write_report)


def benchmark_for(config: GridConfig) -> Benchmark:
    return FSEFT if config.fseft is not None else DGST


def shot_group_first(shots: int):
    """``bench --first-shots``: the cells of Table 1's group at ``shots`` (not the all-samples rows) first."""
    return lambda cell: cell.shots == shots and not cell.all_shot


def run_grid(config: GridConfig, workdir: str | Path, ray_address: str | None = None, progress: bool = True,
             report: bool = True, first_shots: int | None = None) -> dict[str, Any]:
    """Run every unfinished cell of ``config`` in ``workdir``; then write the report (:func:`harness.run_grid`).
    ``first_shots``: the cells at that shot count run before the others (an order only: a grid that may not
    finish in the time at hand gives one complete group of Table 1 first)."""
    first = None if first_shots is None else shot_group_first(first_shots)
    return harness_run_grid(benchmark_for(config), config, workdir, ray_address=ray_address, progress=progress,
                           report=report, first=first)
