"""Tables and figures of a benchmark grid, built from the stored cells alone (no model, no prediction needed).

Writes to ``<workdir>/report/``:

* ``table1.md/.csv`` — the DGST paper's Table 1 layout: DSC and NSD (%) per shot count, mean ± std over test
  cases (pooled over seeds), best in bold and second underlined per column; the all-shot from-scratch row.
* ``table2.md/.csv`` — Table 2: the ablations at the smallest and largest shot count, with seconds per
  iteration and its ratio to ``full`` (medians of the cells' median iteration times, measured in this grid).
* ``gamma.md/.csv/.png`` — Fig. 3: DSC and NSD against γ, with ``full`` as the reference line.
* ``qualitative.png`` — Fig. 2: every Table 1 method's contours on the same slice of each dataset.
* ``cells.csv`` (one row per cell) and ``per_case.csv`` (one row per cell and test case): every number above is
  traceable to its cell id, and the CSV tables name the cells they aggregate.
* ``report.md`` — all tables together, with what is missing.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medadapt.benchmark.grid import Cell, GridConfig, enumerate_cells, method_options
from medadapt.benchmark.runner import grid_paths, load_cell_record
from medadapt.errors import MedadaptError
from medadapt.metrics import format_mean_std, summarize
from medadapt.utils.atomic import atomic_path, atomic_write_text
from medadapt.utils.tables import markdown_table

DISPLAY = {"scratch": "From scratch", "full": "Full", "linear-probe": "LinearProb", "bias": "Bias",
           "adapter": "Adapter", "lora": "LoRA", "affine-norm": "Affine-IN", "dgst": "DGST",
           "encoder-only": "Encoder Only", "decoder-only": "Decoder Only", "bias-norm": "Bias+Norm",
           "drst": "DRST", "sgst": "SGST", "ft-last": "FT-last"}
MISSING = "–"


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


class CellIndex:
    """Finished cell records of a grid, looked up by what the tables ask for."""

    def __init__(self, config: GridConfig, cells: list[Cell], records: dict[str, dict | None]):
        self.config = config
        self.records = records
        self.by_setting: dict[tuple, list[Cell]] = defaultdict(list)
        for cell in cells:
            self.by_setting[self._setting(cell.dataset, cell.method, cell.options, cell.shots)].append(cell)

    @staticmethod
    def _setting(dataset: str, method: str, options: dict, shots: int) -> tuple:
        return dataset, method, tuple(sorted(options.items())), shots

    def finished(self, dataset: str, method: str, shots: int, gamma: int | None = None) -> list[dict]:
        opts = method_options(self.config, method, gamma)
        cells = self.by_setting.get(self._setting(dataset, method, opts, shots), [])
        return [self.records[c.cell_id] for c in cells if self.records.get(c.cell_id)]


def _pooled_rows(records: list[dict], cls: str) -> list[dict]:
    """Per-case rows of one class over all seeds; the case id carries the seed so that seeds pool."""
    rows = []
    for rec in records:
        for r in rec["per_case"]:
            if r["class"] != cls:
                continue
            row = {k: (math.nan if v is None and k in ("dsc", "nsd", "hd95") else v) for k, v in r.items()}
            row["case"] = f"{r['case']}@seed{rec['seed']}"
            rows.append(row)
    return rows


def aggregate(records: list[dict], cls: str) -> dict[str, Any] | None:
    """Mean ± std over test cases (pooled over seeds) and the median iteration time of some cells."""
    if not records:
        return None
    entry = summarize(_pooled_rows(records, cls))["classes"][cls]
    return {"dsc_mean": entry["dsc"]["mean"], "dsc_std": entry["dsc"]["std"],
            "nsd_mean": entry["nsd"]["mean"], "nsd_std": entry["nsd"]["std"],
            "n_cases": entry["n_cases"], "seeds": sorted(r["seed"] for r in records),
            "seconds_per_iteration": float(np.median([r["timing"]["median_iteration_seconds"] for r in records])),
            "trainable": records[0]["parameters"]["trainable"],
            "updated_per_step": records[0]["parameters"]["updated_per_step"],
            "cells": [r["id"] for r in records]}


def _ranked(texts: list[str], means: list[float | None]) -> list[str]:
    """Bold the best and underline the second best value of a column (ties share a rank)."""
    values = sorted({round(m, 4) for m in means if m is not None}, reverse=True)
    out = []
    for text, m in zip(texts, means):
        if m is not None and values and round(m, 4) == values[0]:
            text = f"**{text}**"
        elif m is not None and len(values) > 1 and round(m, 4) == values[1]:
            text = f"<u>{text}</u>"
        out.append(text)
    return out


def _fmt(agg: dict | None, metric: str) -> str:
    if agg is None:
        return MISSING
    return format_mean_std(agg[f"{metric}_mean"], agg[f"{metric}_std"], percent=True, digits=2)


def _mean(agg: dict | None, metric: str) -> float | None:
    return None if agg is None else agg[f"{metric}_mean"]


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    return buf.getvalue()


def _ranked_columns(columns: list[tuple[list[str], list[float | None]]]) -> list[list[str]]:
    return [_ranked(texts, means) for texts, means in columns]


def table1(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    config = index.config
    parts, csv_rows = [], []
    for ds in config.datasets:
        methods = config.table1["methods"]
        aggs = {(m, s): aggregate(index.finished(ds.name, m, s), cls) for m in methods for s in ds.shots}
        columns = []
        for s in ds.shots:
            for metric in ("dsc", "nsd"):
                columns.append(([_fmt(aggs[m, s], metric) for m in methods],
                                [_mean(aggs[m, s], metric) for m in methods]))
        ranked = _ranked_columns(columns)
        rows = [[display_name(m)] + [col[i] for col in ranked] for i, m in enumerate(methods)]
        all_shot = config.table1["all_shot"]
        if all_shot:
            agg = aggregate(index.finished(ds.name, all_shot, ds.train_cases), cls)
            label = f"All-shot ({ds.train_cases}-shot, {display_name(all_shot).lower()})"
            rows.append([label, _fmt(agg, "dsc"), _fmt(agg, "nsd")] + [""] * (2 * len(ds.shots) - 2))
            aggs[f"all-shot:{all_shot}", ds.train_cases] = agg
        header = ["Method"] + [f"{s}-shot {m} (%)" for s in ds.shots for m in ("DSC", "NSD")]
        parts.append(f"**{ds.name}** ({cls})\n\n" + markdown_table(header, rows))
        for (m, s), agg in aggs.items():
            csv_rows.append({"dataset": ds.name, "class": cls, "method": m, "shots": s, **_agg_csv(agg)})
    return "\n\n".join(parts), csv_rows


def _agg_csv(agg: dict | None) -> dict:
    if agg is None:
        return {"dsc_mean": "", "dsc_std": "", "nsd_mean": "", "nsd_std": "", "n_cases": 0, "seeds": [],
                "cells": []}
    return {k: agg[k] for k in ("dsc_mean", "dsc_std", "nsd_mean", "nsd_std", "n_cases", "seeds",
                                "seconds_per_iteration", "trainable", "updated_per_step", "cells")}


def table2(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    config = index.config
    methods, reference = config.table2["methods"], config.table2["reference"]
    settings = [(ds.name, s) for ds in config.datasets for s in sorted({min(ds.shots), max(ds.shots)})]
    aggs = {(m, d, s): aggregate(index.finished(d, m, s), cls) for m in methods for d, s in settings}
    columns = []
    for d, s in settings:
        for metric in ("dsc", "nsd"):
            columns.append(([_fmt(aggs[m, d, s], metric) for m in methods],
                            [_mean(aggs[m, d, s], metric) for m in methods]))
    ranked = _ranked_columns(columns)

    def seconds(method: str) -> float | None:
        records = [r for d, s in settings for r in index.finished(d, method, s)]
        return float(np.median([r["timing"]["median_iteration_seconds"] for r in records])) if records else None

    ref = seconds(reference)
    rows, csv_rows = [], []
    for i, m in enumerate(methods):
        t = seconds(m)
        ratio = (t / ref) if (t is not None and ref) else None
        rows.append([display_name(m)] + [col[i] for col in ranked] +
                    [MISSING if t is None else f"{t:.3f} s", MISSING if ratio is None else f"{ratio:.2f}×"])
        for d, s in settings:
            csv_rows.append({"dataset": d, "class": cls, "method": m, "shots": s, **_agg_csv(aggs[m, d, s]),
                             "method_seconds_per_iteration": t, f"ratio_to_{reference}": ratio})
    header = (["Method"] + [f"{d} {s}-shot {x} (%)" for d, s in settings for x in ("DSC", "NSD")] +
              ["s/iter", f"× {reference}"])
    return f"({cls})\n\n" + markdown_table(header, rows), csv_rows


def gamma_table(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    config = index.config
    g = config.gamma
    rows, csv_rows = [], []
    settings = [(ds.name, max(ds.shots)) for ds in config.datasets]
    lines: list[tuple[str, Any, dict[tuple[str, int], dict | None]]] = []
    for value in g["values"]:
        lines.append((f"{display_name(g['method'])} γ={value}", value,
                      {(d, s): aggregate(index.finished(d, g["method"], s, gamma=value), cls) for d, s in settings}))
    lines.append((display_name(g["reference"]), None,
                  {(d, s): aggregate(index.finished(d, g["reference"], s), cls) for d, s in settings}))
    for label, value, aggs in lines:
        rows.append([label] + [_fmt(aggs[k], metric) for k in settings for metric in ("dsc", "nsd")])
        for (d, s), agg in aggs.items():
            csv_rows.append({"dataset": d, "class": cls, "shots": s,
                             "method": g["method"] if value is not None else g["reference"],
                             "gamma": "" if value is None else value, **_agg_csv(agg)})
    header = ["Setting"] + [f"{d} {s}-shot {x} (%)" for d, s in settings for x in ("DSC", "NSD")]
    return f"({cls})\n\n" + markdown_table(header, rows), csv_rows


def gamma_figure(config: GridConfig, csv_rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(config.gamma["values"])
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ds in enumerate(config.datasets):
        color = colors[i % len(colors)]
        mine = [r for r in csv_rows if r["dataset"] == ds.name]
        for ax, metric in zip(axes, ("dsc", "nsd")):
            ys = [next((r[f"{metric}_mean"] for r in mine if r["gamma"] == v), "") for v in values]
            ys = [100 * y if y != "" else np.nan for y in ys]
            ax.plot(range(len(values)), ys, "o-", color=color, label=f"{ds.name} {max(ds.shots)}-shot")
            ref = next((r[f"{metric}_mean"] for r in mine if r["gamma"] == ""), "")
            if ref != "":
                ax.axhline(100 * ref, color=color, linestyle="--", linewidth=1,
                           label=f"{ds.name} {display_name(config.gamma['reference'])}")
    for ax, metric in zip(axes, ("DSC (%)", "NSD@1mm (%)")):
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel("γ (entries updated per kernel and iteration)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sensitivity to γ ({display_name(config.gamma['method'])}); dashed: "
                 f"{display_name(config.gamma['reference'])}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def qualitative_figure(index: CellIndex, paths, cls: str, path: Path) -> Path | None:
    """Rows: datasets (largest shot count, first seed); columns: Table 1 methods; GT green, prediction yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medadapt.viz import GT_COLOR, PRED_COLOR, _window, radiological_view

    config = index.config
    methods = config.table1["methods"]
    panels = []
    for ds in config.datasets:
        row = []
        for m in methods:
            recs = [r for r in index.finished(ds.name, m, max(ds.shots)) if r["seed"] == config.seeds[0]]
            row.append((m, recs[0] if recs else None))
        panels.append((ds, row))
    if not any(rec for _, row in panels for _, rec in row):
        return None
    fig, axes = plt.subplots(len(panels), len(methods), figsize=(2.3 * len(methods), 2.7 * len(panels)),
                             squeeze=False)
    for r, (ds, row) in enumerate(panels):
        for c, (m, rec) in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if rec is None:
                ax.set_title(f"{display_name(m)}\n(missing)", fontsize=8)
                continue
            npz = np.load(Path(paths.workdir) / "cells" / rec["id"] / rec["qualitative"])
            spacing = npz["spacing"]
            aspect = float(spacing[1] / spacing[2])
            ax.imshow(_window(radiological_view(npz["image"])), cmap="gray", aspect=aspect,
                      interpolation="nearest")
            for mask, color in ((npz["gt"], GT_COLOR), (npz["prediction"], PRED_COLOR)):
                if (mask > 0).any():
                    ax.contour(radiological_view(mask > 0), levels=[0.5], colors=color, linewidths=0.9)
            case = str(npz["case"])
            dsc = next((x["dsc"] for x in rec["per_case"] if x["case"] == case and x["class"] == cls), None)
            score = "n/a" if dsc is None else f"{100 * dsc:.1f}%"
            ax.set_title(f"{display_name(m)}\nDSC {score}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{ds.name}\n{max(ds.shots)}-shot, {case} z={int(npz['z'])}", fontsize=7)
    fig.suptitle(f"Test-case contours (ground truth {GT_COLOR}, prediction {PRED_COLOR})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def _cell_rows(cells: list[Cell], records: dict[str, dict | None]) -> tuple[list[dict], list[dict]]:
    summary, per_case = [], []
    for cell in cells:
        rec = records.get(cell.cell_id)
        if rec is None:
            continue
        for cls, m in rec["metrics"]["classes"].items():
            summary.append({"cell": cell.cell_id, "dataset": cell.dataset, "method": cell.method,
                            "options": " ".join(f"{k}={v}" for k, v in sorted(cell.options.items())),
                            "shots": cell.shots, "all_shot": cell.all_shot, "seed": cell.seed,
                            "experiments": cell.experiments, "class": cls,
                            "dsc_mean": m["dsc"]["mean"], "dsc_std": m["dsc"]["std"],
                            "nsd_mean": m["nsd"]["mean"], "nsd_std": m["nsd"]["std"], "n_cases": m["n_cases"],
                            "trainable": rec["parameters"]["trainable"],
                            "updated_per_step": rec["parameters"]["updated_per_step"],
                            "total_params": rec["parameters"]["total"],
                            "median_iteration_seconds": rec["timing"]["median_iteration_seconds"],
                            "cell_seconds": rec["cell_seconds"], "executor": rec["executor"]["kind"],
                            "host": rec["executor"]["host"], "shot_cases": rec["shot_cases"]})
        for row in rec["per_case"]:
            per_case.append({"cell": cell.cell_id, **row})
    return summary, per_case


def write_report(config: GridConfig, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build every table and figure of ``config`` from the cells stored in ``workdir``."""
    paths = grid_paths(config, workdir)
    cells = enumerate_cells(config)
    records = {c.cell_id: load_cell_record(paths, c) for c in cells}
    done = [r for r in records.values() if r]
    if not done:
        raise MedadaptError(f"{paths.workdir}: no finished cells of grid {config.name!r}; run "
                            f"'medadapt bench {config.cli_argument}' first (same --workdir)")
    index = CellIndex(config, cells, records)
    out = Path(paths.workdir) / "report"
    classes = list(done[0]["metrics"]["classes"])
    files: dict[str, Path] = {}
    sections = [f"# Benchmark report: grid `{config.name}`\n",
                f"{len(done)} of {len(cells)} cells finished. Config: `{config.source}`. DSC and NSD at 1 mm in %, "
                "mean ± std over test cases (pooled over seeds); best **bold**, second <u>underlined</u>.\n"]
    t1_md, t1_csv = zip(*(table1(index, cls) for cls in classes))
    files["table1.md"] = _write(out / "table1.md", "\n\n".join(t1_md) + "\n")
    files["table1.csv"] = _write(out / "table1.csv", _csv(sum(t1_csv, [])))
    sections += ["## Table 1: few-shot fine-tuning methods\n", *t1_md]
    if config.table2:
        t2_md, t2_csv = zip(*(table2(index, cls) for cls in classes))
        files["table2.md"] = _write(out / "table2.md", "\n\n".join(t2_md) + "\n")
        files["table2.csv"] = _write(out / "table2.csv", _csv(sum(t2_csv, [])))
        sections += ["\n## Table 2: sparsification ablations\n", *t2_md]
    if config.gamma:
        g_md, g_csv = zip(*(gamma_table(index, cls) for cls in classes))
        files["gamma.md"] = _write(out / "gamma.md", "\n\n".join(g_md) + "\n")
        files["gamma.csv"] = _write(out / "gamma.csv", _csv(sum(g_csv, [])))
        files["gamma.png"] = gamma_figure(config, g_csv[0], out / "gamma.png")
        sections += ["\n## Fig. 3: sensitivity to γ\n", *g_md, "\n![gamma](gamma.png)"]
    qual = qualitative_figure(index, paths, classes[0], out / "qualitative.png")
    if qual:
        files["qualitative.png"] = qual
        sections.append("\n## Fig. 2: qualitative comparison\n\n![qualitative](qualitative.png)")
    missing = [c.cell_id for c in cells if not records.get(c.cell_id)]
    if missing:
        sections.append(f"\n## Missing cells ({len(missing)})\n\n" + "\n".join(f"- `{m}`" for m in missing))
    summary_rows, per_case_rows = _cell_rows(cells, records)
    files["cells.csv"] = _write(out / "cells.csv", _csv(summary_rows))
    files["per_case.csv"] = _write(out / "per_case.csv", _csv(per_case_rows))
    files["report.md"] = _write(out / "report.md", "\n".join(sections) + "\n")
    if progress:
        print("\n\n".join(t1_md))
        print(f"report: {out / 'report.md'} ({len(done)}/{len(cells)} cells)")
    return {"dir": str(out), "files": {k: str(v) for k, v in files.items()}, "finished": len(done),
            "cells": len(cells), "missing": missing}


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path
