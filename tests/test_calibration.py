"""SGST's one-time calibration: one definition (medadapt.data.sampling.calibration_plan) for both training loops.

One unaugmented patch per training case, centred on a foreground voxel the calibration's own seeded stream
picks, in batches of the loop's batch size; the selection is the top-gamma of |sum of gradients| per kernel.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medadapt.nnunet.env import temporary_environment

from medadapt.data.augmentation import Augmentation
from medadapt.data.cache import sample_class_locations
from medadapt.data.sampling import (PatchSampler, calibration_batches, calibration_plan, crop_calibration_patch,
                                    crop_with_padding)
from medadapt.engine import Trainer, TrainingConfig
from medadapt.errors import MedadaptError
from medadapt.tuning import make_strategy
from medadapt.tuning.sparse import indices_to_mask

PATCH = (16, 32, 32)


class _Case:
    """A preprocessed case in memory (what medadapt's cache gives: data [C, z, y, x], seg [z, y, x])."""

    def __init__(self, case_id: str, seed: int, shape=(20, 40, 44), blobs: int = 2, class_locations=None,
                 data=None, seg=None, channel_min=None):
        self.case_id = case_id
        rng = np.random.default_rng(seed)
        if data is None:
            data = rng.standard_normal((1, *shape)).astype(np.float32)
            seg = np.zeros(shape, dtype=np.int16)
            for b in range(blobs):  # small blobs of classes 1 and 2 somewhere in the volume
                z, y, x = (int(rng.integers(2, s - 4)) for s in shape)
                seg[z:z + 3, y:y + 3, x:x + 3] = 1 + b % 2
        self.data, self.seg = data, seg
        self.class_locations = (class_locations if class_locations is not None
                                else sample_class_locations(seg, [1, 2]))
        if channel_min is not None:
            self.channel_min = channel_min


def _cases(n=5):
    return [_Case(f"case_{i:02d}", seed=i) for i in range(n)]


def _plan(cases, batch_size=2, seed=0):
    return calibration_plan([(c.case_id, c.data.shape[1:], c.class_locations) for c in cases], PATCH, batch_size,
                            seed)



def _spy_on_calibration(strategy, monkeypatch) -> list:
    """Record the batches ``strategy.calibrate`` is given (and still calibrate)."""
    seen = []
    original = strategy.calibrate

    def spy(model, loss_fn, batches):
        batches = list(batches)
        seen.extend(batches)
        return original(model, loss_fn, batches)

    monkeypatch.setattr(strategy, "calibrate", spy)
    return seen

def test_plan_is_one_foreground_patch_per_case_in_batches():
    cases = _cases(5)
    plan = _plan(cases, batch_size=2)
    assert [len(b) for b in plan] == [2, 2, 1]
    patches = [p for b in plan for p in b]
    assert [p.case_id for p in patches] == sorted(c.case_id for c in cases)
    by_id = {c.case_id: c for c in cases}
    for p in patches:
        case = by_id[p.case_id]
        assert all(s <= v < s + n for v, s, n in zip(p.voxel, p.start, PATCH))  # the voxel lies in the patch
        assert all(0 <= s and s + n <= d for s, n, d in zip(p.start, PATCH, case.seg.shape))  # inside the volume
        _, lab = crop_calibration_patch(case.data, case.seg, p, PATCH, 0.0)
        assert (lab > 0).any() and lab[tuple(v - s for v, s in zip(p.voxel, p.start))] == p.label


def test_plan_depends_on_seed_and_case_only():
    cases = _cases(5)
    plan = [p for b in _plan(cases, seed=3) for p in b]
    # another order, another batch size, a subset: every case keeps its patch
    again = [p for b in _plan(cases[::-1], batch_size=3, seed=3) for p in b]
    assert again == plan
    subset = [p for b in _plan(cases[1:3], seed=3) for p in b]
    assert subset == [p for p in plan if p.case_id in ("case_01", "case_02")]
    # the seed picks the voxels (some case gets another voxel under some other seed)
    assert any([p.voxel for b in _plan(cases, seed=s) for p in b] != [p.voxel for p in plan] for s in range(4, 8))


def test_case_without_foreground_gives_no_patch():
    """A scan without any annotated structure (common with lymph nodes) is left out: every patch holds
    foreground. Only when no case has foreground is there nothing to calibrate on."""
    cases = _cases(2) + [_Case("case_empty", seed=9, blobs=0)]
    plan = _plan(cases)
    assert [p.case_id for batch in plan for p in batch] == sorted(c.case_id for c in cases[:2])
    assert _plan(cases[:2]) == plan  # the other cases' patches do not depend on it
    with pytest.raises(MedadaptError, match="none of the 1 training cases has a foreground voxel"):
        _plan([_Case("case_empty", seed=9, blobs=0)])


def test_stored_locations_that_miss_the_segmentation_are_refused():
    case = _cases(1)[0]
    wrong = {1: np.array([[0, 0, 0]]), 2: np.zeros((0, 3), dtype=np.int32)}  # voxel (0,0,0) is background
    stale = _Case("case_stale", seed=0, data=case.data, seg=case.seg, class_locations=wrong)
    (p,), = _plan([stale])
    with pytest.raises(MedadaptError, match="case_stale"):
        crop_calibration_patch(stale.data, stale.seg, p, PATCH, 0.0)


def _sgst_trainer(tiny_unet, sampler, tmp_path, seed=0):
    model = tiny_unet(seed=0, num_classes=3)  # background + the cases' classes 1 and 2
    strategy = make_strategy("sgst", gamma=2)
    model = strategy.prepare(model)
    cfg = TrainingConfig(epochs=1, iterations_per_epoch=1, initial_lr=1e-2, seed=seed)
    return Trainer(model, strategy, sampler, cfg, tmp_path, progress=False, device="cpu")


def test_engine_calibrates_on_the_shared_plan_without_augmentation(tiny_unet, tmp_path, monkeypatch):
    cases = _cases(5)
    sampler = PatchSampler(cases, PATCH, batch_size=2, augmentation=Augmentation(PATCH))
    trainer = _sgst_trainer(tiny_unet, sampler, tmp_path, seed=11)
    seen = _spy_on_calibration(trainer.strategy, monkeypatch)
    trainer._calibrate()
    plan = _plan(cases, batch_size=2, seed=11)
    assert [b["case_ids"] for b in seen] == [[p.case_id for p in g] for g in plan]
    by_id = {c.case_id: c for c in cases}
    for batch, group in zip(seen, plan):
        for j, p in enumerate(group):  # exactly the crop, no augmentation
            case = by_id[p.case_id]
            np.testing.assert_array_equal(batch["image"][j].numpy(), crop_with_padding(case.data, p.start, PATCH, 0))
            np.testing.assert_array_equal(batch["label"][j, 0].numpy(), crop_with_padding(case.seg, p.start, PATCH, 0))
            assert (batch["label"][j] > 0).any()
    assert trainer.strategy.calibration_batches == len(plan)


def _topk_by_hand(score: torch.Tensor, gamma: int, out_dim: int) -> torch.Tensor:
    """Mask of the gamma largest scores of every output channel's kernel (a full sort, not kernel_topk_indices)."""
    moved = score.movedim(out_dim, 0)
    flat = moved.reshape(moved.shape[0], -1)
    order = flat.argsort(dim=1, descending=True)[:, :gamma]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return mask.view(moved.shape).movedim(0, out_dim)


def _assert_selection_is_topgamma_of_abs_sum(strategy, model, loss_fn, batches):
    """Gradients summed over the batches by hand (backward without zeroing), |.|, top-gamma per kernel."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss_fn(model, batch).backward()
    compared = 0
    for weight, out_dim in strategy._sparse:
        expected = _topk_by_hand(weight.grad.abs(), strategy.gamma, out_dim)
        got = indices_to_mask(strategy.select(weight, out_dim), weight)
        assert torch.equal(got, expected)
        compared += 1
    model.zero_grad(set_to_none=True)
    assert compared > 0


def test_sgst_selection_is_topgamma_of_abs_summed_gradient(tiny_unet, tmp_path):
    cases = _cases(5)
    sampler = PatchSampler(cases, PATCH, batch_size=2)
    trainer = _sgst_trainer(tiny_unet, sampler, tmp_path, seed=4)
    trainer._calibrate()
    batches = list(calibration_batches(sampler, seed=4))
    assert len(batches) == 3

    def loss_fn(model, batch):
        return trainer.loss(model, batch, model(batch["image"]))  # a loss term: (model, batch, outputs)

    _assert_selection_is_topgamma_of_abs_sum(trainer.strategy, trainer.model, loss_fn, batches)


# -- nnU-Net's trainer ------------------------------------------------------------------------------------------
DATASET = "Dataset509_Calib"


@pytest.fixture(scope="module")
def nnunet_preprocessed(tmp_path_factory):
    """A tiny raw dataset planned and preprocessed by nnU-Net itself (3d_fullres), its three folders set."""
    pytest.importorskip("nnunetv2")
    import yaml

    from medadapt.synth import load_domain, write_dataset
    from medadapt.synth.spec import DOMAINS_DIR

    root = tmp_path_factory.mktemp("nnunet_calib")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false"}
    threads = torch.get_num_threads()
    with temporary_environment(env):
        spec = yaml.safe_load((DOMAINS_DIR / "hn-source.yaml").read_text())
        spec.update(name="calib", case_prefix="calib", shape=[16, 40, 40])
        spec["scanner"]["spacing_mm"] = [9.0, 5.6, 5.6]
        spec["scanner"]["slice_thickness_mm"] = 9.0
        (root / "calib.yaml").write_text(yaml.safe_dump(spec))
        write_dataset(load_domain(root / "calib.yaml"), root / "raw" / DATASET, num_cases=5, seed=0,
                      progress=False)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                          plan_experiments, preprocess)

        from medadapt.nnunet.env import quiet

        os.environ["nnUNet_n_proc_DA"] = "1"  # nnU-Net's planner sets torch's thread count from it
        with quiet():
            extract_fingerprints([509], num_processes=1, verbose=False, show_progress_bar=False)
            plan_experiments([509])
            preprocess([509], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
        os.environ["nnUNet_n_proc_DA"] = "0"
        torch.set_num_threads(threads)
        yield root


def test_nnunet_trainer_calibrates_on_the_same_patches(nnunet_preprocessed, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from medadapt.nnunet.env import quiet
    from medadapt.nnunet.trainer import build_trainer

    seed = 2
    trainer = build_trainer(DATASET, "3d_fullres", "all", "sgst", shots=3, seed=seed,
                            method_options={"gamma": 1}, epochs=1,
                            iterations_per_epoch=1, val_iterations=1)
    with quiet():
        trainer.initialize()
    # nnU-Net's own on_train_start (dataloader workers, plots, unpacking) is not what this test is about
    monkeypatch.setattr(nnUNetTrainer, "on_train_start",
                        lambda self: self.set_deep_supervision_enabled(self.enable_deep_supervision))
    seen = _spy_on_calibration(trainer.strategy, monkeypatch)
    with quiet():
        trainer.on_train_start()
    shot_ids = trainer.medadapt_split[0]
    assert sorted(k for b in seen for k in b["keys"]) == sorted(shot_ids)
    assert [len(b["keys"]) for b in seen] == [min(trainer.batch_size, len(shot_ids) - i)
                                              for i in range(0, len(shot_ids), trainer.batch_size)]
    assert isinstance(seen[0]["target"], list) and len(seen[0]["target"]) > 1  # deep-supervision targets

    # medadapt's engine side, on the arrays as nnU-Net's trainer loads them: the same patches
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(shot_ids))
    cases = []
    for cid in shot_ids:
        data, seg, _, props = dataset.load_case(cid)
        seg = np.asarray(seg)[0].copy()
        seg[seg < 0] = 0  # as medadapt's cache stores it (nnU-Net's -1 outside the nonzero mask is background)
        cases.append(_Case(cid, 0, data=np.asarray(data), seg=seg, class_locations=props["class_locations"],
                           channel_min=[0.0]))  # nnU-Net pads with 0 where a patch leaves the volume
        # medadapt's own cache samples the same foreground voxels as nnU-Net's preprocessing
        ours = sample_class_locations(seg, [1])
        np.testing.assert_array_equal(ours[1], np.asarray(props["class_locations"][1])[:, 1:])
    patch = tuple(trainer.configuration_manager.patch_size)
    engine = list(calibration_batches(PatchSampler(cases, patch, trainer.batch_size), seed))
    assert [b["case_ids"] for b in engine] == [b["keys"] for b in seen]
    for ours, theirs in zip(engine, seen):
        torch.testing.assert_close(ours["image"], theirs["data"], rtol=0, atol=0)
        assert torch.equal(ours["label"], theirs["target"][0].long())
        assert all((t > 0).any() for t in theirs["target"][0])  # every patch holds foreground

    # and SGST's selection is the top-gamma of |sum of gradients| over those batches, with nnU-Net's loss
    def loss_fn(model, batch):
        return trainer.loss(model(batch["data"]), batch["target"])

    _assert_selection_is_topgamma_of_abs_sum(trainer.strategy, trainer.network, loss_fn, seen)
