"""``medadapt export-nnunet`` and ``medadapt nnunet-train``, which the nnU-Net plugin registers
(:mod:`medadapt.nnunet.plugin`); each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import (MODEL_NAMES_HELP, CommandGroup, add_head_option, add_method_options,
                                 method_options, model_arg, positive_int, seed_arg, shots_arg)


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("export-nnunet", "write a model folder as an nnU-Net v2 trained model folder (and zip)",
                  "Write a medadapt model folder (e.g. <finetune run>/model) as an nnU-Net v2 "
                  "trained model folder (dataset.json, plans.json, fold_F/checkpoint_final.pth) "
                  "that nnUNetv2_predict_from_modelfolder and nnUNetPredictor load unchanged; "
                  "LoRA is already merged, adapters cannot be exported. Needs "
                  "pip install 'medadapt[nnunet]'.")
def add_export_nnunet(p):
    p.add_argument("model", type=model_arg,
                   help="medadapt model folder (or an nnU-Net model folder/zip)" + MODEL_NAMES_HELP)
    p.add_argument("--out", type=Path, required=True, help="nnU-Net trained model folder to write (new or empty)")
    p.add_argument("--zip", type=Path, default=None,
                   help="also write the zip nnUNetv2_install_pretrained_model_from_zip installs")
    p.add_argument("--fold", default="0", help="fold folder name to write, fold_<FOLD> (default 0)")
    p.add_argument("--dataset-name", default=None,
                   help="DatasetXXX_Name for plans.json and the zip (default: the nnU-Net foundation's, "
                        "else Dataset999_medadapt)")
    return cmd_export_nnunet


def cmd_export_nnunet(args) -> int:
    from medadapt.nnunet.env import import_nnunet

    import_nnunet()  # a missing nnunetv2 is one line, before any work
    from medadapt.nnunet.export import export_model

    out = export_model(args.model, args.out, zip_path=args.zip, fold=args.fold, dataset_name=args.dataset_name)
    print(f"nnU-Net model folder written to {out}" + (f" and {args.zip}" if args.zip else ""))
    print(f"predict with: nnUNetv2_predict_from_modelfolder -m {out} -f {args.fold} -i INPUT -o OUTPUT")
    return 0


@commands.command("nnunet-train", "nnU-Net's own trainer with a medadapt fine-tuning method",
                  "Run nnunetv2's trainer (its data augmentation, deep supervision, validation "
                  "and checkpoint format) on a dataset preprocessed by nnUNetv2_plan_and_preprocess, "
                  "with --method applied, on --shots training cases drawn as 'medadapt "
                  "finetune' draws them (80/20 split by --split-seed, validation on the 20%%; or --split: "
                  "nnU-Net's splits_final.json at fold FOLD, a list of test cases, or none). "
                  "Output: $nnUNet_results/<dataset>/nnUNetTrainerMedadapt_<method>__<plans>__"
                  "<configuration>/fold_<FOLD>, loadable by nnU-Net's predictor. Needs "
                  "pip install 'medadapt[nnunet]'.")
def add_nnunet_train(p):
    p.add_argument("dataset", help="nnU-Net dataset id or name, e.g. 502 or Dataset502_Tgt")
    p.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="names the output fold_<FOLD> folder, and the fold of a splits_final.json given "
                                "with --split (as nnUNetv2_train's FOLD)")
    from medadapt.tuning import method_names

    p.add_argument("--method", required=True,
                   help=f"fine-tuning method: {', '.join(method_names(exportable_only=True))} (the methods whose "
                        "result is "
                        "nnU-Net's plain network; 'medadapt methods' lists them)")
    add_method_options(p)
    p.add_argument("--shots", type=shots_arg, default=None,
                   help="number of annotated training cases K, or all; default all with --split, else required")
    p.add_argument("--split-seed", type=seed_arg, default=0, help="seed of the fixed 80/20 split (default 0)")
    p.add_argument("--split", default=None, metavar="FILE|none",
                   help="nnU-Net's splits_final.json (fold FOLD's val cases validate), a file of test case ids "
                        "(one per line), or none (every case trains; validation on the training cases, as "
                        "nnU-Net's fold all); default the fixed 80/20 split of --split-seed")
    p.add_argument("--pretrained", type=model_arg, default=None,
                   help="foundation weights: an nnU-Net checkpoint (.pth), model folder or zip, or a medadapt "
                        "model folder; the dataset must be preprocessed with the foundation's plans"
                        + MODEL_NAMES_HELP)
    add_head_option(p)
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 1e-3 as the paper; 1e-2 for scratch)")
    p.add_argument("--epochs", type=positive_int, default=12, help="training epochs (default 12; nnU-Net: 1000)")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=25,
                   help="iterations per epoch (default 25; nnU-Net uses 250)")
    p.add_argument("--val-iterations", type=positive_int, default=5,
                   help="validation iterations per epoch (default 5; nnU-Net uses 50)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0); recorded with the results")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-final-validation", action="store_true",
                   help="skip nnU-Net's final sliding-window validation of the validation cases")
    p.add_argument("--nnunet-preprocessed", type=Path, default=None,
                   help="nnU-Net's preprocessed folder (default: $nnUNet_preprocessed)")
    p.add_argument("--nnunet-results", type=Path, default=None,
                   help="nnU-Net's results folder (default: $nnUNet_results)")
    p.add_argument("--quiet", action="store_true", help="hide nnU-Net's training log (it is still written to "
                                                          "the fold folder)")
    return cmd_nnunet_train


def cmd_nnunet_train(args) -> int:
    import contextlib
    import io

    from medadapt.nnunet.env import import_nnunet, set_paths

    set_paths(preprocessed=args.nnunet_preprocessed, results=args.nnunet_results)
    import_nnunet("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    from medadapt.data.splits import Split
    from medadapt.errors import MedadaptError
    from medadapt.nnunet.trainer import nnunet_train

    split = None
    if args.split is not None:
        is_json = str(args.split).endswith(".json")
        if is_json and not str(args.fold).isdigit():
            raise MedadaptError(f"FOLD {args.fold!r}: --split {args.split} is a splits file; FOLD must name one of "
                                "its folds (a number)")
        split = Split.parse(args.split, int(args.fold) if is_json else None, args.split_seed)
    shots = args.shots
    if shots is None:
        if split is None:
            raise MedadaptError("--shots: required (the number of annotated training cases, or all); it defaults "
                                "to all only with --split")
        shots = "all"
    with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
        out = nnunet_train(args.dataset, args.configuration, args.fold, method=args.method, shots=shots, split=split,
                           pretrained=args.pretrained, seed=args.seed, split_seed=args.split_seed,
                           method_options=method_options(args), epochs=args.epochs,
                           iterations_per_epoch=args.iterations_per_epoch, val_iterations=args.val_iterations,
                           lr=args.lr, plans_identifier=args.plans, device=args.device,
                           final_validation=not args.no_final_validation, head=args.head)
    print(f"nnU-Net trained model in {out.parent} (fold {args.fold}); predict with: "
          f"nnUNetv2_predict_from_modelfolder -m {out.parent} -f {args.fold} -i INPUT -o OUTPUT")
    return 0


@commands.command("bench-predict", "prediction's time and peak memory against nnU-Net's predictor, same model and CT",
                  "Write a synthetic planning CT (default 512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm) and, for a "
                  "2-class softmax head, a many-class softmax head and a many-class sigmoid head on a network "
                  "preset at the model spacing, time 'medadapt predict' against nnU-Net's predictor (nnUNetPredictor, "
                  "sequential, in one process) on the same exported model, with and without test-time mirroring, each in a fresh process: "
                  "wall time and peak memory (the resident high-water mark). Writes results.json/.csv/.md "
                  "to --out. Needs pip install 'medadapt[nnunet]'.")
def add_bench_predict(p):
    p.add_argument("--out", type=Path, default=Path("medadapt_runs/bench-predict"),
                   help="work and results folder (default medadapt_runs/bench-predict); the CT and the models are "
                        "reused from an earlier run there")
    p.add_argument("--shape", type=positive_int, nargs=3, default=[200, 512, 512], metavar=("Z", "Y", "X"),
                   help="the CT's voxels, z y x (default 200 512 512)")
    p.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"),
                   help="the CT's voxel size in mm, z y x (default 2.5 0.8 0.8)")
    p.add_argument("--model-spacing", type=float, default=1.5, help="the model's isotropic spacing in mm (default 1.5)")
    p.add_argument("--preset", default="cpu-small",
                   help="network preset (default cpu-small: the network sets only the time per tile)")
    p.add_argument("--many", type=positive_int, default=25, help="classes of the many-class heads (default 25)")
    p.add_argument("--heads", default=",".join(("softmax-2", "softmax-many", "sigmoid-many")),
                   help="comma-separated heads to measure (default all: softmax-2, softmax-many, sigmoid-many)")
    p.add_argument("--mirror", choices=("both", "yes", "no"), default="both",
                   help="with test-time mirroring, without, or both (default)")
    p.add_argument("--medadapt-only", action="store_true", help="measure medadapt alone")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return cmd_bench_predict


def cmd_bench_predict(args) -> int:
    from medadapt.errors import MedadaptError
    from medadapt.nnunet.predict_bench import HEADS, run_bench_predict, table

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise MedadaptError(f"--heads {args.heads}: unknown {unknown}; choose among {', '.join(HEADS)}")
    if not args.model_spacing > 0 or any(not s > 0 for s in args.spacing):
        raise MedadaptError("--spacing/--model-spacing: give positive sizes in mm")
    mirror = {"both": (False, True), "yes": (True,), "no": (False,)}[args.mirror]
    rows = run_bench_predict(args.out, shape=tuple(args.shape), spacing=tuple(args.spacing),
                             model_spacing=args.model_spacing, preset_name=args.preset, many=args.many, heads=heads,
                             mirror=mirror, tools=("medadapt",) if args.medadapt_only else ("medadapt", "nnunet"),
                             progress=not args.quiet)
    print(table(rows))
    return 0
