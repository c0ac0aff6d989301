"""``medadapt demo``: a built-in foundation adapted to a synthetic hospital (or, with --pretrain, the whole chain
from pretraining); the parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import CommandGroup, positive_int, seed_arg


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("demo",
                  "adapt the built-in foundation to a synthetic hospital with 5 scans (about 2 min cold on 2 CPU "
                  "cores: BENCHMARKS.md)",
                  "Start from the built-in foundation model (medadapt models), generate a second "
                  "synthetic hospital, score the foundation as it is (zero-shot), fine-tune it with K "
                  "scans using full fine-tuning and DGST, evaluate on held-out scans, print a table "
                  "and write a figure. --pretrain: the whole chain instead: generate both hospitals, "
                  "pretrain the foundation on the first (cached), then from scratch, full and DGST.")
def add_demo(p):
    p.add_argument("--workdir", type=Path, default=Path("medadapt_runs/demo"),
                   help="where data, models and results go (default medadapt_runs/demo)")
    p.add_argument("--shots", type=positive_int, default=5, help="annotated target scans K (default 5)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for data, training and the K-shot draw")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the foundation on the first hospital instead of starting from the built-in one "
                        "(the built-in one is exactly that model, seed 0), and add the from-scratch row (about 8 "
                        "more minutes)")
    p.add_argument("--fresh", action="store_true",
                   help="re-run the fine-tuning runs even if finished ones exist (the foundation model "
                        "stays cached)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return cmd_demo


def cmd_demo(args) -> int:
    from medadapt.workflows.demo import run_demo

    run_demo(args.workdir, shots=args.shots, seed=args.seed, fresh=args.fresh, progress=not args.quiet,
             pretrain=args.pretrain)
    return 0
