"""Regenerate tests/data/reports/: the stored cells of the quick grids and the reports built from them.

    python tests/data/make_report_fixtures.py [quick fseft-quick medseqft-quick]
    python tests/data/make_report_fixtures.py quick=WORKDIR ...   # from a grid already run (e.g. by older code)

For each quick config: run the grid in a temporary folder (about a minute each on 2 CPU cores), keep what its
report reads (every cells/**/cell.json and qualitative.npz) under tests/data/reports/<config>/cells/, and the
digests its cells' keys name (inputs.json), and the report's Markdown and CSV files under tests/data/reports/<config>/expected/ (the config file's own path, which
differs between clones, replaced by <config>). tests/test_report_fixtures.py rebuilds each report from the stored
cells and compares it byte for byte. Regenerate only when a report is meant to change, and say so in the commit.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "reports"
CONFIGS = ("quick", "fseft-quick", "medseqft-quick")
KEEP = ("cell.json", "qualitative.npz")


def main(names: list[str]) -> None:
    import torch

    from medadapt.benchmark import benchmarks
    from medadapt.benchmark.harness import run_grid

    torch.set_num_threads(1)
    for arg in names or CONFIGS:
        name, _, given = arg.partition("=")
        benchmark, config = benchmarks.load(name)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["MEDADAPT_CACHE"] = str(Path(tmp) / "cache")
            if given:  # the cells and the report a grid run left there
                workdir = Path(given)
                result = {"cells": len(list((workdir / "cells").rglob("cell.json")))}
            else:
                workdir = Path(tmp) / name
                result = run_grid(benchmark, config, workdir, progress=False)
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            for path in sorted((workdir / "cells").rglob("*")):
                if path.name in KEEP:
                    dest = target / "cells" / path.relative_to(workdir / "cells")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)
            shutil.copyfile(workdir / "inputs.json", target / "inputs.json")  # the digests the cells' keys name
            (target / "expected").mkdir(parents=True)
            for path in sorted((workdir / "report").iterdir()):
                if path.suffix in (".md", ".csv"):
                    text = path.read_text().replace(config.source, "<config>")
                    # a grid run by another clone names its own copy of the built-in config
                    text = re.sub(r"[^`\s]*/medadapt/benchmark/configs/" + re.escape(name) + r"\.yaml", "<config>", text)
                    (target / "expected" / path.name).write_text(text)
            print(f"{name}: {result['cells']} cells, {len(list((target / 'expected').iterdir()))} report files")


if __name__ == "__main__":
    main(sys.argv[1:])
