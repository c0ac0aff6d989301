"""The ``medadapt`` command line. Every subcommand has ``--help``; user mistakes end in one error line (exit 2).

One module per command group, each command's parser beside its handler (:mod:`.data`, :mod:`.training`,
:mod:`.inference`, :mod:`.interop`, :mod:`.demo`, :mod:`.sequential`, :mod:`.bench`, :mod:`.dicom`; what they
share: :mod:`.common`); optional packages add theirs through :mod:`medadapt.plugins` (the nnU-Net interop adds
``export-nnunet`` and ``nnunet-train``). Only the parser of the command being run is built (its choice lists
come from the registries they name, which may import torch); the others are listed by their one-line help, so
``medadapt --help`` stays instant.
"""
from __future__ import annotations

import argparse
import sys

from medadapt.cli import bench, data, demo, dicom, inference, interop, sequential, training
from medadapt.cli.common import model_arg, version_string
from medadapt.errors import MedadaptError

GROUPS = (data, training, bench, inference, interop, demo, sequential, dicom)
#: the order of 'medadapt --help' (a plugin's commands that are not named here come last)
ORDER = ("synth", "pretrain", "pretrain-ssl-head", "recipes", "models", "finetune", "zero-shot", "methods",
         "bench-speed", "bench-predict", "predict", "evaluate", "export-nnunet", "import-monai", "nnunet-train", "demo",
         "mds-stability", "seqft", "bench", "import-dicom", "to-dicom", "dataset-to-dicom")


def commands() -> dict[str, tuple[str, object]]:
    """Every command: ``{name: (one-line help, add(subparsers))}``, in :data:`ORDER`, the core's and the plugins'."""
    from medadapt.plugins import load_plugins

    found = {name: (group.commands.help[name], add) for group in GROUPS for name, add in group.commands.add.items()}
    for name, command in load_plugins().commands.items():
        if name in found:
            raise MedadaptError(f"a medadapt plugin registers the command {name!r}, which medadapt has; uninstall it")
        found[name] = (command.help, command.add)
    ordered = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {n: found[n] for n in ordered}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the main parser's options take
    no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``medadapt`` parser: every command's full parser, or (``only``) just that one's, the others by name
    and one-line help."""
    parser = argparse.ArgumentParser(
        prog="medadapt",
        description="Few-shot adaptation of 3D segmentation foundation models (nnU-Net) to new CT data.")
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback with its cause (e.g. the reader's own error for a "
                             "file that cannot be loaded) after the one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_line, add) in commands().items():
        if only is None or name == only:
            add(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    for command in sub.choices.values():  # every command that reads a model reads it without running its code
        if any(a.type is model_arg or a.dest == "resume" for a in command._actions):
            command.add_argument("--trust-model", action="store_true",
                                 help="load checkpoints that hold Python objects other than tensors and numpy data "
                                      "(unpickling runs their code: only for files from a source you trust, as "
                                      "nnU-Net itself loads them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(only=_command_in(argv))
    except MedadaptError as exc:
        print(f"medadapt: error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except MedadaptError as exc:  # a value the parser's type checks refuse in our words (e.g. --model NAME)
        print(f"medadapt {_command_in(argv) or ''}: error: {exc}".replace(" :", ":"), file=sys.stderr)
        return 2
    from medadapt.utils.torch_version import check

    problem = check()
    if problem is not None and problem[0] == "unsupported":  # (an untested one was warned about at import)
        print(f"medadapt {args.command}: error: {problem[1]}", file=sys.stderr)
        return 2
    from medadapt.utils.allocator import keep_freed_memory

    keep_freed_memory()  # glibc: reuse freed tensor memory instead of page-faulting it back in every iteration
    if getattr(args, "trust_model", False):
        from medadapt.utils.checkpoints import set_trust

        set_trust(True)
    try:
        return args.func(args)
    except MedadaptError as exc:
        print(f"medadapt {args.command}: error: {exc}", file=sys.stderr)
        if args.debug:  # the traceback, and the error that caused this one (a reader's, a decoder's)
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medadapt {args.command}: interrupted; finished work is kept (use --resume)", file=sys.stderr)
        return 130
