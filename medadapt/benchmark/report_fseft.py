"""Tables and figures of an ``fseft`` grid (FSEFT paper, Sec. 4), built from the stored cells alone.

Writes to ``<workdir>/report/``:

* ``table1.md/.csv`` — Table 1's layout: the tasks' structures as columns plus ``Avg`` (the mean over the
  structures), row groups per shot count (the all-shot group first: Generalization and the all-shot rows; then
  k from largest to smallest: the methods and "Adapter + TI"). DSC (%) after thresholding at 0.5 and the
  grid's post-processing (largest connected component), as mean over seeds ± spread over seeds (spread over
  test cases), bold / underlined only where a paired test separates rows of a group
  (:mod:`medadapt.benchmark.stats`). ``Avg``: per seed the mean over structures, then mean ± spread over seeds.
  A structure the foundation does not know has no Generalization value (no foundation output to show).
* ``paired.md/.csv`` — the adapter against every other method of its group, and Adapter + TI against the
  adapter: mean paired difference over (seed, test case), bootstrap 95% interval, Wilcoxon p-value.
* ``fig2a.png/.csv`` — DSC against k of the inductive adapter per kernel size (3³ spatial vs 1×1×1, the
  paper's "MLP"), averaged over tasks (bars: spread over seeds of the per-seed task average).
* ``fig2b.png/.csv`` — DSC against the TI margin γ per Fig. 2b task at its k; dashed: the adapter without TI.
* ``qualitative.png`` — per task, the same test slice segmented by the adapter without and with TI.
* ``cells.csv``, ``per_case.csv``, ``report.md`` — as in the DGST report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medadapt.benchmark import stats
from medadapt.benchmark.cell import Cell
from medadapt.benchmark.config import Dataset
from medadapt.benchmark.grid import GENERALIZATION, GridConfig, method_options, ti_options, variant_options
from medadapt.benchmark.report import (agg_csv, format_cell, class_values, aggregate, contour_grid, display_name,
                                       finish_report, finished_cells)
from medadapt.benchmark.tables import CONVERGENCE_LEGEND, MISSING, csv_text, mark_text, save_figure, write_file, convergence_mark
from medadapt.utils.tables import markdown_table

FOOTNOTE = (
    "DSC (%) after thresholding at 0.5 and the grid's post-processing. Cells: mean over seeds ± spread over seeds "
    "(sample std of the per-seed means over the test cases) and, in brackets, the spread over test cases. Avg: "
    "per seed the mean over the structures, then mean ± spread over seeds (only where every structure has a "
    "value). Bold: the best row of a group in that column and every row not distinguishable from it; "
    "underlined: the best of the rest and those not distinguishable from it (two-sided Wilcoxon signed-rank on "
    f"paired (seed, test case) differences, p < {stats.ALPHA}, no multiple-comparison correction). "
    "Generalization trains nothing (no seeds); it pairs each test case with that case under every seed.")


class Row:
    """One row of a Table 1 group: a method at a shot count, with fixed options (kernel size, TI)."""

    def __init__(self, label: str, method: str, options: dict[str, Any], all_shot: bool = False):
        self.label, self.method, self.options, self.all_shot = label, method, options, all_shot

    @property
    def key(self) -> str:
        return self.label


class FseftIndex:
    """Finished cell records of an fseft grid, looked up by (dataset, method, options, shots)."""

    def __init__(self, config: GridConfig, cells: list[Cell], records: dict[str, dict | None]):
        self.config = config
        self.records = records
        self.by_setting: dict[tuple, list[Cell]] = {}
        for cell in cells:
            self.by_setting.setdefault(self._setting(cell.dataset, cell.method, cell.options, cell.shots),
                                       []).append(cell)

    @staticmethod
    def _setting(dataset: str, method: str, options: dict, shots: int) -> tuple:
        return dataset, method, tuple(sorted(options.items())), shots

    def finished(self, ds: Dataset, row: Row, shots: int | None) -> list[dict]:
        shots = 0 if row.method == GENERALIZATION else (ds.train_cases if row.all_shot else shots)
        cells = self.by_setting.get(self._setting(ds.name, row.method, row.options, shots), [])
        return [self.records[c.cell_id] for c in cells if self.records.get(c.cell_id)]


def _rows(config: GridConfig) -> tuple[list[Row], list[Row]]:
    """(the all-shot group's rows, a k-shot group's rows)."""
    fs = config.fseft
    adapter = fs["adapter"]
    top = []
    if GENERALIZATION in fs["methods"]:
        top.append(Row("Generalization", GENERALIZATION, {}))
    top += [Row(display_name(m), m, method_options(config, m), all_shot=True) for m in fs["all_shot"]]
    few = [Row(display_name(m), m, method_options(config, m)) for m in fs["methods"] if m != GENERALIZATION]
    if fs["transductive"]:
        few.append(Row(f"{display_name(adapter)} + TI", adapter,
                       {**method_options(config, adapter), **ti_options(fs["transductive"])}))
    for v in fs.get("variants", []):  # the text's readings, longer budgets, cached features: extra rows
        (top if v["all_shot"] else few).append(Row(v["label"], v["method"], variant_options(config, v),
                                                   all_shot=v["all_shot"]))
    return top, few


def _columns(config: GridConfig) -> list[tuple[Dataset, str, str]]:
    """(dataset, class, header) per Table 1 column: a task's structure (several: one column each)."""
    cols = []
    for ds in config.datasets:
        for cls in ds.labels:
            cols.append((ds, cls, ds.name if len(ds.labels) == 1 else f"{ds.name}: {cls}"))
    return cols


def _average(per_column: list[list[dict]], classes: list[str]) -> tuple[float | None, float | None, list[int]]:
    """The Avg column: per seed, the mean over columns of that seed's mean over test cases; then the mean and
    the sample std over the seeds every column has (cells without training count for every seed)."""
    by_column = []
    for records, cls in zip(per_column, classes):
        if not records:
            return None, None, []
        seedless = records[0]["method"] == GENERALIZATION  # no training, no seeds: counts for every seed
        means = {}
        for rec in records:
            vals = [r["dsc"] for r in rec["per_case"] if r["class"] == cls and r.get("dsc") is not None]
            if vals:
                means[None if seedless else rec["seed"]] = float(np.mean(vals))
        by_column.append(means)
    seeds = sorted({s for m in by_column for s in m if s is not None})
    seeds = [s for s in seeds if all(s in m or None in m for m in by_column)] or ([None] if all(
        None in m for m in by_column) else [])
    if not seeds:
        return None, None, []
    per_seed = [float(np.mean([m.get(s, m.get(None)) for m in by_column])) for s in seeds]
    spread = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    return float(np.mean(per_seed)), spread, [s for s in seeds if s is not None]


def _fmt_avg(mean: float | None, spread: float | None, seeds: list) -> str:
    if mean is None:
        return MISSING
    return f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if len(seeds) > 1 else "")


def table1(index: FseftIndex) -> tuple[str, list[dict]]:
    config = index.config
    top, few = _rows(config)
    cols = _columns(config)
    groups: list[tuple[str, list[Row], int | None]] = []
    if top:
        groups.append(("All training cases" + (" (and no adaptation)" if top[0].method == GENERALIZATION else ""),
                       top, None))
    for k in sorted({s for ds in config.datasets for s in ds.shots}, reverse=True):
        groups.append((f"k = {k}", few, k))
    header = ["Method"] + [h for _, _, h in cols] + ["Avg"]
    lines, csv_rows = [], []
    for title, rows, k in groups:
        texts = {r.key: [] for r in rows}
        per_row_records: dict[str, list[list[dict]]] = {r.key: [] for r in rows}
        for ds, cls, _ in cols:
            if k is not None and k not in ds.shots:
                for r in rows:
                    texts[r.key].append(MISSING)
                    per_row_records[r.key].append([])
                continue
            records = {r.key: index.finished(ds, r, k) for r in rows}
            values = {n: class_values(recs, cls, "dsc") for n, recs in records.items() if recs}
            marks = stats.rank_marks(list(values), values)
            for r in rows:
                agg = aggregate(records[r.key], cls)
                text = format_cell(agg, "dsc")
                if r.method == GENERALIZATION and not config.knows(ds):
                    text = "n/a"
                texts[r.key].append(mark_text(text, marks.get(r.key, "")) + convergence_mark(records[r.key]))
                per_row_records[r.key].append(records[r.key])
                shots = 0 if r.method == GENERALIZATION else (ds.train_cases if r.all_shot else k)
                csv_rows.append({"group": "all" if k is None else k, "row": r.label, "method": r.method,
                                 "options": " ".join(f"{a}={b}" for a, b in sorted(r.options.items())),
                                 "dataset": ds.name, "class": cls, "shots": shots, **agg_csv(agg)})
        lines.append([f"**{title}**"] + [""] * (len(cols) + 1))
        for r in rows:
            avg = _average(per_row_records[r.key], [c for _, c, _ in cols])
            lines.append([r.label] + texts[r.key] + [_fmt_avg(*avg)])
            csv_rows.append({"group": "all" if k is None else k, "row": r.label, "method": r.method,
                             "options": " ".join(f"{a}={b}" for a, b in sorted(r.options.items())),
                             "dataset": "Avg", "class": "", "shots": "", "dsc_mean": avg[0] if avg[0] is not None
                             else "", "dsc_seed_std": avg[1] if avg[1] is not None else "", "seeds": avg[2]})
    unknown = [ds.name for ds in config.datasets if not config.knows(ds)]
    note = ""
    if top and top[0].method == GENERALIZATION and unknown:
        note = (f"\n\nGeneralization: n/a for {', '.join(unknown)}: the foundation's sources do not label "
                "these structures, so it has no output for them (no cell is run); Avg of that row is therefore "
                "not given.")
    return markdown_table(header, lines) + note + "\n\n" + CONVERGENCE_LEGEND, csv_rows


def paired_table(index: FseftIndex) -> tuple[str, list[dict]]:
    """The adapter against every other row of its group, and Adapter + TI against the adapter."""
    config = index.config
    top, few = _rows(config)
    adapter = config.fseft["adapter"]
    rows, csv_rows = [], []

    def compare(ds: Dataset, cls: str, group: str, k: int | None, mine: Row, theirs: Row) -> None:
        a, b = index.finished(ds, mine, k), index.finished(ds, theirs, k)
        if not a or not b:
            return
        comp = stats.paired_comparison(class_values(a, cls, "dsc"), class_values(b, cls, "dsc"))
        if comp is None:
            return
        rows.append([ds.name if len(ds.labels) == 1 else f"{ds.name}: {cls}", group,
                     f"{mine.label} − {theirs.label}",
                     f"{100 * comp.mean_difference:+.1f} [{100 * comp.ci_low:+.1f}, {100 * comp.ci_high:+.1f}]",
                     f"{comp.p_value:.2g}", str(comp.n_pairs)])
        csv_rows.append({"dataset": ds.name, "class": cls, "group": group, "method": mine.label,
                         "versus": theirs.label, "metric": "dsc", "mean_difference": comp.mean_difference,
                         "ci95_low": comp.ci_low, "ci95_high": comp.ci_high, "p_wilcoxon": comp.p_value,
                         "n_pairs": comp.n_pairs, "significant": comp.significant})

    generalization = next((r for r in top if r.method == GENERALIZATION), None)
    for ds, cls, _ in _columns(config):
        mine_all = next((r for r in top if r.method == adapter), None)
        if mine_all:
            for other in top:
                if other is not mine_all:
                    compare(ds, cls, "all", None, mine_all, other)
        mine = next((r for r in few if r.method == adapter and not any(k.startswith("ti_") for k in r.options)),
                    None)
        ti_row = next((r for r in few if any(k.startswith("ti_") for k in r.options)), None)
        for k in sorted(ds.shots, reverse=True):
            if mine is None:
                break
            if ti_row is not None:
                compare(ds, cls, f"k={k}", k, ti_row, mine)
            for other in few + ([generalization] if generalization else []):
                if other is not mine and other is not ti_row:
                    compare(ds, cls, f"k={k}", k, mine, other)
    header = ["Task", "Group", "Comparison", "Δ DSC (pp) [95% CI]", "p (Wilcoxon)", "pairs"]
    text = (f"Mean paired difference over (seed, test case) pairs in percentage points, percentile bootstrap 95% "
            f"interval ({stats.BOOTSTRAP_RESAMPLES:,} resamples), two-sided Wilcoxon signed-rank p-value.\n\n"
            + (markdown_table(header, rows) if rows else "(no finished pairs)"))
    return text, csv_rows


def _task_average(index: FseftIndex, row: Row, k: int, datasets: list[Dataset]) -> dict[str, Any]:
    """DSC of ``row`` at k averaged over ``datasets`` (those with k among their shots): per seed, then over seeds."""
    per_column, classes, used = [], [], []
    for ds in datasets:
        if k not in ds.shots:
            continue
        for cls in ds.labels:
            per_column.append(index.finished(ds, row, k))
            classes.append(cls)
            used.append(ds.name)
    mean, spread, seeds = _average(per_column, classes) if per_column else (None, None, [])
    return {"dsc_mean": mean, "dsc_seed_std": spread, "seeds": seeds, "datasets": sorted(set(used))}


def fig2a(index: FseftIndex, path: Path) -> tuple[list[dict], Path | None]:
    """DSC against k of the inductive adapter per kernel size, averaged over tasks."""
    config = index.config
    adapter = config.fseft["adapter"]
    shots = sorted({s for ds in config.datasets for s in ds.shots})
    rows = []
    for ks in config.fseft["fig2a"]["kernel_sizes"]:
        row = Row(f"kernel {ks}", adapter, method_options(config, adapter, overrides={"kernel_size": ks}))
        for k in shots:
            rows.append({"kernel_size": ks, "shots": k, **_task_average(index, row, k, config.datasets)})
    if not any(r["dsc_mean"] is not None for r in rows):
        return rows, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for ks in config.fseft["fig2a"]["kernel_sizes"]:
        mine = [r for r in rows if r["kernel_size"] == ks]
        ys = [100 * r["dsc_mean"] if r["dsc_mean"] is not None else np.nan for r in mine]
        es = [100 * r["dsc_seed_std"] if r["dsc_seed_std"] is not None else 0 for r in mine]
        label = f"spatial adapter ({ks}×{ks}×{ks})" if ks > 1 else "1×1×1 adapter (MLP)"
        ax.errorbar(range(len(shots)), ys, yerr=es, fmt="o-", capsize=3, label=label)
    ax.set_xticks(range(len(shots)), [str(k) for k in shots])
    ax.set_xlabel("k (support scans)")
    ax.set_ylabel("DSC (%), mean over tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fig. 2a: the role of spatial adapters (inductive; bars: std over seeds)", fontsize=8)
    fig.tight_layout()
    return rows, save_figure(fig, path)


def fig2b(index: FseftIndex, path: Path) -> tuple[list[dict], Path | None]:
    """DSC against the TI margin per Fig. 2b task at its k; the adapter without TI as a dashed line."""
    import matplotlib

    config = index.config
    fs = config.fseft
    adapter, k, margins = fs["adapter"], fs["fig2b"]["shots"], fs["fig2b"]["margins"]
    weights = fs["fig2b"].get("weights")  # several λ: one line each (the weight column); one: as before
    base = method_options(config, adapter)
    rows = []
    for name in fs["fig2b"]["datasets"]:
        ds = config.dataset(name)
        for cls in ds.labels:
            for weight in (weights or [None]):
                ti = fs["transductive"] if weight is None else {**fs["transductive"], "weight": weight}
                for margin in ([None] if weight in (None, (weights or [None])[0]) else []) + list(margins):
                    opts = base if margin is None else {**base, **ti_options(ti, margin)}
                    agg = aggregate(index.finished(ds, Row("", adapter, opts), k), cls)
                    rows.append({"dataset": ds.name, "class": cls, "shots": k,
                                 **({"weight": "" if margin is None else weight} if weights else {}),
                                 "margin": "" if margin is None else margin, **agg_csv(agg)})
    if not any(r["dsc_mean"] != "" for r in rows):
        return rows, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = list(dict.fromkeys((r["dataset"], r["class"]) for r in rows))
    styles = ["o-", "s:", "^-."]
    for i, (d, cls) in enumerate(series):
        color = colors[i % len(colors)]
        mine = [r for r in rows if (r["dataset"], r["class"]) == (d, cls)]
        for j, weight in enumerate(weights or [None]):
            line = [r for r in mine if weight is None or r.get("weight") == weight]
            pts = [next((r for r in line if r["margin"] == m), None) for m in margins]
            ys = [100 * r["dsc_mean"] if r and r["dsc_mean"] != "" else np.nan for r in pts]
            es = [100 * r["dsc_seed_std"] if r and r["dsc_seed_std"] != "" else 0 for r in pts]
            label = (d if d == cls else f"{d} ({cls})") + ("" if weight is None else f", λ = {weight:g}")
            ax.errorbar(np.arange(len(margins)) + 0.06 * j, ys, yerr=es, fmt=styles[j % len(styles)], color=color,
                        capsize=3, label=label)
        ref = next((r["dsc_mean"] for r in mine if r["margin"] == ""), "")
        if ref != "":
            ax.axhline(100 * ref, color=color, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(margins)), [f"{m:g}" for m in margins])
    ax.set_xlabel("margin γ")
    ax.set_ylabel("DSC (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Fig. 2b: TI margin at k={k} (bars: std over seeds); dashed: no TI", fontsize=8)
    fig.tight_layout()
    return rows, save_figure(fig, path)


def fig2b_table(rows: list[dict]) -> str:
    """Fig. 2b's values as Markdown: task (and class where it differs), λ where the grid sweeps several, γ, DSC
    (mean over seeds ± spread over seeds)."""
    weights = any("weight" in r for r in rows)
    head = ["task"] + (["λ"] if weights else []) + ["γ", "DSC (%)"]
    body = []
    for r in rows:
        task = r["dataset"] if r["dataset"] == r["class"] else f"{r['dataset']} ({r['class']})"
        dsc = MISSING if r["dsc_mean"] == "" else _fmt_avg(r["dsc_mean"], r["dsc_seed_std"] or 0.0, r["seeds"])
        no_ti = r["margin"] == ""
        body.append([task] + (["–" if no_ti else f"{r['weight']:g}"] if weights else [])
                    + ["no TI" if no_ti else f"{r['margin']:g}", dsc])
    return markdown_table(head, body)


def qualitative_figure(index: FseftIndex, paths, path: Path) -> Path | None:
    """Rows: tasks (largest k, first seed); columns: the adapter without and with TI, on the same slice."""
    config = index.config
    _, few = _rows(config)
    shown = [r for r in few if r.method == config.fseft["adapter"]]  # inductive and + TI
    panels = []
    for ds in config.datasets:
        k = max(ds.shots)
        row = []
        for r in shown:
            recs = [x for x in index.finished(ds, r, k) if x["seed"] == config.seeds[0]]
            row.append((r.label, recs[0] if recs else None))
        panels.append((f"{ds.name}\n{k}-shot", row))

    def score(rec: dict, case: str) -> float | None:
        dsc = [x["dsc"] for x in rec["per_case"] if x["case"] == case and x.get("dsc") is not None]
        return float(np.mean(dsc)) if dsc else None

    return contour_grid(panels, paths, path, score, "Without and with TI", width=2.6, title_size=9)


def write_report(config: GridConfig, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build the FSEFT tables and figures of ``config`` from the cells stored in ``workdir``."""
    paths, cells, records, done = finished_cells(config, workdir)
    index = FseftIndex(config, cells, records)
    out = Path(paths.workdir) / "report"
    files: dict[str, Path] = {}
    seeds = ", ".join(map(str, config.seeds))
    sections = [f"# FSEFT benchmark report: grid `{config.name}`\n",
                f"{len(done)} of {len(cells)} cells finished. Config: `{config.cli_argument}`. Seeds: {seeds}. Head "
                f"policy: {config.head}{''.join(f', {m}: {h}' for m, h in config.heads.items())}. "
                f"Post-processing: {config.postprocess}. Recipe: "
                f"{config.recipe['name'] if config.recipe else 'the foundation’s'}.\n"]
    t1_md, t1_csv = table1(index)
    files["table1.md"] = write_file(out / "table1.md", t1_md + "\n\n" + FOOTNOTE + "\n")
    files["table1.csv"] = write_file(out / "table1.csv", csv_text(t1_csv))
    sections += ["## Table 1: few-shot efficient fine-tuning (DSC %)\n", t1_md, "\n" + FOOTNOTE]
    p_md, p_csv = paired_table(index)
    files["paired.md"] = write_file(out / "paired.md", p_md + "\n")
    files["paired.csv"] = write_file(out / "paired.csv", csv_text(p_csv))
    sections += [f"\n## Paired comparisons: {display_name(config.fseft['adapter'])} against the others\n", p_md]
    if config.fseft["fig2a"]:
        rows, png = fig2a(index, out / "fig2a.png")
        files["fig2a.csv"] = write_file(out / "fig2a.csv", csv_text(rows))
        sections.append("\n## Fig. 2a: spatial adapter vs 1×1×1 adapter (inductive)\n")
        sections.append(markdown_table(["kernel", "k", "DSC (%) over tasks", "tasks"],
                                       [[r["kernel_size"], r["shots"], _fmt_avg(r["dsc_mean"], r["dsc_seed_std"],
                                                                                r["seeds"]), ", ".join(r["datasets"])]
                                        for r in rows]))
        if png:
            files["fig2a.png"] = png
            sections.append("\n![fig2a](fig2a.png)")
    if config.fseft["fig2b"]:
        rows, png = fig2b(index, out / "fig2b.png")
        files["fig2b.csv"] = write_file(out / "fig2b.csv", csv_text(rows))
        sections.append(f"\n## Fig. 2b: TI margin γ at k={config.fseft['fig2b']['shots']}\n")
        sections.append(fig2b_table(rows))
        if png:
            files["fig2b.png"] = png
            sections.append("\n![fig2b](fig2b.png)")
    qual = qualitative_figure(index, paths, out / "qualitative.png")
    if qual:
        files["qualitative.png"] = qual
        sections.append("\n## Qualitative: without and with transductive inference\n\n![qualitative](qualitative.png)")
    return finish_report(out, cells, records, sections, files, t1_md, progress)
