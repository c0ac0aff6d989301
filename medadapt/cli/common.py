"""What the ``medadapt`` commands share: argument types, option groups, printing."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medadapt.errors import MedadaptError



class CommandGroup:
    """The commands of one CLI module. Each is declared where its parser is built::

        @commands.command("predict", "one line for 'medadapt --help'", "the command's --help description")
        def add_predict(p):      # adds the arguments to the command's parser p
            ...
            return cmd_predict   # the handler

    ``help``: each command's one line; ``add``: each command's ``add(subparsers)``."""

    def __init__(self) -> None:
        self.help: dict[str, str] = {}
        self.add: dict[str, Callable[[Any], Any]] = {}

    def command(self, name: str, help: str, description: str):
        def register(arguments: Callable[[argparse.ArgumentParser], Callable[[Any], int]]):
            def add(sub) -> argparse.ArgumentParser:
                p = sub.add_parser(name, help=help, description=description)
                p.set_defaults(func=arguments(p))
                return p

            self.help[name], self.add[name] = help, add
            return arguments
        return register


def methods_help(training_only: bool = False) -> str:
    """``--method``'s help: every method of the strategy registry (:func:`medadapt.tuning.method_names`;
    ``training_only``: without those that evaluate the foundation as it is)."""
    from medadapt.tuning import method_names

    return f"fine-tuning method: {', '.join(method_names(training_only))} ('medadapt methods' lists them)"


def shots_arg(text: str) -> "int | str":
    return "all" if text == "all" else positive_int(text)


def int_at_least(text: str, minimum: int, what: str = "an integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


MODEL_NAMES_HELP = "; or a built-in foundation's name ('medadapt models')"


def model_arg(text: str) -> Path:
    """A ``--model`` value: a model folder (or nnU-Net model / zip) that exists, or a built-in foundation's name
    (``medadapt models``); anything else is one error line listing the built-in names (a
    :class:`MedadaptError`, which ``medadapt.cli.main`` prints as it prints a handler's)."""
    from medadapt.models.builtin import resolve_model

    return resolve_model(text)


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def seed_arg(text: str) -> int:
    """A seed: a non-negative integer (NumPy's seed sequences take no negative words)."""
    return int_at_least(text, 0, "an integer seed")


def add_training_options(p: argparse.ArgumentParser, default_recipe: str) -> None:
    from medadapt.engine.recipe import builtin_recipe_names

    p.add_argument("--recipe", default=None,
                   help=f"training recipe: a built-in name ({', '.join(builtin_recipe_names())}) or a recipe file "
                        f"(default: {default_recipe}; 'medadapt recipes' lists them, docs/recipes.md)")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=None,
                   help="iterations per epoch (default: the recipe's)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0); recorded with the results")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from medadapt.engine.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="mixed precision of the training steps: auto (default; fp16 autocast with a gradient "
                        "scaler on a GPU, as nnU-Net, fp32 on the CPU), fp32, fp16 (autocast + gradient scaler) or "
                        "bf16 (autocast); recorded with the run, which resumes only in the same precision")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="background processes that sample and augment batches (default auto: one per CPU core "
                        "but one, at most 8; 0: in the training process); any number gives the same batches")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's forward pass (as nnU-Net's nnUNet_compile; the first "
                        "iterations are slow while it compiles)")


def workers_arg(text: str):
    return text if text == "auto" else int_at_least(text, 0, "a number of workers (an integer >= 0, or auto)")


def engine_options(args):
    """The engine options of a training command (--precision, --workers, --compile)."""
    from medadapt.engine import EngineOptions
    from medadapt.engine.batches import default_workers

    workers = default_workers() if args.workers == "auto" else args.workers
    return EngineOptions(precision=args.precision, workers=workers, compile=bool(args.compile))


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Every method option's flag, generated from the method definitions (medadapt.tuning.registry), and
    --pretext-decoder."""
    from medadapt.tuning.registry import cli_options
    from medadapt.workflows.finetune import PRETEXT_DECODER_CHOICES

    for flag, (option, names) in cli_options().items():  # values checked by method_options: one line each
        p.add_argument(flag, default=None, help=option.cli_help(names) + (f"; {option.describe()}"),
                       metavar=option.name.upper())
    p.add_argument("--pretext-decoder", choices=PRETEXT_DECODER_CHOICES, default="auto",
                   help="methods that freeze part of the network (linear-probe, lora, adapter, ...): new = the "
                        "foundation's decoder was trained on a pretext task (an MAE's), so it trains in full like "
                        "the heads and the method applies to the encoder (MedSeqFT's reading); pretrained = the "
                        "method applies to it; auto (default): new for a self-supervised foundation")


def add_sampling_option(p: argparse.ArgumentParser) -> None:
    from medadapt.data.partial import SAMPLING

    p.add_argument("--sampling", choices=SAMPLING, default="cases",
                   help="with several datasets: draw cases uniformly over all cases (default) or uniformly "
                        "over datasets, then over the dataset's cases")


def add_run_inputs(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --data, --out and --split-seed of a run that is evaluated on the fixed test split."""
    p.add_argument("--model", type=model_arg, required=True, help=model_help + MODEL_NAMES_HELP)
    p.add_argument("--data", type=Path, required=True, help="nnU-Net v2 raw dataset folder")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--split-seed", type=seed_arg, default=0,
                   help="seed of the fixed 80/20 split, and of the folds with --folds (default 0)")
    add_split_options(p)


def add_split_options(p: argparse.ArgumentParser) -> None:
    """--split and --fold: the train/test split when it is not the fixed random one."""
    p.add_argument("--split", default=None, metavar="FILE|none",
                   help="the test cases: nnU-Net's splits_final.json (with --fold), a file of test case ids (one "
                        "per line), or none (every case trains, nothing is evaluated: a final model); default the "
                        "fixed 80/20 split of --split-seed")
    p.add_argument("--fold", type=lambda t: int_at_least(t, 0, "a fold number"), default=None,
                   help="the fold of a splits_final.json given with --split")


def split_from_args(args) -> "Any":
    """The run's split from --split, --fold and --split-seed (medadapt.data.splits.Split)."""
    from medadapt.data.splits import Split

    return Split.parse(args.split, args.fold, args.split_seed)


def add_postprocess_option(p: argparse.ArgumentParser) -> None:
    from medadapt.inference.predictor import POSTPROCESSING

    p.add_argument("--postprocess", choices=POSTPROCESSING, default="none",
                   help="none (default) or lcc: keep each class's largest connected component (single organs, "
                        "not lymph nodes)")


def add_overlap_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlap", type=float, default=0.5,
                   help="the sliding window's tile overlap when predicting the test cases: 0.5 (default, nnU-Net's) "
                        "or less (MONAI's default 0.25 costs ~2.5x less on a CPU)")


def add_head_option(p: argparse.ArgumentParser) -> None:
    from medadapt.workflows.finetune import HEAD_POLICIES

    p.add_argument("--head", choices=HEAD_POLICIES, default="fresh",
                   help="segmentation head to start from: fresh (default; new and randomly initialised, as "
                        "nnU-Net's pretrained-weight loading gives every method) or keep (the foundation's own outputs "
                        "for the dataset's classes, by name; its labels must be classes of the foundation) or match "
                        "(fresh, but the outputs of classes the foundation knows start from its own: FSEFT's "
                        "zero-shot initialisation)")


def given_method_flags(args) -> dict[str, Any]:
    """The method-option flags given on the command line, ``{flag: text}``: the one walk over the registry's
    flags that :func:`method_options` and :func:`every_method_options` share."""
    from medadapt.tuning.registry import cli_options

    return {flag: value for flag in cli_options() if (value := getattr(args, flag_dest(flag), None)) is not None}


def method_options(args, also: tuple[str, ...] = ()) -> dict:
    """The method options given on the command line for ``--method``: the values of its options' flags. An
    unknown method (not a fine-tuning method, nor one of ``also``: a command's own, e.g. seqft's sequential
    methods, which take none of these) or a flag given for an option the method does not take is refused in one
    line."""
    from medadapt.tuning.registry import cli_options, methods

    method = args.method
    definition = methods().get(method)
    if definition is None and method not in also:
        raise MedadaptError(f"--method {method!r} is unknown; choose one of: {', '.join([*methods(), *also])} "
                            "('medadapt methods' lists them)")
    mine = {o.cli_flag(method): o.name for o in definition.options} if definition is not None else {}
    options = {}
    for flag, value in given_method_flags(args).items():
        if flag not in mine:
            takes = ", ".join(mine) or "no method options"
            raise MedadaptError(f"{flag}: --method {method} has no such option ({'/'.join(cli_options()[flag][1])} "
                                f"only); it takes {takes}")
        options[mine[flag]] = _option_value(flag, value, definition.option(mine[flag]), method)
    return options


def _option_value(flag: str, text: str, option, method: str):
    """A method option's command-line text as the option's type, checked by its definition (one line)."""
    try:
        value = option.type(text)
    except ValueError:
        value = text
    try:
        option.check(method, value)
    except MedadaptError:
        raise MedadaptError(f"{flag} {text}: not {option.describe()} ({option.help}); give {option.describe()}") \
            from None
    return value


def every_method_options(args) -> dict[str, dict]:
    """Per method, the options given on the command line that it takes (``medadapt methods``' table)."""
    from medadapt.tuning.registry import methods

    given = given_method_flags(args)
    out: dict[str, dict] = {}
    for name, d in methods().items():
        out[name] = {o.name: _option_value(o.cli_flag(name), given[o.cli_flag(name)], o, name)
                     for o in d.options if o.cli_flag(name) in given}
    return out


def flag_dest(flag: str) -> str:
    """argparse's attribute name for a flag."""
    return flag.lstrip("-").replace("-", "_")


def version_string() -> str:
    from medadapt import __version__

    return f"medadapt {__version__}"


def print_metrics(summary: dict, what: str) -> None:
    """One line per class: mean ± std over cases of DSC and NSD (%) and HD95 (mm)."""
    from medadapt.metrics import format_mean_std

    tol = summary.get("tolerance_mm")
    for name, m in summary["classes"].items():
        undefined = m.get("hd95_undefined", 0)
        hd_note = f", undefined in {undefined} of {m['n_cases']}: one mask empty" if undefined else ""
        print(f"{name}: DSC {format_mean_std(m['dsc']['mean'], m['dsc']['std'], percent=True)}  "
              f"NSD@{tol:g}mm {format_mean_std(m['nsd']['mean'], m['nsd']['std'], percent=True)}  "
              f"HD95 {format_mean_std(m['hd95']['mean'], m['hd95']['std'])} mm{hd_note}  ({m['n_cases']} {what})")


def transductive_options(args):
    from medadapt.tuning.transductive import Transductive

    if args.transductive is None:
        if any(v is not None for v in (args.ti_lambda, args.ti_margin, args.ti_error, args.ti_step)):
            raise MedadaptError("--ti-lambda/--ti-margin/--ti-error/--ti-step: only with --transductive query|batch")
        return None
    given = {"weight": args.ti_lambda, "margin": args.ti_margin, "error": args.ti_error, "step": args.ti_step}
    return Transductive(mode=args.transductive, **{k: v for k, v in given.items() if v is not None})
