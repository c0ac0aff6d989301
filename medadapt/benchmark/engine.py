"""The grid engine every benchmark runs on: cells and their records, listing, resume, order, Ray, the report.

A benchmark is a small definition (:class:`Benchmark`): how its config lays out a work folder (``paths``), its
cells (``cells``), what they share and is made once (``prepare``), how one cell runs and stores its record
(``run_cell``), the order cells run in (``order``), a cell's progress line (``describe``) and its report
(``report``). The DGST and FSEFT grids (:mod:`.runner`) and the MedSeqFT grid (:mod:`.runner_medseqft`) are
three such definitions; this module knows none of them.

What the engine does for all of them:

* **records**: a finished cell is ``<workdir>/cells/<cell id>/cell.json``, written atomically by the cell's
  run, holding the cell's key; a record written for another key (the config changed under the same id) is
  not finished (:func:`read_cell_record`);
* **resume**: only cells without a record run; a killed grid loses no finished cell;
* **one process per work folder**: the work folder is locked for the run (:mod:`medadapt.utils.lock`);
* **order and dependencies**: cells run in the definition's order; on Ray a cell whose ``depends`` names an
  unfinished cell is submitted once that one has finished;
* **executors**: in this process one by one, or as Ray tasks (``ray_address``: ``local``, ``auto`` or an
  address), ``ray.cpus_per_cell`` / ``gpus_per_cell`` of the config each;
* **the report**: rebuilt from the stored records after a run (and by ``bench --report``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medadapt.errors import MedadaptError
from medadapt.utils.lock import folder_lock


@dataclass(frozen=True)
class Benchmark:
    """One paper's benchmark, as the engine runs it (module docstring). ``run_cell`` is a module-level
    function (Ray workers import it by name) taking ``executor`` (a record of where it ran) too."""

    name: str
    paths: Callable[[Any, "str | Path"], Any]          # (config, workdir) -> paths with .workdir, .cell_dir(id)
    cells: Callable[[Any], list]                       # config -> every cell (with cell_id, key, to_dict())
    prepare: Callable[..., None]                       # (config, paths, progress=...) -> None
    run_cell: Callable[..., dict]                      # (cell, paths, executor=None, progress=False) -> record
    report: Callable[..., dict]                        # (config, workdir, progress=...) -> report summary
    describe: Callable[[Any, dict], str]               # (cell, record) -> its progress line's result
    order: Callable[[list, Any], list] | None = None   # (cells to run, config) -> run order


def default_workdir(config) -> Path:
    return Path("medadapt_runs") / "bench" / config.name


# ---------------------------------------------------------------------------------------------- records

def cell_file(paths, cell) -> Path:
    return Path(paths.workdir) / "cells" / cell.cell_id / "cell.json"


def read_cell_record(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` if it exists and was written for ``key`` (any grid's cells), else None."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # cannot happen with atomic writes, but an unreadable record is simply not finished
    return record if record.get("key") == key else None


def load_cell_record(paths, cell) -> dict[str, Any] | None:
    """The stored record of ``cell``, or None if it has not finished (or was written for another key)."""
    return read_cell_record(cell_file(paths, cell), cell.key)


def stored_records(paths, cells: Sequence) -> dict[str, dict | None]:
    """``{cell id: record or None}`` of ``cells``."""
    return {c.cell_id: load_cell_record(paths, c) for c in cells}


def list_cells(benchmark: Benchmark, config, workdir: str | Path) -> tuple[list[tuple[Any, bool]], str]:
    """Every cell with whether it has finished, and the work folder (``bench --list``)."""
    paths = benchmark.paths(config, workdir)
    return [(c, load_cell_record(paths, c) is not None) for c in benchmark.cells(config)], str(paths.workdir)


# ---------------------------------------------------------------------------------------------- Ray

def _import_ray():
    try:
        import ray
    except ImportError:
        raise MedadaptError("--ray: Ray is not installed; install it with pip install 'medadapt[ray]' or run "
                            "without --ray") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str):
    """The ``ray`` module, connected to ``address`` ('local': a private instance here; 'auto' or an address: a
    cluster) unless already initialised; shut down on exit if started here."""
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": "ERROR", "configure_logging": True}
        try:
            if address == "local":  # a private instance on this machine
                ray.init(num_cpus=os.cpu_count(), **kwargs)
            else:  # "auto" (the cluster this machine belongs to) or "ray://host:port" / "host:port"
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MedadaptError(f"--ray {address}: cannot connect ({str(exc).splitlines()[0]}); start a cluster "
                                "with 'ray start --head', pass its address, or use --ray local") from None
        started_here = True
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def prepare_worker(threads: int) -> None:
    """What a Ray worker sets before its cell: glibc's freed-memory reuse and its share of the threads."""
    import torch

    from medadapt.utils.allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)


def run_on_ray(run_cell: Callable[..., dict], cells: list, paths, resources: dict[str, Any],
               address: str, on_done: Callable[[Any, dict], None]) -> None:
    """Every cell as a Ray task running ``run_cell`` (``resources``: the config's ``ray`` section), a cell whose
    ``depends`` names a cell of ``cells`` submitted once that one has finished."""
    waiting = list(cells)
    todo_ids = {c.cell_id for c in cells}
    cell_type = type(cells[0]) if cells else None

    def ray_cell(cell_dict: dict, paths, threads: int) -> dict:
        """One cell on whichever node Ray chose (medadapt installed there, the work folder shared)."""
        prepare_worker(threads)
        return run_cell(cell_type.from_dict(cell_dict), paths, executor={"kind": "ray"})

    with ray_session(address) as ray:
        cpus, gpus = resources["cpus_per_cell"], resources["gpus_per_cell"]
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(ray_cell)
        pending: dict[Any, Any] = {}
        finished: set[str] = set()

        def submit_ready() -> None:
            for cell in list(waiting):
                depends = getattr(cell, "depends", None)
                if depends is None or depends not in todo_ids or depends in finished:
                    waiting.remove(cell)
                    pending[task.remote(cell.to_dict(), paths, cpus)] = cell

        try:
            submit_ready()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                on_done(cell, ray.get(done[0]))
                finished.add(cell.cell_id)
                submit_ready()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


# ---------------------------------------------------------------------------------------------- a run

def run_grid(benchmark: Benchmark, config, workdir: str | Path, ray_address: str | None = None,
             progress: bool = True, report: bool = True,
             first: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Run every unfinished cell of ``config`` in ``workdir`` (locked meanwhile), then write the report.
    ``first``: cells for which it is true run before the others (an order only). Returns a summary."""
    paths = benchmark.paths(config, workdir)
    with folder_lock(paths.workdir, "benchmark work folder"):
        cells = benchmark.cells(config)
        todo = [c for c in cells if load_cell_record(paths, c) is None]
        if benchmark.order is not None:
            todo = benchmark.order(todo, config)
        if first is not None:
            todo.sort(key=lambda c: not first(c))  # stable: the definition's order otherwise
        if progress:
            print(f"grid {config.name!r}: {len(cells)} cells, {len(cells) - len(todo)} already finished, "
                  f"{len(todo)} to run -> {paths.workdir}", flush=True)
        started = time.perf_counter()
        if todo:
            benchmark.prepare(config, paths, progress=progress)
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)

        def on_done(cell, record: dict) -> None:
            bar.update(1)
            if progress:
                tqdm.write(f"  {cell.cell_id}: {benchmark.describe(cell, record)} ({record['cell_seconds']:.0f} s)")

        try:
            if ray_address:
                run_on_ray(benchmark.run_cell, todo, paths, config.ray, ray_address, on_done)
            else:
                for cell in todo:
                    bar.set_postfix_str(cell.cell_id, refresh=True)
                    on_done(cell, benchmark.run_cell(cell, paths, progress=False))
        finally:
            bar.close()
        result = {"cells": len(cells), "ran": len(todo), "seconds": time.perf_counter() - started,
                  "workdir": paths.workdir}
        if report:
            result["report"] = benchmark.report(config, workdir, progress=progress)
    return result
