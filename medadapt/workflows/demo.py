"""``medadapt demo``: a foundation model adapted to a second synthetic hospital with a few annotated scans.

The tour starts where a user starts, with a foundation: the built-in one (:data:`BUILTIN_FOUNDATION`, the
model this demo used to pretrain, shipped in the package: ``medadapt models``). It writes the second hospital's
cohort, scores the foundation as it is (zero-shot, its own head), fine-tunes it with full fine-tuning and DGST
on K scans, predicts the held-out 20% and writes a table and a figure: a few minutes on 2 CPU cores (measured in
BENCHMARKS.md). ``pretrain=True`` (``medadapt demo --pretrain``) is the whole tour instead: both hospitals'
cohorts, pretraining the foundation on the first, and from scratch, full fine-tuning and DGST.

The protocol is the default benchmark grid's (``medadapt bench default``): the ``cpu-bench`` network (patch
16x32x32) on the domains at half their in-plane resolution, a fresh segmentation head for every method
(nnU-Net's pretrained-weight loading), fine-tuning budgets at which full fine-tuning's training loss has
levelled off (600 iterations at lr 1e-3), and from scratch on the foundation's own pretraining schedule (3000
iterations at lr 1e-2). The paper's GPU budget is far larger (2000 pretraining and 50 fine-tuning epochs of 250
iterations, on nnU-Net's 3d_fullres network). A pretrained foundation is cached in the work folder, and
finished runs are reused unless ``--fresh`` is given (a run's folder name carries a hash of its settings and
its foundation, so changed settings never meet an old run).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from medadapt.data.io import read_image, read_label
from medadapt.metrics import format_mean_std
from medadapt.tuning import DGST, FromScratch, FullFineTuning
from medadapt.utils.atomic import atomic_write_json, atomic_write_text
from medadapt.utils.tables import markdown_table

SOURCE_DOMAIN, TARGET_DOMAIN = "hn-source", "hn-center-b"
SOURCE_CASES, TARGET_CASES = 40, 20
DOWNSAMPLE = (1, 2, 2)  # same field of view, half the in-plane resolution (as the default benchmark grid)
PRETRAIN = {"preset_name": "cpu-bench", "epochs": 120, "iterations_per_epoch": 25}
FINETUNE = {"epochs": 24, "iterations_per_epoch": 25}
#: methods that train a new network get the foundation's own pretraining schedule instead of FINETUNE
OWN_SCHEDULE = (FromScratch.name,)
ZERO_SHOT = "zero-shot"
#: the rows of the tour from the built-in foundation (the DGST paper's headline comparison at demo scale), and
#: of the whole tour (``--pretrain``)
METHODS = (ZERO_SHOT, FullFineTuning.name, DGST.name)
PRETRAIN_METHODS = (FromScratch.name, FullFineTuning.name, DGST.name)
#: the built-in foundation (medadapt/foundations/): this demo's foundation as PRETRAIN makes it with seed 0
BUILTIN_FOUNDATION = "synth-hn-lymph-nodes"


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


def _cached_foundation(path: Path, expected: dict) -> bool:
    plans = path / "plans.json"
    if not plans.is_file():
        return False
    prov = json.loads(plans.read_text()).get("provenance", {})
    return prov.get("demo_config") == json.loads(json.dumps(expected))  # compare as stored (JSON)


def run_demo(workdir: str | Path, shots: int = 5, seed: int = 0, fresh: bool = False,
             progress: bool = True, pretrain: bool = False) -> dict:
    from medadapt.synth import load_domain, write_dataset
    from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune, zero_shot

    workdir = Path(workdir)
    started = time.perf_counter()
    _say(f"[1/4] synthetic cohorts -> {workdir / 'data'}", progress)
    target = load_domain(TARGET_DOMAIN).downsampled(DOWNSAMPLE)
    if pretrain:
        source = load_domain(SOURCE_DOMAIN).downsampled(DOWNSAMPLE)
        source_data = write_dataset(source, workdir / "data" / f"{source.name}-seed{seed}", num_cases=SOURCE_CASES,
                                    seed=seed, progress=progress)
    target_data = write_dataset(target, workdir / "data" / f"{target.name}-seed{seed}", num_cases=TARGET_CASES,
                                seed=seed, progress=progress)
    if pretrain:
        foundation = _pretrained_foundation(workdir, source, source_data, seed, progress)
        methods, origin = PRETRAIN_METHODS, None
    else:
        from medadapt.models.builtin import builtin_path

        foundation = builtin_path(BUILTIN_FOUNDATION)
        _say(f"[2/4] foundation model: the built-in {BUILTIN_FOUNDATION} (medadapt models)", progress)
        methods, origin = METHODS, BUILTIN_FOUNDATION

    _say(f"[3/4] {shots} annotated scans of {target.name}: {', '.join(methods)}", progress)
    records, runs = {}, {}
    for method in methods:
        out = runs[method] = run_dir(workdir, method, shots, seed, origin)
        if fresh and out.exists():
            shutil.rmtree(out)
        if method == ZERO_SHOT:  # the foundation as it is: its own head, no training
            records[method] = zero_shot(foundation, target_data, out, resume=True, progress=progress)
        else:
            settings = resolve_finetune(FinetuneRequest(foundation, target_data, method, shots, seed=seed,
                                                         **budget(method)))
            records[method] = finetune(settings, out, resume=True, progress=progress)
        for cls, m in records[method]["metrics"]["classes"].items():
            _say(f"      {method:9s} {cls} DSC "
                 f"{format_mean_std(m['dsc']['mean'], m['dsc']['std'], percent=True)}", progress)

    _say("[4/4] results", progress)
    table = results_table(records)
    print(table["markdown"])
    results_dir = workdir / "results"
    atomic_write_text(results_dir / "results.md", table["markdown"] + "\n")
    atomic_write_text(results_dir / "results.csv", table["csv"])
    atomic_write_json(results_dir / "results.json", {"shots": shots, "seed": seed, "foundation": str(foundation),
                                                     "runs": records})
    figure = demo_figure(records, runs, shots, results_dir / "demo.png")
    elapsed = time.perf_counter() - started
    print(f"figure: {figure}\ntables: {results_dir / 'results.md'}, {results_dir / 'results.csv'}\n"
          f"total time {elapsed / 60:.1f} min")
    return {"records": records, "figure": figure, "seconds": elapsed, "foundation": foundation}


def _pretrained_foundation(workdir: Path, source, source_data: Path, seed: int, progress: bool) -> Path:
    """The whole tour's foundation: pretrained on the source cohort once, then cached in the work folder."""
    from medadapt.workflows.pretrain import PretrainRequest, pretrain, resolve_pretrain

    foundation = workdir / f"foundation-seed{seed}"
    # the cache is valid only for the very same recipe: same data, same training settings
    expected = {**PRETRAIN, "seed": seed, "cases": SOURCE_CASES, "domain": source.to_dict()}
    if _cached_foundation(foundation, expected):
        _say(f"[2/4] foundation model: cached in {foundation}", progress)
        return foundation
    _say(f"[2/4] pretraining the foundation model on {source.name} ({SOURCE_CASES} cases)", progress)
    pretrain(resolve_pretrain(PretrainRequest(source_data, seed=seed, **PRETRAIN)), foundation, resume=True, progress=progress)
    plans = json.loads((foundation / "plans.json").read_text())
    plans["provenance"]["demo_config"] = expected
    atomic_write_json(foundation / "plans.json", plans)
    return foundation


def budget(method: str) -> dict:
    """Epochs and iterations of a method's fine-tuning run (none for zero-shot)."""
    if method == ZERO_SHOT:
        return {}
    if method in OWN_SCHEDULE:
        return {"epochs": PRETRAIN["epochs"], "iterations_per_epoch": PRETRAIN["iterations_per_epoch"]}
    return dict(FINETUNE)


def run_dir(workdir: Path, method: str, shots: int, seed: int, foundation: str | None = None) -> Path:
    """A run's folder: named by method, shots and seed, plus a hash of the demo's settings and of where its
    foundation came from (``foundation``: a built-in's name; None: pretrained by the demo)."""
    from medadapt.utils.hashing import stable_hash
    from medadapt.workflows.finetune import RUN_FORMAT

    settings = {"format": RUN_FORMAT, "pretrain": PRETRAIN, "budget": budget(method), "downsample": DOWNSAMPLE,
                "cases": [SOURCE_CASES, TARGET_CASES]}
    if foundation is not None:  # the whole tour's folders keep their names
        settings["foundation"] = foundation
    return Path(workdir) / "finetune" / f"{method}-{shots}shot-seed{seed}-{stable_hash(settings, 8)}"


def results_table(records: dict[str, dict]) -> dict[str, str]:
    header = ["method", "updated params/iter", "DSC (%)", "NSD@1mm (%)", "HD95 (mm)", "s/iter"]
    rows = []
    csv_rows = []
    for method, rec in records.items():
        for cls, m in rec["metrics"]["classes"].items():
            rows.append([
                method if len(rec["metrics"]["classes"]) == 1 else f"{method} ({cls})",
                f"{rec['parameters']['updated_per_step']:,}",
                format_mean_std(m["dsc"]["mean"], m["dsc"]["std"], percent=True),
                format_mean_std(m["nsd"]["mean"], m["nsd"]["std"], percent=True),
                format_mean_std(m["hd95"]["mean"], m["hd95"]["std"]) +
                (f" ({m['hd95_undefined']}/{m['n_cases']} undefined)" if m.get("hd95_undefined") else ""),
                "–" if rec["timing"]["median_iteration_seconds"] is None  # zero-shot: no training
                else f"{rec['timing']['median_iteration_seconds']:.3f}",
            ])
            csv_rows.append({"method": method, "class": cls, "shots": rec["shots"],
                             "seed": "" if rec["seed"] is None else rec["seed"],
                             "updated_params_per_iter": rec["parameters"]["updated_per_step"],
                             "total_params": rec["parameters"]["total"],
                             "dsc_mean": m["dsc"]["mean"], "dsc_std": m["dsc"]["std"],
                             "nsd_mean": m["nsd"]["mean"], "nsd_std": m["nsd"]["std"],
                             "hd95_mean": m["hd95"]["mean"], "hd95_std": m["hd95"]["std"],
                             "hd95_undefined": m.get("hd95_undefined", 0), "n_test_cases": m["n_cases"],
                             "median_iteration_seconds": rec["timing"]["median_iteration_seconds"]})
    md = markdown_table(header, rows)
    buf = io.StringIO()
    if csv_rows:
        writer = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    return {"markdown": md, "csv": buf.getvalue()}


def demo_figure(records: dict[str, dict], runs: dict[str, Path], shots: int, path: Path) -> Path:
    """Contours of every method on the test case with the most lymph-node voxels, plus the training-loss curves
    of those that train (``runs``: each method's run folder)."""
    from medadapt.data.dataset import RawDataset
    from medadapt.viz import contour_figure

    first = next(iter(records.values()))
    dataset = RawDataset.load(first["dataset"])
    test_ids = first["split"]["test"]
    gts = {cid: read_label(dataset.label_path(cid)) for cid in test_ids}
    case = max(test_ids, key=lambda cid: int((gts[cid].array > 0).sum()))
    image = read_image(dataset.image_paths(case)[0])
    preds, losses, scores = {}, {}, {}
    for method, rec in records.items():
        run = runs[method]
        preds[method] = read_label(run / "predictions" / f"{case}{dataset.file_ending}").array
        if (run / "training" / "history.json").is_file():
            losses[method] = json.loads((run / "training" / "history.json").read_text())["iteration_loss"]
        per_case = _case_dsc(run / "metrics_per_case.csv", case)
        scores[method] = f"DSC {per_case:.1f}%" if per_case is not None else ""
    return contour_figure(path, image.array, gts[case].array, preds, losses=losses, scores=scores,
                          spacing=image.spacing,
                          title=f"{dataset.name}: test case {case}, {shots}-shot fine-tuning")


def _case_dsc(csv_path: Path, case: str) -> float | None:
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["case"] == case:
                v = float(row["dsc"])
                return None if np.isnan(v) else 100 * v
    return None
