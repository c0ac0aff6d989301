"""DGST (Eq. 3-5): only the top-gamma |grad| entries per conv kernel move; everything else is bit-identical."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from medadapt.models.parts import model_parts
from medadapt.tuning import make_strategy


def _sgd(params):
    return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 1, 16, 32, 32, generator=g)
        y = (torch.rand(2, 16, 32, 32, generator=g) > 0.7).long()
        yield x, y


def _loss(model, x, y):
    """CE on every deep-supervision output (all heads get a gradient, unlike nnU-Net's weighting)."""
    outs = model(x)
    loss = nn.functional.cross_entropy(outs[0], y)
    for o in outs[1:]:
        low = nn.functional.interpolate(y[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + 0.5 * nn.functional.cross_entropy(o, low)
    return loss


def _sparse_weights(model):
    heads = {id(p) for h in model_parts(model).heads for p in h.parameters()}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and id(m.weight) not in heads:
            out[name + ".weight"] = 1 if isinstance(m, nn.ConvTranspose3d) else 0
    return out


def _expected_mask(grad: torch.Tensor, gamma: int, out_dim: int) -> np.ndarray:
    """Top-gamma |grad| per output channel, computed independently with numpy argsort."""
    g = np.abs(grad.numpy())
    g = np.moveaxis(g, out_dim, 0)
    flat = g.reshape(g.shape[0], -1)
    mask = np.zeros_like(flat, dtype=bool)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :gamma]
    np.put_along_axis(mask, order, True, axis=1)
    return np.moveaxis(mask.reshape(g.shape), 0, out_dim)


@pytest.mark.parametrize("gamma", [1, 3])
def test_dgst_updates_only_topgamma_per_kernel(tiny_unet, gamma):
    model = tiny_unet(seed=0)
    foundation = copy.deepcopy(model.state_dict())
    strategy = make_strategy("dgst", gamma=gamma)
    model = strategy.prepare(model)
    opt = _sgd(strategy.parameters(model))
    strategy.attach(opt)
    sparse = _sparse_weights(model)
    params = dict(model.named_parameters())
    ever_selected = {n: np.zeros(tuple(params[n].shape), dtype=bool) for n in sparse}

    for x, y in _batches(4):
        opt.zero_grad()
        _loss(model, x, y).backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: params[n].grad.detach().clone() for n in sparse}
        opt.step()
        for n, out_dim in sparse.items():
            expected = _expected_mask(grads[n], gamma, out_dim)
            ever_selected[n] |= expected
            changed = (params[n].detach() != before[n]).numpy()
            # nothing outside the top-gamma entries moved, bit for bit ...
            assert not changed[~expected].any(), n
            np.testing.assert_array_equal(params[n].detach().numpy()[~expected], before[n].numpy()[~expected])
            # ... and exactly gamma entries per kernel did move
            per_kernel = np.moveaxis(changed, out_dim, 0).reshape(changed.shape[out_dim], -1).sum(1)
            assert (per_kernel == gamma).all(), (n, per_kernel)

    # entries never selected are bit-identical to the foundation model after all steps (momentum and weight
    # decay did not move them in later steps either)
    for n in sparse:
        final = params[n].detach().numpy()
        np.testing.assert_array_equal(final[~ever_selected[n]], foundation[n].numpy()[~ever_selected[n]])

    # biases, normalisation affine parameters and the heads are always trained
    heads = {id(p) for h in model_parts(model).heads for p in h.parameters()}
    for name, p in params.items():
        if name in sparse:
            continue
        assert not torch.equal(p.detach(), foundation[name]), f"{name} should have been updated"
    assert any(id(p) in heads for p in params.values())


def test_dgst_with_gamma_at_kernel_size_equals_full(tiny_unet):
    largest_kernel = max(
        (m.weight[0].numel() if isinstance(m, nn.Conv3d) else m.weight[:, 0].numel())
        for m in tiny_unet().modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    )
    runs = {}
    for method, gamma in (("full", None), ("dgst", largest_kernel)):
        model = tiny_unet(seed=0)
        strategy = make_strategy(method, gamma=gamma)
        model = strategy.prepare(model)
        opt = _sgd(strategy.parameters(model))
        strategy.attach(opt)
        for x, y in _batches(3, seed=1):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        runs[method] = model.state_dict()
    for name, value in runs["full"].items():
        assert torch.equal(value, runs["dgst"][name]), name


def test_dgst_restores_state_with_adamw(tiny_unet):
    model = tiny_unet(seed=0)
    strategy = make_strategy("dgst", gamma=1)
    model = strategy.prepare(model)
    opt = torch.optim.AdamW(strategy.parameters(model), lr=1e-3, weight_decay=1e-2)
    strategy.attach(opt)
    sparse = _sparse_weights(model)
    params = dict(model.named_parameters())
    ever = {n: np.zeros(tuple(params[n].shape), dtype=bool) for n in sparse}
    for x, y in _batches(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        grads = {n: params[n].grad.detach().clone() for n in sparse}
        before = {n: params[n].detach().clone() for n in sparse}
        state_before = {n: {k: v.clone() for k, v in opt.state[params[n]].items()} for n in sparse}
        opt.step()
        for n, out_dim in sparse.items():
            mask = _expected_mask(grads[n], 1, out_dim)
            ever[n] |= mask
            np.testing.assert_array_equal(params[n].detach().numpy()[~mask], before[n].numpy()[~mask])
            st = opt.state[params[n]]
            for key in ("exp_avg", "exp_avg_sq"):
                now = st[key].numpy()
                # moments of entries never selected stay at their initial zero ...
                assert np.abs(now[~ever[n]]).max(initial=0) == 0.0
                # ... and those not selected in this step keep their previous value
                if key in state_before[n]:
                    np.testing.assert_array_equal(now[~mask], state_before[n][key].numpy()[~mask])


def test_gamma_must_be_positive():
    from medadapt.errors import MedadaptError

    with pytest.raises(MedadaptError, match="--gamma"):
        make_strategy("dgst", gamma=0)


def test_unknown_method():
    from medadapt.errors import MedadaptError

    with pytest.raises(MedadaptError, match="method 'nope' is unknown"):
        make_strategy("nope")
