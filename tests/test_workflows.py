"""End to end on tiny synthetic cohorts: synth -> pretrain -> finetune (DGST) -> predict -> evaluate."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medadapt.cli import main
from medadapt.data.io import read_image, read_label
from medadapt.workflows.common import source_commit


def _finetune_args(world, out, method="dgst", shots="3", *extra):
    return ["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--out", str(out),
            "--method", method, "--shots", shots, "--epochs", "1", "--iterations-per-epoch", "2", "--quiet",
            *extra]


def test_pretrain_writes_complete_model_folder(world):
    plans = json.loads((world["fm"] / "plans.json").read_text())
    assert (world["fm"] / "weights.pt").is_file()
    assert plans["labels"] == {"background": 0, "lymph_node": 1}
    pre = plans["preprocessing"]
    assert pre["normalization"] == ["CT"]
    props = pre["intensity_properties"][0]
    assert props["percentile_00_5"] < props["mean"] < props["percentile_99_5"]  # stored with the model
    assert len(pre["target_spacing"]) == 3 and plans["network"]["patch_size"] == [16, 32, 32]


def test_finetune_dgst_end_to_end(world, capsys):
    out = world["root"] / "ft-dgst"
    assert main(_finetune_args(world, out, "dgst", "3", "--gamma", "2", "--seed", "4")) == 0
    assert "lymph_node: DSC" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    train, test = run["split"]["train"], run["split"]["test"]
    assert (len(train), len(test)) == (8, 2) and not set(train) & set(test)
    assert len(run["shot_cases"]) == 3 and set(run["shot_cases"]) <= set(train)
    assert run["method"] == {"name": "dgst", "gamma": 2} and run["seed"] == 4
    # every random stream of the run is recorded by purpose: the seed, the purpose's code, what it draws
    streams = run["seeds"]["streams"]
    assert run["seeds"]["scheme"] == run["identity"]["seeds"] and run["seeds"]["seed"] == 4
    assert {"head", "shots", "split", "batches", "epoch", "drst"} <= set(streams)
    assert streams["split"]["sequence"][0] == 0 and streams["head"]["sequence"][0] == 4  # split seed vs seed
    assert len({tuple(s["sequence"]) for s in streams.values()}) == len(streams)  # no two share a stream
    assert run["parameters"]["updated_per_step"] < run["parameters"]["total"]
    assert run["training"]["initial_lr"] == 1e-3 and run["training"]["optimizer"]["momentum"] == 0.99
    assert run["recipe"]["name"] == "cpu-finetune"  # what the cpu-tiny foundation recommends
    assert run["environment"]["medadapt_commit"] == source_commit()  # benchmark cells copy this record
    # predictions are label maps in each test image's own geometry
    for cid in test:
        image = read_image(world["tgt"] / "imagesTr" / f"{cid}_0000.nii.gz")
        pred = read_label(out / "predictions" / f"{cid}.nii.gz")
        assert pred.array.shape == image.array.shape
        np.testing.assert_allclose(pred.affine, image.affine)
        assert set(np.unique(pred.array)) <= {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tolerance_mm"] == 1.0 and summary["n_cases"] == 2
    rows = (out / "metrics_per_case.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case,class,label,dsc,nsd,hd95") and len(rows) == 3
    # the same run again: refused without --resume, reused with it
    assert main(_finetune_args(world, out, "dgst", "3", "--gamma", "2", "--seed", "4")) == 2
    assert main(_finetune_args(world, out, "dgst", "3", "--gamma", "2", "--seed", "4", "--resume")) == 0


def test_same_seed_same_shots_and_nested_draws(world):
    runs = {}
    for name, shots in (("a", "2"), ("b", "4")):
        out = world["root"] / f"ft-full-{name}"
        assert main(_finetune_args(world, out, "full", shots, "--seed", "1")) == 0
        runs[name] = json.loads((out / "run.json").read_text())
    assert runs["a"]["split"] == runs["b"]["split"]  # the 80/20 split is fixed whatever K and seed
    assert runs["a"]["shot_cases"] == runs["b"]["shot_cases"][:2]  # 2-shot cases are among the 4-shot ones


def test_predict_and_evaluate_commands(world, tmp_path):
    case = "tgt_000"
    single = world["tgt"] / "imagesTr" / f"{case}_0000.nii.gz"
    assert main(["predict", "--model", str(world["fm"]), "--input", str(single), "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    pred = read_label(tmp_path / "p" / f"{case}.nii.gz")
    assert pred.array.shape == read_image(single).array.shape
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / f"{case}.nii.gz").write_bytes((world["tgt"] / "labelsTr" / f"{case}.nii.gz").read_bytes())
    (gt / "dataset.json").write_bytes((world["tgt"] / "dataset.json").read_bytes())
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(gt), "--out", str(tmp_path / "ev"),
                 "--tolerance-mm", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and set(summary["classes"]) == {"lymph_node"}
    assert summary["tolerance_mm"] == 2.0
    assert (tmp_path / "ev" / "metrics_per_case.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("method,options", [("lora", ["--lora-rank", "2"]), ("adapter", ["--adapter-reduction", "2"]),
                                            ("sgst", ["--gamma", "2"])])
def test_finetune_other_methods_report_delta_and_predict(world, tmp_path, capsys, method, options):
    out = tmp_path / method
    assert main(_finetune_args(world, out, method, "2", *options)) == 0
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    sizes = run["sizes"]
    assert "as a delta against the foundation" in printed and f"{sizes['delta_bytes'] / 1024:,.0f} KiB" in printed
    assert sizes["delta_bytes"] < sizes["checkpoint_bytes"]
    plans = json.loads((out / "model" / "plans.json").read_text())
    assert plans["extensions"] == ([{"type": "adapter", "reduction": 2}] if method == "adapter" else [])
    if method == "lora":  # the ranks it used: rank 2 fits every layer of this network
        assert run["method_notes"] == {"lora_ranks": {"requested": 2, "clamped": {}}}
    # the saved model folder (plain for LoRA: merged; adapters rebuilt from plans.json) predicts like the run did
    case = run["split"]["test"][0]
    assert main(["predict", "--model", str(out / "model"), "--input",
                 str(world["tgt"] / "imagesTr" / f"{case}_0000.nii.gz"), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert np.array_equal(read_label(tmp_path / "p" / f"{case}.nii.gz").array,
                          read_label(out / "predictions" / f"{case}.nii.gz").array)


def test_methods_command_lists_every_method(world, capsys):
    from medadapt.tuning import method_names

    assert main(["methods", "--model", str(world["fm"])]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert f"| {name} " in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "100.00%" in rows["full"] and "100.00%" not in rows["linear-probe"]
    # a preset's network, without a model folder: the same table (cpu-tiny is the world's foundation network)
    assert main(["methods", "--preset", "cpu-tiny"]) == 0
    preset_out = capsys.readouterr().out
    assert "model: preset cpu-tiny" in preset_out
    assert preset_out.split("\n\nmodel:")[0] == out.split("\n\nmodel:")[0]
    with pytest.raises(SystemExit) as exc:  # --model or --preset, not both
        main(["methods", "--model", str(world["fm"]), "--preset", "cpu-tiny"])
    assert exc.value.code == 2
    capsys.readouterr()
    assert main(["methods"]) == 0  # neither: every method's definition, no parameter counts
    listing = capsys.readouterr().out
    assert all(f"| {name} " in listing for name in method_names()) and "trainable params" not in listing
    assert main(["methods", "--preset", "huge"]) == 2 and "--preset 'huge' is unknown" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for cmd in ("synth", "pretrain", "finetune", "methods", "predict", "evaluate", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: medadapt " + cmd in capsys.readouterr().out


def test_finetune_under_torchrun_two_processes(world, tmp_path):
    """The CLI under torchrun (2 CPU processes, gloo): rank 0 writes one complete run."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "medadapt", *_finetune_args(world, out, "dgst", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a generous limit: a loaded machine must not fail this test
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("lymph_node: DSC") == 1  # reported once, by rank 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"]["name"] == "dgst" and (out / "model" / "weights.pt").is_file()


def test_results_record_the_source_commit():
    """Stored results (run.json, cell.json) name the code that made them, not only the version number."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    source_commit.cache_clear()
    commit = source_commit()
    assert commit is not None and commit.split("+")[0] == head


def _relabelled_copy(world, tmp_path):
    """The target dataset under another label name: the foundation's heads mean nothing for it."""
    import shutil

    data = tmp_path / "relabelled"
    shutil.copytree(world["tgt"], data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "node": 1}
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def test_fresh_head_by_default_keep_on_request(world, tmp_path, capsys):
    import torch

    from medadapt.data.dataset import RawDataset
    from medadapt.errors import MedadaptError
    from medadapt.models import load_model_folder
    from medadapt.models.network import seeded_network
    from medadapt.workflows.finetune import head_parameter_names, load_foundation

    folder = load_model_folder(world["fm"])
    dataset = RawDataset.load(world["tgt"])
    assert dataset.labels == folder.labels  # same labels: nnU-Net would still start from a fresh head
    foundation = folder.load_network().state_dict()
    fresh = load_foundation(folder, dataset, seed=3).state_dict()
    kept = load_foundation(folder, dataset, seed=3, head="keep").state_dict()
    heads = head_parameter_names(folder.load_network())
    assert heads and all(".seg_layers." in k for k in heads)  # found from the structure, named as nnU-Net does
    reference = seeded_network(folder.network, 3, purpose="head").state_dict()  # nnU-Net's initialisation
    for key, value in foundation.items():
        assert torch.equal(kept[key], value), key
        if key in heads:
            assert torch.equal(fresh[key], reference[key]), key
        else:
            assert torch.equal(fresh[key], value), key
    assert any(not torch.equal(fresh[k], foundation[k]) for k in heads)  # (biases start at 0 in both)
    # keep is refused where the labels differ, with one line naming the option and the fix
    other = RawDataset.load(_relabelled_copy(world, tmp_path))
    with pytest.raises(MedadaptError, match="--head keep: labels .* are not classes of the model .* use --head fresh"):
        load_foundation(folder, other, seed=0, head="keep")
    out = tmp_path / "keep-refused"
    assert main(_finetune_args(world, out, "full", "2", "--head", "keep", "--data",
                               str(other.root))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--head keep" in err and not (out / "run.json").exists()
    # the run records its policy; the fresh head travels in the delta, which rebuilds the model exactly
    for head in ("fresh", "keep"):
        run_dir = tmp_path / f"run-{head}"
        assert main(_finetune_args(world, run_dir, "dgst", "2", "--head", head)) == 0
        run = json.loads((run_dir / "run.json").read_text())
        assert run["head"] == head and run["identity"]["head"] == head
        from medadapt.tuning.delta import load_delta_model

        rebuilt = load_delta_model(folder, torch.load(run_dir / "delta.pt", weights_only=False)).state_dict()
        saved = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
        assert all(torch.equal(rebuilt[k], v) for k, v in saved.items())
        trained_head = {k: v for k, v in saved.items() if k in heads}
        if head == "keep":  # the trained head started from the foundation's ...
            assert any(not torch.equal(v, foundation[k]) for k, v in trained_head.items())
    capsys.readouterr()


@pytest.mark.parametrize("change, what", [
    (["--gamma", "3"], "method.gamma"), (["--seed", "5"], "seed"), (["--head", "keep"], "head"),
    (["--split-seed", "1"], "split_seed"), (["--method", "full"], "method.name"),
    (["--epochs", "2"], "training.epochs"),
])
def test_resume_with_other_settings_is_refused(world, tmp_path, capsys, change, what):
    out = tmp_path / "run"
    base = ["--gamma", "2", "--seed", "4"]
    assert main(_finetune_args(world, out, "dgst", "2", *base)) == 0
    before = (out / "run.json").read_text()

    def args(*extra):
        a = _finetune_args(world, out, "dgst", "2", *base, "--resume", *extra)
        if "--method" in extra:  # replace, not repeat, the method (and drop dgst's --gamma: full has no γ)
            i = a.index("--method")
            del a[i:i + 2]
            i = a.index("--gamma")
            del a[i:i + 2]
        return a

    capsys.readouterr()
    assert main(args(*change)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"holds a run with {what} = " in err and "use a new --out" in err
    assert (out / "run.json").read_text() == before  # nothing rewritten
    # an unfinished run (its run.json not yet written) is refused the same way
    (out / "run.json").unlink()
    assert main(args(*change)) == 2 and f"{what} = " in capsys.readouterr().err
    # ... and resumes with its own settings
    assert main(args()) == 0


def test_refuses_another_dataset_or_foundation(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_finetune_args(world, out, "full", "2")) == 0
    other = _relabelled_copy(world, tmp_path)
    assert main(_finetune_args(world, out, "full", "2", "--resume", "--data", str(other))) == 2
    assert "dataset.labels" in capsys.readouterr().err  # what the data is, not where it lies
    fm2 = tmp_path / "fm2"
    assert main(["pretrain", "--data", str(world["src"]), "--out", str(fm2), "--preset", "cpu-tiny", "--epochs", "1",
                 "--iterations-per-epoch", "1", "--seed", "9", "--quiet"]) == 0
    args = _finetune_args(world, out, "full", "2", "--resume")
    args[args.index("--model") + 1] = str(fm2)
    assert main(args) == 2 and "foundation.weights" in capsys.readouterr().err


def test_zero_shot_row(world, tmp_path, capsys):
    out = tmp_path / "zero"
    assert main(["zero-shot", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--out", str(out),
                 "--quiet"]) == 0
    assert "lymph_node: DSC" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    ft = tmp_path / "ft"
    assert main(_finetune_args(world, ft, "full", "2")) == 0
    ft_run = json.loads((ft / "run.json").read_text())
    assert run["split"] == ft_run["split"]  # the same test cases
    # a densely changed run's delta costs no more than the model itself
    assert ft_run["sizes"]["delta_bytes"] <= ft_run["sizes"]["checkpoint_bytes"]
    assert run["method"] == {"name": "zero-shot"} and run["head"] == "keep" and run["parameters"]["trainable"] == 0
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{c}.nii.gz" for c in run["split"]["test"]]
    # the foundation's own heads on a dataset with other labels mean nothing: refused
    capsys.readouterr()
    assert main(["zero-shot", "--model", str(world["fm"]), "--data", str(_relabelled_copy(world, tmp_path)),
                 "--out", str(tmp_path / "z2"), "--quiet"]) == 2
    assert "fine-tune instead" in capsys.readouterr().err


def test_largest_connected_component_postprocessing(world, tmp_path, capsys):
    from scipy.ndimage import label as components

    from medadapt.inference.predictor import keep_largest_components

    seg = np.zeros((8, 12, 12), np.int16)
    seg[1:3, 1:3, 1:3] = 1            # 8 voxels
    seg[4:7, 5:9, 5:9] = 1            # 48 voxels: kept
    seg[0, 10, 10] = 2                # a lone voxel of class 2: its largest component
    seg[5, 1, 1] = 2
    seg[5, 2, 2] = 2                  # diagonal neighbour: 26-connected to (5, 1, 1)
    out = keep_largest_components(seg, [0, 1, 2])
    assert (out == 1).sum() == 48 and (out[1:3, 1:3, 1:3] == 0).all()
    assert (out == 2).sum() == 2 and out[5, 1, 1] == out[5, 2, 2] == 2 and out[0, 10, 10] == 0
    # predict and finetune take --postprocess lcc and record it; predictions keep one component per class
    run_dir = tmp_path / "lcc"
    assert main(_finetune_args(world, run_dir, "full", "2", "--postprocess", "lcc")) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["postprocess"] == "lcc" and run["identity"]["postprocess"] == "lcc"
    for path in (run_dir / "predictions").iterdir():
        pred = read_label(path).array
        assert components(pred == 1, structure=np.ones((3, 3, 3)))[1] <= 1
    case = run["split"]["test"][0]
    assert main(["predict", "--model", str(run_dir / "model"), "--input",
                 str(world["tgt"] / "imagesTr" / f"{case}_0000.nii.gz"), "--out", str(tmp_path / "p"),
                 "--postprocess", "lcc", "--quiet"]) == 0
    assert np.array_equal(read_label(tmp_path / "p" / f"{case}.nii.gz").array,
                          read_label(run_dir / "predictions" / f"{case}.nii.gz").array)
    # resuming the run with another post-processing is refused
    capsys.readouterr()
    assert main(_finetune_args(world, run_dir, "full", "2", "--resume")) == 2
    assert "postprocess" in capsys.readouterr().err
