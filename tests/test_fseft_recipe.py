"""FSEFT as its authors ran it: the recipe of their code and commands (per-method settings, an epoch of k
volumes, Dice smoothing 1, the intensity-shift preset with 1:1 crops, default-initialised heads, no deep
supervision), the levelled-off criterion, and training on cached backbone features."""
import json

import numpy as np
import pytest
import torch
import yaml

from medadapt.cli import main
from medadapt.data.augmentation import IntensityShift, augmentation_preset
from medadapt.data.sampling import PatchSampler
from medadapt.engine.convergence import levelled_off
from medadapt.engine.losses import build_loss
from medadapt.engine.recipe import load_recipe, parse_recipe
from medadapt.errors import MedadaptError


def test_fseft_recipe_resolves_per_method():
    r = load_recipe("fseft-paper")
    adapter = r.for_method("spatial-adapter").for_cases(5)
    assert (adapter.lr, adapter.epochs, adapter.iterations_per_epoch) == (1e-2, 100, 5)  # one pass over k = 5
    probe = r.for_method("linear-probe").for_cases(10)
    assert (probe.lr, probe.epochs, probe.iterations_per_epoch) == (0.1, 50, 10)
    full = r.for_method("full")
    assert (full.lr, full.epochs, full.patches_per_case) == (1e-4, 150, 3)
    assert full.for_cases(5).iterations_per_epoch == 2 and full.for_cases(1).iterations_per_epoch == 1
    assert r.lr_for("ft-last") == 1e-2 and r.loss["smooth"] == 1.0
    assert (r.augmentation, r.head_init, r.deep_supervision) == ("fseft", "torch", False)
    # recipes without the new keys keep their records (and so the DGST grids their hashes)
    assert set(load_recipe("dgst-paper").to_dict()) == {"name", "description", "optimizer", "schedule", "loss",
                                                        "epochs", "iterations_per_epoch", "lr", "method_lr",
                                                        "grad_clip", "batch_size", "patches_per_case", "patch_size"}
    assert "smooth" not in load_recipe("dgst-paper").loss


@pytest.mark.parametrize("change, message", [
    ({"augmentation": "heavy"}, "augmentation: unknown augmentation 'heavy'"),
    ({"head_init": "xavier"}, "head_init: unknown head_init 'xavier'"),
    ({"iterations_per_epoch": "volumes"}, "iterations_per_epoch: 'volumes' is neither a number nor 'cases'"),
    ({"methods": {"full": {"momentum": 1}}}, "methods.full: unknown key(s) ['momentum']"),
    ({"loss": {"name": "dice", "smooth": -1}}, "loss.smooth: -1 is not positive"),
    ({"deep_supervision": "no"}, "deep_supervision: 'no' is not true or false"),
])
def test_recipe_bad_new_keys(change, message):
    raw = {"optimizer": "adamw", "schedule": "cosine", "loss": "dice", "epochs": 2, "iterations_per_epoch": 1,
           "lr": 0.1, **change}
    with pytest.raises(MedadaptError, match=None) as exc:
        parse_recipe(raw, source="r.yaml")
    assert message in str(exc.value) and str(exc.value).startswith("r.yaml: ")


def test_dice_smoothing_one_does_not_reward_empty_predictions():
    """On a patch without foreground, nnU-Net's 1e-5 makes an empty prediction a perfect score; FSEFT's
    smoothing 1 (utils/losses.py: ((2 num) + 1) / (den + 1)) costs any predicted voxel only a little."""
    logits = torch.full((1, 1, 4, 4, 4), -50.0)  # predicts nothing
    target = torch.zeros((1, 1, 4, 4, 4), dtype=torch.long)
    strict = build_loss({"name": "dice", "batch_dice": False}, "sigmoid")
    smooth = build_loss({"name": "dice", "batch_dice": False, "smooth": 1.0}, "sigmoid")
    assert strict(None, {"label": target}, logits).item() == pytest.approx(0.0, abs=1e-6)
    some = logits.clone()
    some[..., 0, 0, 0] = 50.0  # one false-positive voxel
    assert strict(None, {"label": target}, some).item() == pytest.approx(1.0, abs=1e-4)
    assert smooth(None, {"label": target}, some).item() == pytest.approx(1 - 1 / 2, abs=1e-4)
    hand = torch.sigmoid(some)  # against the code's formula
    num, den = 0.0, hand.sum().item()
    assert smooth(None, {"label": target}, some).item() == pytest.approx(1 - (2 * num + 1) / (den + 1), abs=1e-6)


class _Case:
    def __init__(self, shape=(12, 24, 24)):
        self.case_id = "c0"
        self.data = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
        self.seg = np.zeros(shape, np.int16)
        self.seg[5:7, 10:13, 10:13] = 1
        self.class_locations = {1: np.argwhere(self.seg == 1)}


def test_fseft_preset_shifts_intensity_only_and_balances_crops():
    aug, crop = augmentation_preset("fseft", (8, 8, 8))
    assert isinstance(aug, IntensityShift) and crop == {"positive_fraction": 0.5}
    case = _Case()
    sampler = PatchSampler([case], (8, 8, 8), 6, augmentation=aug, patches_per_case=6, **crop)
    plain = PatchSampler([case], (8, 8, 8), 6, augmentation=IntensityShift((8, 8, 8), p=0.0), patches_per_case=6,
                         **crop)
    shifted = 0
    positives = 0
    for i in range(200):
        a = sampler.sample(np.random.default_rng(i))
        b = plain.sample(np.random.default_rng(i))
        assert torch.equal(a["label"], b["label"])  # nothing spatial, no mirroring: the same crops
        diff = (a["image"] - b["image"]).flatten(1)
        for row in diff:  # each patch: unchanged, or one constant offset within +-0.1
            if row.abs().max() > 0:
                shifted += 1
                assert torch.allclose(row, row[0].expand_as(row), atol=1e-6) and abs(row[0].item()) <= 0.1
        positives += int((b["label"].flatten(1).amax(1) > 0).sum())
    assert 0.12 < shifted / 1200 < 0.28  # p = 0.2
    # half the crops centred on foreground; a background-centred crop of this small volume may still catch some
    assert 0.45 < positives / 1200 < 0.8
    nn = PatchSampler([case], (8, 8, 8), 6, augmentation=None, oversample_foreground=0.33)
    forced = sum(int((nn.sample(np.random.default_rng(i))["label"].flatten(1).amax(1)[4:] > 0).all())
                 for i in range(20))
    assert forced == 20  # nnU-Net's rule is unchanged: the last third of the batch always holds foreground


def test_levelled_off_criterion():
    import math

    from medadapt.engine.recipe import lr_factor

    rng = np.random.default_rng(0)
    falling = np.linspace(1.0, 0.2, 100)  # a steady decline: half its improvement in the second half
    assert levelled_off(falling)["levelled_off"] is False
    flat = np.concatenate([np.linspace(1.0, 0.2, 50), np.full(50, 0.2)]) + rng.normal(0, 0.02, 100)
    verdict = levelled_off(flat)
    assert verdict["levelled_off"] is True and verdict["late_improvement"] < 0.05
    assert levelled_off([0.5] * 5)["levelled_off"] is None   # too short to tell
    assert levelled_off(0.5 + rng.normal(0, 0.02, 100))["levelled_off"] is None  # no improvement to speak of
    noisy_fall = np.linspace(1.0, 0.0, 100) + rng.normal(0, 0.05, 100)
    assert levelled_off(noisy_fall)["levelled_off"] is False
    # under a cosine schedule a run still learning at a steady rate per unit of learning rate looks flat at
    # its end on the epoch axis; on the learning-rate axis it is still learning
    cosine = {"name": "cosine", "warmup_epochs": 0, "warmup_start": 0.0, "min_factor": 0.0}
    lr = [lr_factor(cosine, e, 100) for e in range(100)]
    travelled = np.cumsum(lr) / sum(lr)
    steady = 1.0 - 0.8 * travelled + rng.normal(0, 0.005, 100)
    assert levelled_off(steady)["levelled_off"] is True and levelled_off(steady, lr=lr)["levelled_off"] is False
    early = 0.2 + 0.8 * np.exp(-travelled / 0.05) + rng.normal(0, 0.005, 100)  # converged in the first 20%
    assert levelled_off(early, lr=lr)["levelled_off"] is True
    assert not math.isnan(levelled_off(early, lr=lr)["noise"])


def _ft(assembly, out, *extra, method="spatial-adapter"):
    return main(["finetune", "--model", str(assembly["fm"]), "--data", str(assembly["tgt"]), "--out", str(out),
                 "--method", method, "--shots", "2", "--recipe", str(assembly["recipe"]), "--quiet", *extra])


@pytest.fixture(scope="module")
def fseft_assembly(assembly, tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipe") / "fseft-small.yaml"
    raw = load_recipe("fseft-paper").to_dict()
    raw.update(epochs=2, patch_size=[16, 32, 32], batch_size=2, patches_per_case=2,
               methods={"linear-probe": {"lr": 0.1}})
    recipe.write_text(yaml.safe_dump(raw))
    return {**assembly, "recipe": recipe}


def test_fseft_recipe_run(fseft_assembly, tmp_path):
    run = tmp_path / "lp"
    assert _ft(fseft_assembly, run, method="linear-probe") == 0
    record = json.loads((run / "run.json").read_text())
    assert record["training"]["iterations_per_epoch"] == 2  # an epoch of the k = 2 support volumes
    assert record["training"]["initial_lr"] == 0.1 and record["training"]["loss"]["smooth"] == 1.0
    identity = record["identity"]
    assert identity["augmentation"] == "fseft" and identity["head_init"] == "torch"
    assert identity["deep_supervision"] is False


def test_feature_cache(fseft_assembly, tmp_path, capsys):
    from medadapt.data.dataset import RawDataset
    from medadapt.workflows.common import dataset_cache_dir

    cached = tmp_path / "cached"
    assert _ft(fseft_assembly, cached, "--feature-cache") == 0
    record = json.loads((cached / "run.json").read_text())
    assert record["identity"]["feature_cache"] is True
    root = dataset_cache_dir(RawDataset.load(fseft_assembly["tgt"]).root)
    folders = sorted(root.glob("features-*"))
    assert len(folders) == 1
    files = sorted(folders[0].glob("*.npy"))
    assert [f.stem for f in files] == sorted(record["shot_cases"])
    feats = np.load(files[0])
    from medadapt.models import load_model_folder

    folder = load_model_folder(cached / "model")
    tuned = folder.load_network()
    assert feats.shape[0] == tuned.decoder.seg_layers[-1].classifier.in_channels
    # the backbone is untouched; only the adapter and classifier moved
    foundation = load_model_folder(fseft_assembly["fm"]).load_network().state_dict()
    state = tuned.state_dict()
    backbone = [k for k in foundation if not k.startswith("decoder.seg_layers.") and k in state]
    assert backbone and all(torch.equal(state[k], foundation[k]) for k in backbone)
    # the cache is reused by the next run (same features, not recomputed) ...
    mtime = files[0].stat().st_mtime_ns
    assert _ft(fseft_assembly, tmp_path / "again", "--feature-cache", "--seed", "1") == 0
    assert files[0].stat().st_mtime_ns == mtime
    # ... and refused when stale (made from other data: here, its record no longer matches)
    meta = files[0].with_suffix(".json")
    stored = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stored, "data": "0" * 16}))
    capsys.readouterr()
    assert _ft(fseft_assembly, tmp_path / "stale", "--feature-cache") == 2
    err = capsys.readouterr().err
    assert "a stale feature cache" in err and str(files[0]) in err and len(err.strip().splitlines()) == 1
    meta.write_text(json.dumps(stored))
    # a method that trains below the last feature map cannot use the cache: one line, nothing written
    assert _ft(fseft_assembly, tmp_path / "full", "--feature-cache", method="full") == 2
    assert "--feature-cache: the method trains" in capsys.readouterr().err
    assert not (tmp_path / "full").exists()


def test_feature_cache_has_one_writer_when_runs_race(tmp_path, monkeypatch):
    """Two runs that need the same support case's features at once (a grid's cells side by side): one computes
    and writes them, the other waits and reads them; neither sees a half-written entry."""
    import threading
    import time
    from types import SimpleNamespace

    from torch import nn

    import medadapt.tuning.transductive as transductive
    from medadapt.tuning.features import feature_cases

    calls = []

    def slow_features(model, tail, data, patch, overlap):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the other run arrives while this one computes
        return torch.ones(1, 4, 2, 2, 2)

    monkeypatch.setattr(transductive, "query_features", slow_features)
    tail = nn.Sequential(nn.Conv3d(4, 2, 1))
    cases = [SimpleNamespace(case_id="c0", data=np.zeros((1, 2, 2, 2), np.float32), data_path=None)]
    results, errors = [], []

    def run():
        try:
            results.append(feature_cases(None, tail, cases, (2, 2, 2), tmp_path, "fm"))
        except Exception as exc:  # pragma: no cover - the failure is asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1 and len(results) == 2
    assert np.array_equal(np.asarray(results[0][0].data), np.ones((4, 2, 2, 2), np.float32))
    assert results[0][0].path == results[1][0].path
