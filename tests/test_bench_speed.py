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
    assert main(["bench-speed", "--preset", "cpu-tiny", "--methods", "dgst", "--iterations", "2",
                 "--warmup", "1", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds"]) == {"full", "dgst"}  # full is always measured: it is the reference
    for phases in report["seconds"].values():
        assert set(phases) == {"forward", "backward", "selection", "step", "total"}
        assert phases["total"] > 0
    assert report["seconds"]["full"]["selection"] < report["seconds"]["dgst"]["selection"]  # no hooks vs top-k
    assert set(report["peak_memory_bytes"]) == {"full", "dgst"} and all(report["peak_memory_bytes"].values())
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


def test_bench_speed_against_nnunet_times_both_frameworks_from_the_same_weights(capsys):
    """--against-nnunet on the CPU: medadapt's Trainer.train_step and nnU-Net's nnUNetTrainer.train_step, full and
    dgst, both timed, both ratios reported; the networks start identical and train identically (the losses stay
    exactly 1 apart: nnU-Net's Dice term is -Dice, medadapt's 1 - Dice)."""
    import pytest

    pytest.importorskip("nnunetv2")
    assert main(["bench-speed", "--preset", "cpu-tiny", "--against-nnunet", "--iterations", "2", "--warmup", "1",
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    for framework in ("medadapt", "nnunet"):
        for method in ("full", "dgst"):
            assert report["seconds"][framework][method] > 0
            assert len(report["iteration_seconds"][framework][method]) == 2
            assert len(report["losses"][framework][method]) == 3  # warm-up included
        assert report["dgst_to_full"][framework] > 0
    assert set(report["ratio_to_nnunet"]) == {"full", "dgst"}
    assert report["ratio_to_nnunet"]["full"] == report["seconds"]["medadapt"]["full"] / report["seconds"]["nnunet"]["full"]
    assert report["identical_initial_weights"] is True
    assert report["max_loss_gap"] < 1e-4
    assert report["device"] == "cpu" and report["patch"] == [16, 32, 32] and not report["nnunet_autocast"]


def test_bench_speed_against_nnunet_table_and_refusals(capsys, tiny_unet):
    import pytest

    pytest.importorskip("nnunetv2")
    from medadapt.nnunet.speed import same_weights

    assert same_weights(tiny_unet(0), tiny_unet(0)) and not same_weights(tiny_unet(0), tiny_unet(1))
    assert main(["bench-speed", "--preset", "cpu-tiny", "--against-nnunet", "--iterations", "1", "--warmup", "0",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "medadapt / nnU-Net" in out and "| dgst / full " in out and "| full " in out
    assert main(["bench-speed", "--preset", "cpu-swin", "--against-nnunet", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--against-nnunet" in err and "SwinUNETR" in err and "Traceback" not in err
    assert main(["bench-speed", "--preset", "cpu-tiny", "--against-nnunet", "--methods", "lora", "--quiet"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_bench_speed_against_nnunet_without_nnunetv2_is_one_line(capsys, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "nnunetv2" or m.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ModuleNotFoundError
    assert main(["bench-speed", "--preset", "cpu-tiny", "--against-nnunet", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nnU-Net v2 is not installed" in err and "Traceback" not in err


def test_bench_speed_times_heads_on_cached_features(capsys):
    """``spatial-adapter+cache`` times the head alone on the batch's features (finetune --feature-cache): no
    backbone forward in the timed step, so it is cheaper than the uncached adapter on the same batches."""
    assert main(["bench-speed", "--preset", "cpu-tiny", "--methods", "spatial-adapter,spatial-adapter+cache,"
                 "linear-probe+cache", "--iterations", "3", "--warmup", "1", "--no-memory", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds"]) == {"full", "spatial-adapter", "spatial-adapter+cache", "linear-probe+cache"}
    # memory is not measured for a cached head (the step is the head's): no fresh process is started for it
    from medadapt.benchmark import speed

    assert speed._peaks(["spatial-adapter+cache"], None, None, None, {}, (16, 32, 32), 2, "cpu", "fp32") == \
        {"spatial-adapter+cache": None}
    s = report["seconds"]
    assert s["spatial-adapter+cache"]["forward"] < s["spatial-adapter"]["forward"]
    assert main(["bench-speed", "--preset", "cpu-tiny", "--methods", "full+cache", "--quiet"]) == 2
