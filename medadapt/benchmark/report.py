"""Tables and figures of a benchmark grid, built from the stored cells alone (no model, no prediction needed).

Writes to ``<workdir>/report/``:

* ``table1.md/.csv`` — the DGST paper's Table 1 layout: DSC and NSD (%) per shot count as mean over seeds ±
  spread over seeds (spread over test cases), bold / underlined only where a paired test separates methods
  (:mod:`medadapt.benchmark.stats`); the zero-shot row (the foundation with its own heads) and the all-shot
  from-scratch row. ``table1_hd95.md``: the same for HD95, with the number of undefined values.
* ``table2.md/.csv`` — Table 2: the ablations at the smallest and largest shot count, with seconds per
  iteration and its ratio to ``full`` (medians of the cells' median iteration times, measured in this grid).
* ``paired.md/.csv`` — DGST against every other method per setting: mean paired difference over (seed, test
  case), bootstrap 95% interval, Wilcoxon signed-rank p-value.
* ``gamma.md/.csv/.png`` — Fig. 3: DSC and NSD against γ (bars: spread over seeds), ``full`` as reference line.
* ``curves.png`` — training-loss curves of the Table 1 methods and the all-shot row (did the budgets converge).
* ``qualitative.png`` — Fig. 2: every Table 1 method's contours on the same slice of each dataset.
* ``cells.csv`` (one row per cell) and ``per_case.csv`` (one row per cell and test case): every number above is
  traceable to its cell id, and the CSV tables name the cells they aggregate.
* ``report.md`` — all tables together, with what is missing.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medadapt.benchmark import stats
from medadapt.benchmark.cell import Cell
from medadapt.benchmark.grid import NO_TRAINING, ZERO_SHOT, GridConfig, enumerate_cells, grid_paths, method_options
from medadapt.benchmark.tables import (CONVERGENCE_LEGEND, MISSING, csv_text, mark_text, save_figure, write_file, convergence_mark,
                                       stored_cells)
from medadapt.benchmark.tables import finish_report as tables_finish_report
from medadapt.errors import MedadaptError
from medadapt.utils.tables import markdown_table

HEADLINE = "dgst"  # the method every other is compared with in the paired table

FOOTNOTE = (
    "Cells: mean over seeds ± spread over seeds (sample std of the per-seed means over the test cases) and, in "
    "brackets, the spread over test cases (std over all seed × test-case values). Bold: the column's best mean "
    "and every method not distinguishable from it; underlined: the best of the rest and every method not "
    "distinguishable from that one. Distinguishable: two-sided Wilcoxon signed-rank test on the paired "
    f"(seed, test case) differences, p < {stats.ALPHA} (no multiple-comparison correction; the pairs share "
    "test cases across seeds, so they are not fully independent). For HD95 lower is better. A row run with one "
    "seed shows no spread over seeds. The zero-shot row has no seeds (no training); it pairs each test case "
    "with that case under every seed.")


def display_name(method: str) -> str:
    """A method's label in the tables: its definition's (medadapt.tuning.Method.display); the foundation's
    zero-shot row has its own."""
    from medadapt.tuning import methods

    if method == ZERO_SHOT:
        return "Foundation, no fine-tuning"
    definition = methods().get(method)
    return definition.label if definition is not None else method


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
        if method == ZERO_SHOT:  # one cell per dataset, whatever the shot count of the column
            opts, shots = {}, 0
        else:
            opts = method_options(self.config, method, gamma)
        cells = self.by_setting.get(self._setting(dataset, method, opts, shots), [])
        return [self.records[c.cell_id] for c in cells if self.records.get(c.cell_id)]


def class_values(records: list[dict], cls: str, metric: str) -> dict:
    """(seed, case) -> value; a cell without training (zero-shot, generalization) has no seed (None), so that
    it pairs with every seed."""
    values = stats.case_values(records, cls, metric)
    if records and records[0]["method"] in NO_TRAINING:
        values = {(None, case): v for (_, case), v in values.items()}
    return values


def aggregate(records: list[dict], cls: str) -> dict[str, Any] | None:
    """Means over seeds with both spreads (seeds, test cases) of DSC, NSD, HD95, and cell facts."""
    if not records:
        return None
    out: dict[str, Any] = {}
    for metric in ("dsc", "nsd", "hd95"):
        summary = stats.seed_summary(class_values(records, cls, metric))
        out.update({f"{metric}_mean": summary.mean, f"{metric}_seed_std": summary.seed_std,
                    f"{metric}_case_std": summary.case_std})
        if metric == "hd95":
            out["hd95_undefined"] = summary.n_undefined
    times = [r["timing"]["median_iteration_seconds"] for r in records
             if r["timing"].get("median_iteration_seconds") is not None]
    out.update({
        "n_cases": len({case for rec in records for case in (r["case"] for r in rec["per_case"])}),
        "n_values": len(class_values(records, cls, "dsc")),
        "seeds": sorted(r["seed"] for r in records) if records[0]["method"] not in NO_TRAINING else [],
        "seconds_per_iteration": float(np.median(times)) if times else None,
        "trainable": records[0]["parameters"]["trainable"],
        "updated_per_step": records[0]["parameters"]["updated_per_step"],
        "cells": [r["id"] for r in records]})
    return out


def format_cell(agg: dict | None, metric: str) -> str:
    if agg is None or agg[f"{metric}_mean"] is None:
        return MISSING
    scale = 1.0 if metric == "hd95" else 100.0
    seed_spread = f" ± {agg[f'{metric}_seed_std'] * scale:.1f}" if len(agg["seeds"]) > 1 else ""
    text = f"{agg[f'{metric}_mean'] * scale:.1f}{seed_spread} ({agg[f'{metric}_case_std'] * scale:.1f})"
    if metric == "hd95" and agg.get("hd95_undefined"):
        text += f", {agg['hd95_undefined']}/{agg['n_values']} undefined"
    return text


def _column(index: CellIndex, dataset: str, shots: int, methods: list[str], cls: str, metric: str,
            gamma: dict[str, int | None] | None = None) -> tuple[list[str], list[dict | None]]:
    """One table column: marked texts and aggregates of ``methods`` at (dataset, shots)."""
    gamma = gamma or {}
    records = {m: index.finished(dataset, m, shots, gamma.get(m)) for m in methods}
    values = {m: class_values(r, cls, metric) for m, r in records.items() if r}
    marks = stats.rank_marks(list(values), values, higher_is_better=metric != "hd95")
    aggs = [aggregate(records[m], cls) for m in methods]
    return [mark_text(format_cell(a, metric), marks.get(m, "")) + convergence_mark(records[m] or [])
            for m, a in zip(methods, aggs)], aggs


def table1(index: CellIndex, cls: str, metrics: tuple[str, ...] = ("dsc", "nsd")) -> tuple[str, list[dict]]:
    config = index.config
    parts, csv_rows = [], []
    names = {"dsc": "DSC (%)", "nsd": "NSD (%)", "hd95": "HD95 (mm)"}
    for ds in config.datasets:
        methods = list(config.table1["methods"])
        if config.table1.get("zero_shot"):
            methods = [ZERO_SHOT] + methods
        columns = []
        for s in ds.shots:
            for metric in metrics:
                texts, aggs = _column(index, ds.name, s, methods, cls, metric)
                columns.append(texts)
                if metric == metrics[0]:
                    for m, agg in zip(methods, aggs):
                        csv_rows.append({"dataset": ds.name, "class": cls, "method": m, "shots": s, **agg_csv(agg)})
        rows = [[display_name(m)] + [col[i] for col in columns] for i, m in enumerate(methods)]
        all_shot = config.table1["all_shot"]
        if all_shot:
            recs = index.finished(ds.name, all_shot, ds.train_cases)
            agg = aggregate(recs, cls)
            label = f"All-shot ({ds.train_cases}-shot, {display_name(all_shot).lower()})"
            rows.append([label] + [format_cell(agg, m) + convergence_mark(recs or []) for m in metrics]
                        + [""] * (len(metrics) * (len(ds.shots) - 1)))
            csv_rows.append({"dataset": ds.name, "class": cls, "method": f"all-shot:{all_shot}",
                             "shots": ds.train_cases, **agg_csv(agg)})
        header = ["Method"] + [f"{s}-shot {names[m]}" for s in ds.shots for m in metrics]
        parts.append(f"**{ds.name}** ({cls})\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts), csv_rows


def agg_csv(agg: dict | None) -> dict:
    keys = ("dsc_mean", "dsc_seed_std", "dsc_case_std", "nsd_mean", "nsd_seed_std", "nsd_case_std", "hd95_mean",
            "hd95_seed_std", "hd95_case_std", "hd95_undefined", "n_cases", "n_values", "seeds",
            "seconds_per_iteration", "trainable", "updated_per_step", "cells")
    if agg is None:
        return {k: ([] if k in ("seeds", "cells") else "") for k in keys}
    return {k: agg[k] for k in keys}


def table2(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    config = index.config
    methods, reference = config.table2["methods"], config.table2["reference"]
    settings = [(ds.name, s) for ds in config.datasets for s in config.table2_shots(ds)]
    columns, aggs = [], {}
    for d, s in settings:
        for metric in ("dsc", "nsd"):
            texts, col_aggs = _column(index, d, s, methods, cls, metric)
            columns.append(texts)
            aggs.update({(m, d, s): a for m, a in zip(methods, col_aggs)})

    def seconds(method: str) -> float | None:
        records = [r for d, s in settings for r in index.finished(d, method, s)]
        return float(np.median([r["timing"]["median_iteration_seconds"] for r in records])) if records else None

    ref = seconds(reference)
    rows, csv_rows = [], []
    for i, m in enumerate(methods):
        t = seconds(m)
        ratio = (t / ref) if (t is not None and ref) else None
        rows.append([display_name(m)] + [col[i] for col in columns] +
                    [MISSING if t is None else f"{t:.3f} s", MISSING if ratio is None else f"{ratio:.2f}×"])
        for d, s in settings:
            csv_rows.append({"dataset": d, "class": cls, "method": m, "shots": s, **agg_csv(aggs[m, d, s]),
                             "method_seconds_per_iteration": t, f"ratio_to_{reference}": ratio})
    header = (["Method"] + [f"{d} {s}-shot {x} (%)" for d, s in settings for x in ("DSC", "NSD")] +
              ["s/iter", f"× {reference}"])
    return f"({cls})\n\n" + markdown_table(header, rows), csv_rows


def paired_table(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    """DGST against every other method of Tables 1 and 2, per setting: mean paired difference (percentage
    points) with its bootstrap 95% interval and the Wilcoxon p-value, for DSC and NSD."""
    config = index.config
    methods = ([ZERO_SHOT] if config.table1.get("zero_shot") else []) + list(config.table1["methods"])
    if config.table2:
        methods += [m for m in config.table2["methods"] if m not in methods]
    others = [m for m in methods if m != HEADLINE]
    settings = [(ds.name, s) for ds in config.datasets for s in ds.shots]
    rows, csv_rows = [], []
    for d, s in settings:
        mine = index.finished(d, HEADLINE, s)
        if not mine:
            continue
        for m in others:
            theirs = index.finished(d, m, s)
            if not theirs:
                continue
            texts = []
            for metric in ("dsc", "nsd"):
                comp = stats.paired_comparison(class_values(mine, cls, metric), class_values(theirs, cls, metric))
                if comp is None:
                    texts.append(MISSING)
                    continue
                texts.append(f"{100 * comp.mean_difference:+.1f} [{100 * comp.ci_low:+.1f}, "
                             f"{100 * comp.ci_high:+.1f}], p={comp.p_value:.2g}")
                csv_rows.append({"dataset": d, "shots": s, "class": cls, "method": HEADLINE, "versus": m,
                                 "metric": metric, "mean_difference": comp.mean_difference,
                                 "ci95_low": comp.ci_low, "ci95_high": comp.ci_high, "p_wilcoxon": comp.p_value,
                                 "n_pairs": comp.n_pairs, "significant": comp.significant})
            rows.append([d, f"{s}", f"{display_name(HEADLINE)} − {display_name(m)}", *texts])
    header = ["Dataset", "Shots", "Comparison", "Δ DSC (pp) [95% CI], p", "Δ NSD (pp) [95% CI], p"]
    text = (f"({cls}) Mean paired difference over (seed, test case) pairs in percentage points, percentile "
            f"bootstrap 95% interval ({stats.BOOTSTRAP_RESAMPLES:,} resamples), two-sided Wilcoxon signed-rank "
            "p-value.\n\n" + (markdown_table(header, rows) if rows else "(no finished pairs)"))
    return text, csv_rows


def gamma_table(index: CellIndex, cls: str) -> tuple[str, list[dict]]:
    config = index.config
    g = config.gamma
    settings = [(ds.name, config.gamma_shots(ds)) for ds in config.datasets]
    labels = [f"{display_name(g['method'])} γ={v}" for v in g["values"]] + [display_name(g["reference"])]
    keys = [f"gamma{v}" for v in g["values"]] + ["reference"]
    # the γ values of one method are separate rows: give each its own name for ranking
    columns, csv_rows = [], []
    for d, s in settings:
        recs = {f"gamma{v}": index.finished(d, g["method"], s, gamma=v) for v in g["values"]}
        recs["reference"] = index.finished(d, g["reference"], s)
        for metric in ("dsc", "nsd"):
            values = {k: class_values(r, cls, metric) for k, r in recs.items() if r}
            marks = stats.rank_marks(list(values), values)
            columns.append([mark_text(format_cell(aggregate(recs[k], cls), metric), marks.get(k, "")) for k in keys])
        for v, k in zip(list(g["values"]) + [None], keys):
            csv_rows.append({"dataset": d, "class": cls, "shots": s,
                             "method": g["method"] if v is not None else g["reference"],
                             "gamma": "" if v is None else v, **agg_csv(aggregate(recs[k], cls))})
    rows = [[label] + [col[i] for col in columns] for i, label in enumerate(labels)]
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
            pts = [next((r for r in mine if r["gamma"] == v), None) for v in values]
            ys = [100 * r[f"{metric}_mean"] if r and r[f"{metric}_mean"] != "" else np.nan for r in pts]
            es = [100 * r[f"{metric}_seed_std"] if r and r[f"{metric}_seed_std"] != "" else 0 for r in pts]
            ax.errorbar(range(len(values)), ys, yerr=es, fmt="o-", color=color, capsize=3,
                        label=f"{ds.name} {config.gamma_shots(ds)}-shot")
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
    fig.suptitle(f"Sensitivity to γ ({display_name(config.gamma['method'])}; mean over seeds, bars: std over "
                 f"seeds); dashed: {display_name(config.gamma['reference'])}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def contour_panel(ax, rec: dict, paths) -> tuple[str, int]:
    """Draw a cell's stored qualitative slice on ``ax``: the image (radiological view, CT window) with the
    ground truth and prediction contours. Returns the slice's case id and z."""
    from medadapt.viz import GT_COLOR, PRED_COLOR, ct_window, radiological_view

    npz = np.load(Path(paths.workdir) / "cells" / rec["id"] / rec["qualitative"])
    spacing = npz["spacing"]
    ax.imshow(ct_window(radiological_view(npz["image"])), cmap="gray", aspect=float(spacing[1] / spacing[2]),
              interpolation="nearest")
    for mask, color in ((npz["gt"], GT_COLOR), (npz["prediction"], PRED_COLOR)):
        if (mask > 0).any():
            ax.contour(radiological_view(mask > 0), levels=[0.5], colors=color, linewidths=0.9)
    return str(npz["case"]), int(npz["z"])


def contour_grid(panels: list[tuple[str, list[tuple[str, dict | None]]]], paths, path: Path,
                 score: Callable[[dict, str], float | None], title: str, width: float = 2.3,
                 title_size: int = 10) -> Path | None:
    """A grid of cells' stored qualitative slices (:func:`contour_panel`), None when no cell has finished.
    ``panels``: rows of (row label, [(column title, record or None)]); ``score(record, case)``: the DSC shown
    above a slice; the row label gets the slice's case and z."""
    if not any(rec for _, row in panels for _, rec in row):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medadapt.viz import GT_COLOR, PRED_COLOR

    columns = max(len(row) for _, row in panels)
    fig, axes = plt.subplots(len(panels), columns, figsize=(width * columns, 2.7 * len(panels)), squeeze=False)
    for i, (label, row) in enumerate(panels):
        for j, (name, rec) in enumerate(row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if rec is None:
                ax.set_title(f"{name}\n(missing)", fontsize=8)
                continue
            case, z = contour_panel(ax, rec, paths)
            dsc = score(rec, case)
            ax.set_title(f"{name}\nDSC {'n/a' if dsc is None else f'{100 * dsc:.1f}%'}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{label}, {case} z={z}", fontsize=7)
    fig.suptitle(f"{title} (ground truth {GT_COLOR}, prediction {PRED_COLOR})", fontsize=title_size)
    fig.tight_layout()
    return save_figure(fig, path)


def qualitative_figure(index: CellIndex, paths, cls: str, path: Path) -> Path | None:
    """Rows: datasets (largest shot count, first seed); columns: Table 1 methods; GT green, prediction yellow."""
    config = index.config
    methods = ([ZERO_SHOT] if config.table1.get("zero_shot") else []) + list(config.table1["methods"])
    panels = []
    for ds in config.datasets:
        row = []
        for m in methods:
            recs = [r for r in index.finished(ds.name, m, config.focus_shots(ds))
                    if r["seed"] == config.seeds[0] or m == ZERO_SHOT]
            row.append(("Foundation (zero-shot)" if m == ZERO_SHOT else display_name(m), recs[0] if recs else None))
        panels.append((f"{ds.name}\n{config.focus_shots(ds)}-shot", row))
    return contour_grid(panels, paths, path, lambda rec, case: next(
        (x["dsc"] for x in rec["per_case"] if x["case"] == case and x["class"] == cls), None), "Test-case contours")


def curves_figure(index: CellIndex, cls: str, path: Path, window: int = 5) -> Path | None:
    """Training loss per epoch (moving average over ``window`` epochs, mean over seeds) of every Table 1 method
    and the all-shot row at each dataset's largest shot count: whether the budgets let training level off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = index.config
    fig, axes = plt.subplots(1, len(config.datasets), figsize=(5.2 * len(config.datasets), 3.6), squeeze=False)
    drawn = False
    for ax, ds in zip(axes[0], config.datasets):
        lines = [(display_name(m), index.finished(ds.name, m, config.focus_shots(ds))) for m in config.table1["methods"]]
        if config.table1["all_shot"]:
            lines.append((f"All-shot ({ds.train_cases})", index.finished(ds.name, config.table1["all_shot"],
                                                                        ds.train_cases)))
        for label, recs in lines:
            curves = [r["loss_curve"] for r in recs if r.get("loss_curve")]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            k = max(1, min(window, n))
            smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
            iters = recs[0]["training"]["iterations_per_epoch"]
            ax.plot((np.arange(len(smooth)) + k) * iters, smooth, label=label, linewidth=1.2)
            drawn = True
        ax.set_title(f"{ds.name}, {config.focus_shots(ds)}-shot (all-shot: {ds.train_cases})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (Dice + CE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"Training loss per epoch, {window}-epoch moving average, mean over seeds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell_rows(cell: Cell, rec: dict) -> tuple[list[dict], list[dict]]:
    """The ``cells.csv`` and ``per_case.csv`` rows of one finished cell: a row per class."""
    summary = []
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
    return summary, [{"cell": cell.cell_id, **row} for row in rec["per_case"]]


def write_report(config: GridConfig, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build every table and figure of the DGST grid ``config`` from the cells stored in ``workdir`` (an
    ``fseft`` grid has its own: :func:`medadapt.benchmark.report_fseft.write_report`;
    :func:`medadapt.benchmark.benchmarks.load` gives the definition, and so the report, a config needs)."""
    if config.fseft is not None:
        raise MedadaptError(f"grid {config.name!r} is an FSEFT grid: its report is "
                            "medadapt.benchmark.report_fseft.write_report")
    paths, cells, records, done = finished_cells(config, workdir)
    index = CellIndex(config, cells, records)
    out = Path(paths.workdir) / "report"
    classes = list(done[0]["metrics"]["classes"])
    files: dict[str, Path] = {}
    seeds = ", ".join(map(str, config.seeds))
    sections = [f"# Benchmark report: grid `{config.name}`\n",
                f"{len(done)} of {len(cells)} cells finished. Config: `{config.cli_argument}`. Seeds: {seeds} "
                f"({len(config.seeds)}). Head policy: {config.head}. DSC and NSD at 1 mm in %.\n",
                FOOTNOTE + "\n", CONVERGENCE_LEGEND + "\n"]
    t1_md, t1_csv = zip(*(table1(index, cls) for cls in classes))
    files["table1.md"] = write_file(out / "table1.md", "\n\n".join(t1_md) + "\n\n" + FOOTNOTE + "\n\n"
                                + CONVERGENCE_LEGEND + "\n")
    files["table1.csv"] = write_file(out / "table1.csv", csv_text(sum(t1_csv, [])))
    sections += ["## Table 1: few-shot fine-tuning methods\n", *t1_md]
    hd_md = [table1(index, cls, metrics=("hd95",))[0] for cls in classes]
    files["table1_hd95.md"] = write_file(out / "table1_hd95.md", "\n\n".join(hd_md) + "\n")
    sections += ["\n### Table 1, HD95 (mm)\n",
                 "Over the (seed, test case) values where HD95 is defined; 'k/n undefined' counts those where "
                 "exactly one of prediction and ground truth is empty (no surface distance exists).\n", *hd_md]
    if config.table2:
        t2_md, t2_csv = zip(*(table2(index, cls) for cls in classes))
        files["table2.md"] = write_file(out / "table2.md", "\n\n".join(t2_md) + "\n\n" + FOOTNOTE + "\n\n"
                                + CONVERGENCE_LEGEND + "\n")
        files["table2.csv"] = write_file(out / "table2.csv", csv_text(sum(t2_csv, [])))
        sections += ["\n## Table 2: sparsification ablations\n", *t2_md]
    p_md, p_csv = zip(*(paired_table(index, cls) for cls in classes))
    files["paired.md"] = write_file(out / "paired.md", "\n\n".join(p_md) + "\n")
    files["paired.csv"] = write_file(out / "paired.csv", csv_text(sum(p_csv, [])))
    sections += [f"\n## Paired comparisons: {display_name(HEADLINE)} against every other method\n", *p_md]
    if config.gamma:
        g_md, g_csv = zip(*(gamma_table(index, cls) for cls in classes))
        files["gamma.md"] = write_file(out / "gamma.md", "\n\n".join(g_md) + "\n")
        files["gamma.csv"] = write_file(out / "gamma.csv", csv_text(sum(g_csv, [])))
        files["gamma.png"] = gamma_figure(config, g_csv[0], out / "gamma.png")
        sections += ["\n## Fig. 3: sensitivity to γ\n", *g_md, "\n![gamma](gamma.png)"]
    curves = curves_figure(index, classes[0], out / "curves.png")
    if curves:
        files["curves.png"] = curves
        sections.append("\n## Training-loss curves\n\n![curves](curves.png)")
    qual = qualitative_figure(index, paths, classes[0], out / "qualitative.png")
    if qual:
        files["qualitative.png"] = qual
        sections.append("\n## Fig. 2: qualitative comparison\n\n![qualitative](qualitative.png)")
    return finish_report(out, cells, records, sections, files, "\n\n".join(t1_md), progress)


def finished_cells(config: GridConfig, workdir: str | Path):
    """``(paths, cells, records by cell id, finished records)`` of a grid; an error if none has finished."""
    paths, cells, records = stored_cells(config, workdir, grid_paths, enumerate_cells)
    return paths, cells, records, [r for r in records.values() if r]


def finish_report(out: Path, cells: list[Cell], records: dict[str, dict | None], sections: list[str],
                  files: dict[str, Path], headline: str, progress: bool) -> dict[str, Any]:
    """:func:`medadapt.benchmark.tables.finish_report` with this grid's ``cells.csv`` / ``per_case.csv`` rows."""
    return tables_finish_report(out, cells, records, sections, files, headline, progress, _cell_rows)
