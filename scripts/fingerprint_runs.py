"""Short runs of every method and workflow, reduced to digests: the check that a refactor moves no number.

    python scripts/fingerprint_runs.py --work DIR --out fingerprints.json
    python scripts/fingerprint_runs.py --work DIR2 --out after.json --compare fingerprints.json

Synthesises two tiny cohorts, pretrains a tiny foundation, then runs (through ``medadapt.cli.main``, as a user
would): ``finetune`` with every built-in method at 2 shots, 1 epoch x 2 iterations, and with the options each
method takes (γ, LoRA's rank and alpha, the adapter's reduction, the spatial adapter's kernel, width and norm,
cached features, transductive inference, the head policies, the FSEFT recipe), a two-task ``seqft`` stream with
``medseqft`` (MDS buffer, K&G RFT; and with the readings kept as options: the capped and joint KD-based FFT, the
norms trained or copied) and with a parallel baseline, and an MAE ``pretrain``. Each run becomes the
SHA-256 of every weight tensor it saved (by state-dict key, so a file's archive name does not count) and of
every metrics file it wrote. ``--compare`` prints each run that differs and exits 1 if any does. Run it at the
commit before a refactor and after it, on one machine (fp32 on the CPU is deterministic here); it imports the
medadapt on the path (``PYTHONPATH=<a worktree of the earlier commit>`` for the "before").
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

#: (run name, finetune arguments) on top of --shots 2 --epochs 1 --iterations-per-epoch 2 --recipe cpu-finetune
FINETUNE_VARIANTS = (
    ("dgst-gamma2", ["--method", "dgst", "--gamma", "2"]),
    ("drst-gamma2", ["--method", "drst", "--gamma", "2"]),
    ("lora-r2-a4", ["--method", "lora", "--lora-rank", "2", "--lora-alpha", "4"]),
    ("adapter-red2", ["--method", "adapter", "--adapter-reduction", "2"]),
    ("spatial-k1-w4-batch", ["--method", "spatial-adapter", "--adapter-kernel-size", "1", "--adapter-width", "4",
                             "--adapter-norm", "batch"]),
    ("spatial-cached", ["--method", "spatial-adapter", "--feature-cache"]),
    ("linear-probe-cached", ["--method", "linear-probe", "--feature-cache"]),
    ("spatial-ti-batch", ["--method", "spatial-adapter", "--transductive", "batch", "--ti-lambda", "0.5"]),
    ("spatial-ti-query", ["--method", "spatial-adapter", "--transductive", "query"]),
    ("full-head-keep", ["--method", "full", "--head", "keep"]),
    ("ft-last-head-match", ["--method", "ft-last", "--head", "match"]),
    ("spatial-fseft-recipe", ["--method", "spatial-adapter", "--recipe", "fseft-paper"]),
    ("bias-fseft-recipe", ["--method", "bias", "--recipe", "fseft-paper"]),
    ("full-lr", ["--method", "full", "--lr", "0.02"]),
)
BUDGET = ["--shots", "2", "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"]


def tensor_digest(path: Path) -> dict[str, str]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}{k}.", value[k])
        elif isinstance(value, torch.Tensor):
            h = hashlib.sha256(str((value.dtype, tuple(value.shape))).encode())
            h.update(value.detach().contiguous().cpu().numpy().tobytes())
            out[prefix[:-1]] = h.hexdigest()[:16]
        elif prefix != "meta.foundation.":  # (a delta's record of the foundation's folder: a path)
            out[prefix[:-1]] = hashlib.sha256(repr(value).encode()).hexdigest()[:16]

    walk("", state)
    return out


def run_digest(folder: Path) -> dict[str, str]:
    """Every saved weight tensor and every metrics file under ``folder`` (not checkpoints for resuming)."""
    digest: dict[str, str] = {}
    for f in sorted(folder.rglob("*")):
        rel = str(f.relative_to(folder))
        if f.name in ("weights.pt", "delta.pt"):
            tensors = tensor_digest(f)
            digest[rel] = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()[:16]
        elif f.name in ("summary.json", "metrics_per_case.csv") or f.name.endswith("metrics.csv"):
            text = f.read_text()
            if f.suffix == ".json":  # timings are not numbers a refactor keeps
                data = json.loads(text)
                data.pop("timing", None)
                text = json.dumps(data, sort_keys=True)
            digest[rel] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return digest


def cli(args: list[str]) -> None:
    from medadapt.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"medadapt {' '.join(map(str, args))}: exit {rc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the data and the runs")
    parser.add_argument("--out", type=Path, required=True, help="the fingerprints (JSON) to write")
    parser.add_argument("--compare", type=Path, default=None, help="fingerprints of an earlier commit to compare")
    parser.add_argument("--only", default=None, help="comma-separated run names to do (default all)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MEDADAPT_CACHE"] = str(work / "cache")
    import torch
    import yaml

    torch.set_num_threads(2)
    from medadapt.synth.spec import DOMAINS_DIR
    from medadapt.tuning import method_names

    only = set(args.only.split(",")) if args.only else None
    prints: dict[str, dict[str, str]] = {}

    def record(name: str, folder: Path) -> None:
        prints[name] = run_digest(folder)
        print(f"{name}: {len(prints[name])} files", flush=True)

    for name, builtin, n in (("src", "hn-source", 6), ("tgt", "hn-center-b", 10)):
        if not (work / name / "dataset.json").is_file():
            spec = yaml.safe_load((DOMAINS_DIR / f"{builtin}.yaml").read_text())
            spec.update(name=name, case_prefix=name, shape=[max(8, s // 2) for s in spec["shape"]])
            spec["scanner"]["spacing_mm"] = [2 * v for v in spec["scanner"]["spacing_mm"]]
            spec["scanner"]["slice_thickness_mm"] = 2 * spec["scanner"]["slice_thickness_mm"]
            (work / f"{name}.yaml").write_text(yaml.safe_dump(spec))
            cli(["synth", work / f"{name}.yaml", "--out", work / name, "--cases", n, "--quiet"])
    fm = work / "fm"
    if not (fm / "weights.pt").is_file():
        cli(["pretrain", "--data", work / "src", "--out", fm, "--preset", "cpu-tiny", "--epochs", "1",
             "--iterations-per-epoch", "2", "--quiet"])
    record("pretrain", fm)
    runs = [(m, ["--method", m]) for m in method_names()] + list(FINETUNE_VARIANTS)
    for name, extra in runs:
        if only and name not in only:
            continue
        out = work / "finetune" / name
        if not (out / "run.json").is_file():
            recipe = [] if "--recipe" in extra else ["--recipe", "cpu-finetune"]
            cli(["finetune", "--model", fm, "--data", work / "tgt", "--out", out, *BUDGET, *recipe, *extra])
        record(f"finetune/{name}", out)
    mae = work / "mae"  # an MAE foundation: medseqft's MDS buffer scores cases with its pretext head
    if not (mae / "weights.pt").is_file():
        cli(["pretrain", "--data", work / "src", "--out", mae, "--preset", "cpu-tiny", "--objective", "mae",
             "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"])
    record("pretrain-mae", mae)
    # the other model-folder writers: a two-dataset pretraining (class template), the pretext pathway on a
    # foundation, a MONAI SwinUNETR checkpoint imported (seeded MONAI weights, backbone-only and whole)
    two, head = work / "pretrain-two", work / "ssl-head"
    if not (two / "weights.pt").is_file():
        cli(["pretrain", "--data", work / "src", "--data", work / "tgt", "--out", two, "--preset", "cpu-tiny",
             "--epochs", "1", "--iterations-per-epoch", "2", "--sampling", "datasets", "--quiet"])
    record("pretrain-two", two)
    if not (head / "plans.json").is_file():
        cli(["pretrain-ssl-head", "--model", fm, "--data", work / "src", "--out", head, "--epochs", "1",
             "--iterations-per-epoch", "2", "--quiet"])
    record("pretrain-ssl-head", head)
    checkpoint = work / "monai-swin.pt"
    if not checkpoint.is_file():
        from monai.networks.nets import SwinUNETR

        torch.manual_seed(4)
        net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(2, 2, 2, 2), window_size=4)
        torch.save(net.state_dict(), checkpoint)
    for name, extra in (("import-monai", []), ("import-monai-backbone", ["--backbone-only"])):
        out = work / name
        if not (out / "plans.json").is_file():
            cli(["import-monai", checkpoint, "--out", out, "--labels", "background", "liver", "spleen",
                 "--roi-size", "64", "64", "32", *extra])
        record(name, out)
    stream = work / "stream.yaml"
    stream.write_text(f"name: tiny\ntasks:\n  - data: {work / 'tgt'}\n  - data: {work / 'src'}\n")
    seq = ["--epochs", "1", "--iterations-per-epoch", "2", "--recipe", "cpu-finetune", "--quiet"]
    for name, extra in (("medseqft", ["--method", "medseqft", "--buffer-size", "2", "--mds-repeats", "2",
                                      "--kd-until", "budget"]),
                        # the readings kept as options (issue 43): the capped / joint KD-based FFT, the norms
                        ("medseqft-capped-normtrain", ["--method", "medseqft", "--buffer-size", "2", "--mds-repeats",
                                                       "2", "--kd-until", "budget", "--kd-fft", "capped",
                                                       "--kd-norm", "train"]),
                        ("medseqft-joint-normcopy", ["--method", "medseqft", "--buffer-size", "2", "--mds-repeats",
                                                     "2", "--kd-until", "ceiling", "--kd-max-epochs", "10",
                                                     "--kd-fft", "joint", "--kd-weight", "0.5",
                                                     "--kd-norm", "copy"]),
                        ("seq-ft-random", ["--method", "seq-ft", "--buffer", "random", "--retention", "lora-kd",
                                           "--buffer-size", "2", "--kd-until", "budget"]),
                        ("parallel-lora", ["--method", "lora", "--lora-rank", "2"]),
                        ("parallel-fseft-recipe", ["--method", "spatial-adapter", "--recipe", "fseft-paper",
                                                   "--epochs", "1", "--iterations-per-epoch", "2", "--quiet"])):
        if only and f"seqft/{name}" not in only:
            continue
        out = work / "seqft" / name
        if not (out / "results.csv").is_file():
            args_ = seq if "--recipe" not in extra else []
            model = mae if name.startswith("medseqft") else fm
            cli(["seqft", stream, "--model", model, "--out", out, *args_, *extra])
        record(f"seqft/{name}", out)
    args.out.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    differ = [n for n in sorted(set(before) | set(prints)) if before.get(n) != prints.get(n)]
    for n in differ:
        print(f"DIFFERS: {n}")
    print(f"{len(set(before) & set(prints)) - len(differ)} runs identical, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
