"""The benchmarks medadapt ships, found by their config: the DGST and FSEFT grids (:mod:`.runner`, one config
format, two reports) and the MedSeqFT grid (:mod:`.runner_medseqft`, a config with a ``medseqft`` section).
The engine (:mod:`.engine`) runs whichever :class:`~medadapt.benchmark.engine.Benchmark` this returns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medadapt.benchmark.engine import Benchmark


def load(config: str | Path) -> tuple[Benchmark, Any]:
    """The benchmark a config (a built-in name or a YAML file) belongs to, and the parsed config."""
    from medadapt.benchmark.medseqft import is_medseqft_config

    if is_medseqft_config(config):
        from medadapt.benchmark.medseqft import load_config
        from medadapt.benchmark.runner_medseqft import MEDSEQFT

        return MEDSEQFT, load_config(config)
    from medadapt.benchmark.grid import load_config
    from medadapt.benchmark.runner import benchmark_for

    parsed = load_config(config)
    return benchmark_for(parsed), parsed
