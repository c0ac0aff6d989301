"""Training recipes as data: every built-in builds its optimiser, schedule and loss; a model folder's recipe is
used unless overridden; bad recipe files are one error line."""
import json
import math

import pytest
import torch

from medadapt.cli import main
from medadapt.engine import Trainer, TrainingConfig
from medadapt.engine.recipe import builtin_recipe_names, build_optimizer, load_recipe, parse_recipe
from medadapt.errors import MedadaptError
from medadapt.tuning import make_strategy


def test_builtin_recipes():
    names = builtin_recipe_names()
    assert {"nnunet", "dgst-paper", "fseft-paper", "medseqft-paper", "cpu-finetune", "cpu-pretrain"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        net = torch.nn.Conv3d(1, 2, 3)
        opt = build_optimizer(recipe.optimizer, net.parameters(), recipe.lr)
        assert type(opt).__name__.lower() == recipe.optimizer["name"]
        factors = [recipe.lr_factor(e) for e in range(recipe.epochs)]
        assert all(0 <= f <= 1 for f in factors)
        if recipe.schedule["name"] != "constant":
            assert factors[-1] < factors[0] or factors[0] < 1  # it decays (or warms up first)
        assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()  # round trip through data
    dgst = load_recipe("dgst-paper")
    assert (dgst.epochs, dgst.iterations_per_epoch, dgst.lr, dgst.lr_for("scratch")) == (50, 250, 1e-3, 1e-2)
    assert dgst.optimizer == {"name": "sgd", "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
    assert load_recipe("nnunet").lr_factor(500) == pytest.approx(0.5 ** 0.9)


def test_cosine_with_warmup():
    recipe = parse_recipe({"optimizer": "adamw", "loss": "dice", "epochs": 10, "iterations_per_epoch": 1,
                           "lr": 1.0, "schedule": {"name": "cosine", "warmup_epochs": 2, "warmup_start": 0.1}})
    f = [recipe.lr_factor(e) for e in range(10)]
    assert f[0] == pytest.approx(0.1) and f[1] == pytest.approx(0.55) and f[2] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 7)))


def test_engine_trains_with_what_the_recipe_names(tiny_unet, tmp_path):
    from tests.test_engine import RandomPatches

    recipe = load_recipe("medseqft-paper").with_overrides(epochs=5, iterations_per_epoch=1)  # 4 warm-up epochs
    config = TrainingConfig.from_recipe(recipe, "full", seed=0)
    model = tiny_unet()
    strategy = make_strategy("full")
    trainer = Trainer(strategy.prepare(model), strategy, RandomPatches(), config, tmp_path, progress=False)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 1e-5
    history = trainer.fit()
    assert history["lr"] == [config.lr_at(e) for e in range(5)] and history["lr"][0] == 0.0  # warm-up from 0
    assert history["lr"][1] == pytest.approx(0.25 * config.initial_lr)
    assert trainer.loss.name == "dice_ce" and config.grad_clip is None
    assert json.loads(json.dumps(config.to_dict()))["optimizer"]["name"] == "adamw"


def test_epochs_shorter_than_the_warmup_are_refused():
    with pytest.raises(MedadaptError, match="4 warm-up epochs leave none of the 2 epochs to decay"):
        load_recipe("medseqft-paper").with_overrides(epochs=2)


@pytest.mark.parametrize("edit, message", [
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: unknown optimizer 'rmsprop'"),
    ({"schedule": {"name": "step"}}, "schedule.name: unknown schedule 'step'"),
    ({"loss": {"name": "focal"}}, "loss.name: unknown loss 'focal'"),
    ({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, "unknown option(s) ['betas'] for sgd"),
    ({"epochs": 0}, "epochs: 0 is not positive"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
])
def test_bad_recipe_files_are_one_line(tmp_path, capsys, world, edit, message):
    raw = load_recipe("dgst-paper").to_dict()
    raw.update(edit)
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(MedadaptError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--out", str(out),
                 "--method", "full", "--shots", "2", "--recipe", str(path), "--quiet"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and message in err_text and not out.exists()


def test_model_folder_recipe_is_used_unless_overridden(world, tmp_path, capsys):
    plans = json.loads((world["fm"] / "plans.json").read_text())
    assert plans["recipe"] == "cpu-finetune"  # what a cpu-* preset's foundation recommends
    base = ["finetune", "--model", str(world["fm"]), "--data", str(world["tgt"]), "--method", "full",
            "--shots", "2", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--epochs", "1", "--iterations-per-epoch", "2"]) == 0
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["recipe"]["name"] == "cpu-finetune" and run["recipe"]["epochs"] == 1
    assert run["training"]["initial_lr"] == 1e-3 and run["training"]["recipe"] == "cpu-finetune"
    # one step, no test predictions: the recipe's 32 x 160 x 160 patch is the point, not what it learns
    assert main(base + ["--out", str(tmp_path / "b"), "--recipe", "medseqft-paper", "--epochs", "5",
                        "--iterations-per-epoch", "1", "--lr", "0.002", "--split", "none"]) == 0
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["recipe"]["name"] == "medseqft-paper" and run["training"]["optimizer"]["name"] == "adamw"
    assert run["training"]["initial_lr"] == 0.002 and run["recipe"]["patch_size"] == [32, 160, 160]
    tuned = json.loads((tmp_path / "b" / "model" / "plans.json").read_text())
    assert tuned["network"]["patch_size"] == [32, 160, 160]  # the recipe's patch is the tuned model's


def test_recipes_command(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "dgst-paper" in out and "adamw" in out and "50 x 250" in out
    assert main(["recipes", "--show", "fseft-paper"]) == 0
    assert "name: fseft-paper" in capsys.readouterr().out


def test_patches_per_case(tmp_path):
    """FSEFT's batches: several patches of one volume per step (recipe patches_per_case)."""
    import numpy as np

    from medadapt.data.sampling import PatchSampler
    from medadapt.engine.recipe import load_recipe, parse_recipe

    assert load_recipe("fseft-paper").patches_per_case == 6
    base = load_recipe("nnunet").to_dict()
    with pytest.raises(MedadaptError, match="patches_per_case: 4 does not divide batch_size 6"):
        parse_recipe({**base, "batch_size": 6, "patches_per_case": 4}, source="r.yaml")

    class Case:
        def __init__(self, i):
            self.case_id = str(i)
            self.data = np.full((1, 8, 8, 8), float(i), np.float32)
            self.seg = np.zeros((8, 8, 8), np.int16)
            self.class_locations = {}
            self.channel_min = [float(i)]

    sampler = PatchSampler([Case(i) for i in range(5)], (4, 4, 4), 6, patches_per_case=3)
    batch = sampler.sample(np.random.default_rng(0))
    values = batch["image"][:, 0, 0, 0, 0].tolist()
    assert values[:3] == [values[0]] * 3 and values[3:] == [values[3]] * 3  # two cases, three patches each
    with pytest.raises(MedadaptError, match="positive divisor of the batch size 6"):
        PatchSampler([Case(0)], (4, 4, 4), 6, patches_per_case=4)
