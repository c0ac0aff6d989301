"""``medadapt seqft`` (MedSeqFT's sequential fine-tuning over a task stream) and ``medadapt mds-stability``:
each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import (MODEL_NAMES_HELP, CommandGroup, add_method_options, add_overlap_option,
                                 add_postprocess_option, add_training_options, engine_options, method_options,
                                 model_arg, positive_int, seed_arg, shots_arg)


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("mds-stability", "how many maskings R the MDS buffer needs before it stops changing",
                  "Score every training case of each task by the foundation's pretext loss at up "
                  "to --repeats random maskings (MedSeqFT's MDS, batched), read the K-case buffer "
                  "at every power of two R from the same draws, and report where it stops "
                  "changing: the R for seqft --mds-repeats. Writes stability.csv/.json/.md/.png "
                  "into --out.")
def add_mds_stability(p):
    p.add_argument("--model", type=model_arg, required=True, help="the foundation (with a pretext network: an MAE "
                                                                  "foundation, or one with pretrain-ssl-head's pathway)")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="a task's nnU-Net raw dataset (repeat for several tasks); its 80%% train split is scored")
    p.add_argument("--out", type=Path, required=True, help="folder for the measurement")
    p.add_argument("--repeats", type=positive_int, default=1000,
                   help="the largest R measured (default 1000, the paper's)")
    p.add_argument("--buffer-size", type=positive_int, default=4, help="K, the buffer's cases per task (default 4)")
    p.add_argument("--seed", type=seed_arg, default=0, help="mask seed (default 0)")
    p.add_argument("--split-seed", type=seed_arg, default=0, help="seed of each task's 80/20 split (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return cmd_mds_stability


def cmd_mds_stability(args) -> int:
    from medadapt.workflows.mds_stability import mds_stability, summary_line

    record = mds_stability(args.model, args.data, args.out, repeats=args.repeats, buffer_size=args.buffer_size,
                           seed=args.seed, split_seed=args.split_seed, progress=not args.quiet)
    print((args.out / "stability.md").read_text(), end="")
    print(summary_line(record))
    return 0


@commands.command("seqft", "fine-tune task after task over a stream of datasets (MedSeqFT)",
                  "Sequential fine-tuning (MedSeqFT, docs/sequential.md): every task of STREAM, in "
                  "order, each from the previous task's model (seq-ft, medseqft) or each from "
                  "the foundation (any finetune method: the parallel baselines). Every task gets "
                  "its own model folder and test-split metrics (Dice, NSD, HD95); a killed run "
                  "resumes at the task in progress (--resume), and a stream extended by new "
                  "tasks continues where it stopped.")
def add_seqft(p):
    p.add_argument("stream", type=Path, help="stream file: YAML listing the tasks' nnU-Net raw datasets in order "
                                             "('medadapt synth --stream ct-stream --out DIR' writes one)")
    p.add_argument("--model", type=model_arg, required=True, help="foundation model folder M0" + MODEL_NAMES_HELP)
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--method", default="medseqft",
                   help="medseqft (default: MDS buffer + K&G RFT), seq-ft (vanilla sequential; ablations with "
                        "--buffer/--retention), or a finetune method run on each task from M0 (full = FFT, "
                        "scratch = TFS, linear-probe = head fine-tuning, lora, adapter, ...)")
    from medadapt.sequential.buffer import SELECTIONS
    from medadapt.workflows.seqft import KD_UNTIL, KD_UNTIL_DEFAULT, RETENTIONS

    p.add_argument("--buffer", choices=SELECTIONS, default=None,
                   help="seq-ft: the replay buffer the encoder distillation runs on (default none; medseqft: mds)")
    p.add_argument("--retention", choices=RETENTIONS, default=None,
                   help="seq-ft: LoRA-based KD of each task's encoder into the previous one, then merge "
                        "(default none; medseqft: lora-kd)")
    p.add_argument("--buffer-size", type=positive_int, default=4,
                   help="K: cases of each task added to the buffer (default 4; the paper does not say)")
    p.add_argument("--mds-repeats", type=positive_int, default=16,
                   help="R: random maskings averaged per case for MDS (default 16 on CPU; the paper: 1000)")
    p.add_argument("--kd-rank", type=positive_int, default=2, help="LoRA rank of the LoRA-based KD (default 2)")
    p.add_argument("--kd-until", choices=KD_UNTIL, default=KD_UNTIL_DEFAULT,
                   help="LoRA-based KD: ceiling (default) = its whole schedule, the fine-tuning's epochs (or "
                        "--kd-max-epochs) at a constant lr (--kd-lr-fraction of the fine-tuning's); levelled = the "
                        "same, stopped once L_refine has levelled off; budget = a fifth of the fine-tuning epochs on "
                        "its schedule (the paper's VoCo CT ratio)")
    from medadapt.tuning.distill import KD_FFT_MODES, KD_NORMS

    p.add_argument("--kd-norm", choices=KD_NORMS, default="keep",
                   help="LoRA-based KD: the encoder's norm parameters (γ/β): keep (default: E_{t-1}'s, only the LoRA "
                        "factors train), train (they train with the factors and are kept by the merge), copy "
                        "(E_{t-mid}'s before the distillation)")
    p.add_argument("--kd-fft", choices=KD_FFT_MODES, default=None,
                   help="KD-based FFT: joint (default: one optimiser on L_seg + λ·L_kd), separate (each loss its "
                        "own optimiser and parameters), capped (separate, the distillation step at most as long as "
                        "the segmentation step on the encoder)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="--kd-fft joint: λ (default 1)")
    p.add_argument("--kd-lr-fraction", type=float, default=None,
                   help="the LoRA-based KD's lr as a fraction of the fine-tuning's (default 1: its own lr; 0.1 "
                        "with --kd-until budget, the paper's ratios together; not with --kd-recipe)")
    p.add_argument("--kd-max-epochs", type=positive_int, default=None,
                   help="--kd-until levelled/ceiling: the stage's ceiling in epochs (default: the fine-tuning "
                        "epochs; at least 10, what the convergence check needs)")
    p.add_argument("--kd-recipe", default=None,
                   help="recipe of the LoRA-based KD stage (default: derived from the fine-tuning recipe, see "
                        "--kd-until); with --kd-until levelled its epochs are the ceiling")
    add_method_options(p)
    p.add_argument("--shots", type=shots_arg, default="all",
                   help="training cases per task: K, or all (default: every case of the 80%% train split)")
    p.add_argument("--split-seed", type=seed_arg, default=0, help="seed of each task's 80/20 split (default 0)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the recipe's)")
    add_postprocess_option(p)
    add_overlap_option(p)
    add_training_options(p, "the one the model folder recommends, else dgst-paper")
    return cmd_seqft


def cmd_seqft(args) -> int:
    from medadapt.workflows.seqft import JOINT, SEQUENTIAL, SeqftRequest, resolve_seqft, seqft

    engine = engine_options(args)
    settings = resolve_seqft(SeqftRequest(
        args.stream, args.model, args.method, buffer=args.buffer, retention=args.retention,
        buffer_size=args.buffer_size, mds_repeats=args.mds_repeats, kd_rank=args.kd_rank, kd_until=args.kd_until,
        kd_max_epochs=args.kd_max_epochs, kd_lr_fraction=args.kd_lr_fraction, kd_norm=args.kd_norm,
        kd_fft=args.kd_fft, kd_weight=args.kd_weight, shots=args.shots, seed=args.seed, split_seed=args.split_seed,
        recipe=args.recipe, kd_recipe=args.kd_recipe, epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, lr=args.lr,
        method_options=method_options(args, also=(*SEQUENTIAL, JOINT)),
        postprocess=args.postprocess, pretext_decoder=args.pretext_decoder, overlap=args.overlap), engine)
    summary = seqft(settings, args.out, resume=args.resume, progress=not args.quiet, engine=engine)
    print((args.out / "results.md").read_text(), end="")
    print(f"{len(summary['tasks'])} task(s); results in {args.out}")
    return 0
