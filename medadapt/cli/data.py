"""``medadapt synth``: synthetic CT cohorts and task streams; the parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli.common import CommandGroup, positive_int, seed_arg
from medadapt.errors import MedadaptError


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("synth", "generate a synthetic CT cohort as an nnU-Net v2 raw dataset",
                  "Generate a synthetic CT cohort (nnU-Net v2 raw format: lymph nodes, or the "
                  "structures of the spec's labels map) from a domain spec: a built-in name or "
                  "a YAML/JSON file (docs/domains.md).")
def add_synth(p):
    p.add_argument("domain", nargs="?", help="built-in domain name or path to a domain spec file")
    p.add_argument("--out", type=Path, help="output dataset folder")
    p.add_argument("--cases", type=positive_int, default=50, help="number of cases (default 50)")
    p.add_argument("--seed", type=seed_arg, default=0, help="cohort seed (default 0)")
    p.add_argument("--downsample", type=positive_int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="the same field of view with this many times fewer voxels per axis, e.g. 1 2 2 (what the "
                        "demo and the default benchmark grid use)")
    p.add_argument("--stream", default=None, metavar="NAME",
                   help="instead of one DOMAIN: every task of a built-in task stream (e.g. ct-stream, MedSeqFT's "
                        "five tasks and two unseen ones), one dataset each under --out, and --out/stream.yaml "
                        "for 'medadapt seqft'")
    p.add_argument("--list", action="store_true",
                   help="list the built-in domains (name, region, labels) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd_synth


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


@commands.command("import-openkbp", "OpenKBP's head-and-neck CT and contours (CSV) -> nnU-Net v2 raw dataset",
                  "Convert the OpenKBP challenge's provided-data (github.com/ababier/open-kbp: train-pats, "
                  "validation-pats, test-pats; sparse CSV on a 128^3 grid) into an nnU-Net v2 raw dataset: CT in HU "
                  "(stored values clipped to 0..4095, minus 1000; outside the body is air), spacing from "
                  "voxel_dimensions.csv, one label map of the chosen structures (the structure named first keeps "
                  "the voxels where they overlap; what each gave up is recorded), annotated_classes.json where a "
                  "patient lacks some of them (partial labels: unknown, not background), the challenge's split "
                  "(splits_final.json: fold 0 train->validation, fold 1 validation->test; openkbp_sets.json) and "
                  "the record openkbp_import.json. Patients without ct.csv are listed and skipped; a damaged file "
                  "is one error and nothing is written (docs/benchmark.md, 'Real CT: OpenKBP').")
def add_import_openkbp(p):
    from medadapt.data.openkbp import STRUCTURES

    p.add_argument("provided_data", type=Path, metavar="PROVIDED_DATA",
                   help="OpenKBP's provided-data folder (holds train-pats, validation-pats, test-pats)")
    p.add_argument("--out", type=Path, required=True,
                   help="dataset folder to write (new or empty), e.g. $nnUNet_raw/Dataset600_OpenKBP_OARs")
    p.add_argument("--structures", default=None, metavar="A,B,...",
                   help="the structures to label, in priority order (label ids follow it; where they overlap the "
                        f"first named keeps the voxel); default all: {','.join(STRUCTURES)}")
    p.add_argument("--sets", default=None, metavar="SET,...",
                   help="the challenge's sets to import: train, validation, test (default all three)")
    p.add_argument("--crop", choices=("none", "body"), default="none",
                   help="body: write each case cropped to the box of its body (the largest connected region above "
                        "-500 HU, every contour inside, 4 voxels wider; world positions kept), leaving out the air "
                        "around the patient that is three quarters of OpenKBP's grid (what the openkbp-* grids "
                        "use); none (default): OpenKBP's whole 128^3 grid")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd_import_openkbp


def cmd_import_openkbp(args) -> int:
    import sys

    from medadapt.data.openkbp import MAPPING_JSON, SPLITS_FILE, import_openkbp, parse_sets, parse_structures

    structures, sets = parse_structures(args.structures), parse_sets(args.sets)
    result = import_openkbp(args.provided_data, args.out, structures, sets, progress=not args.quiet,
                            crop=args.crop)
    for w in result.warnings:
        print(f"medadapt import-openkbp: warning: {w}", file=sys.stderr)
    labels = ", ".join(f"{k}={v}" for k, v in result.labels.items() if v)
    counts = ", ".join(f"{s} {sum(1 for c in result.training if result.sets[c] == s)}" for s in sets)
    print(f"wrote {len(result.training)} labelled case(s) to {result.out} ({counts}; labels {labels})")
    if result.unlabelled:
        print(f"{len(result.unlabelled)} case(s) with none of the structures went to imagesTs: "
              f"{', '.join(result.unlabelled)}")
    print(f"the challenge's split: {result.out / SPLITS_FILE} (fold 0 train->validation, fold 1 validation->test); "
          f"per case: {result.out / MAPPING_JSON}")
    return 0
