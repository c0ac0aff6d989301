"""What every benchmark report is built from, written once: the mark of a value whose training had not levelled
off, CSV text, atomic files and figures, the check that something has finished, and the report's common end
(missing cells, ``cells.csv``, ``per_case.csv``, ``report.md``). The DGST / FSEFT reports (:mod:`.report`,
:mod:`.report_fseft`) and the MedSeqFT report (:mod:`.report_medseqft`) use them."""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medadapt.benchmark.harness import input_digests, stored_records
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path, atomic_write_text

MISSING = "–"


CONVERGENCE_LEGEND = (
    "†: the training loss of at least one of the value's cells had not levelled off by the end of its budget "
    "(medadapt.engine.convergence: more than a quarter of its smoothed loss's improvement, and more than twice "
    "its noise, came in the second half of its learning-rate budget, i.e. it was still learning as fast per "
    "unit of learning rate as before); such a value measures the budget as much as the method.")


def convergence_mark(records: list[dict]) -> str:
    """`` †`` when some record's training had not levelled off, judged from its stored loss curve (the stored
    verdict for records without one; records with neither: no mark)."""
    verdicts = [record_levelled_off(r) for r in records]
    return " †" if any(v is False for v in verdicts) else ""


def record_levelled_off(record: dict) -> bool | None:
    """A cell's verdict from its stored loss curve against the learning rate of each epoch, rebuilt from its
    recorded training settings (medadapt.engine.convergence); the stored verdict where there is no curve."""
    from medadapt.engine.convergence import levelled_off
    from medadapt.engine.recipe import lr_factor

    curve = record.get("loss_curve")
    if not curve:
        return (record.get("convergence") or {}).get("levelled_off")
    training = record.get("training") or {}
    lr = None
    if training.get("schedule") and training.get("epochs"):
        lr = [lr_factor(training["schedule"], e, training["epochs"]) for e in range(len(curve))]
    return levelled_off(curve, lr=lr)["levelled_off"]


def mark_text(text: str, mark: str) -> str:
    return {"bold": f"**{text}**", "underline": f"<u>{text}</u>"}.get(mark, text)


def csv_text(rows: list[dict]) -> str:
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


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def write_file(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def require_finished(config, paths, records: dict[str, dict | None]) -> None:
    """An error naming the work folder and the command when no cell of the grid has finished."""
    if not any(records.values()):
        raise MedadaptError(f"{paths.workdir}: no finished cells of grid {config.name!r}; run "
                            f"'medadapt bench {config.cli_argument}' first (same --workdir)")


def stored_cells(config, workdir, grid_paths: Callable, cells_of: Callable):
    """``(paths, cells, records by cell id)`` of a grid (``grid_paths(config, workdir)``, ``cells_of(config,
    digests)`` keyed by the work folder's inputs); an error if none has finished."""
    paths = grid_paths(config, workdir)
    cells = cells_of(config, input_digests(paths))
    records = stored_records(paths, cells)
    require_finished(config, paths, records)
    return paths, cells, records


def finish_report(out: Path, cells: list, records: dict[str, dict | None], sections: list[str],
                  files: dict[str, Path], headline: str, progress: bool,
                  cell_rows: Callable[[Any, dict], tuple[list[dict], list[dict]]]) -> dict[str, Any]:
    """What every grid report ends with: the list of missing cells, ``cells.csv`` and ``per_case.csv`` (from
    ``cell_rows(cell, record)`` of every finished cell) and ``report.md``; prints ``headline`` (the main
    table) when ``progress``."""
    done = [r for r in records.values() if r]
    missing = [c.cell_id for c in cells if not records.get(c.cell_id)]
    if missing:
        sections.append(f"\n## Missing cells ({len(missing)})\n\n" + "\n".join(f"- `{m}`" for m in missing))
    summary_rows, per_case_rows = [], []
    for cell in cells:
        if records.get(cell.cell_id):
            summary, per_case = cell_rows(cell, records[cell.cell_id])
            summary_rows += summary
            per_case_rows += per_case
    files["cells.csv"] = write_file(out / "cells.csv", csv_text(summary_rows))
    files["per_case.csv"] = write_file(out / "per_case.csv", csv_text(per_case_rows))
    files["report.md"] = write_file(out / "report.md", "\n".join(sections) + "\n")
    if progress:
        print(headline)
        print(f"report: {out / 'report.md'} ({len(done)}/{len(cells)} cells)")
    return {"dir": str(out), "files": {k: str(v) for k, v in files.items()}, "finished": len(done),
            "cells": len(cells), "missing": missing}
