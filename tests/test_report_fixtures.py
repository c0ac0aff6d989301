"""The reports of the quick grids, rebuilt from stored cells (tests/data/reports/, made by
tests/data/make_report_fixtures.py), are byte-identical to the stored reports: a refactoring of the benchmark
engine or of a report must not move a number or a line (figures are not compared)."""
import shutil
from pathlib import Path

import pytest

from medadapt.benchmark import benchmarks

FIXTURES = Path(__file__).parent / "data" / "reports"


@pytest.mark.parametrize("name", ["quick", "fseft-quick", "medseqft-quick"])
def test_report_from_stored_cells_is_byte_identical(name, tmp_path):
    stored = FIXTURES / name
    benchmark, config = benchmarks.load(name)
    workdir = tmp_path / name
    shutil.copytree(stored / "cells", workdir / "cells")
    shutil.copyfile(stored / "inputs.json", workdir / "inputs.json")  # the digests the cells name
    result = benchmark.report(config, workdir, progress=False)
    assert result["missing"] == []
    expected = sorted(p.name for p in (stored / "expected").iterdir())
    written = sorted(p.name for p in (workdir / "report").iterdir() if p.suffix in (".md", ".csv"))
    assert written == expected
    for file in expected:
        text = (workdir / "report" / file).read_text().replace(config.source, "<config>")
        assert text == (stored / "expected" / file).read_text(), file
