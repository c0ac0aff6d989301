"""FSEFT (Silva-Rodriguez et al.): the spatial adapter, Generalization, and transductive inference under the
anatomical size constraint (Eq. 2-3), on a tiny partially labelled foundation."""
import json

import numpy as np
import pytest
import torch

from medadapt.cli import main
from medadapt.data.io import read_label
from medadapt.errors import MedadaptError
from medadapt.models import load_model_folder
from medadapt.models.spatial_adapter import SpatialAdapterHead, spatial_adapter_of
from medadapt.tuning import make_strategy
from medadapt.tuning.transductive import (Transductive, TransductiveEpochStep, TransductiveTerm,
                                          largest_component_size, size_constraint, size_penalty, size_prior,
                                          transductive_tail)


def _finetune(assembly, out, *extra, data="tgt", method="spatial-adapter"):
    return main(["finetune", "--model", str(assembly["fm"]), "--data", str(assembly[data]), "--out", str(out),
                 "--method", method, "--shots", "2", "--epochs", "2", "--iterations-per-epoch", "2", "--quiet",
                 *extra])


# ---------------------------------------------------------------------------------------------- the adapter
def test_spatial_adapter_architecture(tiny_unet):
    model = tiny_unet(num_classes=3)
    features = model.decoder.seg_layers[-1].in_channels
    strategy = make_strategy("spatial-adapter", kernel_size=3)
    model = strategy.prepare(model)
    head = spatial_adapter_of(model)
    assert isinstance(head, SpatialAdapterHead) and model.decoder.seg_layers[-1] is head
    convs = [m for m in head.adapter.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(3, 3, 3), (3, 3, 3)]  # in = out: MONAI's skip is the identity
    # the authors' code: MONAI's instance norm without affine parameters (and no running statistics)
    for m in (head.adapter.norm1, head.adapter.norm2):
        assert isinstance(m, torch.nn.InstanceNorm3d) and not m.affine and not m.track_running_stats
    assert head.classifier.in_channels == features and head.classifier.out_channels == 3
    # the classifier keeps PyTorch's default initialisation (uniform within 1/sqrt(fan_in)), not He-normal
    bound = 1 / np.sqrt(features)
    assert head.classifier.weight.abs().max() <= bound and head.classifier.bias.abs().max() <= bound
    assert head.classifier.bias.abs().sum() > 0
    batch = make_strategy("spatial-adapter", norm="batch").prepare(tiny_unet(num_classes=3))
    assert isinstance(spatial_adapter_of(batch).adapter.norm1, torch.nn.BatchNorm3d)  # the text's reading
    with pytest.raises(MedadaptError, match=r"option norm \(--adapter-norm\): 'group' is not one of instance, batch"):
        make_strategy("spatial-adapter", norm="group")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = len(model.decoder.seg_layers) - 1
    assert trainable and all(n.startswith(f"decoder.seg_layers.{last}.") for n in trainable)
    out = model(torch.randn(2, 1, 16, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 32, 32)  # deep supervision off
    mlp = make_strategy("spatial-adapter", kernel_size=1, width=6).prepare(tiny_unet())
    convs = [m for m in spatial_adapter_of(mlp).adapter.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(1, 1, 1)] * 3 and convs[0].out_channels == 6  # + the skip conv
    with pytest.raises(MedadaptError,
                       match=r"option kernel_size \(--adapter-kernel-size\): 2 is not an integer >= 1, odd"):
        make_strategy("spatial-adapter", kernel_size=2)


def test_spatial_adapter_run_keeps_the_backbone(assembly, tmp_path):
    run = tmp_path / "sa"
    assert _finetune(assembly, run) == 0
    foundation = load_model_folder(assembly["fm"]).load_network().state_dict()
    folder = load_model_folder(run / "model")
    assert folder.extensions == [{"type": "spatial-adapter", "kernel_size": 3, "width": None, "norm": "instance"}]
    tuned = folder.load_network()  # the adapter is rebuilt from the extension record and reloads
    state = tuned.state_dict()
    backbone = [k for k in foundation if not k.startswith("decoder.seg_layers.") and k in state]
    assert len(backbone) > 20 and all(torch.equal(state[k], foundation[k]) for k in backbone)
    assert isinstance(tuned.decoder.seg_layers[-1], SpatialAdapterHead)
    record = json.loads((run / "run.json").read_text())
    assert record["parameters"]["trainable"] == sum(p.numel() for p in tuned.decoder.seg_layers[-1].parameters())


# ---------------------------------------------------------------------------------------------- Generalization
def test_generalization_equals_the_foundation(assembly, tmp_path):
    run = tmp_path / "gen"
    assert _finetune(assembly, run, data="srcb", method="generalization") == 0
    record = json.loads((run / "run.json").read_text())
    assert record["head"] == "keep" and record["timing"]["median_iteration_seconds"] is None
    labels = json.loads((assembly["srcb"] / "dataset.json").read_text())["labels"]
    classes = ",".join(f"{n}={v}" for n, v in labels.items() if v)
    ref = tmp_path / "ref"
    assert main(["predict", "--model", str(assembly["fm"]), "--input", str(assembly["srcb"] / "imagesTr"),
                 "--out", str(ref), "--classes", classes, "--quiet"]) == 0
    for case in record["split"]["test"]:
        a = read_label(run / "predictions" / f"{case}.nii.gz").array
        b = read_label(ref / f"{case}.nii.gz").array
        assert np.array_equal(a, b)
    # the target labels structures the foundation does not know
    assert _finetune(assembly, tmp_path / "gen-tgt", method="generalization") == 2
    assert not (tmp_path / "gen-tgt").exists()


# ---------------------------------------------------------------------------------------------- the size constraint
def test_size_constraint_hand_computed():
    S, g = 1000.0, 0.1
    for pred, expected in ((950.0, 0.0), (900.0, 0.0), (1100.0, 0.0), (800.0, 100 / 1000), (1300.0, 200 / 1000)):
        assert size_constraint(torch.tensor(pred), S, g).item() == pytest.approx(expected)
    assert size_constraint(torch.tensor(0.0), S, 0.0).item() == pytest.approx(1.0)


def test_code_size_penalty_hand_computed():
    """The authors' TI_modules.py: e = (S - S^) / max(S^, S); |e| - g above the band (under-segmentation),
    |e| + g below it (over-segmentation), 0 inside."""
    S, g = 1000.0, 0.3
    cases = ((1000.0, 0.0), (800.0, 0.0), (1300.0, 0.0),                  # inside: |e| <= 0.3
             (500.0, 0.5 - 0.3),                                         # e = 500/1000 = 0.5 > g
             (100.0, 0.9 - 0.3),                                         # e = 0.9
             (2000.0, 0.5 + 0.3),                                        # e = -1000/2000 = -0.5 < -g
             (10000.0, 0.9 + 0.3))                                       # 10x the prior: e = -0.9
    for pred, expected in cases:
        assert size_penalty(torch.tensor(pred), S, g).item() == pytest.approx(expected)
    # bounded: however far the head over-segments, the error stays in [-1, 1] and the penalty below 1 + g
    for pred in (1e4, 1e6, 1e9):
        assert size_penalty(torch.tensor(pred), S, g).item() < 1 + g
    assert size_penalty(torch.tensor(10 * S), S, g, error="prior").item() == pytest.approx(10 - 1 - g)  # unbounded
    # the text's Eq. 2 in proportions of a query of 1e6 voxels
    assert size_penalty(torch.tensor(2000.0), S, g, error="proportion", voxels=1e6).item() == \
        pytest.approx((2000 - 1300) / 1e6)
    # the maximum is detached: the gradient is that of (S - S^) / max, not of the ratio's denominator
    x = torch.tensor(2000.0, requires_grad=True)
    size_penalty(x, S, g).backward()
    assert x.grad.item() == pytest.approx(1 / 2000)


def test_size_prior_uses_the_largest_component():
    class Case:
        def __init__(self, seg):
            self.seg = seg
    seg = np.zeros((10, 10, 10), np.int16)
    seg[1:4, 1:4, 1:4] = 1     # 27 voxels
    seg[6:8, 6:8, 6:8] = 1     # 8 voxels, a separate island
    seg[5, 5, 5] = 2
    assert largest_component_size(seg == 1) == 27
    corner = np.zeros((4, 4, 4), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touching by a corner: one component in 26-connectivity
    assert largest_component_size(corner) == 2
    assert Transductive().priors([Case(seg), Case(seg)], {"background": 0, "a": 1, "b": 2}) == [27.0, 1.0]


def test_size_prior_converts_between_unequal_spacings():
    """Each support scan's structure size is converted to voxels of the query's spacing by the ratio of voxel
    volumes, whatever its own spacing: the same 27 voxels at 1 x 2 x 3 mm (6 mm^3) and 8 voxels at 3 x 3 x 3 mm
    (27 mm^3: 216 mm^3) in voxels of 0.5 x 1 x 2 mm (1 mm^3)."""
    class Case:
        def __init__(self, seg, spacing):
            self.seg, self.properties = seg, {"spacing_after_resampling": spacing}
    a = np.zeros((6, 6, 6), np.int16)
    a[1:4, 1:4, 1:4] = 1                       # 27 voxels of 6 mm^3 = 162 mm^3
    b = np.zeros((6, 6, 6), np.int16)
    b[1:3, 1:3, 1:3] = 1                       # 8 voxels of 27 mm^3 = 216 mm^3
    support = [Case(a, [1.0, 2.0, 3.0]), Case(b, [3.0, 3.0, 3.0])]
    labels = {"background": 0, "a": 1}
    assert Transductive().priors(support, labels, query_spacing=[0.5, 1.0, 2.0]) == [pytest.approx((162 + 216) / 2)]
    # in voxels of a coarser query (2 x 2 x 2 mm = 8 mm^3): the same volume, 8 times fewer voxels
    assert Transductive().priors(support, labels, query_spacing=[2.0, 2.0, 2.0]) == [pytest.approx(378 / 2 / 8)]
    # without a query spacing, each scan's own voxels (no conversion): 27 and 8 voxels
    assert Transductive().priors(support, labels) == [pytest.approx((27 + 8) / 2)]


def test_size_prior_is_robust_from_five_scans():
    assert size_prior([100, 200]) == 150
    assert size_prior([100, 110, 90, 105, 1000]) == pytest.approx(np.mean([100, 110, 90, 105]))
    assert size_prior([10, 10, 10, 10, 10]) == 10  # std 0: nothing inside the open interval -> the median


def test_ti_gradient_reaches_only_the_adapter(tiny_unet):
    model = make_strategy("spatial-adapter").prepare(tiny_unet(num_classes=2))
    tail = transductive_tail(model)
    feats = [torch.randn(1, tail.classifier.in_channels, 8, 16, 16)]
    term = TransductiveTerm(tail, feats, priors=[5.0, 5.0], margin=0.1)
    loss = term(model, {"epoch": 9, "epochs": 10}, None)
    assert loss.item() > 0  # sigmoid sums of ~2,000 voxels are far above a prior of 5
    assert loss.item() <= 0.1 * 2 * (1 + 0.1)  # bounded: λ · classes · (1 + γ)
    loss.backward()
    inside = {id(p) for p in tail.parameters()}
    assert all(p.grad is not None for p in tail.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in inside)
    assert term(model, {"epoch": 4, "epochs": 10}, None).item() == 0  # the first half of training: off
    # the code's schedule: its own step once per epoch, on the adapter and classifier only
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TransductiveEpochStep(tail, feats, priors=[5.0, 5.0], margin=0.1, tile=(4, 8, 8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert step.on_epoch_end(optimizer, 4, 10) is None  # off in the first half
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    record = step.on_epoch_end(optimizer, 9, 10)
    assert record["ti_penalty"] > 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(id(dict(model.named_parameters())[n]) in inside for n in moved)
    assert all(p.grad is None for p in model.parameters())  # nothing left for the next support step
    # tiles of the training patch give the same sizes as the whole volume for a per-voxel head
    mlp = make_strategy("spatial-adapter", kernel_size=1, norm="batch").prepare(tiny_unet(num_classes=2)).eval()
    mtail = transductive_tail(mlp)
    whole = TransductiveTerm(mtail, feats, priors=[5.0, 5.0]).predicted_sizes()
    tiled = TransductiveTerm(mtail, feats, priors=[5.0, 5.0], tile=(3, 5, 7)).predicted_sizes()
    assert torch.allclose(whole, tiled, rtol=1e-5)
    full = make_strategy("full").prepare(tiny_unet())
    with pytest.raises(MedadaptError, match="--transductive: the method trains .* use --method spatial-adapter"):
        transductive_tail(full)


@pytest.mark.parametrize("mode", ["query", "batch"])
def test_transductive_modes(assembly, tmp_path, mode):
    run = tmp_path / mode
    step = "epoch" if mode == "query" else "every"
    assert _finetune(assembly, run, "--transductive", mode, "--ti-margin", "0.2", "--ti-step", step) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["transductive"] == {"mode": mode, "weight": 0.1, "margin": 0.2, "active_fraction": 0.5,
                                      "error": "max", "step": step}
    if step == "epoch":  # the code's once-per-epoch step, recorded in the history (epochs 2: on in the last one)
        history = json.loads(next((run / "queries").glob("*/training/history.json")).read_text())
        assert [e for e, _ in history["ti_penalty"]] == [1]
    test = record["split"]["test"]
    assert sorted(p.name for p in (run / "predictions").iterdir()) == sorted(f"{c}.nii.gz" for c in test)
    if mode == "query":  # one adapter per test volume
        assert sorted(p.name for p in (run / "queries").iterdir()) == sorted(test)
        assert all((run / "queries" / c / "model" / "plans.json").is_file() for c in test)
        assert not (run / "model").exists()
    else:
        assert (run / "model" / "plans.json").is_file() and not (run / "queries").exists()


def test_transductive_bad_inputs(assembly, tmp_path, capsys):
    cases = [(["--transductive", "batch", "--ti-margin", "1.5"], "--ti-margin 1.5: must be in [0, 1)"),
             (["--transductive", "batch", "--ti-lambda", "-1"], "--ti-lambda -1.0: must be a positive"),
             (["--ti-margin", "0.3"], "only with --transductive"),
             (["--ti-error", "max"], "only with --transductive"),
             (["--transductive", "query", "--method", "full"], "use --method spatial-adapter")]
    for i, (extra, message) in enumerate(cases):
        args = list(extra)
        method = "spatial-adapter"
        if "--method" in args:
            method = args[args.index("--method") + 1]
            del args[args.index("--method"):args.index("--method") + 2]
        assert _finetune(assembly, tmp_path / f"bad{i}", *args, method=method) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"bad{i}").exists()
    with pytest.raises(MedadaptError, match="no support scan holds 'aorta' \\(the largest connected component"):
        class Empty:
            seg = np.zeros((4, 4, 4), np.int16)
        Transductive().priors([Empty(), Empty()], {"background": 0, "aorta": 1})


def test_all_shots(assembly, tmp_path):
    run = tmp_path / "all"
    assert main(["finetune", "--model", str(assembly["fm"]), "--data", str(assembly["tgt"]), "--out", str(run),
                 "--method", "linear-probe", "--shots", "all", "--epochs", "1", "--iterations-per-epoch", "1",
                 "--quiet"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["shots"] == len(record["split"]["train"]) == len(record["shot_cases"])
    with pytest.raises(SystemExit) as exc:  # argparse: one usage line, exit status 2
        main(["finetune", "--model", str(assembly["fm"]), "--data", str(assembly["tgt"]), "--out",
              str(tmp_path / "x"), "--method", "linear-probe", "--shots", "many"])
    assert exc.value.code == 2


def test_ti_on_a_softmax_model_counts_foreground_probabilities(tiny_unet):
    model = make_strategy("spatial-adapter").prepare(tiny_unet(num_classes=2))  # softmax: background + 1 class
    tail = transductive_tail(model)
    feats = [torch.randn(1, tail.classifier.in_channels, 4, 8, 8)]
    term = TransductiveTerm(tail, feats, priors=[10.0], activation="softmax")
    with torch.no_grad():
        expected = torch.softmax(tail(feats[0]), 1)[:, 1].sum()
    assert torch.allclose(term.predicted_sizes()[0, 0], expected)


def test_head_match_starts_known_classes_from_the_foundation(assembly):
    from medadapt.data.dataset import RawDataset
    from medadapt.workflows.finetune import head_parameter_names, load_foundation

    folder = load_model_folder(assembly["fm"])
    dataset = RawDataset.load(assembly["tgt"])
    foundation = folder.load_network().state_dict()
    fresh = load_foundation(folder, dataset, seed=3, head="fresh").state_dict()
    match = load_foundation(folder, dataset, seed=3, head="match").state_dict()
    known = [n for n in dataset.labels if n in folder.foreground]
    assert known and len(known) < len(dataset.labels) - 1  # the target knows some classes, not all
    for key in head_parameter_names(load_foundation(folder, dataset, seed=3)):
        for name, value in dataset.labels.items():
            if value == 0:
                continue
            expected = foundation[key][folder.labels[name] - 1] if name in known else fresh[key][value - 1]
            assert torch.equal(match[key][value - 1], expected), (key, name)
    assert all(torch.equal(match[k], fresh[k]) for k in fresh if k not in head_parameter_names(
        load_foundation(folder, dataset, seed=3)))


def test_per_query_ti_shares_the_epochs_before_the_constraint(assembly, tmp_path):
    """The queries' adapters start alike and see the same batches until TI switches on: those epochs run once
    (prefix/) and every query continues from there, bit for bit what training each from the start gives."""
    from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune

    shared = tmp_path / "shared"
    assert _finetune(assembly, shared, "--transductive", "query") == 0
    assert (shared / "prefix" / "training" / "checkpoint_latest.pt").is_file()  # the shared epochs' checkpoint
    alone = tmp_path / "alone"
    settings = resolve_finetune(FinetuneRequest(assembly["fm"], assembly["tgt"], "spatial-adapter", 2, epochs=2,
                                                iterations_per_epoch=2, transductive=Transductive(mode="query")))
    finetune(settings, alone, progress=False, share_ti_prefix=False)
    assert not (alone / "prefix").exists()
    # the same run as the command line's (its whole identity), only trained without the shared prefix
    assert (alone / "identity.json").read_text() == (shared / "identity.json").read_text()
    queries = sorted(p.name for p in (alone / "queries").iterdir())
    assert queries == sorted(p.name for p in (shared / "queries").iterdir()) and queries
    for q in queries:
        a = torch.load(shared / "queries" / q / "model" / "weights.pt", weights_only=True)
        b = torch.load(alone / "queries" / q / "model" / "weights.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), q
        ha = json.loads((shared / "queries" / q / "training" / "history.json").read_text())
        hb = json.loads((alone / "queries" / q / "training" / "history.json").read_text())
        assert ha["epoch_loss"] == hb["epoch_loss"] and ha["ti_penalty"] == hb["ti_penalty"]
