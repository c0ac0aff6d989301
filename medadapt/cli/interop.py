"""``medadapt import-monai`` (a MONAI SwinUNETR checkpoint as a model folder) and ``medadapt models`` (the
built-in foundations); each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import CommandGroup, positive_int, seed_arg


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("import-monai", "a MONAI SwinUNETR checkpoint as a medadapt model folder",
                  "Write a medadapt model folder (a foundation model for finetune, predict, "
                  "zero-shot, methods) from a MONAI SwinUNETR checkpoint: a state dict as MONAI "
                  "bundles save it, {'state_dict': ...} as the research-contributions scripts "
                  "save it, or {'model': ...}; 'module.' prefixes are undone. The architecture is "
                  "read from the tensors; the preprocessing is MONAI's pipeline (Orientationd, "
                  "Spacingd, ScaleIntensityRanged), given by the options below "
                  "(docs/swinunetr.md).")
def add_import_monai(p):
    p.add_argument("checkpoint", type=Path,
                   help="the checkpoint file (.pt/.pth); the self-supervised Swin transformer weights "
                        "(model_swinvit.pt) need --backbone-only")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (new or empty)")
    p.add_argument("--labels", nargs="+", required=True, metavar="NAME",
                   help="class names in output-channel order, background first (as many as the checkpoint's "
                        "output channels)")
    p.add_argument("--channel-names", nargs="+", default=None, metavar="NAME",
                   help="input channel names (default: CT for every input channel)")
    p.add_argument("--roi-size", type=positive_int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"),
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
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of what --backbone-only initialises (default 0)")
    return cmd_import_monai


def cmd_import_monai(args) -> int:
    from medadapt.workflows.import_monai import MonaiPipeline, import_monai, parse_arch_kwargs

    pipeline = MonaiPipeline(roi_size=args.roi_size, pixdim=args.pixdim, orientation=args.orientation,
                             intensity_range=args.intensity_range, output_range=args.output_range)
    folder = import_monai(args.checkpoint, args.out, args.labels, pipeline=pipeline, channel_names=args.channel_names,
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


@commands.command("models", "list the built-in foundation models (what they segment, how they were made)",
                  "Print every foundation model that ships with medadapt: its name (what every --model "
                  "option takes, e.g. medadapt finetune --model NAME), what it segments, its network, the data "
                  "it was pretrained on and how it was made (the commands and the commit); --show NAME prints "
                  "its whole record (foundation.json) as JSON.")
def add_models(p):
    p.add_argument("--show", default=None, metavar="NAME", help="print this built-in foundation's record as JSON")
    return cmd_models


def cmd_models(args) -> int:
    import json

    from medadapt.errors import MedadaptError
    from medadapt.models.builtin import builtin_info, builtin_names, builtin_path, describe
    from medadapt.utils.tables import markdown_table

    names = builtin_names()
    if args.show:
        if args.show not in names:
            raise MedadaptError(f"--show {args.show}: not a built-in foundation; choose one of "
                                f"{', '.join(names) or 'none installed'}")
        builtin_path(args.show)  # a damaged installation is an error here too
        print(json.dumps(builtin_info(args.show), indent=2))
        return 0
    rows = []
    for name in names:
        d = describe(name)
        rows.append([name, ", ".join(d["segments"]), d["network"], d["data"]["summary"], d["made"]["summary"]])
    print(markdown_table(["model", "segments", "network", "pretrained on", "made by"], rows))
    print("\nUse one as --model NAME (e.g. medadapt finetune --model NAME --data ...); "
          "medadapt models --show NAME prints its whole record.")
    return 0
