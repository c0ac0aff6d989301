"""``medadapt predict`` and ``medadapt evaluate``: each parser beside its handler."""
from __future__ import annotations

from pathlib import Path

from medadapt.cli import dicom as cli_dicom
from medadapt.cli.common import CommandGroup, add_postprocess_option, print_metrics, MODEL_NAMES_HELP, model_arg
from medadapt.errors import MedadaptError


#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


@commands.command("predict", "predict label maps for a NIfTI file or folder",
                  "Sliding-window prediction (Gaussian-weighted, 50%% overlap) of every "
                  "case in --input; label maps are written in each input's geometry.")
def add_predict(p):
    p.add_argument("--model", type=model_arg, required=True, help="model folder" + MODEL_NAMES_HELP)
    p.add_argument("--input", type=Path, required=True,
                   help="a NIfTI file, a folder of <case>_0000.nii.gz files, or a folder of DICOM CT series (one "
                        "case per series)")
    p.add_argument("--out", type=Path, required=True, help="output folder for <case>.nii.gz label maps")
    p.add_argument("--overlap", type=float, default=0.5, help="tile overlap (default 0.5)")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring (8x slower)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="predict only these classes of the model, e.g. liver,spleen (written as 1, 2, ...) or "
                        "liver=3,spleen=1 (default: every class, with the model's ids)")
    add_postprocess_option(p)
    cli_dicom.add_predict_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd_predict


def cmd_predict(args) -> int:
    from medadapt.data.dataset import find_images
    from medadapt.inference import Predictor
    from medadapt.models import load_model_folder

    folder = load_model_folder(args.model)
    series = cli_dicom.find_input_series(args.input, args.format)  # DICOM CT series, or None for NIfTI input
    if series is None:
        cases = find_images(args.input, folder.file_ending, num_channels=folder.network.input_channels)
    if not 0 <= args.overlap < 1:
        raise MedadaptError(f"--overlap {args.overlap}: must be in [0, 1)")
    from medadapt.inference.predictor import parse_classes

    predictor = Predictor(folder, overlap=args.overlap, mirror=args.mirror, postprocess=args.postprocess,
                          classes=parse_classes(args.classes))
    if series is not None:
        return cli_dicom.predict_series(predictor, series, args)
    written = predictor.predict_files(cases, args.out, progress=not args.quiet)
    print(f"wrote {len(written)} label map(s) to {args.out}")
    return 0


@commands.command("evaluate", "DSC, NSD and HD95 of predictions against ground truth",
                  "Per case and class: DSC, NSD at --tolerance-mm and HD95 (mm), using "
                  "voxel spacing; writes metrics_per_case.csv and summary.json.")
def add_evaluate(p):
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted <case>.nii.gz")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth <case>.nii.gz")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--out", type=Path, default=None, help="where to write results (default: --pred)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return cmd_evaluate


def cmd_evaluate(args) -> int:
    from medadapt.metrics import evaluate_folders

    if not args.tolerance_mm >= 0:
        raise MedadaptError(f"--tolerance-mm {args.tolerance_mm}: must be >= 0")
    out = args.out or args.pred
    summary = evaluate_folders(args.pred, args.gt, out, tolerance_mm=args.tolerance_mm,
                               progress=not args.quiet)
    print_metrics(summary, "cases")
    print(f"wrote {out / 'metrics_per_case.csv'} and {out / 'summary.json'}")
    return 0
