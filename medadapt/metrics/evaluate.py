"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Writes ``metrics_per_case.csv`` (one row per case and class) and ``summary.json`` (per class mean/std over
cases) atomically, only after every case has been read, checked and evaluated: any error leaves nothing behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medadapt.data.io import read_label
from medadapt.errors import MedadaptError
from medadapt.metrics.overlap_surface import EMPTY_POLICY, binary_metrics, case_metrics, check_labels
from medadapt.utils.atomic import atomic_write_json, atomic_write_text

CSV_COLUMNS = ("case", "class", "label", "dsc", "nsd", "hd95", "gt_voxels", "pred_voxels")
STD_DEFINITION = "population standard deviation over cases (numpy ddof=0)"
AFFINE_ATOL = 1e-3
_METRICS = ("dsc", "nsd", "hd95")


# ----------------------------------------------------------------------------------------------- summaries
def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None
    arr = np.asarray(vals, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


def summarize(rows: list[dict], tolerance_mm: float | None = None) -> dict:
    """Per-class mean and std over cases of rows from :func:`case_metrics` (one row per case and class).

    Returns ``{"tolerance_mm", "empty_policy", "std", "n_cases", "cases", "classes", "foreground_mean"}`` where
    ``classes[name]`` is ``{"label", "n_cases", "dsc": {"mean", "std"}, "nsd": {...},
    "hd95": {"mean", "std", "n"}, "hd95_undefined", "hd95_undefined_cases"}``. NaN HD95 values (exactly one
    mask empty) are left out of the HD95 mean/std and counted in ``hd95_undefined``; a mean over no values is
    ``None``. ``foreground_mean`` averages the per-class means (like nnU-Net's). The tolerance is taken from
    the rows' ``tolerance_mm`` (``case_metrics`` sets it), else from the argument. Rows without ``case``
    count as one case each.
    """
    tols = {float(r["tolerance_mm"]) for r in rows if "tolerance_mm" in r}
    if tolerance_mm is not None:
        tols.add(float(tolerance_mm))
    if len(tols) > 1:
        raise ValueError(f"rows mix NSD tolerances {sorted(tols)} mm; summarize one tolerance at a time")
    tol = tols.pop() if tols else None

    by_class: dict[str, list[dict]] = {}
    for r in rows:
        missing = [k for k in ("class", "label", *_METRICS) if k not in r]
        if missing:
            raise ValueError(f"row {r!r} lacks keys {missing}; pass rows made by case_metrics")
        by_class.setdefault(str(r["class"]), []).append(r)

    cases: list[str] = []
    for r in rows:
        if "case" in r and str(r["case"]) not in cases:
            cases.append(str(r["case"]))

    classes: dict[str, dict] = {}
    for name, crow in sorted(by_class.items(), key=lambda kv: int(kv[1][0]["label"])):
        label_values = {int(r["label"]) for r in crow}
        if len(label_values) > 1:
            raise ValueError(f"class {name!r} appears with several label values {sorted(label_values)}")
        case_ids = [str(r["case"]) for r in crow if "case" in r]
        dup = sorted({c for c in case_ids if case_ids.count(c) > 1})
        if dup:
            raise ValueError(f"class {name!r} has several rows for case(s) {dup}")
        entry: dict = {"label": label_values.pop(), "n_cases": len(crow)}
        for m in ("dsc", "nsd"):
            mean, std = _mean_std([r[m] for r in crow])
            entry[m] = {"mean": mean, "std": std}
        hd = [float(r["hd95"]) for r in crow]
        mean, std = _mean_std(hd)
        entry["hd95"] = {"mean": mean, "std": std, "n": sum(not math.isnan(v) for v in hd)}
        undefined = [r for r in crow if math.isnan(float(r["hd95"]))]
        entry["hd95_undefined"] = len(undefined)
        entry["hd95_undefined_cases"] = [str(r["case"]) for r in undefined if "case" in r]
        classes[name] = entry

    foreground_mean = {}
    for m in _METRICS:
        means = [c[m]["mean"] for c in classes.values() if c[m]["mean"] is not None]
        foreground_mean[m] = float(np.mean(means)) if means else None

    return {
        "tolerance_mm": tol,
        "empty_policy": EMPTY_POLICY,
        "std": STD_DEFINITION,
        "n_cases": len(cases) if cases else max((len(v) for v in by_class.values()), default=0),
        "cases": cases,
        "classes": classes,
        "foreground_mean": foreground_mean,
    }


def format_mean_std(mean: float | None, std: float | None, percent: bool = False, digits: int = 1) -> str:
    """``"71.3 ± 5.2"``; ``percent=True`` multiplies by 100 (for DSC/NSD in [0, 1]); ``"n/a"`` if undefined."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale = 100.0 if percent else 1.0
    text = f"{mean * scale:.{digits}f}"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return text
    return f"{text} ± {std * scale:.{digits}f}"


# ----------------------------------------------------------------------------------------------- labels
def _labels_from_dataset_json(path: Path) -> dict[str, int]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedadaptError(f"{path}: cannot be read as JSON ({exc}); fix the file or pass labels explicitly") from None
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise MedadaptError(f"{path}: has no 'labels' mapping; add one ({{\"background\": 0, \"name\": 1}})")
    # nnU-Net v1 wrote {"0": "background", "1": "name"}; v2 writes {"background": 0, "name": 1}.
    if all(isinstance(v, str) for v in raw.values()) and all(str(k).lstrip("-").isdigit() for k in raw):
        raw = {v: int(k) for k, v in raw.items()}
    if "ignore" in raw:
        raise MedadaptError(
            f"{path}: declares an 'ignore' label; evaluation with ignore labels is not supported, "
            "evaluate against fully annotated ground truth"
        )
    try:
        return check_labels(raw)
    except ValueError as exc:
        raise MedadaptError(f"{path}: 'labels' is not usable ({exc}); fix it or pass labels explicitly") from None


def _find_dataset_json(gt_dir: Path) -> Path | None:
    for d in (gt_dir, gt_dir.parent):
        p = d / "dataset.json"
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------------------------- folders
def _list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.endswith(file_ending) and len(name) > len(file_ending) and not name.startswith(".") and p.is_file():
            out[name[: -len(file_ending)]] = p
    return out


def _name_cases(cases: Sequence[str], limit: int = 10) -> str:
    cases = sorted(cases)
    text = ", ".join(cases[:limit])
    if len(cases) > limit:
        text += f", ... ({len(cases)} in all)"
    return text


def metrics_csv(rows: list[dict], lead: tuple[str, ...] = ()) -> str:
    """``metrics_per_case.csv``'s text (metrics as their repr, so :func:`read_metrics_csv` gets the same floats);
    ``lead``: columns of the rows written before the usual ones (e.g. a cross-validation's fold)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*lead, *CSV_COLUMNS])
    for r in rows:
        writer.writerow([*(r[c] for c in lead), *(repr(float(r[c])) if c in _METRICS else r[c] for c in CSV_COLUMNS)])
    return buf.getvalue()


def read_metrics_csv(path: str | Path) -> list[dict]:
    """The rows of a ``metrics_per_case.csv`` as :func:`summarize` takes them (metrics exact floats)."""
    with open(path, newline="") as f:
        return [{**r, "label": int(r["label"]), "gt_voxels": int(r["gt_voxels"]), "pred_voxels": int(r["pred_voxels"]),
                 **{m: float(r[m]) for m in _METRICS}} for r in csv.DictReader(f)]


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path,
    labels: dict | None = None,
    tolerance_mm: float = 1.0,
    file_ending: str = ".nii.gz",
    progress: bool = True,
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the same-named ground truth in ``gt_dir``.

    Cases are paired by file name without ``file_ending``; every ground truth needs a prediction and vice
    versa. Predictions must have the ground truth's shape and affine (within 1e-3); metrics use the ground
    truth's spacing. ``labels`` (``{name: value}``) defaults to the ``labels`` of a ``dataset.json`` in
    ``gt_dir`` or its parent, else to every nonzero value found (named ``label_<value>``). Writes
    ``<out_dir>/metrics_per_case.csv`` and ``<out_dir>/summary.json`` and returns the summary (see
    :func:`summarize`, plus ``pred_dir``, ``gt_dir``, ``labels``).
    """
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    for opt, d in (("pred_dir", pred_dir), ("gt_dir", gt_dir)):
        if not d.is_dir():
            raise MedadaptError(f"{d}: {opt} folder not found; check the path")
    if out_dir.exists() and not out_dir.is_dir():
        raise MedadaptError(f"{out_dir}: output folder is an existing file; choose a folder path")
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise MedadaptError(f"tolerance_mm={tolerance_mm!r}: must be a finite number of millimetres >= 0")
    if not file_ending:
        raise MedadaptError("file_ending='': give the label files' ending, e.g. '.nii.gz'")

    preds = _list_cases(pred_dir, file_ending)
    gts = _list_cases(gt_dir, file_ending)
    if not preds:
        raise MedadaptError(f"{pred_dir}: no prediction files ending in {file_ending!r}; check pred_dir and file_ending")
    no_pred = sorted(set(gts) - set(preds))
    no_gt = sorted(set(preds) - set(gts))
    if no_pred:
        raise MedadaptError(
            f"{pred_dir}: no prediction for ground-truth case(s) {_name_cases(no_pred)}; "
            f"predict every case in {gt_dir} (or evaluate against a folder holding only the predicted cases)"
        )
    if no_gt:
        raise MedadaptError(
            f"{gt_dir}: no ground truth for predicted case(s) {_name_cases(no_gt)}; "
            "remove those predictions or add their ground truth"
        )

    label_source: str
    if labels is not None:
        try:
            classes: dict[str, int] | None = check_labels(labels)
        except ValueError as exc:
            raise MedadaptError(f"labels option: {exc}; give {{name: integer value}}, e.g. {{'lymph_node': 1}}") from None
        label_source = "labels option"
    else:
        ds_json = _find_dataset_json(gt_dir)
        if ds_json is not None:
            classes = _labels_from_dataset_json(ds_json)
            label_source = str(ds_json)
        else:
            classes = None  # inferred from the values present
            label_source = "values present in the label maps"

    rows: list[dict] = []
    seen_values: set[int] = set()
    case_ids = sorted(gts)
    for case in tqdm(case_ids, desc="metrics", unit="case", disable=not progress):
        gt = read_label(gts[case])
        pred = read_label(preds[case])
        if pred.array.shape != gt.array.shape:
            mismatch = f"shape (z, y, x) {pred.array.shape} != ground truth's {gt.array.shape}"
        elif not np.allclose(pred.affine, gt.affine, rtol=0, atol=AFFINE_ATOL):
            worst = float(np.abs(pred.affine - gt.affine).max())
            mismatch = (
                f"affine differs from the ground truth's by up to {worst:.4g} (> {AFFINE_ATOL}; spacing "
                f"{tuple(round(v, 4) for v in pred.spacing)} vs {tuple(round(v, 4) for v in gt.spacing)} mm)"
            )
        else:
            mismatch = ""
        if mismatch:
            raise MedadaptError(
                f"{preds[case]}: {mismatch} ({gts[case]}); the prediction must be in the ground truth's geometry "
                "(write it with the original image's affine, resampled back if it was cropped or resampled)"
            )
        present = {id(vol): set(np.unique(vol.array).tolist()) - {0} for vol in (gt, pred)}
        values = present[id(gt)] | present[id(pred)]
        if classes is not None:
            allowed = set(classes.values())
            for vol in (gt, pred):
                bad = sorted(present[id(vol)] - allowed)
                if bad:
                    raise MedadaptError(
                        f"{vol.path}: label value(s) {bad} are not in the labels {classes} (from {label_source}); "
                        "fix the label map or the labels"
                    )
            rows.extend(case_metrics(pred.array, gt.array, gt.spacing, classes, tol, case=case))
        else:
            seen_values |= values
            case_labels = {f"label_{v}": int(v) for v in sorted(values)}
            if case_labels:
                rows.extend(case_metrics(pred.array, gt.array, gt.spacing, case_labels, tol, case=case))

    if classes is None:
        if not seen_values:
            raise MedadaptError(
                f"{gt_dir}: every ground truth and prediction is empty and no dataset.json gives the labels; "
                "pass labels explicitly"
            )
        classes = {f"label_{v}": int(v) for v in sorted(seen_values)}
        # A class absent from both maps of a case gets the both-empty result of the policy.
        have = {(r["case"], r["label"]) for r in rows}
        empty = np.zeros((1, 1, 1), dtype=bool)
        for case in case_ids:
            for name, value in classes.items():
                if (case, value) not in have:
                    row = {"case": case, "class": name, "label": value}
                    row.update(binary_metrics(empty, empty, (1.0, 1.0, 1.0), tol))
                    row["tolerance_mm"] = tol
                    rows.append(row)
    order = {c: i for i, c in enumerate(case_ids)}
    rows.sort(key=lambda r: (order[r["case"]], r["label"]))

    summary = summarize(rows, tolerance_mm=tol)
    summary["pred_dir"] = str(pred_dir)
    summary["gt_dir"] = str(gt_dir)
    summary["labels"] = dict(classes)
    summary["labels_from"] = label_source
    write_metrics(rows, summary, out_dir)
    return summary


def write_metrics(rows: list[dict], summary: dict, out_dir: str | Path) -> None:
    """Write ``metrics_per_case.csv`` and ``summary.json`` to ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "metrics_per_case.csv", metrics_csv(rows))
    atomic_write_json(out_dir / "summary.json", summary)


__all__ = ["evaluate_folders", "summarize", "format_mean_std", "write_metrics", "metrics_csv", "read_metrics_csv",
           "CSV_COLUMNS"]
