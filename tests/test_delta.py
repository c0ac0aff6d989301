"""Deltas against the foundation model: compact, and applied back bit-exactly."""
import copy

import pytest
import torch

from medadapt.models import ModelFolder, preset, save_model_folder
from medadapt.tuning.delta import apply_delta, delta_size_bytes, load_delta_model, make_delta, save_delta
from tests.conftest import any_strategy, random_batches, segmentation_loss


def _fine_tune(method, tiny_unet, **options):
    foundation = tiny_unet(seed=0)
    model = copy.deepcopy(foundation)
    torch.manual_seed(0)
    strategy = any_strategy(method, **options)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, segmentation_loss, random_batches(1, seed=5))
    opt = torch.optim.SGD(strategy.parameters(model), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    strategy.attach(opt)
    for batch in random_batches(3, seed=1):
        opt.zero_grad()
        segmentation_loss(model, batch).backward()
        opt.step()
    return foundation, model, strategy


@pytest.mark.parametrize("method,options", [("dgst", {"gamma": 1}), ("sgst", {"gamma": 2}), ("bias", {}),
                                            ("lora", {"rank": 2}), ("adapter", {"reduction": 2}),
                                            ("full", {})])
def test_delta_round_trip_is_bit_exact(method, options, tiny_unet, tmp_path):
    foundation, model, strategy = _fine_tune(method, tiny_unet, **options)
    trained = model.state_dict()
    delta = make_delta(foundation.state_dict(), trained, meta={"strategy": strategy.config(), "num_classes": 2})
    save_delta(tmp_path / "delta.pt", delta)
    loaded = torch.load(tmp_path / "delta.pt", weights_only=False)
    rebuilt = apply_delta(foundation.state_dict(), loaded)
    assert set(rebuilt) == set(trained)
    for key, value in trained.items():
        assert torch.equal(rebuilt[key], value), key

    # and the final model (LoRA merged, adapters kept) from a foundation model folder + the delta
    folder = ModelFolder(network=preset("cpu-tiny", 1, 2), preprocessing={}, labels={"background": 0, "x": 1},
                         channel_names={"0": "CT"})
    save_model_folder(tmp_path / "fm", foundation, folder)
    final = strategy.finalize(model)
    again = load_delta_model(folder, loaded)
    for key, value in final.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    torch.save(final.state_dict(), tmp_path / "full.pt")
    full_size = (tmp_path / "full.pt").stat().st_size
    if method in ("dgst", "sgst", "bias", "lora", "adapter"):
        assert delta_size_bytes(delta) < full_size, (method, delta_size_bytes(delta), full_size)


def test_sparse_delta_stores_indices_only_for_changed_entries(tiny_unet):
    foundation, model, strategy = _fine_tune("dgst", tiny_unet, gamma=1)
    delta = make_delta(foundation.state_dict(), model.state_dict())
    entry = delta["entries"]["encoder.stages.1.0.convs.1.conv.weight"]
    weight = model.state_dict()["encoder.stages.1.0.convs.1.conv.weight"]
    assert "index" in entry and entry["index"].numel() <= 3 * weight.shape[0]  # <= gamma x out x steps
    assert delta["entries"]["encoder.stages.1.0.convs.1.conv.bias"].get("full") is not None


def test_dense_delta_costs_no_more_than_the_model(tiny_unet, tmp_path):
    """A `full`-style run changes every tensor densely: its delta must not be larger than the model's own
    torch.save (nnU-Net's state dict names most tensors two to four times, as aliases of one tensor)."""
    foundation = tiny_unet(seed=0)
    model = copy.deepcopy(foundation)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    trained = model.state_dict()
    assert len({v.data_ptr() for v in trained.values()}) < len(trained)  # the aliases this is about
    delta = make_delta(foundation.state_dict(), trained, meta={"strategy": {"name": "full"}, "num_classes": 2})
    assert all("full" in e for e in delta["entries"].values())
    torch.save(trained, tmp_path / "weights.pt")
    save_delta(tmp_path / "delta.pt", delta)
    model_size = (tmp_path / "weights.pt").stat().st_size
    assert (tmp_path / "delta.pt").stat().st_size <= model_size + 2048
    assert delta_size_bytes(delta) <= model_size + 2048
    rebuilt = apply_delta(foundation.state_dict(), torch.load(tmp_path / "delta.pt", weights_only=False))
    assert set(rebuilt) == set(trained)
    for key, value in trained.items():
        assert torch.equal(rebuilt[key], value), key


def test_sparse_form_only_when_it_is_smaller(tiny_unet):
    """One changed entry of a small tensor: two records (index + value) would cost more than the whole tensor."""
    from medadapt.tuning.delta import _stored_bytes

    foundation = tiny_unet(seed=0)
    base = foundation.state_dict()
    trained = {k: v.clone() for k, v in base.items()}
    small = "encoder.stages.0.0.convs.0.conv.bias"
    large = "encoder.stages.1.0.convs.1.conv.weight"
    trained[small].view(-1)[0] += 1
    trained[large].view(-1)[5] += 1
    delta = make_delta(base, trained)
    assert "full" in delta["entries"][small]
    assert delta["entries"][large]["index"].tolist() == [5]
    for key, entry in delta["entries"].items():
        whole = _stored_bytes(trained[key].numel() * trained[key].element_size())
        stored = sum(_stored_bytes(t.numel() * t.element_size()) for t in entry.values())
        assert stored <= whole, key
    rebuilt = apply_delta(base, delta)
    for key, value in trained.items():
        assert torch.equal(rebuilt[key], value), key


def test_aliases_share_an_entry_only_when_the_foundation_agrees(tiny_unet):
    """An aliased key reuses the first key's sparse entry only if the foundation holds the same tensor under
    both names; otherwise it gets its own entry, and applying stays exact."""
    foundation = tiny_unet(seed=0)
    model = copy.deepcopy(foundation)
    key = "encoder.stages.1.0.convs.1.conv.weight"
    alias = "encoder.stages.1.0.convs.1.all_modules.0.weight"
    trained = model.state_dict()
    assert trained[key].data_ptr() == trained[alias].data_ptr()
    with torch.no_grad():
        trained[key].view(-1)[7] += 1
    base = {k: v.clone() for k, v in foundation.state_dict().items()}  # no aliases in this foundation
    delta = make_delta(base, trained)
    assert delta["entries"][alias] is delta["entries"][key]  # equal values under both names: shared
    base[alias] = base[alias] + 1  # now the foundation disagrees between the two names
    delta = make_delta(base, trained)
    assert delta["entries"][alias] is not delta["entries"][key]
    rebuilt = apply_delta(base, delta)
    for k, v in trained.items():
        assert torch.equal(rebuilt[k], v), k
