"""The ``medadapt`` command line. Every subcommand has ``--help``; user mistakes end in one error line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medadapt import cli_dicom
from medadapt.errors import MedadaptError

METHODS_HELP = ("fine-tuning method: scratch, full, linear-probe, bias, affine-norm, bias-norm, encoder-only, "
                "decoder-only, ft-last, lora, adapter, drst, sgst, dgst ('medadapt methods' lists them)")


def _shots(text: str) -> "int | str":
    return "all" if text == "all" else _positive_int(text)


def _int_at_least(text: str, minimum: int, what: str = "an integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _seed(text: str) -> int:
    """A seed: a non-negative integer (NumPy's seed sequences take no negative words)."""
    return _int_at_least(text, 0, "an integer seed")


def _add_training_options(p: argparse.ArgumentParser, default_recipe: str) -> None:
    p.add_argument("--recipe", default=None,
                   help=f"training recipe: a built-in name or a recipe file (default: {default_recipe}; "
                        "'medadapt recipes' lists them, docs/recipes.md)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--iterations-per-epoch", type=_positive_int, default=None,
                   help="iterations per epoch (default: the recipe's)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0); recorded with the results")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="mixed precision of the training steps: auto (default; fp16 autocast with a gradient "
                        "scaler on a GPU, as nnU-Net, fp32 on the CPU), fp32, fp16 (autocast + gradient scaler) or "
                        "bf16 (autocast); recorded with the run, which resumes only in the same precision")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="background processes that sample and augment batches (default auto: one per CPU core "
                        "but one, at most 8; 0: in the training process); any number gives the same batches")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's forward pass (as nnU-Net's nnUNet_compile; the first "
                        "iterations are slow while it compiles)")


def _workers(text: str):
    return text if text == "auto" else _int_at_least(text, 0, "a number of workers (an integer >= 0, or auto)")


def _engine(args):
    """The engine options of a training command (--precision, --workers, --compile)."""
    from medadapt.engine import EngineOptions
    from medadapt.engine.batches import default_workers

    workers = default_workers() if args.workers == "auto" else args.workers
    return EngineOptions(precision=args.precision, workers=workers, compile=bool(args.compile))


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gamma", type=_positive_int, default=None,
                   help="dgst/drst/sgst: entries updated per kernel and iteration (default 1, as the paper)")
    p.add_argument("--lora-rank", type=_positive_int, default=None, help="lora: rank r (default 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora: alpha; scale = alpha/r (default r)")
    p.add_argument("--adapter-reduction", type=_positive_int, default=None,
                   help="adapter: channel reduction factor of the bottleneck (default 4)")
    p.add_argument("--adapter-kernel-size", type=_positive_int, default=None,
                   help="spatial-adapter: kernel size of its convolutions (default 3; 1: FSEFT's MLP comparison)")
    p.add_argument("--adapter-width", type=_positive_int, default=None,
                   help="spatial-adapter: its output channels (default: the feature map's)")
    p.add_argument("--adapter-norm", choices=("instance", "batch"), default=None,
                   help="spatial-adapter: its normalisation (default instance without affine parameters, as the "
                        "authors' code; batch: the text's batch normalisation)")
    p.add_argument("--pretext-decoder", choices=("auto", "new", "pretrained"), default="auto",
                   help="methods that freeze part of the network (linear-probe, lora, adapter, ...): new = the "
                        "foundation's decoder was trained on a pretext task (an MAE's), so it trains in full like "
                        "the heads and the method applies to the encoder (MedSeqFT's reading); pretrained = the "
                        "method applies to it; auto (default): new for a self-supervised foundation")


def _add_run_inputs(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --data, --out and --split-seed of a run that is evaluated on the fixed test split."""
    p.add_argument("--model", type=Path, required=True, help=model_help)
    p.add_argument("--data", type=Path, required=True, help="nnU-Net v2 raw dataset folder")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of the fixed 80/20 split (default 0)")


def _add_postprocess_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postprocess", choices=("none", "lcc"), default="none",
                   help="none (default) or lcc: keep each class's largest connected component (single organs, "
                        "not lymph nodes)")


def _add_head_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", choices=("fresh", "keep", "match"), default="fresh",
                   help="segmentation head to start from: fresh (default; new and randomly initialised, as "
                        "nnU-Net's pretrained-weight loading gives every method) or keep (the foundation's own outputs "
                        "for the dataset's classes, by name; its labels must be classes of the foundation) or match "
                        "(fresh, but the outputs of classes the foundation knows start from its own: FSEFT's "
                        "zero-shot initialisation)")


def _method_options(args) -> dict:
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "reduction": args.adapter_reduction,
            "kernel_size": args.adapter_kernel_size, "width": args.adapter_width, "norm": args.adapter_norm}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medadapt",
        description="Few-shot adaptation of 3D segmentation foundation models (nnU-Net) to new CT data.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="generate a synthetic CT cohort as an nnU-Net v2 raw dataset",
                       description="Generate a synthetic CT cohort (nnU-Net v2 raw format: lymph nodes, or the "
                                   "structures of the spec's labels map) from a domain spec: a built-in name or "
                                   "a YAML/JSON file (docs/domains.md).")
    p.add_argument("domain", nargs="?", help="built-in domain name or path to a domain spec file")
    p.add_argument("--out", type=Path, help="output dataset folder")
    p.add_argument("--cases", type=_positive_int, default=50, help="number of cases (default 50)")
    p.add_argument("--seed", type=_seed, default=0, help="cohort seed (default 0)")
    p.add_argument("--downsample", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="the same field of view with this many times fewer voxels per axis, e.g. 1 2 2 (what the "
                        "demo and the default benchmark grid use)")
    p.add_argument("--stream", default=None, metavar="NAME",
                   help="instead of one DOMAIN: every task of a built-in task stream (e.g. ct-stream, MedSeqFT's "
                        "five tasks and two unseen ones), one dataset each under --out, and --out/stream.yaml "
                        "for 'medadapt seqft'")
    p.add_argument("--list", action="store_true",
                   help="list the built-in domains (name, region, labels) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pretrain", help="train a foundation model on whole datasets",
                       description="Train a segmentation network on every case of one or several nnU-Net v2 raw "
                                   "datasets and write a model folder (weights + everything inference needs). "
                                   "Several datasets that label different structures give a partially labelled "
                                   "model: one class template (the union of their label names), one sigmoid "
                                   "output per class, a loss over each case's annotated classes only "
                                   "(docs/partial-labels.md).")
    p.add_argument("--data", type=Path, required=True, action="append",
                   help="nnU-Net v2 raw dataset folder; repeat for several datasets")
    p.add_argument("--objective", choices=("supervised", "mae"), default="supervised",
                   help="supervised (default): segment the datasets' labels; mae: masked-volume reconstruction "
                        "(labels unused; nnssl's CNN masked autoencoder), a foundation without a segmentation "
                        "head that keeps its reconstruction head for case scoring (docs/ssl.md)")
    p.add_argument("--activation", choices=("softmax", "sigmoid"), default=None,
                   help="output activation (default: softmax for one fully labelled dataset, else sigmoid)")
    p.add_argument("--sampling", choices=("cases", "datasets"), default="cases",
                   help="with several datasets: draw cases uniformly over all cases (default) or uniformly "
                        "over datasets, then over the dataset's cases")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--preset", default="cpu-small", help="network preset (default cpu-small; see docs)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    _add_training_options(p, "the preset's pretraining recipe: cpu-pretrain for cpu-*, else nnunet; with "
                             "--objective mae cpu-mae-pretrain, cpu-swin-mae-pretrain or mae-nnssl")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("pretrain-ssl-head", help="give a supervised foundation a masked-reconstruction pathway",
                       description="Train a masked-volume reconstruction pathway for a supervised foundation "
                                   "model: a copy of its decoder and a new 1x1x1 reconstruction head on its "
                                   "encoder, which stays frozen (bit-identical). Writes the foundation's model "
                                   "folder (same weights.pt; plans.json with a pretext record) plus pretext.pt to "
                                   "--out, so that cases can be scored by the foundation's self-supervised loss "
                                   "(docs/ssl.md).")
    p.add_argument("--model", type=Path, required=True, help="supervised foundation model folder")
    p.add_argument("--data", type=Path, required=True, action="append",
                   help="nnU-Net v2 raw dataset folder to train the pathway on (labels unused); repeat for several")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (not --model)")
    p.add_argument("--sampling", choices=("cases", "datasets"), default="cases",
                   help="with several datasets: draw cases uniformly over all cases (default) or uniformly "
                        "over datasets, then over the dataset's cases")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    _add_training_options(p, "the masked-reconstruction recipe of the foundation's preset (cpu-mae-pretrain for "
                             "cpu-*), else mae-nnssl")
    p.set_defaults(func=cmd_pretrain_ssl_head)

    p = sub.add_parser("recipes", help="list the built-in training recipes",
                       description="Print every built-in training recipe (optimiser, schedule, loss, budget, "
                                   "learning rates); --show NAME prints one in full, as a file to start from.")
    p.add_argument("--show", default=None, metavar="NAME", help="print this recipe (a name or a file) as YAML")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("finetune", help="few-shot fine-tune a model folder and evaluate it on the test split",
                       description="Split the dataset 80/20 (fixed by --split-seed), draw K training cases "
                                   "(--shots, --seed), fine-tune with --method, predict and evaluate the "
                                   "test split (DSC, NSD at 1 mm, HD95).")
    _add_run_inputs(p, "foundation model folder")
    p.add_argument("--method", required=True, help=METHODS_HELP)
    _add_method_options(p)
    p.add_argument("--shots", type=_shots, required=True,
                   help="number of annotated training cases K, or all (every case of the train split)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default: the recipe's for the method; dgst-paper: 1e-3, "
                        "1e-2 for scratch)")
    _add_head_option(p)
    _add_postprocess_option(p)
    p.add_argument("--transductive", choices=("query", "batch"), default=None,
                   help="FSEFT's transductive inference: the test volumes' predicted sizes are kept within a "
                        "margin of the support's (spatial-adapter); query: an adapter per test volume (the "
                        "paper's), batch: one for all")
    p.add_argument("--ti-lambda", type=float, default=None,
                   help="weight lambda of the size constraint (default 0.1, the authors' TI commands; the text: 1)")
    p.add_argument("--ti-margin", type=float, default=None,
                   help="margin gamma of the size constraint, in [0, 1) (default 0.3, the authors' TI commands)")
    p.add_argument("--ti-error", choices=("max", "prior", "proportion"), default=None,
                   help="how the size error is normalised: max (default, the authors' code: (S - S^)/max(S^, S), "
                        "bounded), prior (divided by the prior S), proportion (the text's Eq. 2 in proportions "
                        "of the query)")
    p.add_argument("--ti-step", choices=("epoch", "every"), default=None,
                   help="epoch (default, the authors' code: its own optimiser step once per epoch) or every "
                        "(the text's Eq. 3: summed into the loss of every support step)")
    p.add_argument("--feature-cache", action="store_true",
                   help="linear-probe / spatial-adapter: compute each support volume's backbone features once "
                        "(sliding window) and train the head on patches of them; no input-space augmentation "
                        "(beyond the paper; docs/methods.md)")
    _add_training_options(p, "the one the model folder recommends, else dgst-paper")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("zero-shot", help="evaluate a model as it is (no fine-tuning) on a dataset's test split",
                       description="Predict and evaluate the test part of the same fixed 80/20 split that "
                                   "finetune uses, with the model's own heads: the 'Foundation, no fine-tuning' "
                                   "reference. The dataset's label names must be classes of the model (a "
                                   "partially labelled model is evaluated on the classes the dataset labels).")
    _add_run_inputs(p, "model folder")
    p.add_argument("--all-cases", action="store_true",
                   help="evaluate every case of --data (a held-out cohort) instead of its test split")
    _add_postprocess_option(p)
    p.add_argument("--resume", action="store_true", help="reuse a finished run in the same --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser("methods", help="list the fine-tuning methods with their trainable parameters",
                       description="For a model folder or a preset network, print every fine-tuning method with "
                                   "its trainable-parameter count, its share of the model and the entries one "
                                   "step updates.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model folder (e.g. the demo's foundation model)")
    source.add_argument("--preset", default=None, help="a network preset (one input channel, one foreground class)")
    _add_method_options(p)
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("bench-speed", help="seconds per training iteration of every method, side by side",
                       description="Time every fine-tuning method on the same batches in one process "
                                   "(interleaved), split into forward, backward, selection and optimizer step; "
                                   "ratio to full; peak memory. With --against-nnunet: medadapt's training step "
                                   "against nnU-Net's on the same network, weights and batches.")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--model", type=Path, help="a model folder to time")
    net.add_argument("--preset", default=None, help="a network preset (default cpu-small)")
    p.add_argument("--patch", type=_positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="patch size (default: the network's)")
    p.add_argument("--batch", type=_positive_int, default=None, help="batch size (default: the network's)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: all); also MedSeqFT's stages kd-fft (KD-based FFT) and "
                        "lora-kd (LoRA-based KD), timed through their own steps, and linear-probe+cache / "
                        "spatial-adapter+cache: the head's step on cached backbone features (finetune "
                        "--feature-cache)")
    p.add_argument("--iterations", type=_positive_int, default=5, help="timed iterations per method (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--against-nnunet", action="store_true",
                   help="time medadapt's training step (Trainer.train_step) against nnU-Net's "
                        "(nnUNetTrainer.train_step) for full and dgst: the same network (an nnU-Net network: "
                        "PlainConvUNet presets or an nnU-Net model), weights, batches, patch, loss and device, "
                        "interleaved; prints both medians and the ratios (no memory measurement; needs nnunetv2)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="the engine's mixed precision for medadapt's steps (default auto: fp16 autocast + gradient "
                        "scaler on a GPU, as nnU-Net's trainer; fp32 on the CPU)")
    _add_method_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_speed)

    p = sub.add_parser("predict", help="predict label maps for a NIfTI file or folder",
                       description="Sliding-window prediction (Gaussian-weighted, 50%% overlap) of every "
                                   "case in --input; label maps are written in each input's geometry.")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--input", type=Path, required=True,
                   help="a NIfTI file, a folder of <case>_0000.nii.gz files, or a folder of DICOM CT series (one "
                        "case per series)")
    p.add_argument("--out", type=Path, required=True, help="output folder for <case>.nii.gz label maps")
    p.add_argument("--overlap", type=float, default=0.5, help="tile overlap (default 0.5)")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring (8x slower)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="predict only these classes of the model, e.g. liver,spleen (written as 1, 2, ...) or "
                        "liver=3,spleen=1 (default: every class, with the model's ids)")
    _add_postprocess_option(p)
    cli_dicom.add_predict_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="DSC, NSD and HD95 of predictions against ground truth",
                       description="Per case and class: DSC, NSD at --tolerance-mm and HD95 (mm), using "
                                   "voxel spacing; writes metrics_per_case.csv and summary.json.")
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted <case>.nii.gz")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth <case>.nii.gz")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--out", type=Path, default=None, help="where to write results (default: --pred)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export-nnunet", help="write a model folder as an nnU-Net v2 trained model folder (and zip)",
                       description="Write a medadapt model folder (e.g. <finetune run>/model) as an nnU-Net v2 "
                                   "trained model folder (dataset.json, plans.json, fold_F/checkpoint_final.pth) "
                                   "that nnUNetv2_predict_from_modelfolder and nnUNetPredictor load unchanged; "
                                   "LoRA is already merged, adapters cannot be exported. Needs "
                                   "pip install 'medadapt[nnunet]'.")
    p.add_argument("model", type=Path, help="medadapt model folder (or an nnU-Net model folder/zip)")
    p.add_argument("--out", type=Path, required=True, help="nnU-Net trained model folder to write (new or empty)")
    p.add_argument("--zip", type=Path, default=None,
                   help="also write the zip nnUNetv2_install_pretrained_model_from_zip installs")
    p.add_argument("--fold", default="0", help="fold folder name to write, fold_<FOLD> (default 0)")
    p.add_argument("--dataset-name", default=None,
                   help="DatasetXXX_Name for plans.json and the zip (default: the nnU-Net foundation's, "
                        "else Dataset999_medadapt)")
    p.set_defaults(func=cmd_export_nnunet)

    p = sub.add_parser("import-monai", help="a MONAI SwinUNETR checkpoint as a medadapt model folder",
                       description="Write a medadapt model folder (a foundation model for finetune, predict, "
                                   "zero-shot, methods) from a MONAI SwinUNETR checkpoint: a state dict as MONAI "
                                   "bundles save it, {'state_dict': ...} as the research-contributions scripts "
                                   "save it, or {'model': ...}; 'module.' prefixes are undone. The architecture is "
                                   "read from the tensors; the preprocessing is MONAI's pipeline (Orientationd, "
                                   "Spacingd, ScaleIntensityRanged), given by the options below "
                                   "(docs/swinunetr.md).")
    p.add_argument("checkpoint", type=Path,
                   help="the checkpoint file (.pt/.pth); the self-supervised Swin transformer weights "
                        "(model_swinvit.pt) need --backbone-only")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (new or empty)")
    p.add_argument("--labels", nargs="+", required=True, metavar="NAME",
                   help="class names in output-channel order, background first (as many as the checkpoint's "
                        "output channels)")
    p.add_argument("--channel-names", nargs="+", default=None, metavar="NAME",
                   help="input channel names (default: CT for every input channel)")
    p.add_argument("--roi-size", type=_positive_int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"),
                   help="patch size as MONAI's roi_size, x y z, multiples of 32 (default 96 96 96)")
    p.add_argument("--pixdim", type=float, nargs=3, default=[1.5, 1.5, 2.0], metavar=("X", "Y", "Z"),
                   help="the spacing in mm the model was trained at, as MONAI's Spacingd pixdim, x y z after "
                        "--orientation (default 1.5 1.5 2.0: the BTCV pipeline)")
    p.add_argument("--orientation", default="RAS", help="axis codes of MONAI's Orientationd (default RAS)")
    p.add_argument("--intensity-range", type=float, nargs=2, default=[-175.0, 250.0], metavar=("A_MIN", "A_MAX"),
                   help="ScaleIntensityRanged a_min a_max, clipped (default -175 250: the BTCV pipeline)")
    p.add_argument("--output-range", type=float, nargs=2, default=[0.0, 1.0], metavar=("B_MIN", "B_MAX"),
                   help="ScaleIntensityRanged b_min b_max (default 0 1)")
    p.add_argument("--backbone-only", action="store_true",
                   help="load the Swin transformer (swinViT) alone; the conv blocks, decoder and head start from "
                        "MONAI's initialisation (seeded by --seed)")
    p.add_argument("--arch-kwargs", default=None, metavar="JSON",
                   help="SwinUNETR constructor arguments the weights cannot tell, as a JSON object, e.g. "
                        "'{\"downsample\": \"mergingv2\"}' (default: MONAI's: downsample merging, normalize true)")
    p.add_argument("--recipe", default="swinunetr-btcv",
                   help="the fine-tuning recipe the model folder recommends (default swinunetr-btcv)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of what --backbone-only initialises (default 0)")
    p.set_defaults(func=cmd_import_monai)

    p = sub.add_parser("nnunet-train", help="nnU-Net's own trainer with a medadapt fine-tuning method",
                       description="Run nnunetv2's trainer (its data augmentation, deep supervision, validation "
                                   "and checkpoint format) on a dataset preprocessed by nnUNetv2_plan_and_preprocess, "
                                   "with --method applied, on --shots training cases drawn as 'medadapt "
                                   "finetune' draws them (80/20 split by --split-seed, validation on the 20%%). "
                                   "Output: $nnUNet_results/<dataset>/nnUNetTrainerMedadapt_<method>__<plans>__"
                                   "<configuration>/fold_<FOLD>, loadable by nnU-Net's predictor. Needs "
                                   "pip install 'medadapt[nnunet]'.")
    p.add_argument("dataset", help="nnU-Net dataset id or name, e.g. 502 or Dataset502_Tgt")
    p.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="names the output fold_<FOLD> folder (the split is medadapt's few-shot split)")
    p.add_argument("--method", required=True, help=METHODS_HELP + "; adapter cannot be saved for nnU-Net")
    _add_method_options(p)
    p.add_argument("--shots", type=_positive_int, required=True, help="number of annotated training cases K")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of the fixed 80/20 split (default 0)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="foundation weights: an nnU-Net checkpoint (.pth), model folder or zip, or a medadapt "
                        "model folder; the dataset must be preprocessed with the foundation's plans")
    _add_head_option(p)
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 1e-3 as the paper; 1e-2 for scratch)")
    p.add_argument("--epochs", type=_positive_int, default=12, help="training epochs (default 12; nnU-Net: 1000)")
    p.add_argument("--iterations-per-epoch", type=_positive_int, default=25,
                   help="iterations per epoch (default 25; nnU-Net uses 250)")
    p.add_argument("--val-iterations", type=_positive_int, default=5,
                   help="validation iterations per epoch (default 5; nnU-Net uses 50)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0); recorded with the results")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-final-validation", action="store_true",
                   help="skip nnU-Net's final sliding-window validation of the validation cases")
    p.add_argument("--nnunet-preprocessed", type=Path, default=None,
                   help="nnU-Net's preprocessed folder (default: $nnUNet_preprocessed)")
    p.add_argument("--nnunet-results", type=Path, default=None,
                   help="nnU-Net's results folder (default: $nnUNet_results)")
    p.add_argument("--quiet", action="store_true", help="hide nnU-Net's training log (it is still written to "
                                                          "the fold folder)")
    p.set_defaults(func=cmd_nnunet_train)

    p = sub.add_parser("demo", help="the whole chain on built-in synthetic cohorts (about 4 min on 2 CPU cores)",
                       description="Generate two synthetic hospitals, pretrain a small foundation model on "
                                   "the first (cached), fine-tune it with K scans of the second using "
                                   "scratch, full and DGST, evaluate on held-out scans, print a table and "
                                   "write a figure.")
    p.add_argument("--workdir", type=Path, default=Path("medadapt_runs/demo"),
                   help="where data, models and results go (default medadapt_runs/demo)")
    p.add_argument("--shots", type=_positive_int, default=5, help="annotated target scans K (default 5)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for data, training and the K-shot draw")
    p.add_argument("--fresh", action="store_true",
                   help="re-run the fine-tuning runs even if finished ones exist (the foundation model "
                        "stays cached)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("mds-stability", help="how many maskings R the MDS buffer needs before it stops changing",
                       description="Score every training case of each task by the foundation's pretext loss at up "
                                   "to --repeats random maskings (MedSeqFT's MDS, batched), read the K-case buffer "
                                   "at every power of two R from the same draws, and report where it stops "
                                   "changing: the R for seqft --mds-repeats. Writes stability.csv/.json/.md/.png "
                                   "into --out.")
    p.add_argument("--model", type=Path, required=True, help="the foundation (with a pretext network: an MAE "
                                                             "foundation, or one with pretrain-ssl-head's pathway)")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="a task's nnU-Net raw dataset (repeat for several tasks); its 80%% train split is scored")
    p.add_argument("--out", type=Path, required=True, help="folder for the measurement")
    p.add_argument("--repeats", type=_positive_int, default=1000,
                   help="the largest R measured (default 1000, the paper's)")
    p.add_argument("--buffer-size", type=_positive_int, default=4, help="K, the buffer's cases per task (default 4)")
    p.add_argument("--seed", type=_seed, default=0, help="mask seed (default 0)")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of each task's 80/20 split (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mds_stability)

    p = sub.add_parser("seqft", help="fine-tune task after task over a stream of datasets (MedSeqFT)",
                       description="Sequential fine-tuning (MedSeqFT, docs/sequential.md): every task of STREAM, in "
                                   "order, each from the previous task's model (seq-ft, medseqft) or each from "
                                   "the foundation (any finetune method: the parallel baselines). Every task gets "
                                   "its own model folder and test-split metrics (Dice, NSD, HD95); a killed run "
                                   "resumes at the task in progress (--resume), and a stream extended by new "
                                   "tasks continues where it stopped.")
    p.add_argument("stream", type=Path, help="stream file: YAML listing the tasks' nnU-Net raw datasets in order "
                                             "('medadapt synth --stream ct-stream --out DIR' writes one)")
    p.add_argument("--model", type=Path, required=True, help="foundation model folder M0")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--method", default="medseqft",
                   help="medseqft (default: MDS buffer + K&G RFT), seq-ft (vanilla sequential; ablations with "
                        "--buffer/--retention), or a finetune method run on each task from M0 (full = FFT, "
                        "scratch = TFS, linear-probe = head fine-tuning, lora, adapter, ...)")
    p.add_argument("--buffer", choices=("none", "random", "mds"), default=None,
                   help="seq-ft: the replay buffer the encoder distillation runs on (default none; medseqft: mds)")
    p.add_argument("--retention", choices=("none", "lora-kd"), default=None,
                   help="seq-ft: LoRA-based KD of each task's encoder into the previous one, then merge "
                        "(default none; medseqft: lora-kd)")
    p.add_argument("--buffer-size", type=_positive_int, default=4,
                   help="K: cases of each task added to the buffer (default 4; the paper does not say)")
    p.add_argument("--mds-repeats", type=_positive_int, default=16,
                   help="R: random maskings averaged per case for MDS (default 16 on CPU; the paper: 1000)")
    p.add_argument("--kd-rank", type=_positive_int, default=2, help="LoRA rank of the LoRA-based KD (default 2)")
    p.add_argument("--kd-until", choices=("levelled", "budget"), default="levelled",
                   help="LoRA-based KD: levelled (default) = until L_refine has levelled off, at a constant tenth of "
                        "the fine-tuning lr, at most --kd-max-epochs; budget = a fifth of the fine-tuning epochs on "
                        "its schedule (the paper's VoCo CT ratio)")
    p.add_argument("--kd-max-epochs", type=_positive_int, default=None,
                   help="--kd-until levelled: the stage's ceiling in epochs (default: the fine-tuning epochs; at "
                        "least 10, what the convergence check needs)")
    p.add_argument("--kd-recipe", default=None,
                   help="recipe of the LoRA-based KD stage (default: derived from the fine-tuning recipe, see "
                        "--kd-until); with --kd-until levelled its epochs are the ceiling")
    _add_method_options(p)
    p.add_argument("--shots", type=_shots, default="all",
                   help="training cases per task: K, or all (default: every case of the 80%% train split)")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of each task's 80/20 split (default 0)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    _add_postprocess_option(p)
    _add_training_options(p, "the one the model folder recommends, else dgst-paper")
    p.set_defaults(func=cmd_seqft)

    p = sub.add_parser("bench", help="benchmark grids: the DGST paper's Tables 1-2 and Fig. 3, FSEFT's Table 1 and "
                                     "Fig. 2, or MedSeqFT's Tables II, III, VI, VII and Fig. 4 (resumable)",
                       description="Run a grid of fine-tuning cells and write the paper's tables as Markdown and "
                                   "CSV (mean over seeds, spreads, marks only where a paired test separates "
                                   "methods) and its figures. Finished cells are stored and never re-run; a "
                                   "changed config re-runs only the cells it changes. A DGST config (default, "
                                   "quick, paper): datasets x shots x methods x seeds, DGST's paired "
                                   "differences, a gamma plot, loss curves, contours. An fseft config (fseft, "
                                   "fseft-cpu, fseft-quick): FSEFT's Table 1, Fig. 2a, Fig. 2b, contours. A medseqft config "
                                   "(medseqft, medseqft-quick): one cell per (row, seed) runs 'medadapt seqft' "
                                   "over a task stream (TFS, FFT, head fine-tuning, LoRA r = 2..32, adapters, "
                                   "joint training, Seq. FT, + Random, + MDS, + K&G RFT, MedSeqFT) and one per "
                                   "(unseen task, row, seed) fine-tunes from M0 or from MedSeqFT's refined M_n; "
                                   "the report has Table II (methods x tasks, Dice and HD95), Table III "
                                   "(ablation), Table VI (unseen tasks), Table VII (time per stage), Fig. 4 "
                                   "(encoder change), forgetting and forward transfer, and MedSeqFT's paired "
                                   "differences (docs/benchmark.md).")
    p.add_argument("config", help="built-in grid (default: 236 cells, 3 seeds, within 2 h on 2 idle CPU cores "
                                  "with --ray local; quick: ~1 min; paper: the paper's sizes, for a GPU "
                                  "cluster; fseft: the FSEFT paper's Table 1 and Fig. 2a/2b as its authors ran them, 471 cells, ~21 h; "
                                  "fseft-cpu: the same on 3 tasks and 2 seeds, 172 cells, ~6.5 h; fseft-quick: seconds; medseqft: MedSeqFT's tables on the synthetic CT "
                                  "stream, 48 cells, about 2 h with --ray local; medseqft-quick: "
                                  "seconds) or a YAML grid config")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where data, cells and the report go (default medadapt_runs/bench/<config name>)")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the tables and figures from the stored cells (no training)")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is finished; run nothing")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run cells as Ray tasks: 'auto' (the cluster this machine is in), a cluster address, "
                        "or 'local' (a private instance here); needs pip install 'medadapt[ray]' and a work "
                        "folder every node can read and write")
    p.add_argument("--first-shots", type=_positive_int, default=None, metavar="K",
                   help="run the cells with K shots before the others (only the order changes: a grid that may "
                        "not finish in the time at hand completes one group of Table 1 first; DGST and FSEFT "
                        "grids)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_bench)
    cli_dicom.add_parsers(sub)  # import-dicom, to-dicom, dataset-to-dicom
    return parser


def _version() -> str:
    from medadapt import __version__

    return f"medadapt {__version__}"


def _print_metrics(summary: dict, what: str) -> None:
    """One line per class: mean ± std over cases of DSC and NSD (%) and HD95 (mm)."""
    from medadapt.metrics import format_mean_std

    tol = summary.get("tolerance_mm")
    for name, m in summary["classes"].items():
        undefined = m.get("hd95_undefined", 0)
        hd_note = f", undefined in {undefined} of {m['n_cases']}: one mask empty" if undefined else ""
        print(f"{name}: DSC {format_mean_std(m['dsc']['mean'], m['dsc']['std'], percent=True)}  "
              f"NSD@{tol:g}mm {format_mean_std(m['nsd']['mean'], m['nsd']['std'], percent=True)}  "
              f"HD95 {format_mean_std(m['hd95']['mean'], m['hd95']['std'])} mm{hd_note}  ({m['n_cases']} {what})")


# -- commands -------------------------------------------------------------------------------------------------
def cmd_synth(args) -> int:
    from medadapt.synth import builtin_domains, load_domain, write_dataset

    if args.list:
        for name in builtin_domains():
            spec = load_domain(name)
            print(f"{name:<20} {spec.region:<12} {', '.join(n for n, i in spec.dataset_labels.items() if i)}")
        return 0
    if args.stream is not None:
        if args.domain or args.out is None:
            raise MedadaptError("synth --stream NAME needs --out and no DOMAIN (see 'medadapt synth --help')")
        from medadapt.sequential.stream import write_synthetic_stream

        path = write_synthetic_stream(args.stream, args.out, cases=args.cases, seed=args.seed,
                                      downsample=tuple(args.downsample) if args.downsample else None,
                                      progress=not args.quiet)
        print(f"wrote the {args.stream!r} stream's datasets ({args.cases} cases each) and {path}")
        return 0
    if not args.domain or args.out is None:
        raise MedadaptError("synth needs a DOMAIN and --out (see 'medadapt synth --help'; "
                            "'medadapt synth --list' shows the built-in domains)")
    spec = load_domain(args.domain)
    if args.downsample:
        spec = spec.downsampled(tuple(args.downsample))
    path = write_dataset(spec, args.out, num_cases=args.cases, seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.cases} cases of domain {args.domain!r} to {path}")
    return 0


def cmd_pretrain(args) -> int:
    from medadapt.workflows.pretrain import pretrain

    pretrain(args.data, args.out, preset_name=args.preset, epochs=args.epochs,
             iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, seed=args.seed, resume=args.resume,
             progress=not args.quiet, recipe=args.recipe, activation=args.activation, sampling=args.sampling,
             objective=args.objective, engine=_engine(args))
    from medadapt.engine.distributed import is_main

    if is_main():
        print(f"model folder written to {args.out}")
    return 0


def cmd_pretrain_ssl_head(args) -> int:
    from medadapt.engine.distributed import is_main
    from medadapt.workflows.ssl import pretrain_ssl_head

    folder = pretrain_ssl_head(args.model, args.data, args.out, epochs=args.epochs,
                               iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, seed=args.seed,
                               resume=args.resume, progress=not args.quiet, recipe=args.recipe,
                               sampling=args.sampling, engine=_engine(args))
    if is_main():
        mask = folder.pretext["mask"]
        print(f"model folder with a masked-reconstruction pathway ({'x'.join(map(str, mask['block_size']))} blocks, "
              f"{mask['mask_ratio']:g} masked) written to {args.out}")
    return 0


def _transductive(args):
    from medadapt.tuning.transductive import Transductive

    if args.transductive is None:
        if any(v is not None for v in (args.ti_lambda, args.ti_margin, args.ti_error, args.ti_step)):
            raise MedadaptError("--ti-lambda/--ti-margin/--ti-error/--ti-step: only with --transductive query|batch")
        return None
    given = {"weight": args.ti_lambda, "margin": args.ti_margin, "error": args.ti_error, "step": args.ti_step}
    return Transductive(mode=args.transductive, **{k: v for k, v in given.items() if v is not None})


def cmd_finetune(args) -> int:
    from medadapt.workflows.finetune import finetune

    record = finetune(args.model, args.data, args.out, method=args.method, shots=args.shots, seed=args.seed,
                      gamma=args.gamma, split_seed=args.split_seed, epochs=args.epochs,
                      iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, resume=args.resume,
                      progress=not args.quiet, method_options=_method_options(args), head=args.head,
                      recipe=args.recipe, postprocess=args.postprocess, transductive=_transductive(args),
                      engine=_engine(args), feature_cache=args.feature_cache,
                      pretext_decoder=args.pretext_decoder)
    if not record:  # a torchrun rank other than 0: rank 0 reports
        return 0
    _print_metrics(record["metrics"], "test cases")
    sizes = record["sizes"]
    print(f"model: {args.out / 'model'} ({sizes['checkpoint_bytes'] / 1024:,.0f} KiB); as a delta against the "
          f"foundation: {args.out / 'delta.pt'} ({sizes['delta_bytes'] / 1024:,.0f} KiB)")
    print(f"results in {args.out}")
    return 0


def cmd_recipes(args) -> int:
    import yaml

    from medadapt.engine.recipe import builtin_recipe_names, load_recipe
    from medadapt.utils.tables import markdown_table

    if args.show:
        print(yaml.safe_dump(load_recipe(args.show).to_dict(), sort_keys=False).rstrip())
        return 0
    rows = []
    for name in builtin_recipe_names():
        r = load_recipe(name)
        lrs = ", ".join(f"{m} {v:g}" for m, v in r.method_lr.items())
        rows.append([name, r.optimizer["name"], r.schedule["name"], r.loss["name"],
                     f"{r.epochs} x {r.iterations_per_epoch}", f"{r.lr:g}" + (f" ({lrs})" if lrs else "")])
    print(markdown_table(["recipe", "optimizer", "schedule", "loss", "epochs x iterations", "lr"], rows))
    return 0


def cmd_zero_shot(args) -> int:
    from medadapt.workflows.finetune import zero_shot

    record = zero_shot(args.model, args.data, args.out, split_seed=args.split_seed, resume=args.resume,
                       progress=not args.quiet, postprocess=args.postprocess, all_cases=args.all_cases)
    _print_metrics(record["metrics"], "cases" if args.all_cases else "test cases")
    print(f"results in {args.out}")
    return 0


def cmd_methods(args) -> int:
    from medadapt.models import load_model_folder
    from medadapt.workflows.methods import methods_table

    if args.preset is not None:
        from medadapt.models import preset
        from medadapt.models.network import seeded_network

        network = seeded_network(preset(args.preset, input_channels=1, num_classes=2), 0)
        _, text = methods_table(network=network, label=f"preset {args.preset}", gamma=args.gamma,
                                **_method_options(args))
    else:
        _, text = methods_table(load_model_folder(args.model), gamma=args.gamma, **_method_options(args))
    print(text)
    return 0


def cmd_bench_speed(args) -> int:
    from medadapt.benchmark.speed import run_bench_speed

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    options = {"gamma": args.gamma, **_method_options(args)}
    run_bench_speed(model=args.model, preset_name=args.preset, patch=args.patch, batch=args.batch, methods=methods,
                    iterations=args.iterations, warmup=args.warmup, memory=not args.no_memory, device=args.device,
                    as_json=args.json, options={k: v for k, v in options.items() if v is not None},
                    progress=not args.quiet, precision=args.precision, against_nnunet=args.against_nnunet)
    return 0


def cmd_predict(args) -> int:
    from medadapt.data.dataset import find_images
    from medadapt.inference import Predictor
    from medadapt.models import load_model_folder

    folder = load_model_folder(args.model)
    series = cli_dicom.find_input_series(args.input, args.format)  # DICOM CT series, or None for NIfTI input
    if series is None:
        cases = find_images(args.input, folder.file_ending, num_channels=folder.network.input_channels)
    if not 0 <= args.overlap < 1:
        raise MedadaptError(f"--overlap {args.overlap}: must be in [0, 1)")
    from medadapt.inference.predictor import parse_classes

    predictor = Predictor(folder, overlap=args.overlap, mirror=args.mirror, postprocess=args.postprocess,
                          classes=parse_classes(args.classes))
    if series is not None:
        return cli_dicom.predict_series(predictor, series, args)
    written = predictor.predict_files(cases, args.out, progress=not args.quiet)
    print(f"wrote {len(written)} label map(s) to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from medadapt.metrics import evaluate_folders

    if not args.tolerance_mm >= 0:
        raise MedadaptError(f"--tolerance-mm {args.tolerance_mm}: must be >= 0")
    out = args.out or args.pred
    summary = evaluate_folders(args.pred, args.gt, out, tolerance_mm=args.tolerance_mm,
                               progress=not args.quiet)
    _print_metrics(summary, "cases")
    print(f"wrote {out / 'metrics_per_case.csv'} and {out / 'summary.json'}")
    return 0


def cmd_export_nnunet(args) -> int:
    from medadapt.nnunet.env import import_nnunet

    import_nnunet()  # a missing nnunetv2 is one line, before any work
    from medadapt.nnunet.export import export_model

    out = export_model(args.model, args.out, zip_path=args.zip, fold=args.fold, dataset_name=args.dataset_name)
    print(f"nnU-Net model folder written to {out}" + (f" and {args.zip}" if args.zip else ""))
    print(f"predict with: nnUNetv2_predict_from_modelfolder -m {out} -f {args.fold} -i INPUT -o OUTPUT")
    return 0


def cmd_import_monai(args) -> int:
    from medadapt.workflows.import_monai import import_monai, parse_arch_kwargs

    folder = import_monai(args.checkpoint, args.out, args.labels, channel_names=args.channel_names,
                          roi_size=args.roi_size, pixdim=args.pixdim, orientation=args.orientation,
                          intensity_range=args.intensity_range, output_range=args.output_range,
                          backbone_only=args.backbone_only, arch_kwargs=parse_arch_kwargs(args.arch_kwargs),
                          recipe=args.recipe, seed=args.seed)
    arch = folder.network.arch_kwargs
    prov = folder.provenance
    print(f"SwinUNETR: feature size {arch['feature_size']}, depths {arch['depths']}, heads {arch['num_heads']}, "
          f"window {arch['window_size']}, {folder.network.input_channels} -> {folder.network.num_classes} channels, "
          f"{prov['parameters']:,} parameters; {prov['loaded_tensors']} tensors loaded"
          + (", the rest initialised as MONAI does" if prov["backbone_only"] else ""))
    r = folder.plan().intensity_ranges[0]
    print(f"preprocessing: orientation {args.orientation}, pixdim {' x '.join(f'{v:g}' for v in args.pixdim)} mm, "
          f"ScaleIntensityRange [{r.a_min:g}, {r.a_max:g}] -> [{r.b_min:g}, {r.b_max:g}], patch "
          f"{' x '.join(map(str, args.roi_size))}")
    print(f"model folder written to {args.out}")
    return 0


def cmd_nnunet_train(args) -> int:
    import contextlib
    import io

    from medadapt.nnunet.env import import_nnunet, set_paths

    set_paths(preprocessed=args.nnunet_preprocessed, results=args.nnunet_results)
    import_nnunet("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    from medadapt.nnunet.trainer import nnunet_train

    with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
        out = nnunet_train(args.dataset, args.configuration, args.fold, method=args.method, shots=args.shots,
                           pretrained=args.pretrained, seed=args.seed, split_seed=args.split_seed,
                           gamma=args.gamma, method_options=_method_options(args), epochs=args.epochs,
                           iterations_per_epoch=args.iterations_per_epoch, val_iterations=args.val_iterations,
                           lr=args.lr, plans_identifier=args.plans, device=args.device,
                           final_validation=not args.no_final_validation, head=args.head)
    print(f"nnU-Net trained model in {out.parent} (fold {args.fold}); predict with: "
          f"nnUNetv2_predict_from_modelfolder -m {out.parent} -f {args.fold} -i INPUT -o OUTPUT")
    return 0


def cmd_demo(args) -> int:
    from medadapt.workflows.demo import run_demo

    run_demo(args.workdir, shots=args.shots, seed=args.seed, fresh=args.fresh, progress=not args.quiet)
    return 0


def cmd_mds_stability(args) -> int:
    from medadapt.workflows.mds_stability import mds_stability, summary_line

    record = mds_stability(args.model, args.data, args.out, repeats=args.repeats, buffer_size=args.buffer_size,
                           seed=args.seed, split_seed=args.split_seed, progress=not args.quiet)
    print((args.out / "stability.md").read_text(), end="")
    print(summary_line(record))
    return 0


def cmd_seqft(args) -> int:
    from medadapt.workflows.seqft import seqft

    summary = seqft(args.stream, args.model, args.out, method=args.method, buffer=args.buffer,
                    retention=args.retention, buffer_size=args.buffer_size, mds_repeats=args.mds_repeats,
                    kd_rank=args.kd_rank, kd_until=args.kd_until, kd_max_epochs=args.kd_max_epochs,
                    shots=args.shots, seed=args.seed, split_seed=args.split_seed,
                    recipe=args.recipe, kd_recipe=args.kd_recipe, epochs=args.epochs,
                    iterations_per_epoch=args.iterations_per_epoch, lr=args.lr,
                    method_options=_method_options(args), postprocess=args.postprocess, resume=args.resume,
                    progress=not args.quiet, engine=_engine(args), pretext_decoder=args.pretext_decoder)
    print((args.out / "results.md").read_text(), end="")
    print(f"{len(summary['tasks'])} task(s); results in {args.out}")
    return 0


def cmd_bench(args) -> int:
    from medadapt.benchmark.medseqft import is_medseqft_config

    if is_medseqft_config(args.config):  # a medseqft section: the MedSeqFT grid's own cells, runner and report
        from medadapt.benchmark import medseqft as grid, report_medseqft as report, runner_medseqft as runner
    else:
        from medadapt.benchmark import grid, report, runner
    enumerate_cells, load_config, write_report = grid.enumerate_cells, grid.load_config, report.write_report
    default_workdir, grid_paths = runner.default_workdir, runner.grid_paths
    load_cell_record, run_grid = runner.load_cell_record, runner.run_grid

    config = load_config(args.config)
    workdir = args.workdir or default_workdir(config)
    if args.list:
        paths = grid_paths(config, workdir)
        cells = enumerate_cells(config)
        done = 0
        for cell in cells:
            finished = load_cell_record(paths, cell) is not None
            done += finished
            print(f"{'done' if finished else 'todo'}  {cell.cell_id}  [{', '.join(cell.experiments)}]")
        print(f"{done}/{len(cells)} cells finished in {paths.workdir}")
        return 0
    if args.report:
        write_report(config, workdir, progress=not args.quiet)
        return 0
    if args.first_shots is not None and is_medseqft_config(args.config):
        raise MedadaptError("--first-shots: a MedSeqFT grid's cells are tasks of a stream, not shot counts; "
                            "leave it out")
    extra = {"first_shots": args.first_shots} if args.first_shots is not None else {}
    result = run_grid(config, workdir, ray_address=args.ray, progress=not args.quiet, **extra)
    if not args.quiet:
        print(f"{result['ran']} cells run in {result['seconds'] / 60:.1f} min; report in {result['report']['dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from medadapt.utils.allocator import keep_freed_memory

    keep_freed_memory()  # glibc: reuse freed tensor memory instead of page-faulting it back in every iteration
    try:
        return args.func(args)
    except MedadaptError as exc:
        print(f"medadapt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medadapt {args.command}: interrupted; finished work is kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
