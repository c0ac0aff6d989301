"""Every strategy trains exactly the parameters it promises, with SGD (Nesterov, momentum, weight decay) and AdamW.

The promised sets are written out here from the network's structure (PlainConvUNet: encoder, decoder,
decoder.seg_layers, transpconvs, stages), independently of how the strategies find them.
"""
import copy

import pytest
import torch
from torch import nn

from medadapt.tuning import make_strategy, method_names
from medadapt.tuning.delta import foundation_key
from tests.conftest import any_strategy, random_batches, segmentation_loss

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2),
}


def _names(model, modules):
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def promised(model: nn.Module, method: str) -> set[str]:
    """Foundation parameter names each method may change (LoRA/adapter add their own new parameters)."""
    dec = model.decoder
    heads = _names(model, dec.seg_layers)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    biases = {n for n, _ in model.named_parameters()
              if n.endswith(".bias") and any(n == f"{mn}.bias" for mn, m in model.named_modules() if m in convs)}
    norm = _names(model, norms)
    everything = {n for n, _ in model.named_parameters()}
    # nnU-Net's deep supervision gives the lowest-resolution output weight 0: no gradient reaches its head
    silent = _names(model, [dec.seg_layers[0]])
    return {k: v - silent for k, v in {
        "scratch": everything, "full": everything,
        "linear-probe": heads,
        "bias": biases | heads,
        "affine-norm": norm | heads,
        "bias-norm": biases | norm | heads,
        "encoder-only": _names(model, [model.encoder]) | heads,
        "decoder-only": _names(model, [dec]) - _names(model, [model.encoder]),  # nnU-Net's decoder.encoder

        "ft-last": _names(model, [dec.transpconvs[-1], dec.stages[-1]]) | heads,
        "lora": heads, "adapter": heads,
        "spatial-adapter": set(),  # the full-resolution head is replaced: adapter and classifier are new
        "dgst": everything, "drst": everything, "sgst": everything,  # sparse entries: see test_sparse_budgets
    }.items()}[method]


def train(method, optimizer, tiny_unet, steps=3, **options):
    model = tiny_unet(seed=0)
    foundation = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    strategy = any_strategy(method, **options)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, segmentation_loss, random_batches(2, seed=5))
    opt = OPTIMIZERS[optimizer](strategy.parameters(model))
    strategy.attach(opt)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    for batch in random_batches(steps, seed=2):
        opt.zero_grad()
        segmentation_loss(model, batch).backward()
        opt.step()
    return model, strategy, foundation, start


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", method_names(training_only=True))
def test_exactly_the_promised_parameters_change(method, optimizer, tiny_unet):
    model, strategy, foundation, start = train(method, optimizer, tiny_unet)
    allowed = promised(tiny_unet(), method)
    after = dict(model.named_parameters())
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    new = {k for k in after if foundation_key(k) not in foundation}  # modules the strategy added
    changed_foundation = {foundation_key(k) for k in changed - new}
    assert changed_foundation == allowed, (
        f"{method}: unexpected {sorted(changed_foundation - allowed)[:5]}, unchanged {sorted(allowed - changed_foundation)[:5]}")
    if method in ("lora", "adapter", "spatial-adapter"):
        assert new and new <= changed, f"{method}: its new parameters must all train"
    else:
        assert not new
    if method != "scratch":  # every method but scratch starts exactly from the foundation model
        for k, v in start.items():
            if foundation_key(k) in foundation and k not in new:
                assert torch.equal(v, foundation[foundation_key(k)]), k


def _selections_per_step(method, gamma, tiny_unet, steps=3):
    """Per step and sparse conv: (entries the strategy selected, entries that actually changed)."""
    model = tiny_unet(seed=0)
    strategy = make_strategy(method, gamma=gamma, seed=3)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, segmentation_loss, random_batches(2, seed=5))
    opt = OPTIMIZERS["sgd"](strategy.parameters(model))
    strategy.attach(opt)
    convs = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m not in list(model.decoder.seg_layers)}
    steps_out = []
    for batch in random_batches(steps, seed=2):
        opt.zero_grad()
        segmentation_loss(model, batch).backward()
        before = {n: m.weight.detach().clone() for n, m in convs.items()}
        opt.step()
        steps_out.append({n: (strategy.selection_mask(m.weight), m.weight.detach() != before[n])
                          for n, m in convs.items()})
    return convs, steps_out


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 10])
def test_sparse_budgets(gamma, tiny_unet):
    counts = {}
    for method in ("dgst", "drst", "sgst"):
        convs, steps = _selections_per_step(method, gamma, tiny_unet)
        per_step = []
        for step in steps:
            total = 0
            for name, (selected, changed) in step.items():
                assert not (changed & ~selected).any(), (method, name)  # nothing unselected moved
                out_dim = 1 if isinstance(convs[name], nn.ConvTranspose3d) else 0
                per_kernel = selected.movedim(out_dim, 0).flatten(1).sum(1)
                kernel = selected.movedim(out_dim, 0)[0].numel()
                assert (per_kernel == min(gamma, kernel)).all(), (method, name, per_kernel)
                total += int(per_kernel.sum())
            per_step.append(total)
            # almost every selected entry really moves (an entry with a ~0 gradient may not)
            n_changed = sum(int(c.sum()) for _, c in step.values())
            assert n_changed >= 0.95 * total
        counts[method] = per_step
        if method == "sgst":  # the static set never changes
            assert all(torch.equal(later[n][0], steps[0][n][0]) for later in steps[1:] for n in later)
        if method == "drst":  # the random set is drawn anew each step
            assert any(not torch.equal(steps[1][n][0], steps[0][n][0]) for n in steps[0])
    assert counts["dgst"] == counts["drst"] == counts["sgst"]


def test_lora_merge_matches_unmerged(tiny_unet):
    model, strategy, _, _ = train("lora", "adamw", tiny_unet, rank=2, alpha=4.0)
    model.eval()
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        unmerged = [o.clone() for o in model(x)]
        merged_model = strategy.finalize(copy.deepcopy(model))
        merged = merged_model(x)
    for a, b in zip(unmerged, merged):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert set(merged_model.state_dict()) == set(tiny_unet().state_dict())  # plain architecture again


def test_adapters_start_at_the_foundation_model(tiny_unet):
    model = tiny_unet(seed=0).eval()
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(x)
        adapted = make_strategy("adapter", reduction=2).prepare(copy.deepcopy(model)).eval()(x)
    for a, b in zip(reference, adapted):
        assert torch.equal(a, b)


def test_frozen_parameters_get_no_gradient(tiny_unet):
    model, strategy, _, _ = train("bias", "sgd", tiny_unet, steps=1)
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None  # autograd computed no weight gradient for frozen weights


def test_bias_training_with_frozen_weights_keeps_outputs(tiny_unet):
    """bias/bias-norm add conv biases after a bias-free convolution (no weight gradient): same function."""
    model = tiny_unet(seed=0).eval()
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(x)
        strategy = make_strategy("bias")
        prepared = copy.deepcopy(strategy.prepare(copy.deepcopy(model))).eval()  # deep copies keep working
        decoupled = prepared(x)
        plain = strategy.finalize(prepared)(x)
    for a, b, c in zip(reference, decoupled, plain):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(a, c)
    assert set(prepared.state_dict()) == set(model.state_dict())
    assert not any(m._forward_hooks for m in prepared.modules())
