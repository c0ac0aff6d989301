"""MONAI's SwinUNETR as a first-class network: preset, roles, model folders, every method, MONAI checkpoints.

The promised parameter sets are written out here from MONAI's module names (swinViT, encoder1..4, encoder10,
decoder5..1, out), independently of how medadapt's parts and strategies find them.
"""
import copy
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from torch import nn

from medadapt.cli import main
from medadapt.engine import DeepSupervisedDiceCE
from medadapt.models import ModelFolder, build_network, load_model_folder, model_parts, preset, save_model_folder
from medadapt.models.lora import lora_modules
from medadapt.models.network import set_deep_supervision
from medadapt.models.parts import bias_parameters, norm_parameters
from medadapt.models.swin import SwinUNETR
from medadapt.tuning import make_strategy, method_names
from medadapt.tuning.delta import apply_delta, foundation_key, load_delta_model, make_delta
from tests.test_cli_errors import make_dataset
from tests.conftest import any_strategy

SHAPE = (1, 1, 32, 32, 64)  # the smallest training input: every axis a multiple of 32, deepest map 1x1x2
ENCODER = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
DECODER = ("decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.")
SSL_HEADS = ("rotation_head.weight", "rotation_head.bias", "contrastive_head.weight", "contrastive_head.bias",
             "convTrans3d.weight", "convTrans3d.bias", "norm.weight", "norm.bias")


def _swin(seed: int = 0, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(preset("cpu-swin", input_channels=1, num_classes=num_classes))


@pytest.fixture(scope="module")
def foundation():
    return _swin()


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield {"image": torch.randn(SHAPE, generator=g), "label": (torch.rand(SHAPE, generator=g) > 0.7).long()}


def _loss(model, batch):
    return DeepSupervisedDiceCE()(model(batch["image"]), batch["label"])


def _train(model, method, steps=2, optimizer="adamw", **options):
    strategy = any_strategy(method, **options)
    torch.manual_seed(1)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, _loss, _batches(1, seed=5))
    params = strategy.parameters(model)
    opt = (torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5))
    strategy.attach(opt)
    for batch in _batches(steps, seed=2):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return model, strategy


def _x(seed=9, shape=(1, 1, 32, 32, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- the network
def test_preset_is_monai_swinunetr_with_monai_keys_and_init(foundation):
    spec = preset("cpu-swin", input_channels=1, num_classes=2)
    assert spec.network_class_name == "medadapt.models.swin.SwinUNETR"
    assert isinstance(foundation, MonaiSwinUNETR)
    kwargs = {k: v for k, v in spec.arch_kwargs.items() if k != "axis_order"}
    torch.manual_seed(0)
    monai = MonaiSwinUNETR(in_channels=1, out_channels=2, **kwargs)
    ours, theirs = foundation.state_dict(), monai.state_dict()
    assert list(ours) == list(theirs)  # MONAI's keys, in MONAI's order
    for k in theirs:  # MONAI's own initialisation, untouched by nnU-Net's He init
        assert torch.equal(ours[k], theirs[k]), k
    net = copy.deepcopy(foundation).eval()
    set_deep_supervision(net, False)  # no deep supervision: a no-op
    x = _x()
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out, monai.eval()(x))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 32, 32, 64)  # one tensor, not a list


def test_bad_patch_is_one_clear_error(foundation):
    from medadapt.errors import MedadaptError

    net = copy.deepcopy(foundation)
    with pytest.raises(MedadaptError, match="multiple of 32"):
        net(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(MedadaptError, match="one voxel"):
        net.train()(torch.zeros(2, 1, 32, 32, 32))


def test_roles(foundation):
    parts = model_parts(foundation)
    names = {id(p): n for n, p in foundation.named_parameters()}

    def of(module_or_modules):
        modules = module_or_modules if isinstance(module_or_modules, list) else [module_or_modules]
        return {names[id(p)] for m in modules for p in m.parameters()}

    everything = set(names.values())
    assert of(parts.encoder) == {n for n in everything if n.startswith(ENCODER)}
    assert of(parts.decoder) == {n for n in everything if n.startswith(DECODER)}
    assert of(parts.heads) == {"out.conv.conv.weight", "out.conv.conv.bias"}
    assert of(parts.last_stage) == {n for n in everything if n.startswith("decoder1.")}
    assert of(parts.encoder) | of(parts.decoder) | of(parts.heads) == everything
    assert [type(m).__name__ for m in parts.adapter_sites] == ["UnetrBasicBlock"] * 5 + ["UnetrUpBlock"] * 5
    tables = {names[id(p)] for p in parts.extra_biases}
    assert tables == {n for n in everything if n.endswith("relative_position_bias_table")} and len(tables) == 8
    assert tables <= {names[id(p)] for p in bias_parameters(foundation)}
    layer_norms = {n for n, m in foundation.named_modules() if isinstance(m, nn.LayerNorm)}
    assert {names[id(p)] for p in norm_parameters(foundation)} == {
        n for n in everything if n.rsplit(".", 1)[0] in layer_norms}  # MONAI's instance norms have no affine


def test_model_folder_round_trip(foundation, tmp_path):
    folder = ModelFolder(network=preset("cpu-swin", 1, 2), preprocessing={}, labels={"background": 0, "x": 1},
                         channel_names={"0": "CT"})
    save_model_folder(tmp_path / "m", foundation, folder)
    loaded = load_model_folder(tmp_path / "m").load_network()
    assert isinstance(loaded, SwinUNETR)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), copy.deepcopy(foundation).eval()(x))
    # the weights are MONAI's: they load into MONAI's own class unchanged
    spec = folder.network
    monai = MonaiSwinUNETR(in_channels=1, out_channels=2,
                           **{k: v for k, v in spec.arch_kwargs.items() if k != "axis_order"})
    monai.load_state_dict(torch.load(tmp_path / "m" / "weights.pt", weights_only=True))


# ----------------------------------------------------------------------------------------------- every method
def promised(model: nn.Module, method: str) -> set[str]:
    """Foundation parameter names each method may change, from MONAI's module names and layer types."""
    everything = {n for n, _ in model.named_parameters()}
    heads = {n for n in everything if n.startswith("out.")}
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear))}
    biases = {n for n in everything if n.endswith(".bias") and n[:-5] in layers}
    biases |= {n for n in everything if n.endswith(".relative_position_bias_table")}
    layer_norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    norms = {n for n in everything if n.rsplit(".", 1)[0] in layer_norms}
    return {
        "scratch": everything, "full": everything, "dgst": everything, "drst": everything, "sgst": everything,
        "linear-probe": heads, "lora": heads, "adapter": heads,
        "spatial-adapter": set(),  # `out` is replaced: the adapter and its classifier are new
        "bias": biases | heads, "affine-norm": norms | heads, "bias-norm": biases | norms | heads,
        "encoder-only": {n for n in everything if n.startswith(ENCODER)} | heads,
        "decoder-only": {n for n in everything if n.startswith(DECODER)} | heads,
        "ft-last": {n for n in everything if n.startswith("decoder1.")} | heads,
    }[method]


@pytest.mark.parametrize("method", method_names(training_only=True))
def test_every_method_trains_exactly_its_parameters(method, foundation):
    start = {k: v.detach().clone() for k, v in foundation.named_parameters()}
    model, strategy = _train(copy.deepcopy(foundation), method, gamma=1, rank=2, reduction=4)
    after = dict(model.named_parameters())
    new = {k for k in after if foundation_key(k) not in start}  # what the strategy added
    changed = {foundation_key(k) for k in after if k not in new and not torch.equal(after[k], start[foundation_key(k)])}
    allowed = promised(foundation, method)
    assert changed == allowed, (method, sorted(changed - allowed)[:4], sorted(allowed - changed)[:4])
    if method in ("lora", "adapter", "spatial-adapter"):
        assert new and all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in new if "lora_B" in k)
    else:
        assert not new
    final = strategy.finalize(model)
    if method == "spatial-adapter":  # the head module `out` is now the adapter and its classifier
        assert {k for k in final.state_dict() if not k.startswith("out.")} == \
            {k for k in foundation.state_dict() if not k.startswith("out.")}
        assert {k for k in final.state_dict() if k.startswith("out.")} == {k for k in new} | {
            k for k in final.state_dict() if k.startswith("out.") and ("running_" in k or "num_batches" in k)}
        return
    assert set(final.state_dict()) == set(foundation.state_dict()) | (
        {k for k in final.state_dict() if ".medadapt_adapter." in k} if method == "adapter" else set())


def test_frozen_linear_weights_get_no_gradient(foundation):
    model, _ = _train(copy.deepcopy(foundation), "bias", steps=1)
    qkv = model.swinViT.layers1[0].blocks[0].attn.qkv
    assert qkv.bias.requires_grad and qkv.bias.grad is not None
    assert not qkv.weight.requires_grad and qkv.weight.grad is None


@pytest.mark.parametrize("method", ["dgst", "drst", "sgst"])
def test_sparse_kernels_are_linear_rows_and_conv_output_channels(method, foundation):
    gamma = 2
    model = copy.deepcopy(foundation)
    strategy = make_strategy(method, gamma=gamma, seed=3)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, _loss, _batches(1, seed=5))
    opt = torch.optim.SGD(strategy.parameters(model), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    strategy.attach(opt)
    heads = {id(m) for head in model_parts(model).heads for m in head.modules()}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)) and id(m) not in heads}
    kinds = {type(m) for m in layers.values()}
    assert {nn.Linear, nn.Conv3d, nn.ConvTranspose3d} <= kinds
    assert {"swinViT.layers1.0.blocks.0.attn.qkv", "swinViT.layers1.0.blocks.0.attn.proj",
            "swinViT.layers1.0.blocks.0.mlp.linear1", "swinViT.layers1.0.downsample.reduction",
            "swinViT.patch_embed.proj"} <= set(layers)
    for step, batch in enumerate(_batches(3, seed=2)):
        opt.zero_grad()
        _loss(model, batch).backward()
        before = {n: m.weight.detach().clone() for n, m in layers.items()}
        opt.step()
        for name, m in layers.items():
            selected = strategy.selection_mask(m.weight)
            changed = m.weight.detach() != before[name]
            assert not (changed & ~selected).any(), (method, step, name)  # unselected entries: bit-identical
            out_dim = 1 if isinstance(m, nn.ConvTranspose3d) else 0  # a Linear's kernel o is weight[o, :]
            per_kernel = selected.movedim(out_dim, 0).flatten(1).sum(1)
            assert (per_kernel == min(gamma, selected.movedim(out_dim, 0)[0].numel())).all(), (name, per_kernel)
    sparse_entries = sum(min(gamma, m.weight[0].numel() if not isinstance(m, nn.ConvTranspose3d)
                             else m.weight[:, 0].numel()) * m.weight.shape[1 if isinstance(m, nn.ConvTranspose3d)
                                                                             else 0] for m in layers.values())
    dense = sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in layers.values())
    assert strategy.updated_per_step(model) == sparse_entries + dense


def test_lora_covers_linear_layers_and_merges(foundation):
    model, strategy = _train(copy.deepcopy(foundation), "lora", steps=3, rank=2, alpha=4.0)
    injected = {n for n, m in model.named_modules() if m in lora_modules(model)}
    linears = {n for n, m in foundation.named_modules() if isinstance(m, nn.Linear)}
    convs = {n for n, m in foundation.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))}
    assert injected == (linears | convs) - {"out.conv.conv"}
    x = _x()
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged_model = strategy.finalize(copy.deepcopy(model))
        merged = merged_model(x)
    assert (unmerged - merged).abs().max().item() <= 1e-5
    assert not torch.equal(merged, copy.deepcopy(foundation).eval()(x))  # it did train
    assert set(merged_model.state_dict()) == set(foundation.state_dict())  # MONAI's keys again
    assert type(merged_model.swinViT.layers1[0].blocks[0].attn.qkv) is nn.Linear


def test_adapters_start_at_the_foundation_and_survive_a_model_folder(foundation, tmp_path):
    x = _x()
    model = make_strategy("adapter", reduction=4).prepare(copy.deepcopy(foundation))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), copy.deepcopy(foundation).eval()(x))
    model, strategy = _train(copy.deepcopy(foundation), "adapter", reduction=4)
    folder = ModelFolder(network=preset("cpu-swin", 1, 2), preprocessing={}, labels={"background": 0, "x": 1},
                         channel_names={"0": "CT"}, extensions=strategy.architecture(model))
    save_model_folder(tmp_path / "m", strategy.finalize(model), folder)
    loaded = load_model_folder(tmp_path / "m").load_network()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("method,options", [("dgst", {"gamma": 1}), ("lora", {"rank": 2}),
                                            ("adapter", {"reduction": 4}), ("bias", {})])
def test_delta_round_trip(method, options, foundation, tmp_path):
    model, strategy = _train(copy.deepcopy(foundation), method, **options)
    trained = model.state_dict()
    delta = make_delta(foundation.state_dict(), trained, meta={"strategy": strategy.config(), "num_classes": 2})
    rebuilt = apply_delta(foundation.state_dict(), delta)
    assert set(rebuilt) == set(trained) and all(torch.equal(rebuilt[k], v) for k, v in trained.items())
    folder = ModelFolder(network=preset("cpu-swin", 1, 2), preprocessing={}, labels={"background": 0, "x": 1},
                         channel_names={"0": "CT"})
    save_model_folder(tmp_path / "fm", foundation, folder)
    final = strategy.finalize(model).state_dict()
    again = load_delta_model(folder, delta).state_dict()
    assert set(again) == set(final) and all(torch.equal(again[k], v) for k, v in final.items())


def test_scratch_redraws_monai_initialisation(foundation):
    model = make_strategy("scratch").prepare(copy.deepcopy(foundation))
    for (name, p), q in zip(model.named_parameters(), foundation.parameters()):
        if q.std() > 0:  # (LayerNorm scales are ones, biases zeros, before and after)
            assert not torch.equal(p, q), name
    for module in model.modules():  # torch's default init (MONAI's), not He: |w| <= 1/sqrt(fan_in) for Linear
        if isinstance(module, nn.Linear):
            assert module.weight.abs().max() <= 1 / module.in_features ** 0.5
    tables = torch.cat([t.flatten() for t in model_parts(model).extra_biases])
    assert 0.018 < tables.std() < 0.022 and tables.abs().max() <= 2  # MONAI's trunc_normal_(std=0.02), cut at +-2


def test_methods_table_for_the_preset(capsys):
    assert main(["methods", "--preset", "cpu-swin"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(method_names()) <= set(rows)
    assert "100.00%" in rows["full"] and "100.00%" not in rows["lora"]
    assert "model: preset cpu-swin" in out


# ----------------------------------------------------------------------------------------------- normalisation
def test_scale_intensity_range_is_monais():
    from monai.transforms import ScaleIntensityRange

    from medadapt.data.preprocessing import IntensityRange, PreprocessingPlan, normalize

    image = np.random.default_rng(0).normal(0, 400, (6, 7, 8)).astype(np.float32)
    ours = normalize(image, "ScaleIntensityRange", None, IntensityRange(-175, 250))
    theirs = ScaleIntensityRange(a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)(image)
    assert ours.dtype == np.float32 and np.array_equal(ours, np.asarray(theirs))
    plan = PreprocessingPlan((2.0, 1.5, 1.5), ["scaleintensityranged"], [None], "RAS",
                             intensity_ranges=[{"a_min": -175, "a_max": 250}])
    assert PreprocessingPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert "intensity_ranges" not in PreprocessingPlan((1, 1, 1), ["CT"], [None]).to_dict()  # old plans unchanged
    from medadapt.errors import MedadaptError

    with pytest.raises(MedadaptError, match="intensity_ranges"):
        PreprocessingPlan((1, 1, 1), ["ScaleIntensityRange"], [None])
    with pytest.raises(MedadaptError, match="a_max"):
        IntensityRange(250, -175)


# ----------------------------------------------------------------------------------------------- MONAI checkpoints
@pytest.fixture(scope="module")
def monai_net():
    torch.manual_seed(4)
    return MonaiSwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(2, 2, 2, 2), window_size=4).eval()


def _import(path, out, *extra, labels=("background", "liver", "spleen")):
    return main(["import-monai", str(path), "--out", str(out), "--labels", *labels, "--roi-size", "64", "64", "32",
                 *extra])


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "module", "model"])
def test_monai_checkpoint_imports_and_computes_what_monai_computes(wrapping, monai_net, tmp_path, capsys):
    state = monai_net.state_dict()
    saved = {"plain": state, "state_dict": {"epoch": 7, "best_acc": np.float64(0.8), "state_dict": state},
             "module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
             "model": {"model": state, "optimizer": {"lr": torch.tensor(1e-4)}}}[wrapping]
    torch.save(saved, tmp_path / "model.pt")
    assert _import(tmp_path / "model.pt", tmp_path / "m") == 0
    assert "model folder written to" in capsys.readouterr().out
    folder = load_model_folder(tmp_path / "m")
    assert folder.labels == {"background": 0, "liver": 1, "spleen": 2}
    assert folder.network.patch_size == (32, 64, 64)  # MONAI's roi (x, y, z) as medadapt's (z, y, x)
    assert folder.plan().target_spacing == (2.0, 1.5, 1.5) and folder.plan().orientation == "RAS"
    net = folder.load_network().eval()
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k
    x = _x(shape=(1, 1, 32, 64, 32))  # medadapt's (z, y, x) ...
    with torch.no_grad():
        ours = net(x)
        theirs = monai_net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)  # ... is MONAI's (x, y, z) reversed
    assert torch.equal(ours, theirs)


def test_self_supervised_backbone_loads_as_monai_load_from(monai_net, tmp_path, capsys):
    ssl = {f"module.{k.replace('mlp.linear1', 'mlp.fc1').replace('mlp.linear2', 'mlp.fc2')}": v
           for k, v in monai_net.swinViT.state_dict().items()}
    ssl.update({f"module.{k}": torch.zeros(3) for k in SSL_HEADS})
    torch.save({"state_dict": ssl}, tmp_path / "model_swinvit.pt")
    assert _import(tmp_path / "model_swinvit.pt", tmp_path / "m", labels=("background", "organ")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backbone-only" in err[0] and not (tmp_path / "m").exists()

    assert _import(tmp_path / "model_swinvit.pt", tmp_path / "m", "--backbone-only", "--seed", "5",
                   labels=("background", "organ")) == 0
    net = load_model_folder(tmp_path / "m").load_network()
    reference = MonaiSwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), window_size=4)
    reference.load_from(torch.load(tmp_path / "model_swinvit.pt", weights_only=True))  # MONAI's own loader
    for k, v in reference.swinViT.state_dict().items():
        assert torch.equal(net.swinViT.state_dict()[k], v), k
    plans = json.loads((tmp_path / "m" / "plans.json").read_text())
    assert plans["provenance"]["backbone_only"] and sorted(plans["provenance"]["dropped_keys"]) == sorted(SSL_HEADS)


def _one_error_line(capsys):
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medadapt import-monai: error: "), captured.err
    assert "Traceback" not in captured.err
    return err[0]


@pytest.mark.parametrize("case", ["no file", "not a checkpoint", "a U-Net", "missing key", "extra key",
                                  "other shape", "labels", "roi", "arch-kwargs", "out not empty"])
def test_bad_checkpoints_are_one_line(case, monai_net, tmp_path, capsys):
    state = dict(monai_net.state_dict())
    path, out, extra, labels = tmp_path / "model.pt", tmp_path / "m", [], ("background", "liver", "spleen")
    if case == "not a checkpoint":
        path.write_text("not a checkpoint")
    elif case == "a U-Net":
        torch.save(build_network(preset("cpu-tiny", 1, 2)).state_dict(), path)
    elif case != "no file":
        if case == "missing key":
            del state["decoder2.conv_block.conv1.conv.weight"]
        elif case == "extra key":
            state["decoder2.extra.weight"] = torch.zeros(1)
        elif case == "other shape":
            state["decoder2.conv_block.conv1.conv.weight"] = torch.zeros(1, 1, 3, 3, 3)
        elif case == "labels":
            labels = ("background", "liver")
        elif case == "roi":
            extra = ["--roi-size", "48", "64", "64"]
        elif case == "arch-kwargs":
            extra = ["--arch-kwargs", '{"downsample": "nonsense"}']
        elif case == "out not empty":
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        torch.save({"state_dict": state}, path)
    assert main(["import-monai", str(path), "--out", str(out), "--labels", *labels, *extra]) == 2
    line = _one_error_line(capsys)
    expected = {"no file": "no such checkpoint", "not a checkpoint": "not a PyTorch checkpoint",
                "a U-Net": "not a MONAI SwinUNETR", "missing key": "decoder2.conv_block.conv1.conv.weight",
                "extra key": "decoder2.extra.weight", "other shape": "another shape", "labels": "output channels",
                "roi": "--roi-size", "arch-kwargs": "--arch-kwargs", "out not empty": "not an empty folder"}[case]
    assert expected in line, line
    if case == "out not empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_export_to_nnunet_is_refused(foundation, tmp_path, capsys):
    pytest.importorskip("nnunetv2")
    folder = ModelFolder(network=preset("cpu-swin", 1, 2), preprocessing={}, labels={"background": 0, "x": 1},
                         channel_names={"0": "CT"})
    save_model_folder(tmp_path / "m", foundation, folder)
    assert main(["export-nnunet", str(tmp_path / "m"), "--out", str(tmp_path / "nn")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "medadapt.models.swin.SwinUNETR" in err[0] and "not an nnU-Net network" in err[0]
    assert not (tmp_path / "nn").exists()


# ----------------------------------------------------------------------------------------------- end to end
def test_pretrain_and_finetune_a_swinunetr_and_an_imported_one(monai_net, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data")
    quick = ["--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "fm"), "--preset", "cpu-swin", "--epochs",
                 "2", "--iterations-per-epoch", "1", "--quiet"]) == 0  # (cpu-swin-pretrain warms up for an epoch)
    fm = json.loads((tmp_path / "fm" / "plans.json").read_text())
    assert fm["recipe"] == "cpu-swin-finetune" and fm["provenance"]["recipe"]["optimizer"]["name"] == "adamw"
    assert main(["finetune", "--model", str(tmp_path / "fm"), "--data", str(data), "--out", str(tmp_path / "lora"),
                 "--method", "lora", "--shots", "2", *quick]) == 0
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert run["recipe"]["name"] == "cpu-swin-finetune" and run["metrics"]["classes"]
    tuned = load_model_folder(tmp_path / "lora" / "model")
    assert set(tuned.load_network().state_dict()) == set(load_model_folder(tmp_path / "fm").load_network().state_dict())

    torch.save({"state_dict": monai_net.state_dict()}, tmp_path / "monai.pt")
    assert _import(tmp_path / "monai.pt", tmp_path / "imported") == 0
    assert load_model_folder(tmp_path / "imported").recipe == "swinunetr-btcv"  # for a GPU: a CPU one here
    assert main(["finetune", "--model", str(tmp_path / "imported"), "--data", str(data), "--out",
                 str(tmp_path / "dgst"), "--method", "dgst", "--shots", "2", "--recipe", "cpu-swin-finetune",
                 *quick]) == 0
    run = json.loads((tmp_path / "dgst" / "run.json").read_text())
    assert run["head"] == "fresh" and run["metrics"]["classes"]
    assert load_model_folder(tmp_path / "dgst" / "model").plan().intensity_ranges[0].a_min == -175.0
    capsys.readouterr()
