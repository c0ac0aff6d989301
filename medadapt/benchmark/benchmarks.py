"""The benchmarks medadapt ships, found by their config: the DGST and FSEFT grids (:mod:`.runner`, one config
format, two reports) and the MedSeqFT grid (:mod:`.runner_medseqft`, a config with a ``medseqft`` section).
Every config is read once (:func:`medadapt.benchmark.config.read_config`) and parsed by its paper's definition
on the shared schema (:mod:`.config`); the harness (:mod:`.harness`) runs whichever
:class:`~medadapt.benchmark.harness.Benchmark` this returns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medadapt.benchmark.config import paper_of, read_config
from medadapt.benchmark.harness import Benchmark


def load(config: str | Path) -> tuple[Benchmark, Any]:
    """The benchmark a config (a built-in name or a YAML file) belongs to, and the parsed config."""
    path, raw = read_config(config)
    if paper_of(raw) == "medseqft":
        from medadapt.benchmark.medseqft import parse_config
        from medadapt.benchmark.runner_medseqft import MEDSEQFT

        return MEDSEQFT, parse_config(raw, source=str(path), base_dir=path.parent)
    from medadapt.benchmark.grid import parse_config
    from medadapt.benchmark.runner import benchmark_for

    parsed = parse_config(raw, source=str(path), base_dir=path.parent)
    return benchmark_for(parsed), parsed
