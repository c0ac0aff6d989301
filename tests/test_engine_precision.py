"""How the engine runs steps: mixed precision (exact strategies under autocast + a gradient scaler, skipped
steps), background batches (the same batches for any number of workers), device-side DRST, torch.compile."""
import copy

import numpy as np
import pytest
import torch

from medadapt.data.augmentation import Augmentation
from medadapt.data.sampling import PatchSampler
from medadapt.engine import EngineOptions, Trainer, TrainingConfig
from medadapt.engine.batches import batch_stream
from medadapt.engine.losses import build_loss
from medadapt.engine.precision import MixedPrecision, resolve_precision
from medadapt.errors import MedadaptError
from medadapt.tuning import make_strategy
from medadapt.tuning.base import StepContext, default_train_step
from medadapt.tuning.sparse import kernel_topk_indices
from tests.test_engine import RandomPatches
from tests.conftest import any_strategy


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 16, 32, 32, generator=g)
    y = (torch.rand(2, 1, 16, 32, 32, generator=g) > 0.7).long()
    return {"image": x, "label": y}


class InfGrad(torch.autograd.Function):
    """0 in the forward pass, an infinite gradient for ``weight`` in the backward pass (an fp16 overflow)."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def _setup(tiny_unet, method, clip=12.0):
    model = tiny_unet(seed=0)
    strategy = any_strategy(method, gamma=1, seed=3)
    model = strategy.prepare(model)
    optimizer = torch.optim.SGD(strategy.parameters(model), lr=1e-2, momentum=0.99, nesterov=True,
                                weight_decay=3e-5)
    seen = {}

    def snapshot(opt, args, kwargs):  # registered before the strategy's hooks: the gradient it selects from
        seen.update({id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None})

    optimizer.register_step_pre_hook(snapshot)
    strategy.attach(optimizer)
    loss = build_loss({"name": "dice_ce", "batch_dice": True}, "softmax")
    if strategy.needs_calibration:
        strategy.calibrate(model, lambda m, b: loss(m, b, m(b["image"])), [_batch(9)])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    amp = MixedPrecision("bf16", "cpu", scaler=scaler)
    ctx = StepContext(model=model, forward=model, optimizer=optimizer, loss=loss, grad_clip=clip, precision=amp)
    return model, strategy, optimizer, ctx, seen


@pytest.mark.parametrize("method", ["dgst", "drst", "sgst"])
def test_sparse_strategies_exact_under_bf16_with_a_scaler(tiny_unet, method):
    model, strategy, optimizer, ctx, seen = _setup(tiny_unet, method, clip=1e-3)
    before = copy.deepcopy(model.state_dict())
    default_train_step(ctx, _batch())
    ctx.precision.update()
    assert not ctx.precision.last_step_skipped
    # the hooks saw the unscaled, clipped gradient: its norm is the clipping norm, not 2^12 times it
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen.values()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    for weight, out_dim in strategy._sparse:
        moved = (weight.detach() != before[names[id(weight)]])
        selected = strategy.selection_mask(weight)
        assert not (moved & ~selected).any(), names[id(weight)]  # nothing outside the selection moved
        if method == "dgst":  # and the selection is the top-gamma |unscaled gradient| per kernel
            expected = kernel_topk_indices(seen[id(weight)].abs(), 1, out_dim)
            assert torch.equal(torch.sort(strategy.last_selection[id(weight)]).values, torch.sort(expected).values)


@pytest.mark.parametrize("method", ["dgst", "drst", "sgst"])
def test_a_skipped_step_leaves_everything_untouched(tiny_unet, method):
    model, strategy, optimizer, ctx, seen = _setup(tiny_unet, method)
    default_train_step(ctx, _batch(1))  # one real step first: momentum buffers, a selection, a drawn stream
    ctx.precision.update()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    selection = {k: (None if v is None else v.clone()) for k, v in strategy.last_selection.items()}
    own = copy.deepcopy(strategy.state_dict())
    scale = ctx.precision.scaler.get_scale()
    target = next(w for w, _ in strategy._sparse)
    ctx.loss_terms = [lambda m, b, o: InfGrad.apply(target)]
    default_train_step(ctx, _batch(2))
    ctx.precision.update()
    assert ctx.precision.last_step_skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    after = optimizer.state_dict()
    for key, value in state["state"].items():
        for k, v in value.items():
            assert torch.equal(after["state"][key][k], v) if torch.is_tensor(v) else after["state"][key][k] == v
    assert set(strategy.last_selection) == set(selection)
    for k, v in selection.items():
        assert (v is None and strategy.last_selection[k] is None) or torch.equal(strategy.last_selection[k], v)
    for key, value in own.items():  # DRST's generator state, SGST's indices
        new = strategy.state_dict()[key]
        if torch.is_tensor(value):
            assert torch.equal(new, value)
        elif isinstance(value, list):
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(new, value))
        else:
            assert new == value
    assert ctx.precision.scaler.get_scale() == scale / 2  # the scaler backed off


def test_precision_resolution_and_records():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(MedadaptError, match="--precision"):
        resolve_precision("fp8", "cpu")
    base = TrainingConfig(epochs=1, iterations_per_epoch=1, initial_lr=1e-2)
    assert "precision" not in base.to_dict()  # fp32 records are those written before mixed precision
    assert EngineOptions(precision="bf16").configure(base, "cpu").to_dict()["precision"] == "bf16"
    assert EngineOptions().configure(base, "cpu").precision == "fp32"
    with pytest.raises(MedadaptError, match="--workers"):
        EngineOptions(workers=-1)


def _trainer(tiny_unet, out, method="dgst", engine=None, epochs=2, sampler=None):
    model = tiny_unet(seed=0)
    torch.manual_seed(0)
    strategy = any_strategy(method, gamma=1, seed=0)
    model = strategy.prepare(model)
    cfg = TrainingConfig(epochs=epochs, iterations_per_epoch=2, initial_lr=1e-2, seed=7)
    if engine is not None:
        cfg = engine.configure(cfg, "cpu")
    return Trainer(model, strategy, sampler or RandomPatches(), cfg, out, progress=False, engine=engine)


def test_bf16_run_resumes_only_in_bf16(tiny_unet, tmp_path):
    t = _trainer(tiny_unet, tmp_path, engine=EngineOptions(precision="bf16"), epochs=1)
    t.fit()
    assert all(np.isfinite(t.history["iteration_loss"]))
    with pytest.raises(MedadaptError, match="other training settings"):
        _trainer(tiny_unet, tmp_path, engine=EngineOptions(precision="fp32"), epochs=1).fit(resume=True)


class _Case:
    def __init__(self, i):
        rng = np.random.default_rng(i)
        self.case_id = f"c{i}"
        self.data = rng.standard_normal((1, 20, 40, 40)).astype(np.float32)
        self.seg = (rng.random((20, 40, 40)) > 0.9).astype(np.int16)
        self.class_locations = {1: np.argwhere(self.seg == 1)}


def test_the_same_batches_for_any_number_of_workers():
    patch = (16, 32, 32)
    sampler = PatchSampler([_Case(i) for i in range(3)], patch, 2, augmentation=Augmentation(patch))
    runs = [list(batch_stream(sampler, seed=5, iterations_per_epoch=3, start=2, stop=7, workers=w)) for w in (0, 1, 2)]
    for other in runs[1:]:
        assert len(other) == len(runs[0]) == 5
        for a, b in zip(runs[0], other):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), k
    # a batch is a function of (seed, epoch, iteration): a stream started later gives the same batch 4
    late = list(batch_stream(sampler, seed=5, iterations_per_epoch=3, start=4, stop=5, workers=0))
    assert torch.equal(late[0]["image"], runs[0][2]["image"])


def test_training_with_workers_equals_training_without(tiny_unet, tmp_path):
    a = _trainer(tiny_unet, tmp_path / "a", engine=EngineOptions(workers=0))
    a.fit()
    b = _trainer(tiny_unet, tmp_path / "b", engine=EngineOptions(workers=2))
    b.fit()
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    assert 0 <= b.summary()["data_wait_share"] < 1


def test_drst_draws_on_the_weights_device_and_resumes(tiny_unet, tmp_path):
    straight = _trainer(tiny_unet, tmp_path / "a", method="drst")
    straight.fit()
    state = straight.strategy.state_dict()
    assert state["device"] == "cpu" and state["generator"].dtype == torch.uint8
    # killed in epoch 2, resumed from epoch 1's checkpoint (its generator state): the same selections and weights
    killed = _trainer(tiny_unet, tmp_path / "b", method="drst", sampler=RandomPatches(fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = _trainer(tiny_unet, tmp_path / "b", method="drst")
    resumed.fit(resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    # a state drawn on another device type is refused in one line, not silently re-seeded
    other = make_strategy("drst", gamma=1, seed=0)
    other.prepare(tiny_unet(seed=0))
    other.load_state_dict({**state, "device": "cuda"})
    weight = other._sparse[0][0]
    with pytest.raises(MedadaptError, match="resume it on cuda"):
        other.select(weight, 0)


def test_compiled_forward_keeps_the_strategy_exact(tiny_unet, tmp_path):
    plain = _trainer(tiny_unet, tmp_path / "a", epochs=1)
    plain.fit()
    compiled = _trainer(tiny_unet, tmp_path / "b", engine=EngineOptions(compile="eager"), epochs=1)
    compiled.fit()
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(value, compiled.model.state_dict()[name], atol=1e-6), name
    # the checkpoint holds the plain network's keys (no torch.compile wrapper prefix)
    ckpt = torch.load(tmp_path / "b" / "checkpoint_latest.pt", weights_only=False)
    assert set(ckpt["model"]) == set(plain.model.state_dict())


def test_kd_fine_tuning_under_bf16_with_a_scaler(tiny_unet):
    """MedSeqFT's KD-based FFT (two optimisers) under autocast + scaler: both steps see unscaled gradients;
    when the segmentation gradient overflows, its step is skipped (decoder and head untouched) while the
    distillation step, checked on its own gradients, goes ahead."""
    from medadapt.models.parts import encoder_parameters
    from medadapt.tuning.distill import KDFineTuning, frozen_copy

    class Buffer:
        def sample(self, rng):
            return {"image": torch.from_numpy(rng.standard_normal((2, 1, 16, 32, 32)).astype(np.float32))}

    model = tiny_unet(seed=1)
    strategy = KDFineTuning(frozen_copy(tiny_unet(seed=2)), Buffer(), seed=0)
    model = strategy.prepare(model)
    opt = torch.optim.SGD(strategy.parameters(model), lr=1e-2, momentum=0.99, nesterov=True)
    strategy.attach(opt)
    amp = MixedPrecision("bf16", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    loss = build_loss({"name": "dice_ce", "batch_dice": True}, "softmax")
    ctx = StepContext(model=model, forward=model, optimizer=opt, loss=loss, grad_clip=12.0, precision=amp)
    before = copy.deepcopy(model.state_dict())
    strategy.train_step(ctx, _batch(0))
    amp.update()
    assert not amp.last_step_skipped and torch.isfinite(strategy.last_kd_loss)
    names = {id(p): n for n, p in model.named_parameters()}
    encoder = {names[id(p)] for p in encoder_parameters(model)}
    assert all(not torch.equal(before[n], model.state_dict()[n]) for n in list(encoder)[:3])
    # the segmentation gradient overflows on a decoder-side weight: that step is skipped, the KD step is not
    state = copy.deepcopy(model.state_dict())
    decoder_weight = next(p for p in model.parameters() if names[id(p)] not in encoder)
    ctx.loss_terms = [lambda m, b, o: InfGrad.apply(decoder_weight)]
    strategy.train_step(ctx, _batch(1))
    amp.update()
    for name, value in model.state_dict().items():
        if name in names.values() and name not in encoder:
            assert torch.equal(value, state[name]), name  # only the segmentation step moves these
    assert any(not torch.equal(model.state_dict()[n], state[n]) for n in encoder)  # the KD step went ahead
    assert amp.scaler.get_scale() == 2.0 ** 11
