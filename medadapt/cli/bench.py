"""``medadapt bench`` (the benchmark grids) and ``medadapt bench-speed``: each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import (MODEL_NAMES_HELP, CommandGroup, add_method_options, every_method_options, model_arg,
                                 positive_int)
from medadapt.errors import MedadaptError


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("bench-speed", "seconds per training iteration of every method, side by side",
                  "Time every fine-tuning method on the same batches in one process "
                  "(interleaved), split into forward, backward, selection and optimizer step; "
                  "ratio to full; peak memory. With --against-nnunet: medadapt's training step "
                  "against nnU-Net's on the same network, weights and batches.")
def add_bench_speed(p):
    net = p.add_mutually_exclusive_group()
    net.add_argument("--model", type=model_arg, help="a model folder to time" + MODEL_NAMES_HELP)
    net.add_argument("--preset", default=None, help="a network preset (default cpu-small)")
    p.add_argument("--patch", type=positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="patch size (default: the network's)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the network's)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: all); also MedSeqFT's stages kd-fft (KD-based FFT) and "
                        "lora-kd (LoRA-based KD), timed through their own steps, and linear-probe+cache / "
                        "spatial-adapter+cache: the head's step on cached backbone features (finetune "
                        "--feature-cache)")
    p.add_argument("--iterations", type=positive_int, default=5, help="timed iterations per method (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--against-nnunet", action="store_true",
                   help="time medadapt's training step (Trainer.train_step) against nnU-Net's "
                        "(nnUNetTrainer.train_step) for full and dgst: the same network (an nnU-Net network: "
                        "PlainConvUNet presets or an nnU-Net model), weights, batches, patch, loss and device, "
                        "interleaved; prints both medians and the ratios (no memory measurement; needs nnunetv2)")
    from medadapt.engine.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the engine's mixed precision for medadapt's steps (default auto: fp16 autocast + gradient "
                        "scaler on a GPU, as nnU-Net's trainer; fp32 on the CPU)")
    add_method_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd_bench_speed


def cmd_bench_speed(args) -> int:
    from medadapt.benchmark.speed import SpeedRequest, run_bench_speed

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    # one set of option values for every method timed (each takes those of its own options)
    options = {k: v for per_method in every_method_options(args).values() for k, v in per_method.items()}
    run_bench_speed(SpeedRequest(model=args.model, preset_name=args.preset, patch=args.patch, batch=args.batch,
                                 methods=methods, iterations=args.iterations, warmup=args.warmup,
                                 memory=not args.no_memory, device=args.device,
                                 options={k: v for k, v in options.items() if v is not None},
                                 precision=args.precision, against_nnunet=args.against_nnunet),
                    as_json=args.json, progress=not args.quiet)
    return 0


@commands.command("bench",
                  "benchmark grids: the DGST paper's Tables 1-2 and Fig. 3, FSEFT's Table 1 and Fig. 2, or MedSeqFT's "
                  "Tables II, III, VI, VII and Fig. 4 (resumable)",
                  "Run a grid of fine-tuning cells and write the paper's tables as Markdown and "
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
def add_bench(p):
    p.add_argument("config", help="built-in grid (default: 236 cells, 3 seeds, within 2 h on 2 idle CPU cores "
                                  "with --ray local; quick: ~1 min; paper: the paper's sizes, for a GPU "
                                  "cluster; fseft: the FSEFT paper's Table 1 and Fig. 2a/2b as its authors ran "
                                  "them, 471 cells, ~21 h; fseft-cpu: the same on 3 tasks and 2 seeds, 172 cells, "
                                  "~6.5 h; fseft-quick: ~1 min; medseqft: MedSeqFT's tables on the synthetic CT "
                                  "stream, 48 cells, ~4 h with --ray local; medseqft-quick: ~1.5 min) or a "
                                  "YAML grid config, also on your own data and foundation (data: an nnU-Net raw "
                                  "dataset, model: a trained model; docs/benchmark.md)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where data, cells and the report go (default medadapt_runs/bench/<config name>)")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the tables and figures from the stored cells (no training)")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is finished; run nothing")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run cells as Ray tasks: 'auto' (the cluster this machine is in), a cluster address, "
                        "or 'local' (a private instance here); needs pip install 'medadapt[ray]' and a work "
                        "folder every node can read and write")
    p.add_argument("--first-shots", type=positive_int, default=None, metavar="K",
                   help="run the cells with K shots before the others (only the order changes: a grid that may "
                        "not finish in the time at hand completes one group of Table 1 first; DGST and FSEFT "
                        "grids)")
    p.add_argument("--retime", nargs="?", const="full,medseqft", default=None, metavar="ROWS",
                   help="MedSeqFT grids: Table VII on idle cores. Re-run these finished stream rows' cells of one "
                        "seed (comma-separated, FFT's 'full' among them; default full,medseqft) one at a time in "
                        "<workdir>/retime/, MDS computed afresh, and write <workdir>/table7-idle.md/.csv: seconds "
                        "by stage beside the grid's record, x FFT, and whether the numbers equal the record's. "
                        "Run it with nothing else running on the machine")
    p.add_argument("--retime-seed", type=int, default=None, metavar="SEED",
                   help="--retime: the seed whose cells are re-run (default the grid's first)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="--retime: threads per re-run cell (default the config's ray.cpus_per_cell, as the grid's "
                        "workers ran them)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return cmd_bench


def cmd_bench(args) -> int:
    from medadapt.benchmark import benchmarks
    from medadapt.benchmark.harness import default_workdir, list_cells, run_grid

    benchmark, config = benchmarks.load(args.config)
    workdir = args.workdir or default_workdir(config)
    if args.retime is None and (args.retime_seed is not None or args.threads is not None):
        raise MedadaptError("--retime-seed/--threads: they set up --retime; add --retime (or leave them out)")
    if args.retime is not None and benchmark.name != "medseqft":
        raise MedadaptError(f"--retime: Table VII (MedSeqFT against FFT) belongs to MedSeqFT grids; "
                            f"{args.config!r} is a {benchmark.name} grid")
    if args.retime is not None and (args.report or args.list or args.ray):
        raise MedadaptError("--retime runs on its own: leave out --report, --list and --ray")
    if args.list:
        cells, where = list_cells(benchmark, config, workdir)
        for cell, status, reason in cells:
            print(f"{status}  {cell.cell_id}  [{', '.join(cell.experiments)}]" + (f"  {reason}" if reason else ""))
        stale = sum(status == "stale" for _, status, _ in cells)
        print(f"{sum(status == 'done' for _, status, _ in cells)}/{len(cells)} cells finished in {where}"
              + (f"; {stale} stale (re-run by 'medadapt bench {config.cli_argument}' with this --workdir)"
                 if stale else ""))
        return 0
    if args.retime is not None:
        from medadapt.benchmark.retime_medseqft import retime

        rows = [r.strip() for r in args.retime.split(",") if r.strip()]
        result = retime(benchmark, config, workdir, rows, seed=args.retime_seed, threads=args.threads,
                        progress=not args.quiet)
        if not args.quiet:
            print(Path(result["files"]["md"]).read_text())
        return 0
    if args.report:
        benchmark.report(config, workdir, progress=not args.quiet)
        return 0
    first = None
    if args.first_shots is not None:
        if benchmark.name == "medseqft":
            raise MedadaptError("--first-shots: a MedSeqFT grid's cells are tasks of a stream, not shot counts; "
                                "leave it out")
        from medadapt.benchmark.runner import shot_group_first

        first = shot_group_first(args.first_shots)
    result = run_grid(benchmark, config, workdir, ray_address=args.ray, progress=not args.quiet, first=first)
    if not args.quiet:
        print(f"{result['ran']} cells run in {result['seconds'] / 60:.1f} min; report in {result['report']['dir']}")
    return 0
