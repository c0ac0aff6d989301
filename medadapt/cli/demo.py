"""``medadapt demo``: the whole chain on built-in synthetic cohorts; the parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import CommandGroup, positive_int, seed_arg


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("demo",
                  "the whole chain on built-in synthetic cohorts (about 9 min cold on 2 CPU cores: BENCHMARKS.md)",
                  "Generate two synthetic hospitals, pretrain a small foundation model on "
                  "the first (cached), fine-tune it with K scans of the second using "
                  "scratch, full and DGST, evaluate on held-out scans, print a table and "
                  "write a figure.")
def add_demo(p):
    p.add_argument("--workdir", type=Path, default=Path("medadapt_runs/demo"),
                   help="where data, models and results go (default medadapt_runs/demo)")
    p.add_argument("--shots", type=positive_int, default=5, help="annotated target scans K (default 5)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for data, training and the K-shot draw")
    p.add_argument("--fresh", action="store_true",
                   help="re-run the fine-tuning runs even if finished ones exist (the foundation model "
                        "stays cached)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return cmd_demo


def cmd_demo(args) -> int:
    from medadapt.workflows.demo import run_demo

    run_demo(args.workdir, shots=args.shots, seed=args.seed, fresh=args.fresh, progress=not args.quiet)
    return 0
