"""Deltas against the foundation model: compact, and applied back bit-exactly."""
import copy

import pytest
import torch

from medadapt.models import ModelFolder, preset, save_model_folder
from medadapt.tuning import make_strategy
from medadapt.tuning.delta import apply_delta, delta_size_bytes, load_delta_model, make_delta, save_delta
from tests.conftest import random_batches, segmentation_loss


def _fine_tune(method, tiny_unet, **options):
    foundation = tiny_unet(seed=0)
    model = copy.deepcopy(foundation)
    torch.manual_seed(0)
    strategy = make_strategy(method, **options)
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
