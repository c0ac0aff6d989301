"""The training commands: ``pretrain``, ``pretrain-ssl-head``, ``recipes``, ``finetune``, ``zero-shot``,
``methods``; each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import (MODEL_NAMES_HELP, CommandGroup, add_head_option, add_method_options,
                                 add_overlap_option, add_postprocess_option, add_run_inputs, add_sampling_option,
                                 add_training_options,
                                 engine_options, every_method_options, int_at_least, method_options, methods_help,
                                 model_arg, print_metrics, shots_arg, split_from_args, transductive_options)


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("pretrain", "train a foundation model on whole datasets",
                  "Train a segmentation network on every case of one or several nnU-Net v2 raw "
                  "datasets and write a model folder (weights + everything inference needs). "
                  "Several datasets that label different structures give a partially labelled "
                  "model: one class template (the union of their label names), one sigmoid "
                  "output per class, a loss over each case's annotated classes only "
                  "(docs/partial-labels.md).")
def add_pretrain(p):
    p.add_argument("--data", type=Path, required=True, action="append",
                   help="nnU-Net v2 raw dataset folder; repeat for several datasets")
    from medadapt.models.model_folder import ACTIVATIONS
    from medadapt.workflows.pretrain import OBJECTIVES

    p.add_argument("--objective", choices=OBJECTIVES, default="supervised",
                   help="supervised (default): segment the datasets' labels; mae: masked-volume reconstruction "
                        "(labels unused; nnssl's CNN masked autoencoder), a foundation without a segmentation "
                        "head that keeps its reconstruction head for case scoring (docs/ssl.md)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="output activation (default: softmax for one fully labelled dataset, else sigmoid)")
    add_sampling_option(p)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--preset", default="cpu-small", help="network preset (default cpu-small; see docs)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    add_training_options(p, "the preset's pretraining recipe: cpu-pretrain for cpu-*, else nnunet; with "
                             "--objective mae cpu-mae-pretrain, cpu-swin-mae-pretrain or mae-nnssl")
    return cmd_pretrain


def cmd_pretrain(args) -> int:
    from medadapt.workflows.pretrain import PretrainRequest, pretrain, resolve_pretrain

    engine = engine_options(args)
    settings = resolve_pretrain(PretrainRequest(
        args.data, preset_name=args.preset, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        lr=args.lr, seed=args.seed, recipe=args.recipe, activation=args.activation, sampling=args.sampling,
        objective=args.objective), engine)
    pretrain(settings, args.out, resume=args.resume, progress=not args.quiet, engine=engine)
    from medadapt.engine.distributed import is_main

    if is_main():
        print(f"model folder written to {args.out}")
    return 0


@commands.command("pretrain-ssl-head", "give a supervised foundation a masked-reconstruction pathway",
                  "Train a masked-volume reconstruction pathway for a supervised foundation "
                  "model: a copy of its decoder and a new 1x1x1 reconstruction head on its "
                  "encoder, which stays frozen (bit-identical). Writes the foundation's model "
                  "folder (same weights.pt; plans.json with a pretext record) plus pretext.pt to "
                  "--out, so that cases can be scored by the foundation's self-supervised loss "
                  "(docs/ssl.md).")
def add_pretrain_ssl_head(p):
    p.add_argument("--model", type=model_arg, required=True, help="supervised foundation model folder" + MODEL_NAMES_HELP)
    p.add_argument("--data", type=Path, required=True, action="append",
                   help="nnU-Net v2 raw dataset folder to train the pathway on (labels unused); repeat for several")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (not --model)")
    add_sampling_option(p)
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    add_training_options(p, "the masked-reconstruction recipe of the foundation's preset (cpu-mae-pretrain for "
                             "cpu-*), else mae-nnssl")
    return cmd_pretrain_ssl_head


def cmd_pretrain_ssl_head(args) -> int:
    from medadapt.engine.distributed import is_main
    from medadapt.workflows.ssl import SslHeadRequest, pretrain_ssl_head

    request = SslHeadRequest(args.model, args.data, recipe=args.recipe, epochs=args.epochs,
                             iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, seed=args.seed,
                             sampling=args.sampling)
    folder = pretrain_ssl_head(request, args.out, resume=args.resume, progress=not args.quiet,
                               engine=engine_options(args))
    if is_main():
        mask = folder.pretext["mask"]
        print(f"model folder with a masked-reconstruction pathway ({'x'.join(map(str, mask['block_size']))} blocks, "
              f"{mask['mask_ratio']:g} masked) written to {args.out}")
    return 0


@commands.command("recipes", "list the built-in training recipes",
                  "Print every built-in training recipe (optimiser, schedule, loss, budget, "
                  "learning rates); --show NAME prints one in full, as a file to start from.")
def add_recipes(p):
    p.add_argument("--show", default=None, metavar="NAME", help="print this recipe (a name or a file) as YAML")
    return cmd_recipes


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


@commands.command("finetune", "few-shot fine-tune a model folder and evaluate it on the test split",
                  "Split the dataset 80/20 (fixed by --split-seed; or --split FILE|none), draw K training "
                  "cases (--shots, --seed), fine-tune with --method, predict and evaluate the "
                  "test split (DSC, NSD at 1 mm, HD95). --folds N cross-validates instead: N runs, each "
                  "scoring the cases it was trained without (N = the number of cases is leave-one-out), "
                  "pooled; --final then also trains the model on every case.")
def add_finetune(p):
    add_run_inputs(p, "foundation model folder")
    p.add_argument("--method", required=True, help=methods_help())
    add_method_options(p)
    p.add_argument("--shots", type=shots_arg, default=None,
                   help="number of annotated training cases K, or all (every case of the train split); "
                        "default all with --split none or --folds, else required")
    p.add_argument("--folds", type=lambda t: int_at_least(t, 2, "a number of folds"), default=None,
                   help="cross-validate over every case of --data: N runs in --out/fold_<k>, each predicting and "
                        "scoring the cases it was trained without; per-fold and pooled metrics in "
                        "--out/crossval.{json,csv,md} (folds drawn with --split-seed; resumable fold by fold)")
    p.add_argument("--final", action="store_true",
                   help="with --folds: also train the model on every case (--out/final), the one to use")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default: the recipe's for the method; dgst-paper: 1e-3, "
                        "1e-2 for scratch)")
    add_head_option(p)
    add_postprocess_option(p)
    add_overlap_option(p)
    from medadapt.tuning.transductive import ERRORS, MODES, STEPS

    p.add_argument("--transductive", choices=MODES, default=None,
                   help="FSEFT's transductive inference: the test volumes' predicted sizes are kept within a "
                        "margin of the support's (spatial-adapter); query: an adapter per test volume (the "
                        "paper's), batch: one for all")
    p.add_argument("--ti-lambda", type=float, default=None,
                   help="weight lambda of the size constraint (default 0.1, the authors' TI commands; the text: 1)")
    p.add_argument("--ti-margin", type=float, default=None,
                   help="margin gamma of the size constraint, in [0, 1) (default 0.3, the authors' TI commands)")
    p.add_argument("--ti-error", choices=ERRORS, default=None,
                   help="how the size error is normalised: max (default, the authors' code: (S - S^)/max(S^, S), "
                        "bounded), prior (divided by the prior S), proportion (the text's Eq. 2 in proportions "
                        "of the query)")
    p.add_argument("--ti-step", choices=STEPS, default=None,
                   help="epoch (default, the authors' code: its own optimiser step once per epoch) or every "
                        "(the text's Eq. 3: summed into the loss of every support step)")
    p.add_argument("--feature-cache", action="store_true",
                   help="linear-probe / spatial-adapter: compute each support volume's backbone features once "
                        "(sliding window) and train the head on patches of them; no input-space augmentation "
                        "(beyond the paper; docs/methods.md)")
    add_training_options(p, "the one the model folder recommends, else dgst-paper")
    return cmd_finetune


def cmd_finetune(args) -> int:
    import dataclasses
    import functools

    from medadapt.errors import MedadaptError
    from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune

    if args.folds is not None and (args.split is not None or args.fold is not None):
        raise MedadaptError("--folds: cross-validation makes its own splits; drop --split/--fold or --folds")
    if args.final and args.folds is None:
        raise MedadaptError("--final: trains the model on every case after a cross-validation; give --folds N "
                            "(or train on every case alone with --split none)")
    split = split_from_args(args) if args.folds is None else None
    shots = args.shots
    if shots is None:
        if args.folds is None and split.evaluates:
            raise MedadaptError("--shots: required (the number of annotated training cases, or all); it defaults "
                                "to all only with --split none or --folds")
        shots = "all"
    engine = engine_options(args)
    request = FinetuneRequest(
        args.model, args.data, args.method, shots, seed=args.seed, split_seed=args.split_seed, epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, lr=args.lr, method_options=method_options(args),
        head=args.head, recipe=args.recipe, postprocess=args.postprocess, overlap=args.overlap,
        transductive=transductive_options(args),
        feature_cache=args.feature_cache, pretext_decoder=args.pretext_decoder)

    def resolve(split):
        return resolve_finetune(dataclasses.replace(request, split=split), engine)
    if args.folds is not None:
        from medadapt.workflows.crossval import cross_validate

        result = cross_validate(lambda s: resolve(split=s), args.data, args.out, args.folds, seed=args.split_seed,
                                final=args.final, resume=args.resume, progress=not args.quiet,
                                run=functools.partial(finetune, engine=engine))
        print_metrics(result["pooled"], f"held-out cases, {args.folds} folds pooled")
        print(f"cross-validation: {args.out / 'crossval.md'}")
        if result["final"]:
            print(f"final model (every case): {result['final']['model']}")
        return 0
    settings = resolve(split=split)
    record = finetune(settings, args.out, resume=args.resume, progress=not args.quiet, engine=engine)
    if not record:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if record["metrics"] is not None:
        print_metrics(record["metrics"], "test cases")
    else:
        print(f"trained on every case ({len(record['shot_cases'])}); nothing evaluated (--split none)")
    sizes = record["sizes"]
    print(f"model: {args.out / 'model'} ({sizes['checkpoint_bytes'] / 1024:,.0f} KiB); as a delta against the "
          f"foundation: {args.out / 'delta.pt'} ({sizes['delta_bytes'] / 1024:,.0f} KiB)")
    print(f"results in {args.out}")
    return 0


@commands.command("zero-shot", "evaluate a model as it is (no fine-tuning) on a dataset's test split",
                  "Predict and evaluate the test part of the same fixed 80/20 split that "
                  "finetune uses, with the model's own heads: the 'Foundation, no fine-tuning' "
                  "reference. The dataset's label names must be classes of the model (a "
                  "partially labelled model is evaluated on the classes the dataset labels).")
def add_zero_shot(p):
    add_run_inputs(p, "model folder")
    p.add_argument("--all-cases", action="store_true",
                   help="evaluate every case of --data (a held-out cohort) instead of its test split")
    add_postprocess_option(p)
    add_overlap_option(p)
    p.add_argument("--resume", action="store_true", help="reuse a finished run in the same --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return cmd_zero_shot


def cmd_zero_shot(args) -> int:
    from medadapt.workflows.finetune import zero_shot

    split = split_from_args(args) if (args.split is not None or args.fold is not None) else None
    record = zero_shot(args.model, args.data, args.out, split_seed=args.split_seed, resume=args.resume,
                       progress=not args.quiet, postprocess=args.postprocess, all_cases=args.all_cases, split=split,
                       overlap=args.overlap)
    print_metrics(record["metrics"], "cases" if args.all_cases else "test cases")
    print(f"results in {args.out}")
    return 0


@commands.command("methods", "list the fine-tuning methods (with their trainable parameters on a model)",
                  "Print every fine-tuning method (built-in and from plugins) with what it trains, its options "
                  "(flag, default, values) and what it can do (cached features, nnU-Net export); with --model "
                  "or --preset, every method's trainable-parameter count on that network, its share of the "
                  "model and the entries one step updates.")
def add_methods(p):
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=model_arg, help="model folder" + MODEL_NAMES_HELP)
    source.add_argument("--preset", default=None, help="a network preset (one input channel, one foreground class)")
    add_method_options(p)
    return cmd_methods


def cmd_methods(args) -> int:
    from medadapt.models import load_model_folder
    from medadapt.workflows.methods import definitions_table, methods_table

    options = every_method_options(args)
    if args.preset is not None:
        from medadapt.models import preset
        from medadapt.models.network import seeded_network

        network = seeded_network(preset(args.preset, input_channels=1, num_classes=2), 0)
        _, text = methods_table(network=network, label=f"preset {args.preset}", options=options)
    elif args.model is not None:
        _, text = methods_table(load_model_folder(args.model), options=options)
    else:
        text = definitions_table()
    print(text)
    return 0
