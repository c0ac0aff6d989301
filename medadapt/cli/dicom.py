"""The DICOM commands: ``import-dicom``, ``to-dicom``, ``dataset-to-dicom``, and ``predict``'s DICOM input and
``--format rtstruct|seg`` (docs/dicom.md); each parser beside its handler, which only parses and prints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medadapt.cli.common import CommandGroup, MODEL_NAMES_HELP, model_arg
from medadapt.errors import MedadaptError

#: this module's commands, each with its one line in 'medadapt --help' (medadapt.cli.common)
commands = CommandGroup()


def predict_formats() -> tuple[str, ...]:
    """``predict --format``: NIfTI label maps, or one of the DICOM objects :mod:`medadapt.dicom.export` writes."""
    from medadapt.dicom.export import FORMATS

    return ("nifti", *FORMATS)


@commands.command("import-dicom", "CT series + RT Structure Sets (a planning-system export) -> nnU-Net v2 raw dataset",
                  "Walk SOURCE for DICOM files, group CT images by series and RTSTRUCTs by the series they "
                  "reference (else by frame of reference; contours whose images are absent are placed by "
                  "position, with a warning), sort slices along the slice normal, convert to HU, rasterise "
                  "each ROI mapped by --roi in the CT's geometry (voxel centre inside, even-odd rule: holes "
                  "and islands) and write an nnU-Net v2 raw dataset: imagesTr/labelsTr/dataset.json, imagesTs "
                  "for cases without a matching ROI, and the mapping (which ROI became which label, which were "
                  "left out and why) in dicom_import.json and dicom_import.csv. Written atomically: nothing "
                  "is left on any error (docs/dicom.md).")
def add_import_dicom(p):
    p.add_argument("source", type=Path, help="folder tree holding the DICOM export (CT images and RTSTRUCT files)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (new or empty), e.g. "
                                                           "Dataset503_MyClinic")
    p.add_argument("--roi", action="append", required=True, metavar="LABEL=PATTERN[,PATTERN...]",
                   help="a dataset label and the ROI names that go to it, as shell patterns, case, spaces, "
                        "underscores and hyphens ignored, e.g. \"lymph_node=LN*,Lnn*,GTVn*\"; a bare NAME is its "
                        "own pattern; TG-263 standard names also match their usual other spellings (Parotid_L: "
                        "'Lt Parotid'). Repeat for more labels: label ids follow the order, and where ROIs of "
                        "different labels overlap the label given first keeps the voxel")
    p.add_argument("--series", action="append", default=None, metavar="UID",
                   help="import this CT series (SeriesInstanceUID) only; repeat for more; needed where a patient "
                        "has several CT series")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return cmd_import_dicom


def cmd_import_dicom(args) -> int:
    from medadapt.dicom.importer import MAPPING_CSV, MAPPING_JSON, import_dicom

    result = import_dicom(args.source, args.out, args.roi, series_uids=args.series, progress=_say(args.quiet))
    for w in result.warnings:
        print(f"medadapt import-dicom: warning: {w}", file=sys.stderr)
    labels = ", ".join(f"{k}={v}" for k, v in result.labels.items() if v)
    print(f"wrote {len(result.training)} training case(s) to {result.out} (labels {labels})")
    if result.test:
        print(f"{len(result.test)} case(s) without a matching ROI went to imagesTs: {', '.join(result.test)}")
    print(f"which ROI became which label: {result.out / MAPPING_CSV} (details in {MAPPING_JSON})")
    return 0


@commands.command("to-dicom", "a NIfTI label map on a CT series -> RTSTRUCT or DICOM-SEG for the planning system",
                  "Write LABELMAP (a NIfTI label map on the grid of the CT series --reference, e.g. a medadapt "
                  "prediction) as an RT Structure Set (one ROI per label, a colour each; contours per slice, "
                  "outer contours and holes, in patient coordinates on the slices' positions, each referencing "
                  "its image) or as a DICOM-SEG (highdicom; the segmentation algorithm named: medadapt, its "
                  "version, the model). New series and instance UIDs; patient, study and frame of reference "
                  "are the reference series'.")
def add_to_dicom(p):
    p.add_argument("labelmap", type=Path, help="NIfTI label map (.nii.gz) on the reference series' grid")
    p.add_argument("--reference", type=Path, required=True, help="folder of the CT series the label map belongs to")
    p.add_argument("--out", type=Path, required=True, help="DICOM file to write, e.g. rs.dcm")
    from medadapt.dicom.export import FORMATS

    p.add_argument("--format", choices=FORMATS, required=True,
                   help="rtstruct (RT Structure Set, what planning systems import) or seg (DICOM Segmentation)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--labels", default=None, metavar="NAMES",
                       help="names of the labels: 1=GTVn,2=Parotid_L, or GTVn,Parotid_L (ids 1, 2, ...), or a "
                            "dataset.json (its labels); default: the model's with --model, else label_<id>")
    names.add_argument("--model", type=model_arg, default=None, help="model folder whose label names to use (and "
                                                                   "whose name the DICOM-SEG records)" + MODEL_NAMES_HELP)
    return cmd_to_dicom


def cmd_to_dicom(args) -> int:
    from medadapt.dicom.export import parse_labels, to_dicom

    names, name = (parse_labels(args.labels), "")
    if args.model is not None:
        names, name = _model_labels(args.model)
    out = to_dicom(args.labelmap, args.reference, args.out, args.format, labels=names, model_name=name)
    print(f"wrote {'RT Structure Set' if args.format == 'rtstruct' else 'DICOM-SEG'} {out}")
    return 0


@commands.command("dataset-to-dicom", "a raw dataset's cases as DICOM exports (CT series + RTSTRUCT per case)",
                  "Write each case of an nnU-Net v2 raw dataset as a planning system's export: "
                  "OUT/<case>/CT/CT.<k>.dcm (axial CT, HU) and OUT/<case>/RS.dcm (one ROI per label). With "
                  "'medadapt synth' it makes DICOM data to try import-dicom, predict --format and to-dicom on.")
def add_dataset_to_dicom(p):
    p.add_argument("dataset", type=Path, help="nnU-Net v2 raw dataset folder")
    p.add_argument("--out", type=Path, required=True, help="export folder (one subfolder per case)")
    p.add_argument("--roi-name", action="append", default=None, metavar="LABEL=ROINAME",
                   help="the ROI name to write for a label (default: the label's name), e.g. lymph_node=LN_Neck_L; "
                        "repeat for more labels")
    p.add_argument("--cases", type=int, default=None, help="only the first N cases (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return cmd_dataset_to_dicom


def cmd_dataset_to_dicom(args) -> int:
    from medadapt.dicom.export import dataset_to_dicom

    roi_names = {}
    for item in args.roi_name or []:
        label, sep, roi = item.partition("=")
        if not sep or not label.strip() or not roi.strip():
            raise MedadaptError(f"--roi-name {item!r}: write LABEL=ROINAME, e.g. lymph_node=LN_Neck_L")
        roi_names[label.strip()] = roi.strip()
    if args.cases is not None and args.cases < 1:
        raise MedadaptError(f"--cases {args.cases}: must be at least 1")
    written = dataset_to_dicom(args.dataset, args.out, roi_names, cases=args.cases, progress=_say(args.quiet))
    print(f"wrote {len(written)} case(s) as CT series + RTSTRUCT to {args.out}")
    return 0


def _say(quiet: bool):
    return None if quiet else (lambda text: print(text, file=sys.stderr, flush=True))


def _model_labels(model: Path) -> tuple[dict[int, str], str]:
    from medadapt.models import load_model_folder

    folder = load_model_folder(model)
    return {v: k for k, v in folder.foreground.items()}, model_name(folder)


def model_name(folder) -> str:
    """How DICOM outputs name a model: its folder ('runs/dgst/model' -> 'dgst/model')."""
    path = Path(folder.path) if folder.path is not None else Path("model")
    return f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name


def find_input_series(path: Path, fmt: str):
    """The CT series under ``predict --input`` when it is a DICOM folder (one case per series), else None (a
    NIfTI input, for which --format must be nifti)."""
    from medadapt.data.io import NIFTI_ENDINGS

    if fmt not in predict_formats():
        raise MedadaptError(f"--format {fmt!r}: choose one of {', '.join(predict_formats())}")
    path = Path(path)
    nifti = path.is_file() and path.name.endswith(NIFTI_ENDINGS) or path.is_dir() and any(
        p.name.endswith(NIFTI_ENDINGS) for p in path.iterdir() if p.is_file())
    if nifti or not path.exists():
        if fmt != "nifti":
            raise MedadaptError(f"--format {fmt}: needs a DICOM CT series as --input (the {fmt.upper()} references "
                                "its images); pass the series' folder, or write NIfTI and use 'medadapt to-dicom "
                                "LABELMAP --reference SERIES'")
        return None
    from medadapt.dicom.series import build_series, scan

    found = scan(path)
    if not found.ct:
        if found.files_read and found.not_dicom < found.files_read:
            raise MedadaptError(f"--input {path}: no CT series here ({found.describe()}); pass a folder of CT "
                                "images, a NIfTI file or a folder of <case>_0000.nii.gz files")
        return None  # neither NIfTI nor DICOM: find_images says what it expects
    series = [build_series(uid, items) for uid, items in found.ct.items()]
    for s in series:
        s.check_decodable()
    return sorted(series, key=lambda s: (s.patient_id, s.uid))


def predict_series(predictor, series, args) -> int:
    """Predict each CT series; write <case>.nii.gz, <case>_rtstruct.dcm or <case>_seg.dcm into --out."""
    from tqdm.auto import tqdm

    from medadapt.data.io import write_volume
    from medadapt.dicom.export import write_labelmap
    from medadapt.dicom.importer import case_id_for

    folder = predictor.folder
    out = Path(args.out)
    names = {}
    reverse = {v: k for k, v in predictor.classes.items()}
    for v, n in sorted(reverse.items()):
        names[v] = n
    name = model_name(folder)
    taken: set[str] = set()
    for s in series:  # every series whose prediction cannot fit the memory: one line before any work
        predictor.check_memory(s.label, s.shape, s.spacing)
    written = []
    for s in tqdm(series, desc="predict", disable=args.quiet, unit="series", leave=False):
        case = case_id_for(s.patient_id or s.folder.name, taken)
        seg = predictor.predict_case([s.to_volume()])
        if args.format == "nifti":
            target = out / f"{case}{folder.file_ending}"
            write_volume(seg, s.affine, target, dtype="uint8" if seg.max(initial=0) < 256 else "int16")
        else:
            target = out / f"{case}_{args.format}.dcm"
            labels = names if args.format == "rtstruct" else {v: n for v, n in names.items()}
            try:
                write_labelmap(seg, s, labels, target, args.format, model_name=name)
            except MedadaptError as exc:
                if args.format == "seg" and "empty" in str(exc):
                    print(f"medadapt predict: warning: {case}: nothing predicted, no DICOM-SEG written",
                          file=sys.stderr)
                    continue
                raise
        written.append(target)
    what = {"nifti": "label map(s)", "rtstruct": "RT Structure Set(s)", "seg": "DICOM-SEG(s)"}[args.format]
    print(f"wrote {len(written)} {what} for {len(series)} CT series to {out}")
    return 0


def add_predict_options(p: argparse.ArgumentParser) -> None:
    """``predict --format``."""
    p.add_argument("--format", choices=predict_formats(), default="nifti",
                   help="nifti (default: <case>.nii.gz), or with a DICOM CT series as --input rtstruct "
                        "(<case>_rtstruct.dcm, an RT Structure Set for the planning system) or seg "
                        "(<case>_seg.dcm, DICOM-SEG)")
