"""Prediction without needless memory (issue 34): the label maps are those of the code before it (full-volume
softmax and sigmoid copies, out-of-place mirror sums), except where two classes' probabilities tie to float
precision; and a volume whose prediction cannot fit the memory is one line before any work."""
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medadapt.data.io import read_image
from medadapt.data.preprocessing import preprocess_case, resample_to_shape
from medadapt.inference.predictor import Predictor, softmax_
from medadapt.models import load_model_folder
from medadapt.models.network import build_network


@torch.no_grad()
def _reference_logits(p: Predictor, data: np.ndarray) -> torch.Tensor:
    """predict_logits as it was: every mirrored pass's full output kept, then summed and divided out of place."""
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    flips = [()] if not p.mirror else [a for r in range(4) for a in itertools.combinations((2, 3, 4), r)]
    total = None
    for axes in flips:
        xi = torch.flip(x, axes) if axes else x
        logits = sliding_window_inference(xi, roi_size=p.patch_size, sw_batch_size=p.sw_batch_size,
                                          predictor=p._forward, overlap=p.overlap, mode="gaussian",
                                          sigma_scale=0.125, padding_mode="constant", cval=0.0)
        logits = torch.flip(logits, axes) if axes else logits
        total = logits if total is None else total + logits
    return (total / len(flips))[0].float()


def _reference_decision(probabilities: torch.Tensor, shape, thresholds=None) -> tuple[np.ndarray, np.ndarray]:
    """The label map (channel ids, before reorientation) as revert_prediction made it, and each voxel's gap
    between its two best (thresholded) probabilities."""
    probs = resample_to_shape(probabilities, shape) if tuple(probabilities.shape[1:]) != tuple(shape) \
        else probabilities
    if thresholds is not None:
        t = torch.tensor(thresholds, dtype=probs.dtype)[:, None, None, None]
        probs = torch.where(probs >= t, probs, torch.full_like(probs, -torch.inf))
    top = torch.topk(probs, k=min(2, probs.shape[0]), dim=0).values
    gap = (top[0] - top[-1]).numpy() if probs.shape[0] > 1 else np.full(shape, np.inf)
    seg = torch.argmax(probs, dim=0).numpy()  # argmax: the first of equal maxima, as the running decision
    if thresholds is not None:
        seg = np.where(torch.isinf(top[0]).numpy(), -1, seg)
    return seg, gap


def _model(world, classes: int, activation: str):
    """The world's foundation with a ``classes``-output head (random weights), softmax or sigmoid."""
    folder = load_model_folder(world["fm"])
    names = ["background"] + [f"c{i}" for i in range(1, classes + (activation == "sigmoid"))]
    spec = folder.network.with_classes(classes)
    folder = dataclasses.replace(folder, network=spec, labels={n: i for i, n in enumerate(names)},
                                 activation=activation)
    torch.manual_seed(classes)
    net = build_network(spec)
    for m in net.modules():  # spread the logits so that classes compete
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.normal_(m.weight, std=0.3)
    return folder, net


@pytest.mark.parametrize("classes,activation,mirror", [(2, "softmax", False), (2, "softmax", True),
                                                       (6, "softmax", True), (5, "sigmoid", False),
                                                       (5, "sigmoid", True)])
def test_label_maps_are_unchanged_but_for_ties(world, classes, activation, mirror):
    folder, net = _model(world, classes, activation)
    predictor = Predictor(folder, network=net, mirror=mirror)
    case_ids = sorted(p.name.split("_0000")[0] for p in (world["tgt"] / "imagesTr").glob("*_0000.nii.gz"))[:2]
    changed, voxels = 0, 0
    for cid in case_ids:
        image = read_image(world["tgt"] / "imagesTr" / f"{cid}_0000.nii.gz")
        case = preprocess_case([image], None, predictor.plan)
        new_logits = predictor.predict_logits(case.data)
        old_logits = _reference_logits(predictor, case.data)
        assert torch.equal(new_logits, old_logits)  # the in-place sums are the same sums
        shape = tuple(case.properties["reoriented_shape"])
        if activation == "softmax":
            old, gap = _reference_decision(torch.softmax(old_logits, dim=0), shape)
            new, _ = _reference_decision(softmax_(new_logits.clone(), voxels=777), shape)
        else:
            thresholds = [0.5] * (classes)
            old, gap = _reference_decision(torch.sigmoid(old_logits), shape, thresholds)
            new, _ = _reference_decision(torch.cat([torch.sigmoid(new_logits[c:c + 1]) for c in range(classes)]),
                                         shape, thresholds)
        differ = old != new
        assert (gap[differ] < 1e-5).all(), "a label changed where the classes do not tie"
        changed += int(differ.sum())
        voxels += differ.size
        # and the whole predictor (preprocess, logits, decision, reorientation) runs end to end
        seg = predictor.predict_case([image])
        assert seg.shape == image.array.shape
    assert changed <= 1e-4 * voxels  # ties are rare: bounded


def test_softmax_in_place_is_softmax_to_rounding():
    torch.manual_seed(0)
    x = torch.randn(25, 13, 17, 19) * 4
    ref = torch.softmax(x, dim=0)
    out = softmax_(x.clone(), voxels=100)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(out.argmax(0), ref.argmax(0)) or (out - ref).abs().max() < 1e-6


def test_a_sigmoid_model_aggregates_only_the_classes_asked_for(world):
    folder, net = _model(world, 5, "sigmoid")
    image = read_image(sorted((world["tgt"] / "imagesTr").glob("*_0000.nii.gz"))[0])
    everything = Predictor(folder, network=net).predict_case([image])
    some = Predictor(folder, network=net, classes={"c2": 1, "c4": 2})
    assert some.aggregated_channels == 2 and Predictor(folder, network=net).aggregated_channels == 5
    subset = some.predict_case([image])
    # the two classes' outputs are independent of the others': where a voxel is c2 or c4 among all five, it is
    # here too (it may also be c2/c4 where another class won before)
    for name, out_id, full_id in (("c2", 1, 2), ("c4", 2, 4)):
        assert np.all(subset[everything == full_id] == out_id)
    assert set(np.unique(subset)) <= {0, 1, 2}


def test_a_prediction_that_cannot_fit_is_one_line_before_any_work(world, tmp_path, capsys, monkeypatch):
    import medadapt.inference.predictor as predictor_module
    from medadapt.cli import main

    monkeypatch.setattr(predictor_module, "available_memory", lambda: 1 << 20)  # 1 MiB left
    images = sorted((world["tgt"] / "imagesTr").glob("*_0000.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in images:
        (inputs / p.name).symlink_to(p)
    assert main(["predict", "--model", str(world["fm"]), "--input", str(inputs), "--out", str(tmp_path / "out"),
                 "--mirror", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB at its peak" in err and images[0].name.split("_0000")[0] in err
    assert "without --mirror" in err
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_bench_predict_measures_a_tool_on_a_written_ct(tmp_path):
    """The prediction benchmark's parts at a toy size: the CT, a model per head, a measured prediction and the
    table (nnU-Net's side is the same command line nnU-Net documents; run by BENCHMARKS.md's measurement)."""
    pytest.importorskip("nnunetv2")
    from medadapt.nnunet.predict_bench import run_bench_predict

    rows = run_bench_predict(tmp_path, shape=(12, 40, 40), spacing=(2.5, 1.6, 1.6), model_spacing=3.0,
                             preset_name="cpu-tiny", many=4, heads=("softmax-many",), mirror=(False,),
                             tools=("medadapt",), progress=False)
    assert [(r["head"], r["classes"], r["tool"]) for r in rows] == [("softmax-many", 4, "medadapt")]
    assert rows[0]["seconds"] > 0 and rows[0]["peak_gib"] > 0
    assert (tmp_path / "predictions" / "softmax-many-plain-medadapt" / "ct.nii.gz").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "| softmax-many | no " in md
    assert "How each tool was called:\n- medadapt: medadapt predict" in md and "nnUNetPredictor" not in md
    setting = json.loads((tmp_path / "results.json").read_text())["setting"]
    assert "predict_from_files_sequential" in setting["calls"]["nnunet"]  # recorded whichever tools ran


def test_measure_takes_the_peak_of_the_process_and_of_its_children(tmp_path):
    """The benchmark's memory reading: the kernel's high-water mark of a process that holds ~300 MB for a moment
    (no sampling can miss it), and a process that forks a child holding memory is seen as two processes."""
    import sys

    from medadapt.nnunet.predict_bench import measure

    hold = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(0.05); del a"
    result = measure([sys.executable, "-c", hold])
    assert result["returncode"] == 0 and result["processes"] == 1
    assert 300 * 2**20 <= result["peak_bytes"] < 500 * 2**20
    fork = ("import os, time, numpy as np\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    a = np.ones(100 * 2**20 // 8); time.sleep(1.5); os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    result = measure([sys.executable, "-c", fork], interval=0.1)
    assert result["returncode"] == 0 and result["processes"] == 2
    failing = measure([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert failing["returncode"] == 3 and "boom" in failing["output_tail"]
    assert measure(["/no/such/program"])["returncode"] == 127


def test_measure_holds_none_of_the_measuring_process_memory():
    """A forked child starts with its parent's resident pages and Linux keeps the high-water mark across exec:
    the reading of a small command must not grow with the size of the process that measures it."""
    import sys

    import numpy as np

    from medadapt.nnunet.predict_bench import measure

    ballast = np.ones(1024 * 2**20 // 8)  # 1 GiB resident here
    result = measure([sys.executable, "-c", "pass"])
    assert ballast[-1] == 1.0 and result["returncode"] == 0
    assert result["peak_bytes"] < 200 * 2**20
