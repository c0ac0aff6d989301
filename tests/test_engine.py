"""The training engine: nnU-Net conventions, checkpoints and exact resumption."""
import numpy as np
import pytest
import torch

from medadapt.engine import DeepSupervisedDiceCE, Trainer, TrainingConfig, deep_supervision_weights
from medadapt.errors import MedadaptError
from tests.conftest import any_strategy


class RandomPatches:
    """A stand-in sampler: patches drawn from the rng the engine passes in (so runs are reproducible)."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def sample(self, rng):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a killed run
        x = torch.from_numpy(rng.standard_normal((2, 1, 16, 32, 32)).astype(np.float32))
        y = torch.from_numpy((rng.random((2, 1, 16, 32, 32)) > 0.8).astype(np.int64))
        return {"image": x, "label": y}


def _trainer(tiny_unet, out, sampler, method="dgst", epochs=3):
    model = tiny_unet(seed=0)
    torch.manual_seed(0)
    strategy = any_strategy(method, gamma=1, seed=0)
    model = strategy.prepare(model)
    cfg = TrainingConfig(epochs=epochs, iterations_per_epoch=2, initial_lr=1e-2, seed=7)
    return Trainer(model, strategy, sampler, cfg, out, progress=False)


def test_deep_supervision_weights_follow_nnunet():
    w = deep_supervision_weights(4)
    np.testing.assert_allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    assert deep_supervision_weights(1) == [1.0]


def test_poly_learning_rate():
    cfg = TrainingConfig(epochs=10, iterations_per_epoch=1, initial_lr=1e-3)
    assert cfg.lr_at(0) == pytest.approx(1e-3)
    assert cfg.lr_at(5) == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_optimizer_is_nnunet_sgd(tiny_unet, tmp_path):
    t = _trainer(tiny_unet, tmp_path, RandomPatches())
    group = t.optimizer.param_groups[0]
    assert isinstance(t.optimizer, torch.optim.SGD)
    assert group["momentum"] == 0.99 and group["nesterov"] and group["weight_decay"] == 3e-5


def test_loss_accepts_deep_supervision_list():
    loss = DeepSupervisedDiceCE()
    target = torch.zeros(2, 1, 8, 16, 16, dtype=torch.long)
    target[:, :, 2:6, 4:12, 4:12] = 1
    perfect = torch.cat([(target == 0).float(), (target == 1).float()], 1) * 20 - 10
    low = torch.nn.functional.interpolate(perfect, scale_factor=0.5)
    good = loss([perfect, low], target)
    bad = loss([-perfect, -low], target)
    assert good < 0.05 < bad


@pytest.mark.parametrize("method", ["dgst", "drst", "sgst", "lora"])
def test_resumed_run_equals_uninterrupted(tiny_unet, tmp_path, method):
    straight = _trainer(tiny_unet, tmp_path / "a", RandomPatches(), method=method)
    straight.fit()

    # dies in the 2nd epoch (sgst's calibration pass draws one extra batch first)
    killed = _trainer(tiny_unet, tmp_path / "b", RandomPatches(fail_after=3 + (method == "sgst")), method=method)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = _trainer(tiny_unet, tmp_path / "b", RandomPatches(), method=method)
    resumed.fit(resume=True)
    assert resumed.start_epoch == 1  # the finished first epoch was not recomputed
    assert len(resumed.history["epoch_loss"]) == 3
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_existing_run_needs_resume(tiny_unet, tmp_path):
    _trainer(tiny_unet, tmp_path, RandomPatches(), epochs=1).fit()
    with pytest.raises(MedadaptError, match="--resume"):
        _trainer(tiny_unet, tmp_path, RandomPatches(), epochs=1).fit()


def test_loss_equals_monai_dice_ce():
    """The engine's Dice + CE (written to work across ranks) is MONAI's DiceCELoss in one process."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 16, 16, generator=g)
    target = torch.randint(0, 3, (2, 1, 8, 16, 16), generator=g)
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                       smooth_nr=1e-5, smooth_dr=1e-5)
    assert torch.allclose(DeepSupervisedDiceCE()(logits, target), monai(logits, target), atol=1e-6)


def test_engine_learns_one_case_from_scratch(tmp_path, monkeypatch):
    """The engine learns at all: one synthetic case (three ellipsoids, 40 HU above a noisy background), the
    cpu-tiny network trained from scratch for 300 iterations through ``pretrain``, predicted back through the
    Predictor: DSC >= 0.8 on that case."""
    import json

    from medadapt.data.io import read_label, write_volume
    from medadapt.inference import Predictor
    from medadapt.metrics import case_metrics
    from medadapt.models import load_model_folder
    from medadapt.workflows.pretrain import PretrainRequest, pretrain, resolve_pretrain

    rng = np.random.default_rng(0)
    shape = (24, 48, 48)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    for cz, cy, cx, r in ((8, 14, 14, 5), (15, 30, 34, 7), (12, 36, 12, 4)):
        label[((z - cz) / (r / 2)) ** 2 + ((y - cy) / r) ** 2 + ((x - cx) / r) ** 2 <= 1] = 1
    image = rng.normal(0, 15, shape) + 40.0 * label
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # (x, y, z) spacing 1 x 1 x 2 mm
    data = tmp_path / "one"
    write_volume(image.astype(np.int16), affine, data / "imagesTr" / "one_000_0000.nii.gz", dtype=np.int16)
    write_volume(label, affine, data / "labelsTr" / "one_000.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    pretrain(resolve_pretrain(PretrainRequest(data, preset_name="cpu-tiny", epochs=12, iterations_per_epoch=25, seed=0)),
             tmp_path / "model", progress=False)
    folder = load_model_folder(tmp_path / "model")
    Predictor(folder).predict_files([("one_000", [data / "imagesTr" / "one_000_0000.nii.gz"])], tmp_path / "pred",
                                    progress=False)
    pred = read_label(tmp_path / "pred" / "one_000.nii.gz")
    gt = read_label(data / "labelsTr" / "one_000.nii.gz")
    (row,) = case_metrics(pred.array, gt.array, gt.spacing, {"blob": 1})
    assert row["dsc"] >= 0.8, row


def test_strategy_owns_the_training_step(tiny_unet, tmp_path):
    """A method that routes losses to different parameters is a strategy overriding train_step: here the
    recipe's loss trains the head only and an extra term (given to the engine like any other) trains the
    encoder only, with one optimiser. The engine runs it without knowing it."""
    from medadapt.models.parts import head_parameters, model_parts
    from medadapt.tuning.base import Strategy

    class Routed(Strategy):
        name = "routed-test"

        def train_step(self, ctx, batch):
            ctx.optimizer.zero_grad(set_to_none=True)
            outputs = ctx.forward(batch["image"])
            head = head_parameters(ctx.model)
            encoder = list(model_parts(ctx.model).encoder.parameters())
            seg = ctx.loss(ctx.model, batch, outputs)
            extra = sum(term(ctx.model, batch, outputs) for term in ctx.loss_terms)
            for loss, params in ((seg, head), (extra, encoder)):
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                for p, g in zip(params, grads):  # (the lowest deep-supervision head has loss weight 0)
                    p.grad = g
            ctx.optimizer.step()
            return (seg + extra).detach()

    model = tiny_unet(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = Routed()
    model = strategy.prepare(model)
    terms = [lambda m, b, out: sum(p.pow(2).sum() for p in model_parts(m).encoder.parameters()) * 1e-3]
    cfg = TrainingConfig(epochs=1, iterations_per_epoch=2, initial_lr=1e-2, seed=0)
    trainer = Trainer(model, strategy, RandomPatches(), cfg, tmp_path, loss_terms=terms, progress=False)
    trainer.fit()
    enc = {f"{p}encoder.{k}" for k in model_parts(model).encoder.state_dict() for p in ("", "decoder.")}
    heads = {f"decoder.seg_layers.{k}" for k in model.decoder.seg_layers.state_dict()}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= enc | heads and changed & heads and changed & enc
    decoder_own = [k for k in before if k.startswith("decoder.") and k not in heads and "encoder" not in k]
    assert decoder_own and not (changed & set(decoder_own))  # the rest of the decoder had no loss routed to it
