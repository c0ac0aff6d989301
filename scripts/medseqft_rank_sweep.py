"""Issue 43: can *any* rank-r change of E_{t-1}'s weights keep task t? A training-free rank sweep.

The LoRA-based KD looks for a rank-r change ΔW = BA of every encoder layer of E_{t-1} that reproduces the
fine-tuned E_{t-mid}'s features. Whether one exists does not depend on how the distillation is trained: the best
rank-r change of a layer in the weight's own norm is the truncated SVD of the fine-tuning's change
W_mid - W_prev (Eckart-Young). This script builds, for r = 1, 2, 4, ..., the encoder W_prev + SVD_r(W_mid - W_prev)
at every conv layer (the weight viewed as d x k, out-channels x in-channels·kernel, as LoRA views it), with the
norm γ/β of E_{t-1} (what the merge keeps) or of E_{t-mid}, puts M_{t-mid}'s decoder and head on it, and scores
the task's test cases. Beside it: the share of the change's energy (squared Frobenius norm) rank r holds, and the
feature MSE to E_{t-mid} on the task's training cases (L_refine's measure, on whole-case tiles).

Input: a `medadapt seqft` run folder of the refinement study (scripts/medseqft_refine_study.py) and a task index;
E_{t-1} is the foundation for task 1 and the previous task's refined model after it. Output: a JSON record and a
Markdown table (in git, beside the study).

    python scripts/medseqft_rank_sweep.py --run /work/data/refine-study/runs/base --task 1 \
        --foundation benchmarks/medseqft/foundation-74dc411d --out benchmarks/medseqft-refine-study
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from medadapt.data.cache import preprocess_dataset
from medadapt.data.dataset import RawDataset
from medadapt.models.lora import lora_targets
from medadapt.models.model_folder import load_model_folder
from medadapt.models.parts import encoder_features, model_parts
from medadapt.sequential.buffer import case_tiles
from medadapt.sequential.transfer import with_encoder
from medadapt.tuning.distill import copy_encoder_norms, feature_mse
from medadapt.workflows.common import dataset_cache_dir
from medadapt.workflows.finetune import predict_and_evaluate

RANKS = (1, 2, 4, 8, 16, 32, 64)


def truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``delta`` viewed as d x k, and the share of its energy it holds."""
    mat = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, len(s))
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    energy = float((s[:r] ** 2).sum() / (s ** 2).sum()) if float((s ** 2).sum()) > 0 else 1.0
    return approx.reshape(delta.shape).to(delta.dtype), energy


def build(prev: torch.nn.Module, mid: torch.nn.Module, rank: int | None, norms: str) -> tuple[torch.nn.Module, float]:
    """M_mid with the encoder W_prev + SVD_rank(W_mid - W_prev) (rank None: W_mid itself) and ``norms``' γ/β;
    returns the network and the energy share over all layers together."""
    net = copy.deepcopy(mid)
    enc_prev = dict(lora_targets(model_parts(prev).encoder))
    enc_mid = dict(lora_targets(model_parts(mid).encoder))
    kept = total = 0.0
    with torch.no_grad():
        for name, layer in lora_targets(model_parts(net).encoder):
            w_prev, w_mid = enc_prev[name].weight, enc_mid[name].weight
            delta = w_mid - w_prev
            approx, share = (delta, 1.0) if rank is None else truncated(delta, rank)
            layer.weight.copy_(w_prev + approx)
            energy = float((delta.double() ** 2).sum())
            kept += share * energy
            total += energy
            # biases are not LoRA's: E_{t-1}'s (what the merge keeps)
            if layer.bias is not None:
                layer.bias.copy_(enc_prev[name].bias)
    copy_encoder_norms(prev if norms == "prev" else mid, net)
    return net, (kept / total if total else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a seqft run folder of the study")
    ap.add_argument("--task", type=int, default=1)
    ap.add_argument("--foundation", type=Path, required=True, help="M_0 (E_{t-1} of task 1)")
    ap.add_argument("--data", type=Path, default=None, help="the task's dataset (default: the run's record of it)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--feature-cases", type=int, default=4, help="training cases the feature MSE is measured on")
    args = ap.parse_args()

    task_dir = next(args.run.glob(f"tasks/{args.task:02d}-*"))
    t = json.loads((task_dir / "task.json").read_text())
    folder_mid = load_model_folder(task_dir / "model")
    mid = folder_mid.load_network()
    if args.task == 1:
        prev_net = load_model_folder(args.foundation).load_network()
    else:
        prev_dir = next(args.run.glob(f"tasks/{args.task - 1:02d}-*"))
        prev_net = load_model_folder(prev_dir / "refined" / "model").load_network()
    prev = with_encoder(copy.deepcopy(mid), prev_net)  # E_{t-1} in M_mid's architecture (head classes differ)
    refined = load_model_folder(task_dir / "refined" / "model").load_network()

    record_ = json.loads((args.run / "seqft.json").read_text())
    data = args.data or Path(record_["tasks"][args.task - 1]["data"])
    dataset = RawDataset.load(data)
    cases = preprocess_dataset(dataset, t["shot_cases"][:args.feature_cases], folder_mid.plan(),
                               dataset_cache_dir(dataset.root), progress=False)
    tiles = torch.cat([case_tiles(c, record_["patch_size"]) for c in cases])

    @torch.no_grad()
    def fmse(net) -> float:
        net.eval()
        mid.eval()
        return float(feature_mse(encoder_features(net, tiles), encoder_features(mid, tiles)))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def score(net, label) -> float:
            summary = predict_and_evaluate(folder_mid, net, dataset, t["test_cases"], Path(tmp) / label, False)
            return float(summary["foreground_mean"]["dsc"])

        for norms in ("prev", "mid"):
            for rank in (*RANKS, None):
                net, share = build(prev, mid, rank, norms)
                rows.append({"rank": "full" if rank is None else rank, "norms": norms, "energy_share": share,
                             "feature_mse": fmse(net), "dsc": score(net, f"{norms}-{rank}")})
                print(rows[-1], flush=True)
        ref = {"mid_dsc": float(t["metrics"]["foreground_mean"]["dsc"]),
               "refined_dsc": float(t["refined_metrics"]["foreground_mean"]["dsc"]),
               "prev_dsc": score(prev, "prev"), "refined_feature_mse": fmse(refined),
               "prev_feature_mse": fmse(prev)}
    record = {"run": args.run.name, "task": t["task"], "index": args.task, **ref, "sweep": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"rank-sweep-{args.run.name}-task{args.task}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Rank sweep: {args.run.name}, task {args.task} ({t['task']})", "",
             f"M_mid Dice {100 * ref['mid_dsc']:.1f}; the study's refined M_t {100 * ref['refined_dsc']:.1f} "
             f"(feature MSE to E_mid {ref['refined_feature_mse']:.4f}); E_(t-1) with M_mid's decoder "
             f"{100 * ref['prev_dsc']:.1f} (feature MSE {ref['prev_feature_mse']:.4f}).", "",
             "E_(t-1) + the best rank-r change of each encoder layer (truncated SVD of W_mid - W_(t-1)), with "
             "E_(t-1)'s or E_mid's norm γ/β, M_mid's decoder and head (scripts/medseqft_rank_sweep.py):", "",
             "| norms | rank | change energy held | feature MSE to E_mid | Dice |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['norms']} | {r['rank']} | {100 * r['energy_share']:.1f}% | {r['feature_mse']:.4f} | "
                     f"{100 * r['dsc']:.1f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
