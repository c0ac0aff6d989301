"""nnU-Net v2 interoperability on tiny synthetic data, on the CPU.

A tiny foundation dataset is planned and preprocessed with ``nnUNetv2_plan_and_preprocess`` and an nnU-Net
model is trained two iterations with nnunetv2's own ``nnUNetTrainer``; then README's section "Fine-tune an
nnU-Net model you already have" is run command by command (medadapt commands in this process, nnU-Net's
commands as subprocesses), with quick settings appended to the commands that train or spawn workers.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medadapt.nnunet.env import temporary_environment
import yaml

pytest.importorskip("nnunetv2")

from medadapt.cli import main  # noqa: E402
from medadapt.synth import load_domain, write_dataset  # noqa: E402
from medadapt.synth.spec import DOMAINS_DIR  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Fine-tune an nnU-Net model you already have"
FOUNDATION = "Dataset501_Foundation"
TARGET = "Dataset502_MyHospital"
# worker processes off, one thread: the suite runs on 2 CPU cores
QUIET_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "nnUNet_compile": "false"}
# appended to README's commands (argparse: the last occurrence of an option wins)
QUICK = {
    "medadapt finetune": ["--epochs", "1", "--iterations-per-epoch", "2", "--quiet"],
    "medadapt predict": ["--quiet"],
    "medadapt nnunet-train": ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
                              "--no-final-validation", "--quiet"],
    "nnUNetv2_predict_from_modelfolder": ["-npp", "1", "-nps", "1", "-device", "cpu"],
    "nnUNetv2_preprocess": ["-np", "1"],
    "nnUNetv2_plan_and_preprocess": ["-npfp", "1"],
}
QUICK_TRAIN = dict(epochs=1, iterations_per_epoch=2, val_iterations=1)


def _spec(root: Path, builtin: str, name: str, shape, spacing) -> Path:
    spec = yaml.safe_load((DOMAINS_DIR / f"{builtin}.yaml").read_text())
    spec.update(name=name, case_prefix=name, shape=list(shape))
    spec["scanner"]["spacing_mm"] = list(spacing)
    spec["scanner"]["slice_thickness_mm"] = float(spacing[0])
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _nnunet_cli(name: str, args: list[str], cwd: Path, **env) -> None:
    exe = Path(sys.executable).parent / name
    result = subprocess.run([str(exe), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def nnunet_world(tmp_path_factory):
    """nnU-Net's three folders with a planned, preprocessed foundation dataset and an nnU-Net-trained model
    (fold 'all', two iterations), plus a raw target dataset (another scanner) with imagesTs."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
           "nnUNet_results": str(root / "nnUNet_results"), **QUIET_ENV}
    with temporary_environment(env):
        raw = root / "nnUNet_raw"
        write_dataset(load_domain(_spec(root, "hn-source", "foundation", (16, 40, 40), (9.0, 5.6, 5.6))),
                      raw / FOUNDATION, num_cases=5, seed=0, progress=False)
        target_spec = load_domain(_spec(root, "hn-center-b", "myhospital", (18, 44, 44), (8.0, 5.1, 5.1)))
        write_dataset(target_spec, raw / TARGET, num_cases=8, seed=1, progress=False)
        unlabelled = write_dataset(target_spec, root / "unlabelled", num_cases=2, seed=2, progress=False)
        (raw / TARGET / "imagesTs").mkdir()
        for f in sorted((unlabelled / "imagesTr").glob("*_0000.nii.gz")):
            shutil.copy(f, raw / TARGET / "imagesTs" / f.name.replace("myhospital_", "myhospital_ts"))
        # the nnU-Net planner sets torch's thread count from nnUNet_n_proc_DA, which must be >= 1 there
        _nnunet_cli("nnUNetv2_plan_and_preprocess", ["-d", "501", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                    root, nnUNet_n_proc_DA="1")
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        pre = root / "nnUNet_preprocessed" / FOUNDATION
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False
        np.random.seed(0)
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = nnUNetTrainer(plans=plans, configuration="3d_fullres", fold="all",
                                    dataset_json=json.loads((pre / "dataset.json").read_text()),
                                    device=torch.device("cpu"))
            trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
            trainer.run_training()
        model = root / "nnUNet_results" / FOUNDATION / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        assert (model / "fold_all" / "checkpoint_final.pth").is_file()
        yield {"root": root, "raw": raw, "model": model, "checkpoint": model / "fold_all" / "checkpoint_final.pth"}


def readme_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("export "):
            commands.append(line)
    return commands


@pytest.fixture(scope="module")
def readme_run(nnunet_world):
    """Every command of README's nnU-Net section, in order, in the world's root folder."""
    root = nnunet_world["root"]
    ran = []
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for command in readme_commands():
            argv = shlex.split(os.path.expandvars(command))
            key = next((k for k in QUICK if command.startswith(k)), None)
            argv += QUICK.get(key, [])
            if argv[0] == "medadapt":
                assert main(argv[1:]) == 0, command
            else:  # nnU-Net's planner sets torch's thread count from nnUNet_n_proc_DA, which must be >= 1
                _nnunet_cli(argv[0], argv[1:], root, nnUNet_n_proc_DA="1")
            ran.append(argv[:2])
    finally:
        os.chdir(cwd)
    return {**nnunet_world, "ran": ran}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def test_readme_section_round_trip(readme_run):
    """Fine-tune the nnU-Net model with DGST, export it, run nnU-Net's predictor on the export: its label maps
    match ``medadapt predict`` on the same cases; the exported network is the fine-tuned one."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from medadapt.data.io import read_label
    from medadapt.models import load_model_folder

    root = readme_run["root"]
    assert [a[1] if a[0] == "medadapt" else a[0] for a in readme_run["ran"]] == [
        "finetune", "export-nnunet", "nnUNetv2_predict_from_modelfolder", "predict",
        "nnUNetv2_plan_and_preprocess", "nnUNetv2_move_plans_between_datasets", "nnUNetv2_preprocess",
        "nnunet-train"]
    run = root / "runs" / "myhospital-dgst"
    record = json.loads((run / "run.json").read_text())
    assert record["method"]["name"] == "dgst" and len(record["shot_cases"]) == 5

    # the fine-tuned model is the nnU-Net architecture of the foundation's plans, with nnU-Net preprocessing
    tuned = load_model_folder(run / "model")
    foundation = load_model_folder(readme_run["model"])
    assert tuned.network.to_dict() == foundation.network.to_dict()
    source_plans = json.loads((readme_run["model"] / "plans.json").read_text())
    assert tuned.plan().nnunet["plans"] == source_plans
    assert list(tuned.network.patch_size) == source_plans["configurations"]["3d_fullres"]["patch_size"]

    # the export is nnU-Net's layout; the zip holds the same under DatasetXXX/trainer__plans__configuration
    export = run / "nnunet"
    assert (export / "fold_0" / "checkpoint_final.pth").is_file()
    with zipfile.ZipFile(root / "runs" / "myhospital-dgst.zip") as zf:
        assert f"{TARGET}/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth" in zf.namelist()

    # nnU-Net's predictor builds the very network medadapt fine-tuned (weights bit-identical)
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, verbose_preprocessing=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(str(export), use_folds=(0,))
    ours = tuned.load_network(deep_supervision=False).eval()
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    predictor.network.eval()
    x = torch.randn(1, 1, *tuned.network.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(predictor.network(x), ours(x), rtol=0, atol=0)
    foundation_net = foundation.load_network(deep_supervision=False)
    assert any(not torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                      foundation_net.state_dict().values()))

    # label maps: nnU-Net's predictor (default test-time mirroring) vs medadapt predict --mirror
    nn_preds = sorted((root / "preds-nnunet").glob("*.nii.gz"))
    ma_preds = sorted((root / "preds-medadapt").glob("*.nii.gz"))
    assert [p.name for p in nn_preds] == [p.name for p in ma_preds] and len(nn_preds) == 2
    for a, b in zip(nn_preds, ma_preds):
        la, lb = read_label(a), read_label(b)
        assert la.array.shape == lb.array.shape
        np.testing.assert_allclose(la.affine, lb.affine, atol=1e-4)
        agree = float((la.array == lb.array).mean())
        dice = _dice(la.array, lb.array)
        print(f"{a.name}: {100 * agree:.4f}% voxels identical, foreground Dice {dice:.5f}, "
              f"{int((la.array > 0).sum())} vs {int((lb.array > 0).sum())} foreground voxels")
        # nnU-Net's predictor sums tile logits in float16, medadapt in float32: a voxel whose two logits
        # (nearly) tie can flip; a Dice over a handful of foreground voxels would magnify single flips
        differing = int((la.array != lb.array).sum())
        assert agree >= 0.995, (a.name, agree)
        assert dice >= 0.99 or differing <= 0.001 * la.array.size, (a.name, dice, differing)


def _pretrained(path: Path) -> dict[str, torch.Tensor]:
    from medadapt.nnunet.model import clean_state_dict, load_checkpoint

    return clean_state_dict(load_checkpoint(path)["network_weights"])


def test_nnunet_train_dgst_updates_only_selected_entries(readme_run):
    """One short epoch of nnU-Net's trainer with DGST: at every optimizer step nothing outside DGST's top-gamma
    entries moves, and the final checkpoint differs from the foundation only in entries ever selected."""
    from medadapt.data.splits import draw_shots, train_test_split
    from medadapt.nnunet.trainer import nnunet_train
    from medadapt.tuning.sparse import SparseUpdateStrategy

    checks = {"steps": 0}

    def watch(trainer):
        strategy = trainer.strategy
        assert isinstance(strategy, SparseUpdateStrategy)
        weights = dict(strategy._sparse)
        names = {id(p): n for n, p in trainer.network.named_parameters()}
        ever = {id(w): torch.zeros_like(w, dtype=torch.bool) for w in weights}
        checks["ever"], checks["names"] = ever, names
        before = {}

        def pre(optimizer, args, kwargs):  # runs after DGST's own pre-hook (registered later)
            before.update({id(w): w.detach().clone() for w in weights})

        def post(optimizer, args, kwargs):  # runs after DGST restored the unselected entries
            for w, out_dim in weights.items():
                mask = strategy.selection_mask(w)
                changed = w.detach() != before[id(w)]
                assert not changed[~mask].any(), names[id(w)]
                per_kernel = mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1).sum(1)
                assert (per_kernel == strategy.gamma).all(), names[id(w)]
                ever[id(w)] |= mask
            checks["steps"] += 1

        trainer.optimizer.register_step_pre_hook(pre)
        trainer.optimizer.register_step_post_hook(post)

    with contextlib.redirect_stdout(io.StringIO()):
        out = nnunet_train("502", "3d_fullres", 1, method="dgst", shots=5, method_options={"gamma": 1},
                           plans_identifier="FoundationPlans", pretrained=readme_run["checkpoint"],
                           final_validation=False, on_initialized=watch, **QUICK_TRAIN)
    assert checks["steps"] == 2
    assert out.parent.name == "nnUNetTrainerMedadapt_dgst__FoundationPlans__3d_fullres"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    final, start = ckpt["network_weights"], _pretrained(readme_run["checkpoint"])
    ever = {checks["names"][k]: v for k, v in checks["ever"].items()}
    assert ever and all(k in final for k in ever)
    for name, mask in ever.items():
        unchanged = ~mask
        assert torch.equal(final[name][unchanged], start[name][unchanged]), name
    assert any(not torch.equal(final[k], start[k]) for k in final if k not in ever)  # biases, norms, heads train

    # the few-shot cases are drawn as 'medadapt finetune' draws them (same seeds: same cases)
    run = json.loads((out / "medadapt_run.json").read_text())
    finetune_run = json.loads((readme_run["root"] / "runs" / "myhospital-dgst" / "run.json").read_text())
    cases = sorted(p.name[:-len(".nii.gz")] for p in (readme_run["raw"] / TARGET / "labelsTr").glob("*.nii.gz"))
    train, test = train_test_split(cases, 0.2, 0)
    assert run["shot_cases"] == finetune_run["shot_cases"] == draw_shots(train, 5, 0)
    assert run["split"]["test"] == test
    assert "medadapt: 5 few-shot training cases" in "".join(p.read_text() for p in out.glob("training_log_*.txt"))


@pytest.mark.parametrize("head", ["fresh", "keep"])
def test_nnunet_train_head_policy(readme_run, head):
    """nnunet-train starts every method from nnU-Net's fresh head, as ``nnUNetv2_train -pretrained_weights``
    does; ``--head keep`` keeps the foundation's (the labels are the same here). Everything else is the
    foundation's either way."""
    from medadapt.nnunet.trainer import build_trainer

    start = _pretrained(readme_run["checkpoint"])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = build_trainer("502", "3d_fullres", 1, method="full", shots=5, plans_identifier="FoundationPlans",
                                pretrained=readme_run["checkpoint"], head=head, seed=3,
                                **{k: v for k, v in QUICK_TRAIN.items() if k != "final_validation"})
        trainer.initialize()
    own = {k: v.detach().cpu() for k, v in trainer.network.state_dict().items()}
    heads = [k for k in own if ".seg_layers." in k]
    assert heads and trainer.medadapt_record["head"] == head
    for key, value in own.items():
        if key not in heads:
            assert torch.equal(value, start[key]), key
    same = [torch.equal(own[k], start[k]) for k in heads]
    assert all(same) if head == "keep" else not all(same)


def test_nnunet_train_lora_cli_writes_a_plain_nnunet_model(readme_run, capsys):
    """``medadapt nnunet-train --method lora``: one short epoch with nnU-Net's final validation; the checkpoint
    holds the merged plain network, which nnU-Net's predictor loads."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    args = ["nnunet-train", TARGET, "3d_fullres", "0", "--plans", "FoundationPlans", "--method", "lora",
            "--lora-rank", "2", "--shots", "3", "--pretrained", str(readme_run["model"]), "--epochs", "1",
            "--iterations-per-epoch", "2", "--val-iterations", "1", "--quiet"]
    assert main(args) == 0
    assert "nnUNetv2_predict_from_modelfolder" in capsys.readouterr().out
    folder = Path(os.environ["nnUNet_results"]) / TARGET / "nnUNetTrainerMedadapt_lora__FoundationPlans__3d_fullres"
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    start = _pretrained(readme_run["checkpoint"])
    assert set(ckpt["network_weights"]) == set(start)  # merged: no LoRA factors, no parametrizations
    conv = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.equal(ckpt["network_weights"][conv], start[conv])
    assert json.loads((folder / "fold_0" / "validation" / "summary.json").read_text())["foreground_mean"]
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))


def _copy_model(world, tmp_path) -> Path:
    copy_to = tmp_path / "model"
    shutil.copytree(world["model"], copy_to)
    return copy_to


def _one_error_line(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_model_folder_mismatches_fail_with_one_line(nnunet_world, tmp_path, capsys):
    # wrong architecture: plans.json's network is not the checkpoint's
    model = _copy_model(nnunet_world, tmp_path / "arch")
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [16, 32, 64, 128]
    (model / "plans.json").write_text(json.dumps(plans))
    err = _one_error_line(capsys, ["methods", "--model", str(model)])
    assert "checkpoint_final.pth" in err and "plans.json" in err and "shape" in err

    # missing fold
    model = _copy_model(nnunet_world, tmp_path / "fold")
    shutil.rmtree(model / "fold_all")
    err = _one_error_line(capsys, ["methods", "--model", str(model)])
    assert "fold_*/checkpoint_final.pth" in err

    # dataset.json lists two input channels, the checkpoint takes one
    model = _copy_model(nnunet_world, tmp_path / "channels")
    dataset = json.loads((model / "dataset.json").read_text())
    dataset["channel_names"] = {"0": "CT", "1": "CT"}
    (model / "dataset.json").write_text(json.dumps(dataset))
    err = _one_error_line(capsys, ["methods", "--model", str(model)])
    assert "2 input channel(s)" in err and "takes 1" in err

    # a configuration that is not in the plans
    model = _copy_model(nnunet_world, tmp_path / "config")
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"] = {"2d": plans["configurations"]["3d_fullres"]}
    (model / "plans.json").write_text(json.dumps(plans))
    err = _one_error_line(capsys, ["methods", "--model", str(model)])
    assert "3d_fullres" in err


def test_plain_resenc_and_zip_models_load_as_nnunet_builds_them(nnunet_world, tmp_path):
    """The PlainConvUNet of the default plans and the ResEnc (M) preset's ResidualEncoderUNet are built from
    the plans exactly as nnU-Net builds them; an exported zip loads like its folder."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medadapt.models import load_model_folder

    threads = torch.get_num_threads()
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner sets torch's thread count from it
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            plans_name = plan_experiments([501], "nnUNetPlannerResEncM")
    finally:
        os.environ["nnUNet_n_proc_DA"] = "0"
        torch.set_num_threads(threads)
    pre = Path(os.environ["nnUNet_preprocessed"]) / FOUNDATION
    resenc_plans = json.loads((pre / f"{plans_name}.json").read_text())
    arch = resenc_plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    assert arch.endswith("ResidualEncoderUNet")

    folder = tmp_path / f"nnUNetTrainer__{plans_name}__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    (folder / "plans.json").write_text(json.dumps(resenc_plans))
    pm = PlansManager(copy.deepcopy(resenc_plans))
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")

    for model_dir, reference in ((folder, net), (nnunet_world["model"], None)):
        loaded = load_model_folder(model_dir)
        assert loaded.recipe == "dgst-paper"  # fine-tuned as the DGST paper fine-tunes nnU-Net models
        ours = loaded.load_network(deep_supervision=False).eval()
        if reference is None:  # the nnU-Net-trained PlainConvUNet, built by nnU-Net from its own plans
            pm = PlansManager(json.loads((model_dir / "plans.json").read_text()))
            reference = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2,
                                                                 False)
            reference.load_state_dict(_pretrained(nnunet_world["checkpoint"]))
        assert type(ours) is type(reference)
        assert list(loaded.network.patch_size) == pm.get_configuration("3d_fullres").patch_size
        x = torch.randn(1, 1, *loaded.network.patch_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference.eval()(x), rtol=0, atol=0)

    # nnU-Net's own zip export of the trained foundation loads as the same model (the exporter copies the
    # final validation's summary.json, which the fixture's two-iteration training skipped: an empty one)
    validation = nnunet_world["model"] / "fold_all" / "validation"
    validation.mkdir(exist_ok=True)
    (validation / "summary.json").write_text("{}")
    zip_path = tmp_path / "foundation.zip"
    export_pretrained_model(501, str(zip_path), configurations=("3d_fullres",), folds=("all",))
    from_zip = load_model_folder(zip_path)
    assert from_zip.network.to_dict() == load_model_folder(nnunet_world["model"]).network.to_dict()
    for a, b in zip(from_zip.load_network().state_dict().values(),
                    load_model_folder(nnunet_world["model"]).load_network().state_dict().values()):
        assert torch.equal(a, b)


def test_nnunet_commands_help_and_input_errors(nnunet_world, tmp_path, capsys, monkeypatch):
    for command in ("export-nnunet", "nnunet-train"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: medadapt " + command in capsys.readouterr().out

    err = _one_error_line(capsys, ["export-nnunet", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert "no such model folder" in err
    err = _one_error_line(capsys, ["export-nnunet", str(nnunet_world["model"]), "--out", str(tmp_path / "x"),
                                   "--dataset-name", "MyData"])
    assert "DatasetXXX_Name" in err

    args = ["nnunet-train", "501", "3d_fullres", "0", "--method", "dgst", "--shots", "2"]
    monkeypatch.delenv("nnUNet_preprocessed")
    err = _one_error_line(capsys, args)
    assert "--nnunet-preprocessed" in err and "nnUNet_preprocessed" in err
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_world["root"] / "nnUNet_preprocessed"))
    assert "--shots: 9 is outside 1..4" in _one_error_line(capsys, args[:4] + ["--method", "dgst", "--shots", "9"])
    assert "--method adapter" in _one_error_line(capsys, args[:4] + ["--method", "adapter", "--shots", "2"])
    assert "'nope' is unknown" in _one_error_line(capsys, args[:4] + ["--method", "nope", "--shots", "2"])
    assert "DATASET '777'" in _one_error_line(capsys, ["nnunet-train", "777"] + args[2:])
    assert "'3d_lowres'" in _one_error_line(capsys, ["nnunet-train", "501", "3d_lowres"] + args[3:])
    assert "FOLD 'x'" in _one_error_line(capsys, ["nnunet-train", "501", "3d_fullres", "x"] + args[4:])


def test_dgst_and_fseft_grids_on_an_nnunet_foundation_and_raw_data(nnunet_world, tmp_path, capsys):
    """Issue 32: a DGST and an FSEFT grid at toy budgets whose foundation is the model nnunetv2's own trainer
    made (``model:`` its results folder) and whose dataset is an nnU-Net raw folder written with nibabel alone
    (``data:``; ``labels:`` cuts one-structure tasks), run to the end with their reports."""
    from medadapt.benchmark import benchmarks
    from medadapt.benchmark.harness import grid_cells
    from tests.test_bench_config import write_raw

    known = [n for n, v in json.loads((nnunet_world["model"] / "dataset.json").read_text())["labels"].items() if v]
    data = write_raw(tmp_path, "rawct", cases=5, labels=(known[0], "nodule"), shape=(16, 40, 40),
                     spacing=(9.0, 5.6, 5.6))
    training = {"epochs": 1, "iterations_per_epoch": 1}
    grids = {
        "dgst": {"name": "nn-dgst", "foundation": {"model": str(nnunet_world["model"])}, "training": training,
                 "datasets": {"all": {"data": str(data), "shots": [1]},
                              "known": {"data": str(data), "labels": [known[0]], "shots": [1]}},
                 "table1": {"methods": ["full"], "all_shot": None}},
        "fseft": {"name": "nn-fseft", "foundation": {"model": str(nnunet_world["model"])}, "training": training,
                  "datasets": {"known": {"data": str(data), "labels": [known[0]], "shots": [1]},
                               "nodule": {"data": str(data), "labels": ["nodule"], "shots": [1]}},
                  "fseft": {"methods": ["generalization", "spatial-adapter"]}},
    }
    for name, doc in grids.items():
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(doc))
        workdir = tmp_path / f"work-{name}"
        assert main(["bench", str(config_file), "--workdir", str(workdir), "--quiet"]) == 0, capsys.readouterr().err
        benchmark, config = benchmarks.load(config_file)
        cells = grid_cells(benchmark, config, workdir)
        assert all((workdir / "cells" / c.cell_id / "cell.json").is_file() for c in cells)
        untrained = sorted((c.dataset, c.method) for c in cells if c.method in ("zero-shot", "generalization"))
        assert untrained == [("known", "zero-shot" if name == "dgst" else "generalization")]
        assert (workdir / "report" / "report.md").is_file()
