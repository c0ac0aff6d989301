"""Tables and figures of a MedSeqFT grid (Ye et al., Sec. IV-V), built from the stored cells alone.

Writes to ``<workdir>/report/``:

* ``table2.md/.csv`` — Table II: the parallel rows (TFS, FFT, head fine-tuning, LoRA, adapters), joint multi-task
  training and MedSeqFT × the stream's tasks, Dice (%) and HD95 (mm) per task and their average;
* ``table3.md/.csv`` — Table III: FFT, Seq. FT, + Random, + MDS, + K&G RFT and MedSeqFT with the paper's
  check-mark columns;
* ``table6.md/.csv`` — Table VI: on each unseen task, TFS, FFT from M_0 and FFT from the refined M_n, per class
  (a multi-class task also gets its class mean);
* ``table7.md/.csv`` — Table VII: training seconds per stage (FFT over the whole stream; each sequential row's
  first-task fine-tuning, its (KD-based) FFT on tasks 2..n, LoRA-based KD, buffer selection after tasks
  1..n-1), their sum and its ratio to FFT;
* ``fig4.png/.csv`` — Fig. 4: each encoder layer's mean |Δθ| from M_0 to M_n, per sequential row (mean over seeds);
* ``transfer.md/.csv`` — forgetting (each earlier task's Dice after the whole stream minus just after its own
  training, and BWT, their mean) and forward transfer (a sequential row's Dice on a task minus FFT's);
* ``paired.md/.csv`` — MedSeqFT against every other row over (seed, task, test case) pairs, and on the unseen
  tasks FFT from M_n against FFT from M_0 and TFS over (seed, test case): mean paired difference, bootstrap 95%
  interval, Wilcoxon p (:func:`medadapt.benchmark.stats.paired_comparison`);
* ``cells.csv`` (one row per cell and task), ``per_case.csv`` (per cell, task, test case and class) and
  ``report.md`` (everything, with the cells still missing).

Numbers: a test case's score on a task is the mean over the task's classes of its per-class value (HD95 over
the classes where it is defined); a task's score in one seed is the mean over its test cases; a table entry is
the mean over seeds ± the spread over seeds (sample std of the per-seed scores; no spread with one seed). The
average over tasks is taken per seed, then mean ± spread. Bold: a column's best row and every row the paired
test does not separate from it (two-sided Wilcoxon on (seed, test case) pairs, p < 0.05; the average column
pairs (seed, task, test case)); underlined: the best of the rest and the rows not separated from it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medadapt.benchmark import stats
from medadapt.benchmark.stats import mean_spread, per_seed_means
from medadapt.benchmark.cell import Cell
from medadapt.benchmark.medseqft import (ABLATION_MARKS, DISPLAY, MedseqftConfig, Row, display_name, enumerate_cells,
                                         grid_paths)
from medadapt.benchmark.tables import (CONVERGENCE_LEGEND, MISSING, csv_text, mark_text, save_figure, write_file, finish_report,
                                       record_levelled_off, stored_cells)
from medadapt.utils.tables import markdown_table

#: a row name with this suffix is the view of a K&G RFT row's refined models M_t (the merged encoder with
#: M_{t-mid}'s decoder and head) instead of its task models M_{t-mid}
REFINED = "@refined"
REFINED_LEGEND = ("refined M_t: the same cells' models after the LoRA-based KD and merge (the merged encoder with "
                  "the task model's decoder and head), the model the stream carries on; the row above it scores "
                  "the task model M_{t-mid}, as the paper's Table III implies (docs/methods.md, MedSeqFT). ‡: the "
                  "LoRA-based KD of at least one of the value's cells stopped at its ceiling without L_refine "
                  "having levelled off.")
METRICS = (("dsc", "Dice", True), ("hd95", "HD95", False))   # (per-case column, header, higher is better)
FOOTNOTE = (
    "Dice (%) and HD95 (mm): a test case's value is the mean over the task's classes (HD95 over the classes where "
    "it is defined); a task's value in one seed is the mean over its test cases; entries are the mean over seeds "
    "± the spread over seeds (sample std; no spread with one seed). Average: per seed the mean over the tasks, "
    "then mean ± spread. Bold: the column's best row and every row not distinguishable from it; underlined: the "
    "best of the rest and the rows not distinguishable from that one. Distinguishable: two-sided Wilcoxon "
    f"signed-rank test on paired (seed, test case) differences (average: (seed, task, test case)), p < "
    f"{stats.ALPHA}, no multiple-comparison correction; pairs share test cases across seeds, so the test is a "
    "screen, not a proof. HD95: lower is better.")


# ---------------------------------------------------------------------------------------------- values

def case_scores(rows: list[dict], metric: str, classes: list[str] | None = None) -> dict[str, float]:
    """``{case: value}``: per test case, the mean of ``metric`` over its classes (``classes``: only those) where
    defined; NaN where no class has a value."""
    by_case: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if classes is not None and r["class"] not in classes:
            continue
        by_case.setdefault(str(r["case"]), [])
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_case[str(r["case"])].append(float(v))
    return {c: (float(np.mean(v)) if v else math.nan) for c, v in by_case.items()}


def _scale(metric: str) -> float:
    return 100.0 if metric in ("dsc", "nsd") else 1.0


class Index:
    """The finished records of a grid, by stream row and by (unseen task, unseen row)."""

    def __init__(self, config: MedseqftConfig, cells: list[Cell], records: dict[str, dict | None]):
        self.config = config
        self.stream: dict[str, list[dict]] = defaultdict(list)
        self.unseen: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for cell in cells:
            rec = records.get(cell.cell_id)
            if rec is None:
                continue
            if cell.kind == "stream":
                self.stream[cell.row].append(rec)
            else:
                self.unseen[(cell.task, cell.row)].append(rec)

    def entries(self, row: str, task: str) -> list[tuple[int, dict]]:
        """(seed, task entry) of a stream row's finished cells on one task (a refined view: its base row's)."""
        out = []
        for rec in self.stream.get(row.removesuffix(REFINED), []):
            entry = next((t for t in rec["tasks"] if t["task"] == task), None)
            if entry is not None:
                out.append((rec["seed"], entry))
        return out

    def task_values(self, row: str, task: str, metric: str) -> dict[tuple[int, str], float]:
        """``{(seed, case): value}`` of a stream row on one task (scaled: Dice in %); a refined view
        (:data:`REFINED`) scores the refined models."""
        key = "refined_per_case" if row.endswith(REFINED) else "per_case"
        out = {}
        for seed, entry in self.entries(row, task):
            for case, v in case_scores(entry.get(key) or [], metric).items():
                out[(seed, case)] = v * _scale(metric)
        return out

    def mark(self, row: str, task: str | None) -> str:
        """`` †`` when the training of some cell of ``row`` on ``task`` (None: any task) had not levelled off
        (medadapt.engine.convergence, from the stored curve and schedule); on a refined view `` ‡`` when some
        LoRA-based KD stopped at its ceiling without L_refine levelling off."""
        tasks = [t.name for t in self.config.tasks] if task is None else [task]
        entries = [e for t in tasks for _, e in self.entries(row, t)]
        if row.endswith(REFINED):
            return " ‡" if any((e.get("refinement") or {}).get("levelled_off") is False for e in entries) else ""
        verdicts = [record_levelled_off(e) for e in entries if e.get("loss_curve")]
        return " †" if any(v is False for v in verdicts) else ""

    def stream_values(self, row: str, metric: str) -> dict[tuple[int, str], float]:
        """``{(seed, "task/case"): value}`` of a stream row over every task."""
        return {(seed, f"{t.name}/{case}"): v for t in self.config.tasks
                for (seed, case), v in self.task_values(row, t.name, metric).items()}

    def unseen_values(self, task: str, row: str, metric: str, classes: list[str] | None = None) -> dict:
        out = {}
        for rec in self.unseen.get((task, row), []):
            for case, v in case_scores(rec["per_case"], metric, classes).items():
                out[(rec["seed"], case)] = v * _scale(metric)
        return out

    def cells_of(self, row: str) -> list[str]:
        return [r["id"] for r in self.stream.get(row.removesuffix(REFINED), [])]


def task_average(index: Index, row: str, metric: str) -> dict[int, float]:
    """Per seed, the mean over the stream's tasks of that seed's task means (seeds with every task only)."""
    per_task = [per_seed_means(index.task_values(row, t.name, metric)) for t in index.config.tasks]
    seeds = set.intersection(*(set(p) for p in per_task)) if per_task else set()
    return {s: float(np.mean([p[s] for p in per_task])) for s in sorted(seeds)}


UNDEFINED = "undefined"  # finished cells, but the metric exists for none of their test cases (HD95: an empty mask)


def _fmt(mean: float | None, spread: float | None, n: int, digits: int = 1, values: dict | None = None) -> str:
    if mean is None:
        return UNDEFINED if values else MISSING
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if n > 1 else "")


def _marks(means: dict[str, float | None], values: dict[str, dict], higher: bool) -> dict[str, str]:
    """Bold / underline for one column, ranked by the shown means, grouped by the paired test."""
    sign = -1.0 if higher else 1.0
    remaining = sorted((n for n, m in means.items() if m is not None), key=lambda n: sign * means[n])
    marks = {n: "" for n in means}

    def tied(a: str, b: str) -> bool:
        comp = stats.paired_comparison(values[a], values[b])
        return a == b or comp is None or not comp.significant

    for mark in ("bold", "underline"):
        if not remaining:
            break
        group = [n for n in remaining if tied(remaining[0], n)]
        for n in group:
            marks[n] = mark
        remaining = [n for n in remaining if n not in group]
    return marks


# ---------------------------------------------------------------------------------------------- tables II, III

def stream_table(index: Index, rows: list[Row], table: str, prefix_columns: dict[str, list[str]] | None = None
                 ) -> tuple[str, list[dict]]:
    """Rows × (each task's Dice and HD95, then their averages), marked per column."""
    tasks = [t.name for t in index.config.tasks]
    names = [r.name for r in rows]
    columns: list[list[str]] = []
    csv_rows: list[dict] = []
    for task in tasks + [None]:
        for metric, _, higher in METRICS:
            if task is None:
                per_seed = {n: task_average(index, n, metric) for n in names}
                values = {n: index.stream_values(n, metric) for n in names}
            else:
                values = {n: index.task_values(n, task, metric) for n in names}
                per_seed = {n: per_seed_means(values[n]) for n in names}
            summary = {n: mean_spread(per_seed[n]) for n in names}
            marks = _marks({n: summary[n][0] for n in names}, values, higher)
            converged = {n: index.mark(n, task) for n in names}
            columns.append([mark_text(_fmt(*summary[n], values=values[n]), marks[n]) + converged[n] for n in names])
            for n, row in zip(names, rows):
                mean, spread, k = summary[n]
                undefined = sum(1 for v in values[n].values() if math.isnan(v))
                csv_rows.append({"table": table, "row": n, "method": row.display, "task": task or "average",
                                 "metric": metric, "mean": mean, "seed_std": spread, "n_seeds": k,
                                 "n_values": len(values[n]) - undefined, "n_undefined": undefined,
                                 "mark": marks[n], "cells": index.cells_of(n),
                                 "levelled_off": not converged[n]})
    prefix_columns = prefix_columns or {}
    header = ["Method", *prefix_columns, *[f"{t} {h}" for t in tasks for _, h, _ in METRICS],
              "Average Dice ↑", "Average HD95 ↓"]
    body = [[row.display, *[prefix_columns[c][i] for c in prefix_columns], *[col[i] for col in columns]]
            for i, row in enumerate(rows)]
    return markdown_table(header, body), csv_rows


def refined_view(row: Row) -> Row:
    """The view of a K&G RFT row's refined models M_t, as a row of its own."""
    return Row(row.name + REFINED, row.kind, row.method, row.options, row.buffer, row.retention,
               display=f"{row.display} (refined M_t)")


def with_refined(rows: list[Row]) -> list[Row]:
    """``rows``, each row with a LoRA-based KD followed by its refined view."""
    return [v for r in rows for v in ([r, refined_view(r)] if r.retention == "lora-kd" else [r])]


def table2_rows(config: MedseqftConfig) -> list[Row]:
    """Table II: the parallel rows, joint training, and MedSeqFT with its refined M_t (the ablations are Table
    III's)."""
    return with_refined([r for r in config.rows if r.kind in ("parallel", "joint") or r.name == "medseqft"])


def table3_rows(config: MedseqftConfig) -> list[Row]:
    return with_refined([r for r in config.rows if r.name in ABLATION_MARKS])


def table3(index: Index) -> tuple[str, list[dict]]:
    rows = table3_rows(index.config)
    marks = {h: ["✓" if ABLATION_MARKS[r.name.removesuffix(REFINED)][i] else "" for r in rows]
             for i, h in enumerate(("FFT", "Seq. FT", "MDS", "Random", "K&G RFT"))}
    md, csv_rows = stream_table(index, rows, "table3", marks)
    by_name = {r.name: r for r in rows}
    for c in csv_rows:
        c.update({h: bool(ABLATION_MARKS[by_name[c["row"]].name.removesuffix(REFINED)][i])
                  for i, h in enumerate(("fft", "seq_ft", "mds", "random", "kg_rft"))})
    return md, csv_rows


# ---------------------------------------------------------------------------------------------- table VI

def unseen_row_name(config: MedseqftConfig, row: str) -> str:
    return DISPLAY[row].format(refined=display_name(config.refined_by)) if row == "fft-mn" else DISPLAY[row]


def table6(index: Index) -> tuple[str, list[dict]]:
    config = index.config
    parts, csv_rows = [], []
    for task in config.unseen:
        groups = [([c], c) for c in task.labels] + ([(list(task.labels), "mean")] if len(task.labels) > 1 else [])
        columns, header = [], ["Method"]
        # † where some cell of the row had not levelled off (its fine-tuning's stored curve and schedule)
        dagger = {r: " †" if any(record_levelled_off(x) is False for x in index.unseen.get((task.name, r), [])
                                 if x.get("loss_curve")) else "" for r in config.unseen_rows}
        for classes, label in groups:
            for metric, h, higher in METRICS:
                values = {r: index.unseen_values(task.name, r, metric, classes) for r in config.unseen_rows}
                summary = {r: mean_spread(per_seed_means(v)) for r, v in values.items()}
                marks = _marks({r: s[0] for r, s in summary.items()}, values, higher)
                columns.append([mark_text(_fmt(*summary[r], values=values[r]), marks[r]) + dagger[r]
                                for r in config.unseen_rows])
                header.append(f"{label} {h}")
                for r in config.unseen_rows:
                    mean, spread, k = summary[r]
                    csv_rows.append({"task": task.name, "class": label, "row": r,
                                     "method": unseen_row_name(config, r), "metric": metric, "mean": mean,
                                     "seed_std": spread, "n_seeds": k, "mark": marks[r],
                                     "cells": [x["id"] for x in index.unseen.get((task.name, r), [])],
                                     "levelled_off": not dagger[r]})
        body = [[unseen_row_name(config, r)] + [col[i] for col in columns] for i, r in enumerate(config.unseen_rows)]
        parts.append(f"**{task.name}** ({', '.join(task.labels)})\n\n" + markdown_table(header, body))
    return "\n\n".join(parts), csv_rows


# ---------------------------------------------------------------------------------------------- table VII

STAGES = (("first", "First-task FFT"), ("later", "(KD-based) FFT, tasks 2–n"), ("lora_kd", "LoRA-based KD"),
          ("buffer", "Buffer selection (MDS / random)"))


def stage_seconds(record: dict, kind: str) -> dict[str, float]:
    """One stream cell's training seconds by stage (``total``: their sum)."""
    tasks = record["tasks"]
    if kind == "parallel":
        return {"total": sum(t["seconds"]["finetune"] or 0.0 for t in tasks)}
    if kind == "joint":
        return {"total": float(tasks[0]["seconds"]["joint"] or 0.0)}
    out = {"first": tasks[0]["seconds"].get("stage1") or 0.0,
           "later": sum(t["seconds"].get("stage1") or 0.0 for t in tasks[1:])}
    for key, stage in (("lora_kd", "stage2"), ("buffer", "buffer")):  # only the stages the row has
        if any(stage in t["seconds"] for t in tasks):
            out[key] = sum(t["seconds"].get(stage) or 0.0 for t in tasks)
    out["total"] = sum(out.values())
    if "buffer" in out:  # the buffer's cost per task (MDS: R maskings of every training case)
        out["buffer_per_task"] = out["buffer"] / max(1, sum("buffer" in t["seconds"] for t in tasks))
    return out


def table7(index: Index) -> tuple[str, list[dict], dict[str, Any]]:
    config = index.config
    rows = [r for r in config.rows if r.name == "full" or r.kind in ("joint", "sequential")]
    fft = {rec["seed"]: stage_seconds(rec, "parallel")["total"] for rec in index.stream.get("full", [])}
    body, csv_rows, ratios = [], [], {}
    for row in rows:
        per_seed = {rec["seed"]: stage_seconds(rec, row.kind) for rec in index.stream.get(row.name, [])}
        line = [row.display]
        entry: dict[str, Any] = {"row": row.name, "method": row.display, "n_seeds": len(per_seed)}
        for key, _ in STAGES:
            vals = {s: v[key] for s, v in per_seed.items() if key in v}
            mean, spread, k = mean_spread(vals)
            line.append(_fmt(mean, spread, k))
            entry.update({f"{key}_seconds": mean, f"{key}_seed_std": spread})
        per_task = mean_spread({s: v["buffer_per_task"] for s, v in per_seed.items() if "buffer_per_task" in v})
        line.append(_fmt(*per_task))
        entry.update({"buffer_per_task_seconds": per_task[0], "buffer_per_task_seed_std": per_task[1]})
        mean, spread, k = mean_spread({s: v["total"] for s, v in per_seed.items()})
        ratio = mean_spread({s: v["total"] / fft[s] for s, v in per_seed.items() if fft.get(s)})
        # the paper's Table VII counts FFT, KD-based FFT and LoRA-based KD: the same ratio without the buffer
        paper = mean_spread({s: (v["total"] - v.get("buffer", 0.0)) / fft[s] for s, v in per_seed.items()
                             if fft.get(s)})
        ratios[row.name] = (ratio[0], paper[0])  # (with, without buffer selection)
        line += [_fmt(mean, spread, k), _fmt(*ratio, 2), _fmt(*paper, 2)]
        entry.update({"total_seconds": mean, "total_seed_std": spread, "ratio_to_fft": ratio[0],
                      "ratio_seed_std": ratio[1], "ratio_to_fft_paper_stages": paper[0],
                      "ratio_paper_stages_seed_std": paper[1], "cells": index.cells_of(row.name)})
        body.append(line)
        csv_rows.append(entry)
    header = ["Method", *[h + " (s)" for _, h in STAGES], "Buffer selection per task (s)", "Sum (s)", "× FFT",
              "× FFT without buffer selection"]
    return markdown_table(header, body), csv_rows, ratios


# ---------------------------------------------------------------------------------------------- Fig. 4

def fig4(index: Index, path: Path) -> tuple[list[dict], Path | None]:
    """Per sequential row, each encoder layer's mean |Δθ| (M_0 -> M_n), mean over seeds: CSV rows and PNG."""
    rows, series = [], []
    for row in (r for r in index.config.rows if r.kind == "sequential"):
        recs = [r for r in index.stream.get(row.name, []) if r.get("encoder_change")]
        if not recs:
            continue
        layers = [name for name, _ in recs[0]["encoder_change"]]
        values = np.asarray([[v for _, v in r["encoder_change"]] for r in recs], dtype=np.float64)
        mean = values.mean(axis=0)
        spread = values.std(axis=0, ddof=1) if len(recs) > 1 else np.zeros_like(mean)
        for i, layer in enumerate(layers):
            rows.append({"row": row.name, "method": row.display, "index": i + 1, "layer": layer,
                         "mean_abs_change": float(mean[i]), "seed_std": float(spread[i]), "n_seeds": len(recs)})
        series.append((row, mean, spread, len(recs)))
    if not series:
        return rows, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series[0][1])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 2.5), 3.6))
    for row, mean, spread, k in series:
        x = np.arange(1, len(mean) + 1)
        ax.errorbar(x, mean, yerr=spread if k > 1 else None, marker="o", ms=3, capsize=2,
                    linewidth=2.0 if row.name == "medseqft" else 1.0, label=row.display)
    ax.set_xlabel("encoder layer n (input to bottleneck)")
    ax.set_ylabel("mean |Δθ|, M0 → Mn")
    ax.set_title("Encoder parameter change after the stream (mean over seeds; bars: spread over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return rows, save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- transfer

def transfer(index: Index) -> tuple[str, list[dict]]:
    config = index.config
    seq = [r for r in config.rows if r.kind == "sequential"]
    earlier = [t.name for t in config.tasks[:-1]]
    csv_rows, body = [], []
    for row in seq:
        recs = [r for r in index.stream.get(row.name, []) if r.get("transfer")]
        line = [row.display]
        for j, task in enumerate(earlier):
            vals = {r["seed"]: r["transfer"]["tasks"][j]["change"] for r in recs
                    if r["transfer"]["tasks"][j]["change"] is not None}
            summary = mean_spread(vals)
            line.append(_fmt(*summary))
            csv_rows.append({"kind": "forgetting", "row": row.name, "method": row.display, "task": task,
                             "mean": summary[0], "seed_std": summary[1], "n_seeds": summary[2]})
        bwt = mean_spread({r["seed"]: r["transfer"]["bwt"] for r in recs if r["transfer"]["bwt"] is not None})
        line.append(_fmt(*bwt))
        csv_rows.append({"kind": "bwt", "row": row.name, "method": row.display, "task": "mean",
                         "mean": bwt[0], "seed_std": bwt[1], "n_seeds": bwt[2]})
        body.append(line)
    forgetting = markdown_table(["Method", *[f"{t} Δ Dice" for t in earlier], "BWT"], body)
    tasks = [t.name for t in config.tasks]
    body = []
    for row in with_refined(seq):
        line = [row.display]
        per_task = []
        for task in tasks:
            mine = per_seed_means(index.task_values(row.name, task, "dsc"))
            ref = per_seed_means(index.task_values("full", task, "dsc"))
            diff = {s: mine[s] - ref[s] for s in mine if s in ref}
            per_task.append(diff)
            summary = mean_spread(diff)
            line.append(_fmt(*summary))
            csv_rows.append({"kind": "forward", "row": row.name, "method": row.display, "task": task,
                             "mean": summary[0], "seed_std": summary[1], "n_seeds": summary[2]})
        seeds = set.intersection(*(set(d) for d in per_task)) if per_task else set()
        avg = mean_spread({s: float(np.mean([d[s] for d in per_task])) for s in seeds})
        line.append(_fmt(*avg))
        csv_rows.append({"kind": "forward", "row": row.name, "method": row.display, "task": "average",
                         "mean": avg[0], "seed_std": avg[1], "n_seeds": avg[2]})
        body.append(line)
    forward = markdown_table(["Method", *tasks, "Average"], body)
    md = ("### Forgetting\n\nEach earlier task's Dice (points) with its own decoder and head on the encoder the "
          "stream ends with, minus its Dice right after its own training; BWT: their mean (negative: "
          "forgetting). Mean over seeds ± spread.\n\n" + forgetting +
          "\n\n### Forward transfer\n\nA sequential row's Dice on each task minus FFT's (parallel fine-tuning "
          "from M0, same seed), in points; mean over seeds ± spread.\n\n" + forward)
    return md, csv_rows


# ---------------------------------------------------------------------------------------------- L_refine

def refinement(index: Index, path: Path) -> tuple[str, list[dict], Path | None]:
    """The LoRA-based KD of every K&G RFT row, per task: the epochs (and iterations) it took against its
    ceiling, how many seeds' L_refine levelled off (and how many stopped early because it had), the final
    L_refine; and the curves (PNG: one panel per row, a line per task and seed)."""
    config = index.config
    rows = [r for r in config.rows if r.retention == "lora-kd"]
    body, csv_rows, series = [], [], []
    for row in rows:
        curves = []
        for task in config.tasks:
            kd = [(seed, e["refinement"]) for seed, e in index.entries(row.name, task.name) if e.get("refinement")]
            if not kd:
                continue
            epochs = mean_spread({s: float(k["epochs"]) for s, k in kd})
            its = mean_spread({s: float(k["iterations"]) for s, k in kd})
            final = mean_spread({s: float(k["curve"][-1]) for s, k in kd if k["curve"]})
            levelled = sum(k["levelled_off"] is True for _, k in kd)
            early = sum(k.get("stopped_at") is not None for _, k in kd)
            ceiling = sorted({k["ceiling_epochs"] for _, k in kd})
            body.append([row.display, task.name, _fmt(*epochs), _fmt(*its, digits=0),
                         "/".join(map(str, ceiling)), f"{levelled} / {len(kd)}", f"{early} / {len(kd)}",
                         _fmt(*final, digits=4)])
            csv_rows.append({"row": row.name, "method": row.display, "task": task.name, "epochs": epochs[0],
                             "epochs_seed_std": epochs[1], "iterations": its[0], "ceiling_epochs": ceiling,
                             "levelled_off": levelled, "stopped_early": early, "n_seeds": len(kd),
                             "final_l_refine": final[0], "cells": index.cells_of(row.name)})
            curves += [(task.name, s, k["curve"]) for s, k in kd]
        if curves:
            series.append((row, curves))
    md = markdown_table(["Method", "Task", "Epochs", "Iterations", "Ceiling (epochs)", "Levelled off",
                         "Stopped early", "Final L_refine"], body) if body else "No K&G RFT cell has finished."
    if not series:
        return md, csv_rows, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    colours = {t.name: f"C{i}" for i, t in enumerate(config.tasks)}
    for ax, (row, curves) in zip(axes[0], series):
        for task, seed, curve in curves:
            ax.plot(np.arange(1, len(curve) + 1), curve, color=colours[task], alpha=0.8,
                    linestyle="-" if seed == min(s for _, s, _ in curves) else "--",
                    label=task if seed == min(s for _, s, _ in curves) else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch of the LoRA-based KD")
        ax.set_ylabel("L_refine (encoder feature MSE)")
        ax.set_title(row.display, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return md, csv_rows, save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- MDS

def mds_buffers(index: Index) -> tuple[str, list[dict]]:
    """Where each MDS buffer settled: per MDS row, task and seed, the smallest r from which the buffer of the
    first r maskings equals every later one up to the run's R (none: it changed at R itself, so R was too
    small to tell), and how many of the 4 cases the buffer at R/4 and R/2 shares with R's, with the Spearman
    correlation of the ranking at R/2 with R's."""
    config = index.config
    body, csv_rows = [], []
    for row in (r for r in config.rows if r.buffer == "mds"):
        for task in config.tasks:
            found = [(seed, e["mds"]) for seed, e in index.entries(row.name, task.name) if e.get("mds")]
            if not found:
                continue
            for seed, m in sorted(found, key=lambda x: x[0]):
                by_r = {s["repeats"]: s for s in m["stability"]}
                quarter, half = by_r.get(m["repeats"] // 4), by_r.get(m["repeats"] // 2)
                settled = m.get("settled_repeats")
                body.append([row.display, task.name, str(seed), str(m["repeats"]),
                             "not within R" if settled is None else str(settled),
                             "–" if quarter is None else f"{quarter['shared_with_final']} / {len(m['picked'])}",
                             "–" if half is None else f"{half['shared_with_final']} / {len(m['picked'])}",
                             "–" if half is None or half["spearman_with_final"] is None
                             else f"{half['spearman_with_final']:.2f}"])
                csv_rows.append({"row": row.name, "method": row.display, "task": task.name, "seed": seed,
                                 "repeats": m["repeats"], "settled_repeats": settled,
                                 "shared_at_quarter": None if quarter is None else quarter["shared_with_final"],
                                 "shared_at_half": None if half is None else half["shared_with_final"],
                                 "spearman_at_half": None if half is None else half["spearman_with_final"],
                                 "buffer": m["picked"]})
    if not body:
        return "No MDS cell has finished.", csv_rows
    return markdown_table(["Method", "Task", "Seed", "R", "Buffer settled at r", "Shared with R's buffer at R/4",
                           "at R/2", "Spearman with R's ranking at R/2"], body), csv_rows


# ---------------------------------------------------------------------------------------------- paired

def headline(config: MedseqftConfig) -> Row:
    """The row every other is compared with: MedSeqFT, else the grid's last row."""
    return next((r for r in config.rows if r.name == "medseqft"), config.rows[-1])


def paired(index: Index) -> tuple[str, list[dict]]:
    config = index.config
    top = headline(config)
    body, csv_rows = [], []
    for row in (r for r in with_refined(config.rows) if r.name != top.name):
        line = [row.display]
        for metric, h, _ in METRICS:
            comp = stats.paired_comparison(index.stream_values(top.name, metric), index.stream_values(row.name, metric))
            line += _paired_cells(comp)
            csv_rows.append({"comparison": "stream", "a": top.name, "b": row.name, "task": "all", "metric": metric,
                             **_paired_csv(comp)})
        body.append(line)
    header = ["Against", "Δ Dice (points)", "95% CI", "p", "pairs", "Δ HD95 (mm)", "95% CI", "p", "pairs"]
    md = (f"{top.display} minus each other row over (seed, task, test case) pairs (Dice: positive = "
          f"{top.display} better; HD95: negative = {top.display} better).\n\n" + markdown_table(header, body))
    if "fft-mn" in config.unseen_rows:
        body = []
        for task in config.unseen:
            for other in (r for r in config.unseen_rows if r != "fft-mn"):
                line = [task.name, unseen_row_name(config, other)]
                for metric, _, _ in METRICS:
                    comp = stats.paired_comparison(index.unseen_values(task.name, "fft-mn", metric),
                                                   index.unseen_values(task.name, other, metric))
                    line += _paired_cells(comp)
                    csv_rows.append({"comparison": "unseen", "a": "fft-mn", "b": other, "task": task.name,
                                     "metric": metric, **_paired_csv(comp)})
                body.append(line)
        md += (f"\n\nUnseen tasks: {unseen_row_name(config, 'fft-mn')} minus each other Table VI row over (seed, "
               "test case) pairs (a case's value: the mean over the task's classes).\n\n"
               + markdown_table(["Task", "Against", *header[1:]], body))
    return md, csv_rows


def _paired_cells(comp) -> list[str]:
    if comp is None:
        return [MISSING] * 4
    return [f"{comp.mean_difference:+.2f}", f"[{comp.ci_low:+.2f}, {comp.ci_high:+.2f}]", f"{comp.p_value:.3g}",
            str(comp.n_pairs)]


def _paired_csv(comp) -> dict[str, Any]:
    if comp is None:
        return {"mean_difference": None, "ci_low": None, "ci_high": None, "p_value": None, "n_pairs": 0}
    return {"mean_difference": comp.mean_difference, "ci_low": comp.ci_low, "ci_high": comp.ci_high,
            "p_value": comp.p_value, "n_pairs": comp.n_pairs}


# ---------------------------------------------------------------------------------------------- the report

def finished_cells(config: MedseqftConfig, workdir: str | Path):
    return stored_cells(config, workdir, grid_paths, enumerate_cells)


def _cell_rows(cell: Cell, rec: dict) -> tuple[list[dict], list[dict]]:
    """The ``cells.csv`` and ``per_case.csv`` rows of one finished cell: a row per task."""
    summary, per_case = [], []
    entries = rec["tasks"] if cell.kind == "stream" else [{"task": cell.task, **rec}]
    for t in entries:
        fm = t["metrics"]["foreground_mean"]
        summary.append({"cell": cell.cell_id, "kind": cell.kind, "row": cell.row, "seed": cell.seed,
                        "task": t["task"], "dsc": None if fm.get("dsc") is None else 100 * fm["dsc"],
                        "hd95": fm.get("hd95"),
                        "seconds": " ".join(f"{k}={v:.1f}" for k, v in (t.get("seconds") or {}).items()
                                            if v is not None),
                        "cell_seconds": rec["cell_seconds"], "executor": rec["executor"]["kind"],
                        "host": rec["executor"]["host"]})
        per_case += [{"cell": cell.cell_id, "task": t["task"], **r} for r in t["per_case"]]
    return summary, per_case


def write_report(config: MedseqftConfig, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build every table and figure of a MedSeqFT grid from the cells stored in ``workdir``."""
    paths, cells, records = finished_cells(config, workdir)
    index = Index(config, cells, records)
    out = Path(paths.workdir) / "report"
    files: dict[str, Path] = {}
    sections = _header(config, sum(1 for r in records.values() if r), len(cells))

    def table(name: str, title: str, md: str, rows: list, legend: str = "") -> None:
        """A table's md (with its legend and the footnote) and csv files, and its report section."""
        md = md + legend
        files[f"{name}.md"] = write_file(out / f"{name}.md", md + "\n\n" + FOOTNOTE + "\n")
        files[f"{name}.csv"] = write_file(out / f"{name}.csv", csv_text(rows))
        sections.extend([f"{title} ([md]({name}.md), [csv]({name}.csv))\n", md])

    def noted(name: str, title: str, note: str, md: str, rows: list) -> None:
        """A section whose md file is its note and its table (no footnote)."""
        files[f"{name}.md"] = write_file(out / f"{name}.md", note + "\n\n" + md + "\n")
        files[f"{name}.csv"] = write_file(out / f"{name}.csv", csv_text(rows))
        sections.extend([f"{title} ([md]({name}.md), [csv]({name}.csv))\n", note, "", md])

    t2_md, t2_csv = stream_table(index, table2_rows(config), "table2")
    table("table2", "## Table II: fine-tuning strategies on the stream's tasks", t2_md, t2_csv,
          "\n\n" + CONVERGENCE_LEGEND + " " + REFINED_LEGEND)
    t2_md = sections[-1]
    if table3_rows(config):
        t3_md, t3_csv = table3(index)
        table("table3", "\n## Table III: ablation of MDS and K&G RFT", t3_md, t3_csv,
              "\n\n" + CONVERGENCE_LEGEND + " " + REFINED_LEGEND)
    if any(r.retention == "lora-kd" for r in config.rows):
        kd_md, kd_csv, kd_png = refinement(index, out / "refinement.png")
        noted("refinement", "\n## L_refine: the LoRA-based KD's convergence", _refinement_note(config), kd_md, kd_csv)
        if kd_png:
            files["refinement.png"] = kd_png
            sections.append("\n![L_refine](refinement.png)")
    if any(r.buffer == "mds" for r in config.rows):
        mds_md, mds_csv = mds_buffers(index)
        noted("mds", "\n## MDS: where each buffer settled", MDS_NOTE.format(r=config.mds_repeats), mds_md, mds_csv)
    if config.unseen_rows:
        t6_md, t6_csv = table6(index)
        table("table6", "\n## Table VI: unseen tasks, from M0 and from the refined M_n", t6_md, t6_csv,
              "\n\n" + CONVERGENCE_LEGEND)
    t7_md, t7_csv, ratios = table7(index)
    files["table7.md"] = write_file(out / "table7.md", t7_md + "\n\n" + _table7_note(ratios) + "\n")
    files["table7.csv"] = write_file(out / "table7.csv", csv_text(t7_csv))
    sections += ["\n## Table VII: training time per stage ([md](table7.md), [csv](table7.csv))\n", t7_md, "",
                 _table7_note(ratios)]
    f4_csv, f4_png = fig4(index, out / "fig4.png")
    files["fig4.csv"] = write_file(out / "fig4.csv", csv_text(f4_csv))
    sections.append("\n## Fig. 4: encoder change M0 → Mn ([csv](fig4.csv))\n")
    if f4_png:
        files["fig4.png"] = f4_png
    sections.append("![fig4](fig4.png)" if f4_png else "No finished sequential cell yet.")
    for name, title, (md, rows) in (("transfer", "\n## Forgetting and forward transfer", transfer(index)),
                                    ("paired", "\n## Paired comparisons", paired(index))):
        files[f"{name}.md"] = write_file(out / f"{name}.md", md + "\n")
        files[f"{name}.csv"] = write_file(out / f"{name}.csv", csv_text(rows))
        sections += [f"{title} ([md]({name}.md), [csv]({name}.csv))\n", md]
    return finish_report(out, cells, records, sections, files, t2_md, progress, _cell_rows)


MDS_NOTE = ("MDS averages each training case's pretext loss over R = {r} random maskings (the paper: 1000); the "
            "buffer of the first r maskings is a run at r, so one run measures how the buffer changes with R "
            "(medadapt.sequential.buffer.buffer_stability). \"Buffer settled at r\": the smallest r from which the "
            "buffer no longer changes up to R; \"not within R\": R was too small to tell.")


def _header(config: MedseqftConfig, done: int, total: int) -> list[str]:
    """The report's title and its first paragraph: what the grid is."""
    f = config.foundation
    if "cases" in config.stream:  # a generated stream
        cases = f"{config.stream['cases']} cases per task (80/20 split)"
    else:
        cases = "cases per task: " + ", ".join(f"{t.name} {t.cases}" for t in config.all_datasets)
    made = f"the model {f['model']}" if "model" in f else \
        f"{f['preset']}, {f['objective']} pretraining on {', '.join(d['name'] for d in f['domains'])}"
    return [f"# Benchmark report: MedSeqFT grid `{config.name}`\n",
            f"{done} of {total} cells finished. Config: `{config.cli_argument}`. Seeds: "
            f"{', '.join(map(str, config.seeds))}. Stream `{config.stream['name']}`: "
            f"{', '.join(t.name for t in config.tasks)} (in this order); unseen: "
            f"{', '.join(t.name for t in config.unseen) or 'none'}; {cases}, shots: {config.shots}. "
            f"Foundation: {made}. Recipe `{config.recipe['name']}`: "
            f"{config.recipe['epochs']} × {config.recipe['iterations_per_epoch']} iterations per task; LoRA-based "
            f"KD `{config.kd_recipe['name']}`: {config.kd_recipe['epochs']} × "
            f"{config.kd_recipe['iterations_per_epoch']}.\n", FOOTNOTE + "\n"]


def _refinement_note(config: MedseqftConfig) -> str:
    how = {"levelled": "until L_refine (the epoch mean of the encoder feature MSE) has levelled off by "
                       "medadapt.engine.convergence, checked after every epoch, at most its ceiling",
           "ceiling": "its whole schedule (L_refine: the epoch mean of the encoder feature MSE; levelled off or "
                      "not by medadapt.engine.convergence over the whole curve)",
           "budget": "a fifth of the fine-tuning epochs on its schedule (the paper's ratios; L_refine: the epoch "
                     "mean of the encoder feature MSE)"}[config.kd_until]
    return (f"LoRA-based KD `{config.kd_recipe['name']}` (until: {config.kd_until}): the stage runs {how}; mean "
            "over seeds ± spread.")


def _table7_note(ratios: dict) -> str:
    target = ""
    if "medseqft" in ratios and ratios["medseqft"][0] is not None:
        r, paper = ratios["medseqft"][0], ratios["medseqft"][1]
        target = (f"\n\nMedSeqFT's training time is {r:.2f}× FFT's, {paper:.2f}× without buffer selection (the "
                  f"target: at most 1.3×, {'met' if r <= 1.3 else 'not met'}; the paper: 27.0 h / 21.1 h = 1.28×, "
                  "whose Table VII has no buffer selection stage).")
    return ("Training seconds (iterations and batch sampling; no evaluation) summed over the stream's tasks, "
            "mean over seeds ± spread; × FFT: per seed the row's sum over FFT's sum (parallel fine-tuning of "
            "every task from M0). Buffer selection counts the buffers after tasks 1..n-1: the buffer after the "
            "stream's last task would serve no task, so it is not selected (a longer stream continuing the run "
            "selects it then). MDS scoring is counted at what it cost when computed: runs that share M0, a task's "
            "cases, R and the seed compute it once (medadapt.sequential.mds_store) and each counts its seconds. "
            "Cells ran two at a time on a shared machine, so times carry its noise." + target)
