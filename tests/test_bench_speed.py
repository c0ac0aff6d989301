"""bench-speed runs and reports every method side by side (what it measures is in BENCHMARKS.md, not here)."""
import json

from medadapt.cli import main
from medadapt.tuning import method_names


def test_bench_speed_table_for_every_method(capsys):
    assert main(["bench-speed", "--preset", "cpu-tiny", "--iterations", "1", "--warmup", "0", "--no-memory",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in method_names(training_only=True):
        assert f"| {name} " in out
    assert "ratio to full" in out and "selection s" in out


def test_bench_speed_json_with_memory(capsys):
    assert main(["bench-speed", "--preset", "cpu-tiny", "--methods", "dgst,bias", "--iterations", "2",
                 "--warmup", "1", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds"]) == {"full", "dgst", "bias"}  # full is always measured: it is the reference
    for phases in report["seconds"].values():
        assert set(phases) == {"forward", "backward", "selection", "step", "total"}
        assert phases["total"] > 0
    assert report["seconds"]["bias"]["selection"] < report["seconds"]["dgst"]["selection"]
    assert set(report["peak_memory_bytes"]) == {"full", "dgst", "bias"}
    assert report["patch"] == [16, 32, 32] and report["device"] == "cpu"


def test_bench_speed_rejects_unknown_method(capsys):
    assert main(["bench-speed", "--preset", "cpu-tiny", "--methods", "nope", "--quiet"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_bench_speed_times_the_medseqft_stages_through_their_own_steps(tiny_unet):
    from medadapt.benchmark.speed import time_methods

    results = time_methods(tiny_unet(), ["full", "kd-fft", "lora-kd"], (16, 32, 32), 2, iterations=2, warmup=1,
                           progress=False)
    for stage in ("kd-fft", "lora-kd"):
        assert results[stage]["total"] > 0
        assert results[stage]["forward"] != results[stage]["forward"]  # not split into phases: NaN
