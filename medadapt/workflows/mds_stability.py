"""``medadapt mds-stability``: how many maskings R the MDS buffer needs before it stops changing (measured).

MedSeqFT's MDS (Sec. III-C) ranks a task's training cases by the foundation's pretext loss averaged over R
random maskings (the paper: 1000) and buffers the K lowest. This scores every training case of each task once
at ``repeats`` maskings (batched: :func:`medadapt.sequential.buffer.mds_losses`), then reads the buffer at every
power of two R below it from the same draws (the first R maskings of a run are a run at R) and reports, per
task, where the buffer settles (:func:`medadapt.sequential.buffer.settled_repeats`): the R to give
``seqft --mds-repeats`` / a grid's ``medseqft.mds_repeats``. Seconds per task at ``repeats`` are measured too
(the MDS cost of Table VII scales linearly in R).

Writes ``<out>/stability.csv`` (task, R, buffer, overlap with the largest R's buffer, Spearman with its
ranking, settled), ``stability.json`` (the same with the per-masking losses' summary and the settings),
``stability.md`` and ``stability.png`` (overlap against R, one line per task).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from medadapt.data.cache import preprocess_dataset
from medadapt.data.dataset import RawDataset
from medadapt.data.splits import train_test_split
from medadapt.errors import MedadaptError
from medadapt.models import load_model_folder
from medadapt.sequential.buffer import buffer_stability, check_buffer_size, mds_losses, settled_repeats
from medadapt.utils import seeds as seeding
from medadapt.utils.atomic import atomic_write_json, atomic_write_text
from medadapt.utils.tables import markdown_table
from medadapt.workflows.common import dataset_cache_dir, environment


def mds_stability(model: str | Path, data: list[str | Path], out: str | Path, repeats: int = 1000,
                  buffer_size: int = 4, seed: int = 0, split_seed: int = 0, progress: bool = True
                  ) -> dict[str, Any]:
    """Measure the MDS buffer's stability against R on each dataset of ``data`` (module docstring)."""
    from medadapt.ssl import load_pretext

    out = Path(out)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise MedadaptError(f"--repeats {repeats!r}: give the largest R to measure, at least 2 (the paper: 1000)")
    if not data:
        raise MedadaptError("--data: give at least one task dataset")
    folder = load_model_folder(model)
    pretext = load_pretext(folder)  # one line if the foundation has no pretext network
    datasets = [RawDataset.load(d) for d in data]
    names = [ds.name for ds in datasets]
    if len(set(names)) != len(names):
        raise MedadaptError(f"--data: datasets {names} repeat a name; give each task once")
    splits = []
    for ds in datasets:
        train, _ = train_test_split(ds.case_ids, test_fraction=0.2, seed=split_seed)
        check_buffer_size(buffer_size, len(train), ds.name)
        splits.append(train)
    if (out / "stability.json").is_file():
        raise MedadaptError(f"{out}: holds a finished measurement; choose another --out")
    tasks, rows = [], []
    for ds, train in zip(datasets, splits):
        cases = preprocess_dataset(ds, train, folder.plan(), dataset_cache_dir(ds.root), progress=progress)
        t0 = time.perf_counter()
        losses = mds_losses(pretext, cases, ds.name, pretext.patch_size, repeats, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
        table = buffer_stability(losses, buffer_size)
        r_star = settled_repeats(table)
        tasks.append({"task": ds.name, "data": str(ds.root), "cases": len(cases), "seconds": seconds,
                      "seconds_per_masking": seconds / repeats, "settled_at": r_star, "rows": table,
                      "scores": {c: float(v.mean()) for c, v in losses.items()},
                      "masking_std": {c: float(v.std(ddof=1)) for c, v in losses.items()}})
        rows += [{"task": ds.name, **{k: (" ".join(v) if k == "buffer" else v) for k, v in r.items()}}
                 for r in table]
    record = {"model": str(folder.path), "repeats": repeats, "buffer_size": buffer_size, "seed": seed,
              "split_seed": split_seed, "seeds": seeding.record(seed, split_seed, ("mds", "split")),
              "tasks": tasks, "environment": environment()}
    out.mkdir(parents=True, exist_ok=True)
    keys = ["task", "repeats", "buffer", "shared_with_final", "spearman_with_final", "settled"]
    atomic_write_text(out / "stability.csv", "\n".join([",".join(keys)] + [
        ",".join("" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k])) for k in keys)
        for r in rows]) + "\n")
    atomic_write_text(out / "stability.md", _markdown(tasks, buffer_size, repeats, seed, folder.path))
    _figure(tasks, buffer_size, out / "stability.png")
    atomic_write_json(out / "stability.json", record)  # last: the measurement is finished
    return record


def _markdown(tasks: list[dict], buffer_size: int, repeats: int, seed: int, model: Path) -> str:
    """stability.md: where each task's buffer settled, then each task's buffer at every R measured."""
    body = [[t["task"], str(t["cases"]), "not within R ≤ %d" % repeats if t["settled_at"] is None
             else str(t["settled_at"]), f"{t['seconds']:.0f}", f"{1000 * t['seconds_per_masking']:.1f}"]
            for t in tasks]
    md = [f"MDS buffer stability (K = {buffer_size}, R up to {repeats}, mask seed {seed}; foundation "
          f"`{model}`).", "",
          markdown_table(["Task", "Cases", "Buffer settled at R", f"Seconds at R = {repeats}", "ms per masking"],
                         body), ""]
    for t in tasks:
        md += [f"**{t['task']}**", "", markdown_table(
            ["R", f"Shared with R = {repeats}", "Spearman", "Settled", "Buffer"],
            [[str(r["repeats"]), f"{r['shared_with_final']} / {buffer_size}",
              "–" if r["spearman_with_final"] is None else f"{r['spearman_with_final']:.3f}",
              "yes" if r["settled"] else "no", " ".join(r["buffer"])] for r in t["rows"]]), ""]
    return "\n".join(md)


def _figure(tasks: list[dict], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medadapt.utils.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for t in tasks:
        ax.plot([r["repeats"] for r in t["rows"]], [r["shared_with_final"] for r in t["rows"]], marker="o", ms=3,
                label=f"{t['task']} (settled: {t['settled_at'] or '–'})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.2, k + 0.2)
    ax.set_xlabel("R (maskings per case)")
    ax.set_ylabel(f"buffer cases shared with the largest R's (of {k})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def summary_line(record: dict[str, Any]) -> str:
    settled = [t["settled_at"] for t in record["tasks"]]
    if any(s is None for s in settled):
        return (f"the buffer had not settled within R = {record['repeats']} on "
                f"{sum(s is None for s in settled)} of {len(settled)} task(s); measure with a larger --repeats")
    return f"the buffer settles by R = {max(settled)} on every task (per task: {json.dumps(settled)})"
