"""Run one cell of a committed grid again in a scratch folder, to profile where a cell's time goes.

    python scripts/profile_cell.py default --prepare                      # data regenerated, foundation copied
    py-spy record -r 20 -f raw -o default.raw -- \\
        python scripts/profile_cell.py default hn-center-b/dgst-gamma1-3shot-seed0

The grid's foundation and ``inputs.json`` are copied from ``benchmarks/<grid>/`` into ``--work`` (default
``/tmp/profile-<grid>``) and its synthetic data regenerated there (``--prepare``), so the cell has the committed
cell's key; then the first cell whose id contains the given text runs in this process on one thread, as the
grid's Ray workers ran them, its record written under ``--work`` (the committed one is not touched). The
profiles of record are in BENCHMARKS.md ("Where a grid cell's time goes").
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from medadapt.benchmark import benchmarks
from medadapt.benchmark.harness import input_digests, prepare_worker

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a committed grid: default, fseft-cpu, medseqft")
    parser.add_argument("cell", nargs="?", help="text in the id of the cell to run")
    parser.add_argument("--prepare", action="store_true", help="copy the foundation and regenerate the data")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    source, work = ROOT / args.grid, args.work or Path(f"/tmp/profile-{args.grid}")
    benchmark, config = benchmarks.load(args.grid)
    paths = benchmark.paths(config, work)
    if args.prepare:
        work.mkdir(parents=True, exist_ok=True)
        for folder in source.glob("foundation-*"):
            if not (work / folder.name).exists():
                shutil.copytree(folder, work / folder.name)
        shutil.copyfile(source / "inputs.json", work / "inputs.json")
        benchmark.prepare(config, paths, progress=True)
    if not args.cell:
        return
    cell = next((c for c in benchmark.cells(config, input_digests(paths)) if args.cell in c.cell_id), None)
    if cell is None:
        parser.error(f"no cell of {args.grid} has {args.cell!r} in its id ('medadapt bench {args.grid} --list')")
    print(f"cell {cell.cell_id} (committed: {(source / 'cells' / cell.cell_id / 'cell.json').is_file()})")
    shutil.rmtree(paths.cell_dir(cell.cell_id), ignore_errors=True)
    prepare_worker(1)
    started = time.perf_counter()
    benchmark.run_cell(cell, paths)
    print(f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
