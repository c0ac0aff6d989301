"""LoRA (medadapt.models.lora) and residual conv adapters (medadapt.models.adapters) on nnU-Net U-Nets."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from medadapt.errors import MedadaptError
from medadapt.models.adapters import (
    AdapterConfig,
    ConvAdapter,
    adapter_parameters,
    has_adapters,
    inject_adapters,
    load_base_state,
    remove_adapters,
)
from medadapt.models.lora import (
    LoRAConfig,
    has_lora,
    inject_lora,
    lora_delta_weight,
    lora_parameters,
    merge_lora,
)
from medadapt.models.parts import model_parts

SHAPE = (2, 1, 8, 16, 16)


@pytest.fixture
def resenc_unet():
    """A small nnU-Net ResidualEncoderUNet (3 stages 4-8-16, one residual block per stage, deep supervision)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    def make(seed: int = 0, num_classes: int = 2):
        torch.manual_seed(seed)
        net = ResidualEncoderUNet(
            input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=3,
            strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 1], num_classes=num_classes,
            n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True,
        )
        net.apply(InitWeights_He(1e-2))
        return net

    return make


@pytest.fixture(params=["plain", "resenc"])
def make_net(request, tiny_unet, resenc_unet):
    return tiny_unet if request.param == "plain" else resenc_unet


def _x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g)


def _outputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = net(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _assert_same(a, b, atol=0.0):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape
        if atol == 0.0:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(u, v, atol=atol, rtol=0)


def _train(net: nn.Module, params, steps: int = 4, lr: float = 0.05, seed: int = 3) -> None:
    """A few SGD steps of deep-supervised cross-entropy against random labels."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        x = torch.randn(SHAPE, generator=g)
        y = torch.randint(0, 2, (SHAPE[0],) + SHAPE[2:], generator=g)
        outs = net(x)
        loss = 0.0
        for o in outs:
            target = nn.functional.interpolate(y[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
            loss = loss + nn.functional.cross_entropy(o, target)
        assert loss.item() > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


# ----------------------------------------------------------------------------------------------------------- LoRA


def test_lora_config_validates():
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0
    for bad in ({"rank": 0}, {"rank": 2.5}, {"alpha": 0.0}, {"alpha": float("nan")}):
        with pytest.raises(MedadaptError):
            LoRAConfig(**bad)


def test_lora_starts_at_foundation_and_trains_only_factors(make_net):
    net = make_net()
    x = _x()
    before = _outputs(net.eval(), x)
    heads = model_parts(net).heads
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    injected = inject_lora(net, LoRAConfig(rank=2, alpha=4.0), skip=heads)

    assert has_lora(net)
    head_ids = {id(h) for h in heads}
    assert {id(m) for m in injected} == {id(m) for m in convs if id(m) not in head_ids}
    assert any(isinstance(m, nn.ConvTranspose3d) for m in injected)
    assert not any(parametrize.is_parametrized(h) for h in heads)
    _assert_same(before, _outputs(net.eval(), x))  # B = 0: bit-identical

    for m in injected:
        assert not m.parametrizations.weight.original.requires_grad
        if m.bias is not None:
            assert m.bias.requires_grad  # the bias is the strategy's business
        assert torch.count_nonzero(lora_delta_weight(m)) == 0
    lora = lora_parameters(net)
    assert len(lora) == 2 * len(injected) and all(p.requires_grad for p in lora)

    # A frozen network + LoRA: the factors are the only trainable parameters.
    frozen = make_net()
    frozen.requires_grad_(False)
    inject_lora(frozen, LoRAConfig(rank=2), skip=model_parts(frozen).heads)
    assert {id(p) for p in frozen.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(frozen)}


def test_lora_factor_shapes_and_rank_clamp(tiny_unet):
    net = tiny_unet()
    injected = inject_lora(net, LoRAConfig(rank=6, alpha=3.0), skip=model_parts(net).heads)
    for m in injected:
        lora = m.parametrizations.weight[0]
        w = m.parametrizations.weight.original
        rows, cols = w.shape[0], w[0].numel()
        assert lora.lora_A.shape == (min(6, rows, cols), cols)
        assert lora.lora_B.shape == (rows, min(6, rows, cols))
        assert lora.scale == 0.5
    first = model_parts(net).encoder.stages[0][0].convs[0].conv  # 1 -> 4 channels: rank clamped to 4 rows
    assert first.parametrizations.weight[0].rank == 4
    transp = model_parts(net).decoder.transpconvs[0]  # ConvTranspose3d(16 -> 8): rows = in = 16
    assert transp.parametrizations.weight[0].lora_B.shape[0] == 16


def test_lora_strategy_says_which_layers_got_a_smaller_rank(tiny_unet):
    """A rank larger than a layer's matrix allows is clamped per layer (module docstring of models.lora): the
    strategy's notes name those layers and their ranks (run.json's method_notes) and say so."""
    from medadapt.tuning import make_strategy

    strategy = make_strategy("lora", rank=6)
    net = strategy.prepare(tiny_unet())
    notes = strategy.notes(net)
    clamped = notes["lora_ranks"]["clamped"]
    assert notes["lora_ranks"]["requested"] == 6
    assert clamped["encoder.stages.0.0.convs.0.conv"] == 4 and all(r < 6 for r in clamped.values())
    assert "LoRA rank 6" in notes["say"] and "rank 4" in notes["say"]
    small = make_strategy("lora", rank=1)
    assert small.notes(small.prepare(tiny_unet())) == {"lora_ranks": {"requested": 1, "clamped": {}}}


def test_lora_merge_matches_and_restores_plain_network(make_net):
    net = make_net()
    keys = {k: v.shape for k, v in net.state_dict().items()}
    transp_before = [t.weight.detach().clone() for t in model_parts(net).decoder.transpconvs]
    injected = inject_lora(net, LoRAConfig(rank=2, alpha=4.0), skip=model_parts(net).heads)
    injected_names = {name for name, m in net.named_modules() if any(m is i for i in injected)}
    net.requires_grad_(False)
    for p in lora_parameters(net):
        p.requires_grad_(True)
    _train(net, lora_parameters(net))

    x = _x()
    unmerged = _outputs(net, x)
    assert all(torch.count_nonzero(p) > 0 for p in lora_parameters(net)[1::2])  # every B moved
    merged_net = merge_lora(copy.deepcopy(net))
    merged = _outputs(merged_net.eval(), x)
    _assert_same(unmerged, merged, atol=1e-5)

    assert not has_lora(merged_net)
    assert not any(parametrize.is_parametrized(m) for m in merged_net.modules())
    assert {k: v.shape for k, v in merged_net.state_dict().items()} == keys
    for name, m in merged_net.named_modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            assert type(m) in (nn.Conv3d, nn.ConvTranspose3d)
            assert isinstance(m.weight, nn.Parameter)
            assert m.weight.requires_grad == (name in injected_names)  # merged kernels are trainable again
    for t, w0 in zip(model_parts(merged_net).decoder.transpconvs, transp_before):
        assert isinstance(t, nn.ConvTranspose3d)
        assert not torch.allclose(t.weight, w0)
    # The merged model is a plain nnU-Net: it loads into a freshly built one and (PlainConvUNet, whose modules
    # pickle, unlike ResidualEncoderUNet's lambdas) pickles again, which a parametrised network does not.
    fresh = make_net(seed=5)
    fresh.load_state_dict(merged_net.state_dict())
    _assert_same(merged, _outputs(fresh.eval(), x))
    if type(net).__name__ == "PlainConvUNet":
        with pytest.raises(RuntimeError):
            pickle.dumps(net)
        pickle.dumps(merged_net)
    assert merge_lora(fresh) is fresh  # nothing to merge: unchanged


def test_lora_deepcopy_and_state_dict_round_trip(tiny_unet):
    net = tiny_unet()
    inject_lora(net, LoRAConfig(rank=2), skip=model_parts(net).heads)
    _train(net, lora_parameters(net), steps=2)
    x = _x()
    ref = _outputs(net, x)

    clone = copy.deepcopy(net)
    _assert_same(ref, _outputs(clone, x))
    assert {id(p) for p in lora_parameters(clone)}.isdisjoint({id(p) for p in lora_parameters(net)})
    merge_lora(clone)
    assert has_lora(net) and not has_lora(clone)
    _assert_same(ref, _outputs(clone.eval(), x), atol=1e-5)

    sd = net.state_dict()
    conv = "encoder.stages.0.0.convs.0.conv"
    for suffix in ("parametrizations.weight.original", "parametrizations.weight.0.lora_A",
                   "parametrizations.weight.0.lora_B", "bias"):
        assert f"{conv}.{suffix}" in sd
    other = tiny_unet(seed=7)
    inject_lora(other, LoRAConfig(rank=2), skip=model_parts(other).heads)
    other.load_state_dict(sd)
    _assert_same(ref, _outputs(other.eval(), x))
    with pytest.raises(MedadaptError):
        inject_lora(net, LoRAConfig())


# ------------------------------------------------------------------------------------------------------- adapters


def test_adapters_start_at_foundation_and_train(make_net):
    net = make_net()
    x = _x()
    before = _outputs(net.eval(), x)
    keys = list(net.state_dict().keys())
    adapters = inject_adapters(net, AdapterConfig(reduction=4))

    parts = model_parts(net)
    assert len(adapters) == len(parts.encoder.stages) + len(parts.decoder.stages)
    assert has_adapters(net) and all(isinstance(a, ConvAdapter) for a in adapters)
    assert all(isinstance(a.down, nn.Conv3d) and a.down.kernel_size == (3, 3, 3) for a in adapters)
    assert [a.channels for a in adapters] == [4, 8, 16, 8, 4]
    _assert_same(before, _outputs(net.eval(), x))  # up = 0: bit-identical
    # Base keys unchanged; adapters only add keys.
    sd_keys = list(net.state_dict().keys())
    assert [k for k in sd_keys if ".medadapt_adapter." not in k] == keys

    net.requires_grad_(False)
    for p in adapter_parameters(net):
        p.requires_grad_(True)
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in adapter_parameters(net)}
    _train(net, adapter_parameters(net))
    after = _outputs(net, x)
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))

    remove_adapters(net)
    assert not has_adapters(net)
    assert list(net.state_dict().keys()) == keys
    assert not any(isinstance(m, ConvAdapter) for m in net.modules())
    _assert_same(before, _outputs(net.eval(), x))


def test_adapters_deepcopy_and_state_dict_round_trip(make_net):
    net = make_net()
    foundation = copy.deepcopy(net.state_dict())
    inject_adapters(net, AdapterConfig(reduction=2))
    _train(net, adapter_parameters(net), steps=2)
    x = _x()
    ref = _outputs(net, x)

    clone = copy.deepcopy(net)
    _assert_same(ref, _outputs(clone, x))
    with torch.no_grad():  # the copy's hooks call the copy's adapters, not the original's
        for p in adapter_parameters(clone):
            p.add_(0.1)
    assert not torch.allclose(_outputs(clone, x)[0], ref[0])
    _assert_same(ref, _outputs(net, x))
    remove_adapters(clone)
    assert not has_adapters(clone) and has_adapters(net)
    _assert_same(_outputs(make_net().eval(), x), _outputs(clone.eval(), x))

    other = make_net(seed=9)
    inject_adapters(other, AdapterConfig(reduction=2))
    other.load_state_dict(net.state_dict())
    _assert_same(ref, _outputs(other.eval(), x))

    # Foundation weights into an adapted network: strict except for the adapters, which stay at identity.
    base = make_net(seed=9)
    inject_adapters(base, AdapterConfig(reduction=2))
    load_base_state(base, foundation)
    _assert_same(_outputs(make_net().eval(), x), _outputs(base.eval(), x))
    with pytest.raises(MedadaptError, match="missing"):
        load_base_state(base, {k: v for k, v in foundation.items() if not k.endswith("seg_layers.0.bias")})
    with pytest.raises(MedadaptError, match="unexpected"):
        load_base_state(base, {**foundation, "extra.weight": torch.zeros(1)})
    with pytest.raises(MedadaptError):
        inject_adapters(base, AdapterConfig())


def test_adapter_parameter_counts(make_net):
    def expected(reduction):
        total = 0
        for c in (4, 8, 16, 8, 4):
            h = max(1, c // reduction)
            total += (c * h * 27 + h) + (h * c + c)
        return total

    counts = {}
    for r in (4, 8):
        net = make_net()
        inject_adapters(net, AdapterConfig(reduction=r))
        counts[r] = sum(p.numel() for p in adapter_parameters(net))
        assert counts[r] == expected(r)
    assert counts[4] > counts[8]
    with pytest.raises(MedadaptError):
        AdapterConfig(reduction=0)


def test_lora_skips_adapter_convs(tiny_unet):
    net = tiny_unet()
    inject_adapters(net, AdapterConfig())
    injected = inject_lora(net, LoRAConfig(rank=2), skip=model_parts(net).heads)
    adapter_convs = {id(m) for a in net.modules() if isinstance(a, ConvAdapter) for m in a.modules()}
    assert adapter_convs and adapter_convs.isdisjoint({id(m) for m in injected})
    x = _x()
    ref = _outputs(net.eval(), x)
    merge_lora(net)
    remove_adapters(net)
    _assert_same(ref, _outputs(net.eval(), x))


def test_lora_finalized_state_dict_leaves_the_model_and_equals_the_merge():
    """nnU-Net's trainer checkpoints the merged weights mid-training without merging the live model."""
    from medadapt.models import build_network, preset
    from medadapt.models.lora import has_lora
    from medadapt.tuning import make_strategy

    torch.manual_seed(0)
    strategy = make_strategy("lora", rank=2)
    model = strategy.prepare(build_network(preset("cpu-tiny", input_channels=1, num_classes=2)))
    with torch.no_grad():
        for p in strategy.parameters(model):
            p.add_(0.1 * torch.randn_like(p))
        state = strategy.finalized_state_dict(model)
    assert has_lora(model)  # untouched
    merged = strategy.finalize(model).state_dict()
    assert state.keys() == merged.keys()
    assert all(torch.equal(state[k], merged[k]) for k in merged)
