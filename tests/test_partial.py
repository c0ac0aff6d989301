"""Partially labelled, multi-dataset pretraining: the masked sigmoid loss, the label template and annotation
records, template sampling, sigmoid prediction (thresholds, class subsets, LCC) and the workflows on top."""
import json
import shutil

import numpy as np
import pytest
import torch

from medadapt.cli import main
from medadapt.data.dataset import RawDataset
from medadapt.data.partial import (ANNOTATIONS_FILE, LabelTemplate, annotation_records, build_template,
                                   sampling_weights)
from medadapt.data.preprocessing import revert_prediction
from medadapt.data.sampling import PatchSampler
from medadapt.engine.losses import build_loss, masked_bce, sigmoid_dice_loss
from medadapt.errors import MedadaptError


# ------------------------------------------------------------------------------------------------ the loss
def _batch(seed=0, shape=(2, 3, 8, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, requires_grad=True)
    target = torch.randint(0, shape[1] + 1, (shape[0], 1, *shape[2:]), generator=g)
    return logits, target


@pytest.mark.parametrize("name", ["dice_ce", "dice"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_unannotated_class_gets_no_gradient(name, batch_dice):
    logits, target = _batch()
    annotated = torch.tensor([[True, False, True], [False, True, True]])
    loss = build_loss({"name": name, "batch_dice": batch_dice}, "sigmoid")
    value = loss(None, {"label": target, "annotated": annotated}, logits)
    value.backward()
    g = logits.grad.abs().flatten(2).sum(2)  # [B, C]
    assert g[0, 1] == 0 and g[1, 0] == 0  # case 0 does not annotate class 1, case 1 not class 0
    assert (g[annotated] > 0).all()


def test_masked_dice_is_fseft_eq1_per_case():
    logits, target = _batch(1)
    w = torch.tensor([[True, False, True], [False, True, True]])
    p = torch.sigmoid(logits)
    expected = []
    for n in range(2):
        terms = []
        for k in range(3):
            if w[n, k]:
                y = (target[n, 0] == k + 1).float()
                dice = (2 * (p[n, k] * y).sum() + 1e-5) / (p[n, k].sum() + y.sum() + 1e-5)
                terms.append(1 - dice)
        expected.append(sum(terms) / len(terms))
    got = sigmoid_dice_loss(logits, target, w, batch_dice=False)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    # BCE: the mean over the voxels of the annotated (case, class) pairs
    y = torch.stack([(target[:, 0] == k + 1).float() for k in range(3)], 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert torch.allclose(masked_bce(logits, target, w), bce[w].mean(), atol=1e-6)
    # fully annotated: the plain sigmoid losses
    assert torch.allclose(masked_bce(logits, target, torch.ones_like(w)), bce.mean(), atol=1e-6)


def test_softmax_loss_refuses_partial_annotations():
    logits, target = _batch(2, shape=(2, 4, 8, 8, 8))
    loss = build_loss({"name": "dice_ce"}, "softmax")
    full = loss(None, {"label": target.clamp(max=3), "annotated": torch.ones(2, 3, dtype=torch.bool)}, logits)
    assert torch.isfinite(full)
    with pytest.raises(MedadaptError, match="softmax output cannot learn from partially annotated"):
        loss(None, {"label": target.clamp(max=3), "annotated": torch.tensor([[1, 0, 1], [1, 1, 1]]).bool()}, logits)


# ------------------------------------------------------------------------------------ template and records
def _fake_dataset(tmp_path, name, labels, cases=("a", "b")):
    root = tmp_path / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in cases:
        (root / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
        (root / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (root / "dataset.json").write_text(json.dumps({"name": name, "channel_names": {"0": "CT"}, "labels": labels,
                                                   "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return RawDataset.load(root)


def test_template_is_the_union_by_name(tmp_path):
    a = _fake_dataset(tmp_path, "A", {"background": 0, "liver": 1, "spleen": 2})
    b = _fake_dataset(tmp_path, "B", {"background": 0, "kidney": 1, "liver": 2})
    t = build_template([a, b])
    assert t.classes == ["liver", "spleen", "kidney"]
    assert t.labels == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    assert t.lookup_table(b.labels).tolist() == [0, 3, 1]
    assert LabelTemplate.from_dict(t.to_dict()).classes == t.classes
    c = _fake_dataset(tmp_path, "C", {"background": 0, "Left Kidney": 1})
    d = _fake_dataset(tmp_path, "D", {"background": 0, "left_kidney": 1})
    with pytest.raises(MedadaptError, match="look like one structure spelled two ways"):
        build_template([c, d])


def test_annotation_records(tmp_path):
    a = _fake_dataset(tmp_path, "A", {"background": 0, "liver": 1, "spleen": 2})
    assert annotation_records(a) == ({"a": ["liver", "spleen"], "b": ["liver", "spleen"]}, False)
    (a.root / ANNOTATIONS_FILE).write_text(json.dumps({"a": ["spleen", "liver"], "b": ["liver"]}))
    assert annotation_records(a) == ({"a": ["liver", "spleen"], "b": ["liver"]}, True)
    (a.root / ANNOTATIONS_FILE).write_text(json.dumps({"a": ["liver"]}))
    with pytest.raises(MedadaptError, match=r"annotated_classes.json: no annotation record for case 'b'"):
        annotation_records(a)
    (a.root / ANNOTATIONS_FILE).write_text(json.dumps({"a": ["liver"], "b": ["heart"]}))
    with pytest.raises(MedadaptError, match=r"case 'b' names \['heart'\], which are not foreground labels"):
        annotation_records(a)


class _Case:
    def __init__(self, seg, annotated, lut, dataset):
        self.case_id = dataset
        self.data = np.zeros((1, *seg.shape), np.float32)
        self.seg = seg
        self.label_lut = lut
        self.annotated = np.asarray(annotated)
        self.dataset = dataset
        self.class_locations = {int(lut[v]): np.argwhere(seg == v) for v in np.unique(seg) if v}
        self.channel_min = [0.0]


def test_sampler_translates_labels_and_carries_annotations():
    seg = np.zeros((8, 8, 8), np.int16)
    seg[2:5, 2:5, 2:5] = 1
    a = _Case(seg, [False, True], np.array([0, 2], np.int16), "A")  # its label 1 is template class 2
    b = _Case(seg, [True, False], np.array([0, 1], np.int16), "B")
    sampler = PatchSampler([a, b, b, b], (8, 8, 8), 4, case_weights=sampling_weights([a, b, b, b], "datasets"))
    np.testing.assert_allclose(sampler.case_weights, [0.5, 1 / 6, 1 / 6, 1 / 6])
    batch = sampler.sample(np.random.default_rng(0), case_indices=[0, 1, 0, 1])
    assert batch["annotated"].tolist() == [[False, True], [True, False]] * 2
    assert batch["label"][0].unique().tolist() == [0, 2] and batch["label"][1].unique().tolist() == [0, 1]
    assert sampling_weights([a, b], "cases") is None


# ------------------------------------------------------------------------------------------- sigmoid decision
def test_revert_prediction_sigmoid_thresholds():
    p = torch.zeros(2, 1, 1, 4)
    p[0, 0, 0] = torch.tensor([0.9, 0.6, 0.3, 0.45])
    p[1, 0, 0] = torch.tensor([0.2, 0.7, 0.35, 0.9])
    props = {"reoriented_shape": [1, 1, 4], "ornt_start": [[0, 1], [1, 1], [2, 1]],
             "ornt_end": [[0, 1], [1, 1], [2, 1]], "original_shape": [1, 1, 4]}
    assert revert_prediction(p, props, thresholds=[0.5, 0.5])[0, 0].tolist() == [1, 2, 0, 2]
    # per-class thresholds: class 2 needs 0.95 -> the voxels it won go to class 1 where that passes
    assert revert_prediction(p, props, thresholds=[0.5, 0.95])[0, 0].tolist() == [1, 1, 0, 0]
    assert revert_prediction(p, props, thresholds=[0.25, 0.5], label_ids=[7, 3])[0, 0].tolist() == [7, 3, 7, 3]
    # softmax with relabelled channels (channel 1 not selected -> background)
    q = torch.softmax(torch.tensor([[0.0, 0, 0, 0], [2, 0, 0, 0], [0, 3, 0, 0]]), 0).reshape(3, 1, 1, 4)
    assert revert_prediction(q, props, label_ids=[0, 0, 5])[0, 0].tolist() == [0, 5, 0, 0]


# ------------------------------------------------------------------------------------------ the workflows
def test_partial_pretrain_records_template(assembly):
    plans = json.loads((assembly["fm"] / "plans.json").read_text())
    assert plans["activation"] == "sigmoid"
    a = json.loads((assembly["srca"] / "dataset.json").read_text())["labels"]
    b = json.loads((assembly["srcb"] / "dataset.json").read_text())["labels"]
    names = [n for n in a if n != "background"] + [n for n in b if n != "background" and n not in a]
    assert plans["template"]["classes"] == names and "trachea" in a and "trachea" in b
    assert plans["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    assert plans["network"]["num_classes"] == len(names)  # one sigmoid output per class, no background
    ds = {d["name"]: d for d in plans["template"]["datasets"]}
    assert ds["srca"]["annotates"] == [n for n in names if n in a] and not ds["srca"]["per_case_records"]
    assert plans["provenance"]["sampling"] == "datasets"
    training = json.loads((assembly["fm"] / "training" / "history.json").read_text())
    assert len(training["iteration_loss"]) == 3 and all(np.isfinite(training["iteration_loss"]))


def test_sigmoid_predict_classes_and_lcc(assembly, tmp_path):
    images = assembly["srcb"] / "imagesTr"
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(assembly["fm"]), "--input", str(images), "--out", str(out),
                 "--classes", "aorta=1,trachea=2", "--postprocess", "lcc", "--quiet"]) == 0
    from medadapt.data.io import read_label
    from scipy import ndimage

    for p in sorted(out.iterdir()):
        seg = read_label(p).array
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        for v in (1, 2):
            assert ndimage.label(seg == v, np.ones((3, 3, 3)))[1] <= 1
    assert main(["predict", "--model", str(assembly["fm"]), "--input", str(images), "--out", str(tmp_path / "x"),
                 "--classes", "heart", "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


def test_zero_shot_and_finetune_on_a_subset_of_classes(assembly, tmp_path):
    # the target labels classes the sources do not (lymph nodes, ...): zero-shot refuses, fine-tuning works
    assert main(["zero-shot", "--model", str(assembly["fm"]), "--data", str(assembly["tgt"]),
                 "--out", str(tmp_path / "zs"), "--quiet"]) == 2
    # a cohort of the assembly itself, evaluated on its classes by name
    assert main(["zero-shot", "--model", str(assembly["fm"]), "--data", str(assembly["srcb"]),
                 "--out", str(tmp_path / "zs-b"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "zs-b" / "summary.json").read_text())
    b = json.loads((assembly["srcb"] / "dataset.json").read_text())["labels"]
    assert set(summary["classes"]) == {n for n in b if n != "background"}
    run = tmp_path / "ft"
    assert main(["finetune", "--model", str(assembly["fm"]), "--data", str(assembly["tgt"]), "--out", str(run),
                 "--method", "dgst", "--shots", "2", "--epochs", "1", "--iterations-per-epoch", "2",
                 "--quiet"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["training"]["activation"] == "sigmoid"
    plans = json.loads((run / "model" / "plans.json").read_text())
    t = json.loads((assembly["tgt"] / "dataset.json").read_text())["labels"]
    assert plans["activation"] == "sigmoid" and plans["network"]["num_classes"] == len(t) - 1
    # keep the foundation's heads of a subset of its classes (by name)
    sub = tmp_path / "srcb-sub"
    shutil.copytree(assembly["srcb"], sub)
    meta = json.loads((sub / "dataset.json").read_text())
    keep = ["background", "trachea", "aorta"]
    meta["labels"] = {n: i for i, n in enumerate(keep)}
    (sub / "dataset.json").write_text(json.dumps(meta))
    from medadapt.data.io import read_label, write_label

    for p in (sub / "labelsTr").iterdir():
        lab = read_label(p)
        new = np.zeros_like(lab.array)
        new[lab.array == b["trachea"]] = 1
        new[lab.array == b["aorta"]] = 2
        write_label(new, lab, p)
    from medadapt.models import load_model_folder
    from medadapt.workflows.finetune import load_foundation

    folder = load_model_folder(assembly["fm"])
    net = load_foundation(folder, RawDataset.load(sub), seed=0, head="keep")
    foundation = folder.load_network().state_dict()
    from medadapt.workflows.finetune import head_parameter_names

    rows = [folder.labels["trachea"] - 1, folder.labels["aorta"] - 1]
    for key in head_parameter_names(net):
        assert torch.equal(net.state_dict()[key], foundation[key][rows])


def test_pretrain_bad_inputs(assembly, tmp_path, capsys):
    # softmax cannot learn from partially labelled datasets
    code = main(["pretrain", "--data", str(assembly["srca"]), "--data", str(assembly["srcb"]),
                 "--out", str(tmp_path / "m"), "--activation", "softmax", "--preset", "cpu-tiny", "--quiet"])
    assert code == 2 and "use --activation sigmoid" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    # a case without an annotation record
    copy = tmp_path / "srca"
    shutil.copytree(assembly["srca"], copy)
    cases = sorted(p.name[:-7] for p in (copy / "labelsTr").iterdir())
    (copy / ANNOTATIONS_FILE).write_text(json.dumps({cases[0]: ["trachea"]}))
    code = main(["pretrain", "--data", str(copy), "--data", str(assembly["srcb"]), "--out", str(tmp_path / "m"),
                 "--preset", "cpu-tiny", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"no annotation record for case {cases[1]!r}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_export_nnunet_refuses_a_sigmoid_model(assembly, tmp_path, capsys):
    pytest.importorskip("nnunetv2")
    code = main(["export-nnunet", str(assembly["fm"]), "--out", str(tmp_path / "nn")])
    err = capsys.readouterr().err
    assert code == 2 and "sigmoid model" in err and "has no nnU-Net form" in err
    assert not (tmp_path / "nn").exists()
