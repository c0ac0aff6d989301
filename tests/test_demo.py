"""The demo's chain, table and figure, at a tiny size: from the built-in foundation, and the whole tour
(--pretrain) with its cached foundation model on a second run."""
import pytest

from medadapt.workflows import demo


@pytest.fixture
def tiny_demo(monkeypatch, tmp_path):
    from tests.conftest import tiny_spec_yaml

    for role, builtin in (("SOURCE_DOMAIN", "hn-source"), ("TARGET_DOMAIN", "hn-center-b")):
        spec = tmp_path / f"{builtin}-tiny.yaml"
        spec.write_text(tiny_spec_yaml(builtin, builtin.replace("-", "") + "tiny"))
        monkeypatch.setattr(demo, role, str(spec))
    monkeypatch.setattr(demo, "SOURCE_CASES", 4)
    monkeypatch.setattr(demo, "TARGET_CASES", 5)
    monkeypatch.setattr(demo, "PRETRAIN", {"preset_name": "cpu-tiny", "epochs": 1, "iterations_per_epoch": 2})
    monkeypatch.setattr(demo, "FINETUNE", {"epochs": 1, "iterations_per_epoch": 2})
    return tmp_path / "work"


def test_demo_from_the_builtin_foundation(tiny_demo, capsys, monkeypatch):
    """The default tour: no source cohort, no pretraining: the built-in foundation as it is (zero-shot), then
    full fine-tuning and DGST from it."""
    def no_pretraining(*args, **kwargs):
        raise AssertionError("the demo pretrained")

    monkeypatch.setattr("medadapt.workflows.pretrain.pretrain", no_pretraining)
    result = demo.run_demo(tiny_demo, shots=2, seed=0, progress=False)
    out = capsys.readouterr().out
    assert set(result["records"]) == {"zero-shot", "full", "dgst"}
    for method in ("zero-shot", "full", "dgst"):
        assert f"| {method}" in out
    assert result["foundation"].name == demo.BUILTIN_FOUNDATION
    assert sorted(p.name for p in (tiny_demo / "data").iterdir()) == ["hncenterbtiny-seed0"]  # no source cohort
    zero = result["records"]["zero-shot"]
    assert zero["parameters"]["updated_per_step"] == 0 and zero["split"] == result["records"]["full"]["split"]
    assert result["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tiny_demo / "results" / "results.csv").read_text().count("\nzero-shot,") == 1


def test_demo_chain_table_figure_and_cache(tiny_demo, capsys, monkeypatch):
    result = demo.run_demo(tiny_demo, shots=2, seed=0, progress=False, pretrain=True)
    out = capsys.readouterr().out
    for method in ("scratch", "full", "dgst"):
        assert f"| {method}" in out
    assert "DSC (%)" in out and "NSD@1mm (%)" in out and "HD95 (mm)" in out
    png = result["figure"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = tiny_demo / "results"
    assert (results / "results.csv").read_text().startswith("method,class,shots,seed")
    assert set(result["records"]) == {"scratch", "full", "dgst"}

    # second run: the foundation model (and finished runs) are reused, nothing is trained again
    def no_training(*args, **kwargs):
        raise AssertionError("pretraining ran again")

    monkeypatch.setattr("medadapt.workflows.pretrain.pretrain", no_training)
    again = demo.run_demo(tiny_demo, shots=2, seed=0, progress=True, pretrain=True)
    assert "cached" in capsys.readouterr().out
    assert again["records"]["dgst"]["metrics"] == result["records"]["dgst"]["metrics"]
