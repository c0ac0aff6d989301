"""Table VII on idle cores: stream cells of a MedSeqFT grid re-run one at a time, alone (``bench --retime``).

The grid's Table VII sums the training seconds its cells recorded, and those cells ran two at a time, on a
machine that other work of a sitting shared, so their ratios carry that noise. The paper's Table VII compares
MedSeqFT with FFT on the same hardware; here that means each cell alone on an otherwise idle machine.

:func:`retime` re-runs the grid's finished stream cells of one seed (FFT and MedSeqFT by default) one after
another in ``<workdir>/retime/`` (regenerable, not kept in git), each from the grid's own foundation and data,
on as many threads as the grid's Ray workers had (``ray.cpus_per_cell``), with a private, empty cache (so MDS
is computed, not read from the store of :mod:`medadapt.sequential.mds_store`). It writes
``<workdir>/table7-idle.md`` and ``.csv``: each re-run's training seconds by stage beside the grid's record of
the same cell, the ratio to FFT, where MedSeqFT's time goes, the machine's load around the runs, and whether
the re-run's numbers equal the committed record's (every value but timings and the environment: a check that
the record reproduces bit for bit here).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import shutil
from pathlib import Path
from typing import Any

from medadapt.benchmark.harness import Benchmark, input_digests, load_cell_record
from medadapt.benchmark.medseqft import MedseqftConfig
from medadapt.benchmark.report_medseqft import STAGES, stage_seconds
from medadapt.benchmark.tables import csv_text, write_file
from medadapt.errors import MedadaptError
from medadapt.utils.environ import environment_variables
from medadapt.utils.lock import folder_lock
from medadapt.utils.tables import markdown_table
from medadapt.workflows.common import cpu_model

#: the rows the paper's Table VII compares
DEFAULT_ROWS = ("full", "medseqft")
RETIME_DIR = "retime"
#: record fields that hold where and how long, not what: left out of the "same numbers" comparison
TIMING_FIELDS = frozenset({"seconds", "timing", "environment", "executor", "cell_seconds", "date"})


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def differing_fields(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two records differ, timings and the environment aside (``tasks[2].metrics.foreground_mean``)."""
    old, new = _strip(old), _strip(new)
    out: list[str] = []

    def walk(a: Any, b: Any, at: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{at}.{k}" if at else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{at}[{i}]")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(at or "(record)")

    walk(old, new, where)
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def select_cells(benchmark: Benchmark, config: MedseqftConfig, paths, rows: list[str], seed: int) -> list:
    """The stream cells of ``rows`` and ``seed``, in ``rows``' order; each must be a row of the grid and finished."""
    names = [r.name for r in config.rows]
    unknown = [r for r in rows if r not in names]
    if unknown:
        raise MedadaptError(f"--retime: {', '.join(unknown)} is not a stream row of grid {config.name!r}; its rows: "
                            f"{', '.join(names)}")
    if "full" not in rows:
        raise MedadaptError("--retime: the rows must include full (FFT): Table VII's ratios are to FFT's time")
    if seed not in config.seeds:
        raise MedadaptError(f"--retime-seed: {seed} is not a seed of grid {config.name!r} (its seeds: "
                            f"{', '.join(map(str, config.seeds))})")
    cells = {(c.row, c.seed): c for c in benchmark.cells(config, input_digests(paths)) if c.kind == "stream"}
    chosen = [cells[(r, seed)] for r in rows]
    missing = [c.cell_id for c in chosen if load_cell_record(paths, c) is None]
    if missing:
        raise MedadaptError(f"--retime re-times finished cells; not finished in {paths.workdir}: "
                            f"{', '.join(missing)}: run 'medadapt bench {config.cli_argument} --workdir "
                            f"{paths.workdir}' first")
    return chosen


def retime(benchmark: Benchmark, config: MedseqftConfig, workdir: str | Path, rows: list[str] | None = None,
           seed: int | None = None, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Re-run ``rows``' stream cells of ``seed`` one at a time in ``<workdir>/retime/`` and write
    ``table7-idle.md`` / ``.csv`` in ``workdir`` (module docstring). Returns ``{"rows": [...], "files": {...}}``."""
    import torch

    from medadapt.benchmark.harness import prepare_worker

    rows = list(rows or DEFAULT_ROWS)
    seed = config.seeds[0] if seed is None else seed
    threads = threads or config.ray["cpus_per_cell"]
    paths = benchmark.paths(config, workdir)
    with folder_lock(paths.workdir, "benchmark work folder"):
        chosen = select_cells(benchmark, config, paths, rows, seed)
        benchmark.prepare(config, paths, progress=progress)  # data is regenerated, not committed (a no-op if there)
        now = {c.cell_id: c for c in benchmark.cells(config, input_digests(paths))}
        moved = [c.cell_id for c in chosen if c.cell_id not in now or now[c.cell_id].key != c.key]
        if moved:
            raise MedadaptError(f"--retime: the inputs in {paths.workdir} no longer give the committed key of "
                                f"{', '.join(moved)} (regenerated data or foundation with other bytes): "
                                f"'medadapt bench {config.cli_argument} --list' says why")
        scratch = Path(paths.workdir) / RETIME_DIR
        here = dataclasses.replace(paths, workdir=str(scratch))
        before_threads = torch.get_num_threads()
        load = {"before": os.getloadavg()[0]}
        results = []
        try:
            for cell in chosen:
                shutil.rmtree(here.cell_dir(cell.cell_id), ignore_errors=True)  # a fresh run, not a resumed one
                cache = scratch / "cache" / cell.cell_id
                shutil.rmtree(cache, ignore_errors=True)
                prepare_worker(threads)
                if progress:
                    print(f"retime: {cell.cell_id} alone on {threads} thread(s) -> {here.cell_dir(cell.cell_id)}",
                          flush=True)
                with environment_variables({"MEDADAPT_CACHE": str(cache)}):
                    record = benchmark.run_cell(cell, here, executor={"kind": "retime"}, progress=progress)
                committed = load_cell_record(paths, cell)
                results.append((cell, record, committed))
        finally:
            torch.set_num_threads(before_threads)
        load["after"] = os.getloadavg()[0]
        return _write(config, Path(paths.workdir), results, threads, load)


def _write(config: MedseqftConfig, workdir: Path, results: list, threads: int, load: dict[str, float]
           ) -> dict[str, Any]:
    fft = {"now": None, "grid": None}
    for cell, record, committed in results:
        if cell.row == "full":
            fft = {"now": stage_seconds(record, "parallel")["total"],
                   "grid": stage_seconds(committed, "parallel")["total"]}
    body, csv_rows = [], []
    shares = None
    for cell, record, committed in results:
        row = config.row(cell.row)
        now, grid = stage_seconds(record, row.kind), stage_seconds(committed, row.kind)
        ratio = now["total"] / fft["now"] if fft["now"] else None
        paper = (now["total"] - now.get("buffer", 0.0)) / fft["now"] if fft["now"] else None
        grid_ratio = grid["total"] / fft["grid"] if fft["grid"] else None
        diff = differing_fields(committed, record)
        same = "yes" if not diff else f"no ({len(diff)} values: {', '.join(diff[:3])}{', …' if len(diff) > 3 else ''})"
        display = row.display
        body.append([display, *[_fmt(now.get(k)) for k, _ in STAGES], _fmt(now["total"]), _fmt(ratio, 2),
                     _fmt(paper, 2), _fmt(grid["total"]), _fmt(grid_ratio, 2), same])
        entry = {"row": cell.row, "method": display, "seed": cell.seed, "cell": cell.cell_id, "threads": threads,
                 **{f"{k}_seconds": now.get(k) for k, _ in STAGES}, "total_seconds": now["total"],
                 "ratio_to_fft": ratio, "ratio_to_fft_paper_stages": paper,
                 "grid_total_seconds": grid["total"], "grid_ratio_to_fft": grid_ratio,
                 "same_numbers_as_record": not diff, "differing_values": len(diff)}
        csv_rows.append(entry)
        if cell.row == "medseqft":
            shares = {k: now[k] / now["total"] for k, _ in STAGES if k in now and now["total"]}
    header = ["Method", *[h + " (s)" for _, h in STAGES], "Sum (s)", "× FFT", "× FFT without buffer selection",
              "Grid's record: sum (s)", "Grid's record: × FFT", "Same numbers as the record"]
    env = results[0][1]["environment"] if results else {}
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Table VII on idle cores: seed {results[0][0].seed if results else '–'}'s cells re-run one at a time "
             f"(`medadapt bench {config.cli_argument} --retime {','.join(c.row for c, _, _ in results)}`), "
             f"{when}; medadapt commit {env.get('medadapt_commit', '?')}, torch {env.get('torch', '?')}; "
             f"{cpu_model()}, {os.cpu_count()} CPU cores, {threads} thread(s) per cell as the grid's workers; "
             f"1-minute load average {load['before']:.2f} before the first run, {load['after']:.2f} after the last "
             "(a run on one thread shows as ~1).", "",
             markdown_table(header, body), "",
             "Training seconds (iterations and batch sampling; no evaluation) summed over the stream's tasks, as "
             "in the report's Table VII; MDS computed afresh (no stored losses). Grid's record: the same cell as "
             "the grid ran it (two cells at a time, beside a sitting's other work). Same numbers: every value of "
             "the re-run's record but timings and the environment equals the committed record's."]
    if shares:
        names = dict(STAGES)
        lines += ["", "Where MedSeqFT's time goes: " + "; ".join(f"{names[k]} {100 * v:.0f}%"
                                                                 for k, v in shares.items()) + "."]
    medseqft = next((e for e in csv_rows if e["row"] == "medseqft"), None)
    if medseqft and medseqft["ratio_to_fft"] is not None:
        r = medseqft["ratio_to_fft"]
        lines += ["", f"MedSeqFT's training time on idle cores is {r:.2f}× FFT's, "
                      f"{medseqft['ratio_to_fft_paper_stages']:.2f}× without buffer selection (the issue's bound: "
                      f"at most 1.3×, {'met' if r <= 1.3 else 'not met'}; the paper: 27.0 h / 21.1 h = 1.28×, whose "
                      "Table VII has no buffer selection stage)."]
    md = "\n".join(lines) + "\n"
    files = {"md": write_file(workdir / "table7-idle.md", md),
             "csv": write_file(workdir / "table7-idle.csv", csv_text(csv_rows))}
    return {"rows": csv_rows, "files": files}
