"""The grid harness every benchmark runs on: cells and their records, listing, resume, order, Ray, the report.

A benchmark is a small definition (:class:`Benchmark`): how its config lays out a work folder (``paths``), its
cells (``cells``), what they share and is made once (``prepare``), how one cell runs and stores its record
(``run_cell``), the order cells run in (``order``), a cell's progress line (``describe``) and its report
(``report``). The DGST and FSEFT grids (:mod:`.runner`) and the MedSeqFT grid (:mod:`.runner_medseqft`) are
three such definitions; this module knows none of them.

What the harness does for all of them:

* **records**: a finished cell is ``<workdir>/cells/<cell id>/cell.json``, written atomically by the cell's
  run, holding the cell's key; a record written for another key (the config changed under the same id) is
  not finished (:func:`read_cell_record`);
* **inputs by digest**: a cell's key names the bytes it was made from, not only the recipes that made them:
  the SHA-256 of the foundation's weights and of each dataset it trains and tests on
  (:func:`input_digests`), recorded in ``<workdir>/inputs.json`` when the grid makes them, so a work folder
  committed without its (regenerable) data still knows its cells, and a re-pretrained foundation or data
  regenerated with other bytes gives other keys: the old records are listed as stale with the reason
  (:func:`list_cells`), never read as finished;
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
from medadapt.utils.atomic import atomic_write_json
from medadapt.utils.digests import dataset_digest, model_digest
from medadapt.utils.lock import folder_lock

INPUTS_FILE = "inputs.json"
INPUTS_FORMAT = "medadapt-bench-inputs/1"


@dataclass(frozen=True)
class Benchmark:
    """One paper's benchmark, as the harness runs it (module docstring). ``run_cell`` is a module-level
    function (Ray workers import it by name) taking ``executor`` (a record of where it ran) too."""

    name: str
    paths: Callable[[Any, "str | Path"], Any]          # (config, workdir) -> paths with .workdir, .cell_dir(id),
                                                       # .foundation (model folder), .datasets ({name: folder})
    cells: Callable[..., list]                         # (config, digests) -> every cell (cell_id, key, to_dict())
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


# ---------------------------------------------------------------------------------------------- inputs

def write_datasets(keys: dict[str, dict[str, Any]], paths, progress: bool = True) -> None:
    """Write each synthetic dataset (``{name: {"domain", "cases", "data_seed", ...}}``) to its folder in
    ``paths.datasets`` (resumable; a folder made from another recipe is refused)."""
    from medadapt.synth import DomainSpec, write_dataset

    for name, key in keys.items():
        write_dataset(DomainSpec.from_dict(key["domain"]), paths.datasets[name], num_cases=key["cases"],
                      seed=key["data_seed"], progress=progress)


def _inputs_of(paths) -> dict[str, tuple[str, Path]]:
    """``{input name: (kind, folder)}``: the foundation and every dataset a grid's cells use."""
    out = {"foundation": ("model", Path(paths.foundation))}
    out.update({f"data/{name}": ("data", Path(folder)) for name, folder in paths.datasets.items()})
    return out


def _complete(kind: str, folder: Path) -> bool:
    return (folder / ("plans.json" if kind == "model" else "dataset.json")).is_file()


def read_inputs_file(workdir: str | Path) -> dict[str, str]:
    """``{folder relative to the work folder: digest}`` as recorded when the grid made its inputs ({} if none)."""
    path = Path(workdir) / INPUTS_FILE
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data["inputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def input_digests(paths, record: bool = False) -> dict[str, Any]:
    """The digests a cell's key names: ``{"foundation": digest, "data": {dataset: digest}}``.

    A real input (a dataset or foundation the config names by path) is named by the fingerprint the config
    took of it (``paths.fingerprints``), not digested here and not recorded.

    An input that is there (complete) is digested now; one that is not (a fresh clone: data is regenerated, not
    committed) takes the digest ``inputs.json`` recorded when it was made, or None (not made yet). ``record``:
    write the digests of the inputs that are there into ``inputs.json`` (after the grid made them)."""
    workdir = Path(paths.workdir)
    recorded = read_inputs_file(workdir)
    given = getattr(paths, "fingerprints", {})  # real inputs: named by their fingerprints (config.grid_paths)
    found: dict[str, str | None] = {}
    for name, (kind, folder) in _inputs_of(paths).items():
        rel = os.path.relpath(folder, workdir)
        if name in given:
            continue
        if _complete(kind, folder):
            found[rel] = model_digest(folder) if kind == "model" else dataset_digest(folder)
        else:
            found[rel] = recorded.get(rel)
    if record:
        merged = {**recorded, **{k: v for k, v in found.items() if v is not None}}
        if merged != recorded:
            atomic_write_json(workdir / INPUTS_FILE, {"format": INPUTS_FORMAT, "inputs": dict(sorted(merged.items()))})
    digests: dict[str, Any] = {"data": {}}
    for name, (kind, folder) in _inputs_of(paths).items():
        value = given[name] if name in given else found[os.path.relpath(folder, workdir)]
        if kind == "model":
            digests["foundation"] = value
        else:
            digests["data"][name.split("/", 1)[1]] = value
    return digests


def keyed_cells(benchmark: Benchmark, config, paths) -> list:
    """Every cell of ``config``, keyed with the digests of the inputs in ``paths``' work folder."""
    return benchmark.cells(config, input_digests(paths))


def grid_cells(benchmark: Benchmark, config, workdir: str | Path) -> list:
    """Every cell of ``config`` as the grid in ``workdir`` keys it (:func:`keyed_cells`)."""
    return keyed_cells(benchmark, config, benchmark.paths(config, workdir))


# ---------------------------------------------------------------------------------------------- listing

def _label(cell_id: str) -> str:
    """A cell id without its key hash: the same row, shots and seed under any key."""
    head, _, tail = cell_id.rpartition("-")
    return head if len(tail) == 12 and all(ch in "0123456789abcdef" for ch in tail) else cell_id


def key_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The first place two keys differ, in words (``inputs.foundation: 3f2a9c1e -> 9b1c0d2a``), or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = key_difference(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
            if diff:
                return diff
        return None
    if old == new:
        return None

    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True)
        return text[:12] + "..." if len(text) > 15 else text

    return f"{where or 'key'}: {short(old)} -> {short(new)}"


def _stale_reason(field_diff: str) -> str:
    if field_diff.startswith("inputs.foundation"):
        return f"the foundation's weights are not the ones its record names ({field_diff})"
    if field_diff.startswith("dataset.data"):
        return f"its data's files changed since its record ({field_diff})"
    if field_diff.startswith("inputs.data"):
        return f"its data's bytes are not the ones its record names ({field_diff})"
    if field_diff.startswith("numerics"):
        return f"the code's numerics version changed ({field_diff})"
    return f"its key changed ({field_diff})"


def list_cells(benchmark: Benchmark, config, workdir: str | Path) -> tuple[list[tuple[Any, str, str]], str]:
    """Every cell as ``(cell, status, reason)`` (``bench --list``), and the work folder. ``status``: done,
    todo, or stale: a record is stored under the cell's row, shots and seed but for another key (other
    foundation weights or data bytes, another numerics version, an edited config) or cannot be read (a
    truncated file); ``reason`` says which. A stale record is never read as finished; running the grid re-runs
    the cell."""
    paths = benchmark.paths(config, workdir)
    cells = keyed_cells(benchmark, config, paths)
    stored: dict[str, list[Path]] = {}
    root = Path(paths.workdir) / "cells"
    for path in sorted(root.rglob("cell.json")) if root.is_dir() else []:
        stored.setdefault(_label(path.parent.relative_to(root).as_posix()), []).append(path)
    out = []
    for cell in cells:
        own = cell_file(paths, cell)
        if load_cell_record(paths, cell) is not None:
            out.append((cell, "done", ""))
            continue
        reason = ""
        for path in ([own] if own.is_file() else []) + [p for p in stored.get(_label(cell.cell_id), []) if p != own]:
            try:
                record = json.loads(path.read_text())
                diff = key_difference(record["key"], cell.key)
            except (OSError, ValueError, KeyError, TypeError):
                reason = f"{path.relative_to(root.parent)} cannot be read (truncated or damaged); it is re-run"
                break
            if diff:
                reason = f"{_stale_reason(diff)}: {path.parent.relative_to(root)}"
                break
        out.append((cell, "stale" if reason else "todo", reason))
    return out, str(paths.workdir)


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
        started = time.perf_counter()
        cells = keyed_cells(benchmark, config, paths)
        if any(load_cell_record(paths, c) is None for c in cells):
            # make what is missing (data is regenerated, not committed), then key the cells by what is there
            benchmark.prepare(config, paths, progress=progress)
            cells = benchmark.cells(config, input_digests(paths, record=True))
        todo = [c for c in cells if load_cell_record(paths, c) is None]
        if benchmark.order is not None:
            todo = benchmark.order(todo, config)
        if first is not None:
            todo.sort(key=lambda c: not first(c))  # stable: the definition's order otherwise
        if progress:
            print(f"grid {config.name!r}: {len(cells)} cells, {len(cells) - len(todo)} already finished, "
                  f"{len(todo)} to run -> {paths.workdir}", flush=True)
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
