"""Issue 43, part 1: which causes of "the refinement throws away what fine-tuning learned" matter, on short runs.

MedSeqFT (the `medseqft` grid's settings: its MAE foundation, the medseqft-paper-cpu recipe, MDS over 64
maskings, buffer 4) on tasks 1-3 of the synthetic ct-stream, seed 0, once per variant: each reading alone and
combined. Per task it records M_{t-mid}'s Dice, the refined M_t's Dice, their ratio, and L_refine (first, last,
epochs, whether it levelled off). Resumable: a finished variant is read back (each run is a `medadapt seqft`
run folder under --work, ignored by git); the records and the table go to --out (in git).

    python scripts/medseqft_refine_study.py --work /work/data/refine-study --out benchmarks/medseqft-refine-study
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
#: name -> (seqft flags, what it tests); what a variant does not set is the medseqft grid of record's refinement
#: (rank 2, until L_refine levels off, a tenth of the fine-tuning's lr, norms kept, separate KD steps)
VARIANTS = {
    "base": ([], "the grid's MedSeqFT (rank 2, L_refine until levelled, norms kept, separate KD steps)"),
    "norm-train": (["--kd-norm", "train"], "encoder norm γ/β trained in the LoRA-based KD and merged"),
    "norm-copy": (["--kd-norm", "copy"], "encoder norm γ/β copied from E_{t-mid} before the KD"),
    "ceiling": (["--kd-until", "ceiling"], "the refinement run to its full schedule (40 epochs, no early stop)"),
    "fft-joint": (["--kd-fft", "joint"], "KD-based FFT: one optimiser on L_seg + L_kd"),
    "fft-capped": (["--kd-fft", "capped"], "KD-based FFT: the KD step at most the task step's length"),
    "rank8": (["--kd-rank", "8"], "LoRA rank 8 instead of 2"),
    # beyond the list: is the refinement short of steps? (capacity: scripts/medseqft_rank_sweep.py; a
    # uniform rank above 8 does not fit this network's first layer, 8 x 27)
    "kd-lr-ft": (["--kd-recipe", "{work}/kd-lr-ft.yaml"], "the LoRA-based KD at the fine-tuning's lr (3e-3, "
                 "constant) instead of a tenth of it"),
    "kd-lr-ft+ceiling": (["--kd-recipe", "{work}/kd-lr-ft.yaml", "--kd-until", "ceiling"], "combined"),
    "rank8+kd-lr-ft+ceiling": (["--kd-rank", "8", "--kd-recipe", "{work}/kd-lr-ft.yaml", "--kd-until", "ceiling"],
                               "combined"),
    # the KD-based FFT's readings and the norms on top of the refinement that converges (the fine-tuning's lr, the
    # full schedule), at the paper's rank and at 8
    "lr1+ceiling+fft-capped": (["--kd-lr-fraction", "1", "--kd-until", "ceiling", "--kd-fft", "capped"], "combined"),
    "lr1+ceiling+fft-joint": (["--kd-lr-fraction", "1", "--kd-until", "ceiling", "--kd-fft", "joint"], "combined"),
    "lr1+ceiling+norm-train": (["--kd-lr-fraction", "1", "--kd-until", "ceiling", "--kd-norm", "train"], "combined"),
    "rank8+lr1+ceiling+fft-capped": (["--kd-rank", "8", "--kd-lr-fraction", "1", "--kd-until", "ceiling",
                                      "--kd-fft", "capped"], "combined"),
    "all": (["--kd-rank", "8", "--kd-lr-fraction", "1", "--kd-until", "ceiling", "--kd-fft", "capped",
             "--kd-norm", "train"], "every change together"),
}


def grid_settings() -> dict:
    cfg = yaml.safe_load((ROOT / "medadapt" / "benchmark" / "configs" / "medseqft.yaml").read_text())
    return cfg


def prepare(work: Path, tasks: int) -> Path:
    """The ct-stream as the grid makes it (25 cases, data seed 0, half in-plane resolution), its first ``tasks``
    tasks in a stream file of their own."""
    from medadapt.sequential.stream import write_synthetic_stream

    cfg = grid_settings()
    s = cfg["stream"]
    full = write_synthetic_stream(s["name"], work / "stream", cases=s["cases"], seed=cfg["data_seed"],
                                  downsample=tuple(s["downsample"]), progress=False)
    doc = yaml.safe_load(full.read_text())
    doc["tasks"], doc["unseen"] = doc["tasks"][:tasks], []
    doc["name"] = f"{doc['name']}-first{tasks}"
    target = work / "stream" / f"stream-first{tasks}.yaml"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


def recipe_file(work: Path) -> Path:
    """The grid's fine-tuning recipe, and beside it the kd-lr-ft variant's LoRA-based KD recipe (the default
    derived one, medadapt.workflows.seqft.kd_recipe_from(until="levelled"), at the fine-tuning's lr)."""
    recipe = grid_settings()["recipe"]
    path = work / "medseqft-paper-cpu.yaml"
    path.write_text(yaml.safe_dump({"description": "the medseqft grid's recipe", **recipe}))
    kd = {**recipe, "name": f"{recipe['name']}-lora-kd", "schedule": {"name": "constant"},
          "description": "the LoRA-based KD at the fine-tuning's lr"}
    (work / "kd-lr-ft.yaml").write_text(yaml.safe_dump(kd))
    return path


def run_variant(name: str, stream: Path, recipe: Path, foundation: Path, work: Path, threads: int) -> Path:
    out = work / "runs" / name
    if (out / "results.md").is_file():
        return out
    cfg = grid_settings()["medseqft"]
    flags = [f.replace("{work}", str(work)) for f in VARIANTS[name][0]]
    # what a variant does not set is the medseqft grid of record's refinement (the defaults when the study began)
    if "--kd-until" not in flags:
        flags += ["--kd-until", "levelled"]
    if "--kd-recipe" not in flags and "--kd-lr-fraction" not in flags:
        flags += ["--kd-lr-fraction", "0.1"]
    cmd = [sys.executable, "-m", "medadapt", "seqft", str(stream), "--model", str(foundation), "--out", str(out),
           "--method", "medseqft", "--recipe", str(recipe), "--seed", "0", "--buffer-size", str(cfg["buffer_size"]),
           "--mds-repeats", str(cfg["mds_repeats"]), "--workers", "0", "--quiet", "--resume", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    return out


def collect(name: str, out: Path) -> list[dict]:
    rows = []
    for task_file in sorted(out.glob("tasks/*/task.json")):
        t = json.loads(task_file.read_text())
        mid = t["metrics"]["foreground_mean"]["dsc"]
        refined = (t.get("refined_metrics") or {}).get("foreground_mean", {}).get("dsc")
        r = t.get("refinement") or {}
        curve = r.get("curve") or []
        rows.append({"variant": name, "flags": " ".join(VARIANTS[name][0]) or "(none)", "task": t["index"],
                     "name": t["task"], "mid_dsc": mid, "refined_dsc": refined,
                     "refined_over_mid": (refined / mid) if refined is not None and mid else None,
                     "l_refine_first": curve[0] if curve else None, "l_refine_last": curve[-1] if curve else None,
                     "kd_epochs": r.get("epochs"), "kd_ceiling": r.get("ceiling_epochs"),
                     "levelled_off": r.get("levelled_off"), "seconds": t.get("seconds")})
    return sorted(rows, key=lambda x: x["task"])


def table(rows: list[dict]) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    lines = ["| variant | task | M_mid DSC | refined DSC | refined / mid | L_refine first → last | KD epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        first, last = r["l_refine_first"], r["l_refine_last"]
        lr = "—" if first is None else f"{first:.4f} → {last:.4f}"
        ratio = "—" if r["refined_over_mid"] is None else f"{r['refined_over_mid']:.2f}"
        mark = " †" if r["levelled_off"] is False else ""
        lines.append(f"| {r['variant']} | {r['task']} {r['name']} | {pct(r['mid_dsc'])} | {pct(r['refined_dsc'])} | "
                     f"{ratio} | {lr} | {r['kd_epochs']}/{r['kd_ceiling']}{mark} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the stream and the runs go (not in git)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "medseqft-refine-study",
                    help="records and table (in git)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, in order")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--foundation", type=Path, default=None,
                    help="the MAE foundation (default: the medseqft grid's committed one)")
    args = ap.parse_args()
    foundation = args.foundation or next((ROOT / "benchmarks" / "medseqft").glob("foundation-*"))
    args.work.mkdir(parents=True, exist_ok=True)
    stream = prepare(args.work, args.tasks)
    recipe = recipe_file(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for name in args.variants.split(","):
        out = run_variant(name, stream, recipe, foundation, args.work, args.threads)
        rows = collect(name, out)
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        all_rows += rows
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[k for k in all_rows[0] if k != "seconds"], extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(all_rows)
        (args.out / "study.csv").write_text(buf.getvalue())
        (args.out / "study.md").write_text(
            "# MedSeqFT refinement study (issue 43, part 1)\n\nSeed 0, tasks 1-"
            f"{args.tasks} of the ct-stream, the medseqft grid's settings; one run per variant "
            "(scripts/medseqft_refine_study.py). †: L_refine had not levelled off.\n\n"
            + "\n".join(f"- **{n}**: {VARIANTS[n][1]} (`{' '.join(VARIANTS[n][0]) or 'no flag'}`)"
                        for n in args.variants.split(",")) + "\n\n" + table(all_rows) + "\n")
        print(f"{name}: done", flush=True)


if __name__ == "__main__":
    main()
