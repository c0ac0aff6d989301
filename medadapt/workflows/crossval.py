"""Cross-validation over a dataset's annotated cases, and the final model on all of them.

A clinic with five annotated scans cannot spare one for a fixed test split and still wants to know how good a
model of its five is. ``folds``-fold cross-validation trains one run per fold (medadapt.data.splits.Split
``folds``: a seeded permutation of the sorted case ids cut into near-equal parts; with as many folds as cases it
is leave-one-out), each predicting and scoring the cases it was trained without, and pools the held-out cases:
every case is scored exactly once, by a model that never saw it. ``final``: one more run on every case (split
``none``), the model the clinic then uses; the cross-validation is the estimate of how good such a model is.

Each fold is an ordinary fine-tuning run in ``<out>/fold_<k>/`` (its identity names the fold), so a killed
cross-validation resumes fold by fold; ``<out>/identity.json`` names the folds, the seed and the settings
shared by every fold, so the folder is never reused for another cross-validation.

Output folder::

    <out>/fold_<k>/              fold k's run (medadapt.workflows.finetune): model, predictions, metrics
    <out>/final/                 with final: the model trained on every case (no test part)
    <out>/metrics_per_case.csv   every held-out case's metrics, with its fold
    <out>/crossval.json          per fold and pooled summaries; the spread of the fold means
    <out>/crossval.csv           one row per (fold or pooled, class): cases, DSC / NSD / HD95 mean and std
    <out>/crossval.md            the same as a Markdown table
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medadapt.data.dataset import RawDataset
from medadapt.data.splits import Split
from medadapt.errors import MedadaptError
from medadapt.metrics import summarize
from medadapt.metrics.evaluate import metrics_csv, read_metrics_csv
from medadapt.utils.atomic import atomic_write_json, atomic_write_text
from medadapt.utils.lock import locks_folder
from medadapt.workflows.identity import check_identity, record_identity, settings_digest

CROSSVAL_FORMAT = "medadapt-crossval/1"
_METRICS = ("dsc", "nsd", "hd95")


def _spread(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class and metric: the mean and population std of the fold means (the folds' spread)."""
    out: dict[str, Any] = {}
    for name in per_fold[0]["classes"]:
        out[name] = {}
        for m in _METRICS:
            means = [f["classes"][name][m]["mean"] for f in per_fold if name in f["classes"]]
            vals = [v for v in means if v is not None and not math.isnan(v)]
            out[name][m] = {"mean_of_folds": float(np.mean(vals)) if vals else None,
                            "std_of_folds": float(np.std(vals)) if vals else None, "folds": len(vals)}
    return out


def _table_rows(per_fold: list[dict[str, Any]], pooled: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for which, summary in [*((str(f["fold"]), f["summary"]) for f in per_fold), ("pooled", pooled)]:
        for name, c in summary["classes"].items():
            rows.append({"fold": which, "class": name, "cases": c["n_cases"],
                         **{f"{m}_{s}": c[m][s] for m in _METRICS for s in ("mean", "std")},
                         "hd95_undefined": c["hd95_undefined"]})
    return rows


def _markdown(rows: list[dict[str, Any]], header: str) -> str:
    from medadapt.utils.tables import markdown_table

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    def mm(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [[r["fold"], r["class"], str(r["cases"]), f"{pct(r['dsc_mean'])} ± {pct(r['dsc_std'])}",
              f"{pct(r['nsd_mean'])} ± {pct(r['nsd_std'])}", f"{mm(r['hd95_mean'])} ± {mm(r['hd95_std'])}"]
             for r in rows]
    return header + "\n\n" + markdown_table(["fold", "class", "cases", "DSC %", "NSD@1mm %", "HD95 mm"], lines) + "\n"


@locks_folder("out", "cross-validation folder")
def cross_validate(settings_for: Callable[[Split], Any], data: str | Path, out: str | Path, folds: int,
                   seed: int = 0, final: bool = False, resume: bool = False, progress: bool = True,
                   run: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """``folds``-fold cross-validation of the fine-tuning ``settings_for(split)`` resolves (a
    :class:`medadapt.workflows.finetune.FinetuneSettings` for a split), the folds drawn with ``seed``; ``final``:
    also the run on every case. Every fold's settings are resolved (and so checked) before the first fold trains.
    Returns the cross-validation's record (also ``out/crossval.json``)."""
    from medadapt.workflows.finetune import finetune

    run = run or finetune
    out = Path(out)
    dataset = RawDataset.load(data)
    n = len(dataset.case_ids)
    Split.cross_validation(folds, 0, seed).apply(dataset.case_ids)  # a fold count the cases cannot take: one line
    fold_settings = [settings_for(Split.cross_validation(folds, k, seed)) for k in range(folds)]
    final_settings = settings_for(Split("none")) if final else None
    shared = {k: v for k, v in fold_settings[0].to_dict().items() if k != "split"}
    identity = {"format": CROSSVAL_FORMAT, "folds": folds, "seed": seed, "cases": sorted(dataset.case_ids),
                "settings_digest": settings_digest(shared)}
    done = out / "crossval.json"
    if done.is_file() and not resume:
        raise MedadaptError(f"{out}: holds a finished cross-validation; pass --resume to reuse it or choose "
                            "another --out")
    check_identity(out, identity)
    record_identity(out, identity)
    per_fold, rows = [], []
    for k, settings in enumerate(fold_settings):
        where = out / f"fold_{k}"
        if progress:
            print(f"fold {k + 1}/{folds}: {where}", flush=True)
        record = run(settings, where, resume=True, progress=progress)
        rows.extend({**r, "fold": k} for r in read_metrics_csv(where / "metrics_per_case.csv"))
        per_fold.append({"fold": k, "test": record["split"]["test"], "train": record["split"]["train"],
                         "shot_cases": record["shot_cases"], "summary": record["metrics"]})
    pooled = summarize([{k: v for k, v in r.items() if k != "fold"} for r in rows],
                       tolerance_mm=per_fold[0]["summary"]["tolerance_mm"])
    result = {"format": CROSSVAL_FORMAT, "folds": folds, "seed": seed, "dataset": str(dataset.root),
              "method": fold_settings[0].strategy().config(), "shots": fold_settings[0].shots,
              "per_fold": per_fold, "pooled": pooled, "spread_of_folds": _spread([f["summary"] for f in per_fold]),
              "final": None}
    table = _table_rows(per_fold, pooled)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "metrics_per_case.csv", metrics_csv(rows, lead=("fold",)))
    atomic_write_text(out / "crossval.csv", buf.getvalue())
    atomic_write_text(out / "crossval.md", _markdown(
        table, f"# {folds}-fold cross-validation of {result['method']['name']} on {dataset.name} "
               f"({n} cases, seed {seed}): each case scored once, by the fold trained without it"))
    if final_settings is not None:
        if progress:
            print(f"final model on all {n} cases: {out / 'final'}", flush=True)
        final_record = run(final_settings, out / "final", resume=True, progress=progress)
        result["final"] = {"folder": str(out / "final"), "model": str(out / "final" / "model"),
                           "train": final_record["split"]["train"]}
    atomic_write_json(done, result)
    return result


__all__ = ["cross_validate", "CROSSVAL_FORMAT"]
