"""``medadapt import-openkbp``: the OpenKBP challenge's CSV data -> an nnU-Net v2 raw dataset.

OpenKBP (Babier et al., Med Phys 48:5549, 2021; github.com/ababier/open-kbp, ``provided-data/``) holds 340
head-and-neck IMRT patients in ``train-pats`` (200), ``validation-pats`` (40) and ``test-pats`` (100), one folder
``pt_N`` each. Every array is a 128 x 128 x 128 grid stored sparsely: a CSV with the header ``,data`` whose
rows are C-order linear indices into the grid, followed by a value (``ct.csv``) or by nothing (a structure's
mask). ``voxel_dimensions.csv`` holds three spacings in millimetres.

What the files mean, read off the data (docs/benchmark.md, "Real CT: OpenKBP"):

* **Axes.** The grid's axis 0 runs anterior -> posterior (the mandible lies at low indices, the spinal cord at
  high), axis 1 patient right -> left (the right parotid at low indices), axis 2 superior -> inferior (the
  brainstem at low indices, the oesophagus at high); ``voxel_dimensions.csv`` gives the spacings of axes 0, 1, 2
  (the first two are equal for every patient, the third is the slice spacing, 1.5-3.3 mm). The dataset is
  written as an axial CT from a DICOM export is (``import-dicom``): voxel x along the patient's left, y
  posterior, z superior (NIfTI orientation ``LPS``), the grid centred on the world origin (OpenKBP keeps no
  patient position).
* **Intensities.** ``ct.csv`` stores CT numbers offset by +1000 (stored 0, the value every voxel outside the
  body has since it is absent from the sparse file, is air at -1000 HU): over 40 patients the fat peak sits at a
  stored 905 (-95 HU) and the soft-tissue peak at 1037 (+37 HU). Some patients are stored in a 16-bit range
  (up to 27,116); the data description recommends clipping to 0..4095, which is done first. So
  ``HU = clip(stored, 0, 4095) - 1000``, in [-1000, 3095], stored as int16.
* **Structures.** Brainstem, SpinalCord, RightParotid, LeftParotid, Esophagus, Larynx, Mandible, PTV56, PTV63,
  PTV70; a structure not contoured in the clinical plan has no file. The PTVs do not overlap each other but do
  overlap organs; organs touch (a parotid and the mandible share a voxel or three). ``--structures`` chooses
  the labels and their order: label ids 1..N follow it, and where chosen structures overlap **the structure
  named first keeps the voxel** (as ``import-dicom``'s ``--roi`` order); the voxels each structure gave up, and
  to which, are recorded per case.
* **Partial labels.** A case that lacks some chosen structures annotates only the others: they are listed in
  ``annotated_classes.json`` (:mod:`medadapt.data.partial`), so partial-label training takes the missing ones
  as unknown, not as background. A case with none of the chosen structures goes to ``imagesTs`` (unlabelled).
* **The challenge's split** is kept: ``openkbp_sets.json`` names each case's set, and ``splits_final.json``
  (nnU-Net's format) has fold 0 = train -> validation (the challenge's development split) and fold 1 =
  validation -> test (the few-shot protocol of the ``openkbp-*`` grids: fine-tune on validation patients,
  evaluate on test patients), each listing the imported labelled cases only.
* ``--crop body`` writes each case cropped to its body: the bounding box of the largest connected region above
  -500 HU (the couch and anything else apart from the patient left out; every labelled voxel kept), four voxels
  wider, every voxel at its world position (the affine's origin moves with the box). OpenKBP's grid is mostly
  air around the patient (the box is about a quarter of it), which training patches and sliding-window
  prediction would otherwise spend three quarters of their time on; what the box leaves out is air, where no
  structure is (the PTVs are clipped 5 mm inside the skin).

A patient without ``ct.csv`` (54 of the 340 in the public repository's snapshot, whose largest files are not
stored) is listed and skipped, with a warning. A damaged file (an index outside the grid, a value that is not a
number, a missing ``voxel_dimensions.csv``) is one error naming the file, and nothing is written: the dataset
is built in a temporary folder beside ``--out`` and renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from medadapt.errors import MedadaptError
from medadapt.utils.atomic import check_new_folder, new_folder

GRID = (128, 128, 128)
#: every structure of the dataset, in the order of OpenKBP's own data loader (organs at risk, then targets)
STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible",
              "PTV56", "PTV63", "PTV70")
#: the challenge's sets and their folder names (the README's tree says ``valid-pats``; the repository has
#: ``validation-pats``)
SETS = {"train": ("train-pats",), "validation": ("validation-pats", "valid-pats"), "test": ("test-pats",)}
HU_OFFSET = 1000
STORED_RANGE = (0, 4095)
SPLITS_FILE = "splits_final.json"
SETS_FILE = "openkbp_sets.json"
MAPPING_JSON = "openkbp_import.json"
CASE_PATTERN = re.compile(r"^pt_(\d+)$")
CROPS = ("none", "body")


@dataclass
class OpenKBPResult:
    out: Path
    labels: dict[str, int]
    training: list[str]
    unlabelled: list[str]
    skipped: list[str]                      # patients without ct.csv
    warnings: list[str] = field(default_factory=list)
    sets: dict[str, str] = field(default_factory=dict)


def case_id(patient: str) -> str:
    """``pt_7`` -> ``pt_007`` (sorts as the patients' numbers do)."""
    return f"pt_{int(CASE_PATTERN.match(patient).group(1)):03d}"


def parse_structures(value: str | None) -> list[str]:
    if value is None:
        return list(STRUCTURES)
    names = [n.strip() for n in value.split(",") if n.strip()]
    by_lower = {s.lower(): s for s in STRUCTURES}
    out = []
    for n in names:
        if n.lower() not in by_lower:
            raise MedadaptError(f"--structures {value}: {n!r} is not an OpenKBP structure; choose from "
                                f"{','.join(STRUCTURES)}")
        if by_lower[n.lower()] in out:
            raise MedadaptError(f"--structures {value}: {n!r} is named twice; name each structure once")
        out.append(by_lower[n.lower()])
    if not out:
        raise MedadaptError("--structures: names no structure; give e.g. PTV56 or Brainstem,SpinalCord")
    return out


def parse_sets(value: str | None) -> list[str]:
    if value is None:
        return list(SETS)
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in SETS]
    if bad or not names:
        raise MedadaptError(f"--sets {value}: {bad[0] if bad else 'nothing'!r} is not a set of the challenge; "
                            f"choose from {','.join(SETS)}")
    return [s for s in SETS if s in names]


def read_sparse(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A sparse OpenKBP CSV: (linear indices, values or None); one error naming the file if it is damaged."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MedadaptError(f"{path}: cannot be read ({exc}); copy it again from OpenKBP's provided-data") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].replace(" ", "") != ",data":
        raise MedadaptError(f"{path}: does not start with OpenKBP's header ',data'; the file is damaged or not an "
                            "OpenKBP file: copy it again from provided-data")
    rows = [ln.split(",", 1) for ln in lines[1:]]
    n_cells = GRID[0] * GRID[1] * GRID[2]
    try:
        index = np.array([r[0] for r in rows], dtype=np.int64)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not r[0].strip().lstrip("-").isdigit())
        raise MedadaptError(f"{path}: line {bad + 2} has the index {rows[bad][0]!r}, not a whole number; the file "
                            "is damaged: copy it again from provided-data") from None
    if index.size and (index.min() < 0 or index.max() >= n_cells):
        i = int(np.flatnonzero((index < 0) | (index >= n_cells))[0])
        raise MedadaptError(f"{path}: line {i + 2} has the index {index[i]}, outside the 128x128x128 grid "
                            f"(0..{n_cells - 1}); the file is damaged: copy it again from provided-data")
    if not with_values:
        return index, None
    try:
        values = np.array([r[1] if len(r) > 1 else "" for r in rows], dtype=np.float64)
    except ValueError:
        def bad_value(r):
            try:
                float(r[1] if len(r) > 1 else "")
                return False
            except ValueError:
                return True
        i = next(i for i, r in enumerate(rows) if bad_value(r))
        raise MedadaptError(f"{path}: line {i + 2} has the value {(rows[i] + [''])[1]!r}, not a number; the file "
                            "is damaged: copy it again from provided-data") from None
    if not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        raise MedadaptError(f"{path}: line {i + 2} has the value {rows[i][1]!r}, not a finite number; the file is "
                            "damaged: copy it again from provided-data")
    return index, values


def read_spacing(folder: Path) -> tuple[float, float, float]:
    """``voxel_dimensions.csv``: the spacings (mm) of the grid's axes 0, 1, 2."""
    path = folder / "voxel_dimensions.csv"
    if not path.is_file():
        raise MedadaptError(f"{path}: missing; every OpenKBP patient has voxel_dimensions.csv: copy the patient's "
                            "folder again from provided-data")
    try:
        values = [float(v) for v in path.read_text().split()]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MedadaptError(f"{path}: not three numbers ({exc}); copy it again from provided-data") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise MedadaptError(f"{path}: holds {values}, not three positive spacings in mm; copy it again from "
                            "provided-data")
    return values[0], values[1], values[2]


def grid_volume(index: np.ndarray, values: np.ndarray | None, dtype) -> np.ndarray:
    """The 128^3 grid in OpenKBP's axes (0: anterior->posterior, 1: right->left, 2: superior->inferior)."""
    vol = np.zeros(GRID[0] * GRID[1] * GRID[2], dtype=dtype)
    vol[index] = 1 if values is None else values
    return vol.reshape(GRID)


def to_zyx(grid: np.ndarray) -> np.ndarray:
    """OpenKBP's (A->P, R->L, S->I) grid as medadapt's (z, y, x) array: z inferior->superior, y A->P, x R->L."""
    return np.ascontiguousarray(grid[:, :, ::-1].transpose(2, 0, 1))


def affine_for(spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel (x, y, z) -> RAS world (mm): x along the patient's left, y posterior, z superior (``LPS``), the
    grid's centre at the origin."""
    s0, s1, s2 = spacing
    aff = np.diag([-s1, -s0, s2, 1.0])
    centre = (np.array(GRID, dtype=np.float64)[[1, 0, 2]] - 1) / 2.0
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def hu_from_stored(stored: np.ndarray) -> np.ndarray:
    """Stored CT numbers -> HU (int16): clipped to the 12-bit range, then the +1000 offset removed."""
    return (np.rint(np.clip(stored, *STORED_RANGE)) - HU_OFFSET).astype(np.int16)


def find_patients(source: Path, sets: list[str]) -> list[tuple[str, str, Path]]:
    """(set, patient, folder) for every ``pt_N`` folder of the chosen sets."""
    if not source.is_dir():
        raise MedadaptError(f"{source}: not a folder; give OpenKBP's provided-data folder (it holds train-pats, "
                            "validation-pats and test-pats)")
    out = []
    missing = []
    for s in sets:
        folder = next((source / name for name in SETS[s] if (source / name).is_dir()), None)
        if folder is None:
            missing.append(f"{SETS[s][0]}/")
            continue
        for p in sorted(folder.iterdir(), key=lambda q: q.name):
            m = CASE_PATTERN.match(p.name)
            if p.is_dir() and m:
                out.append((s, p.name, p))
    if missing and not out:
        raise MedadaptError(f"{source}: has no {', '.join(missing)}; give OpenKBP's provided-data folder (from "
                            "github.com/ababier/open-kbp)")
    if missing:
        raise MedadaptError(f"{source}: has no {', '.join(missing)} for --sets; give the full provided-data folder "
                            "or leave that set out of --sets")
    ids = [case_id(p) for _, p, _ in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise MedadaptError(f"{source}: patient {dupes[0]} appears in more than one set; give the challenge's "
                            "provided-data folder as released")
    if not out:
        raise MedadaptError(f"{source}: no pt_N patient folder in {', '.join(sets)}; give OpenKBP's provided-data "
                            "folder")
    return sorted(out, key=lambda t: int(CASE_PATTERN.match(t[1]).group(1)))


def label_case(folder: Path, structures: list[str]) -> tuple[np.ndarray | None, dict]:
    """A patient's label map (OpenKBP's grid axes) for the chosen structures, the first named keeping the voxels
    of an overlap, and what happened to each structure (voxels kept and given up, to whom)."""
    masks: dict[str, np.ndarray] = {}
    record: dict = {"present": [], "absent": [], "voxels": {}, "gave_up": {}}
    for name in structures:
        path = folder / f"{name}.csv"
        if not path.is_file():
            record["absent"].append(name)
            continue
        index, _ = read_sparse(path, with_values=False)
        if index.size == 0:
            record["absent"].append(name)
            record.setdefault("empty_files", []).append(name)
            continue
        masks[name] = grid_volume(index, None, np.bool_)
        record["present"].append(name)
    if not masks:
        return None, record
    label_map = np.zeros(GRID, np.uint8)
    for i in reversed(range(len(structures))):  # the first named is painted last: it keeps overlaps
        name = structures[i]
        if name in masks:
            label_map[masks[name]] = i + 1
    for i, name in enumerate(structures):
        if name not in masks:
            continue
        owners = label_map[masks[name]]
        record["voxels"][name] = int((owners == i + 1).sum())
        lost = {structures[int(v) - 1]: int(n) for v, n in zip(*np.unique(owners[owners != i + 1],
                                                                           return_counts=True))}
        if lost:
            record["gave_up"][name] = lost
    return label_map, record


#: ``--crop body``: the body is the largest connected region above this HU; the box keeps this many voxels more
BODY_HU, BODY_MARGIN = -500, 4


def body_box(hu_zyx: np.ndarray, label_zyx: np.ndarray | None) -> tuple[slice, slice, slice]:
    """The bounding box of the body (the largest 26-connected region above ``BODY_HU``: the couch and other
    objects apart from the patient are left out) widened by ``BODY_MARGIN`` voxels, and always holding every
    labelled voxel."""
    from scipy import ndimage

    regions, n = ndimage.label(hu_zyx > BODY_HU, structure=np.ones((3, 3, 3), bool))
    keep = np.zeros(hu_zyx.shape, bool)
    if n:
        sizes = np.bincount(regions.ravel())[1:]
        keep = regions == (int(np.argmax(sizes)) + 1)
    if label_zyx is not None:
        keep |= label_zyx > 0
    if not keep.any():
        return tuple(slice(0, s) for s in hu_zyx.shape)
    idx = np.argwhere(keep)
    lo = np.maximum(idx.min(0) - BODY_MARGIN, 0)
    hi = np.minimum(idx.max(0) + 1 + BODY_MARGIN, hu_zyx.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def cropped_affine(affine: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """The affine of the (z, y, x) box ``box`` of an image: voxel (x, y, z) of the box is voxel
    (x + x0, y + y0, z + z0) of the image, so every voxel keeps its world position."""
    out = affine.copy()
    start = np.array([box[2].start, box[1].start, box[0].start, 1.0])
    out[:3, 3] = (affine @ start)[:3]
    return out


def import_openkbp(source: str | Path, out: str | Path, structures: list[str] | None = None,
                   sets: list[str] | None = None, progress: bool = True, crop: str = "none") -> OpenKBPResult:
    """Convert OpenKBP's ``provided-data`` (``source``) into the nnU-Net raw dataset ``out``."""
    from medadapt import __version__
    from medadapt.dicom.importer import write_nifti

    source, out = Path(source), Path(out)
    if crop not in CROPS:
        raise MedadaptError(f"--crop {crop!r}: choose one of {', '.join(CROPS)}")
    structures = list(structures or STRUCTURES)
    sets = list(sets or SETS)
    check_new_folder(out)
    patients = find_patients(source, sets)
    skipped = [f"{s}/{p}" for s, p, folder in patients if not (folder / "ct.csv").is_file()]
    warnings = []
    if skipped:
        warnings.append(f"{len(skipped)} patient(s) have no ct.csv and are skipped: {', '.join(skipped)}")
    todo = [(s, p, f) for s, p, f in patients if (f / "ct.csv").is_file()]
    if not todo:
        raise MedadaptError(f"{source}: none of the {len(patients)} patient(s) of {','.join(sets)} has ct.csv; "
                            "fetch the data with its CT files")
    # a damaged spacing file is refused before anything is converted
    spacings = {folder: read_spacing(folder) for _, _, folder in todo}

    with new_folder(out) as tmp:
        for d in ("imagesTr", "labelsTr"):
            (tmp / d).mkdir()
        training, unlabelled, case_sets, annotated, cases = [], [], {}, {}, []
        iterator = todo
        if progress:
            from tqdm import tqdm

            iterator = tqdm(todo, desc="import-openkbp", unit="patient", dynamic_ncols=True)
        for s, patient, folder in iterator:
            case = case_id(patient)
            spacing = spacings[folder]
            index, values = read_sparse(folder / "ct.csv", with_values=True)
            hu = hu_from_stored(grid_volume(index, values, np.float64))  # absent voxels: stored 0, air
            label_map, record = label_case(folder, structures)
            affine = affine_for(spacing)
            image = to_zyx(hu)
            labels_zyx = to_zyx(label_map) if label_map is not None else None
            if crop == "body":
                box = body_box(image, labels_zyx)
                affine = cropped_affine(affine, box)
                image = np.ascontiguousarray(image[box])
                labels_zyx = np.ascontiguousarray(labels_zyx[box]) if labels_zyx is not None else None
                record["crop_zyx"] = [[b.start, b.stop] for b in box]
            split = "imagesTr" if label_map is not None else "imagesTs"
            (tmp / split).mkdir(exist_ok=True)
            write_nifti(image, affine, tmp / split / f"{case}_0000.nii.gz")
            if labels_zyx is not None:
                write_nifti(labels_zyx, affine, tmp / "labelsTr" / f"{case}.nii.gz")
                training.append(case)
                annotated[case] = list(record["present"])
            else:
                unlabelled.append(case)
            case_sets[case] = s
            for name in record.get("empty_files", []):
                warnings.append(f"{s}/{patient}: {name}.csv lists no voxel; taken as not contoured")
            cases.append({"case": case, "patient": patient, "set": s, "split": split,
                          "spacing_mm": list(spacing), "ct_values": int(index.size), **record})
        labels = {"background": 0, **{n: i + 1 for i, n in enumerate(structures)}}
        partial = any(len(v) < len(structures) for v in annotated.values())
        if not training:
            raise MedadaptError(f"{source}: no imported patient has any of {','.join(structures)}; choose other "
                                "--structures")
        dataset_json = {"name": out.name,
                        "description": "OpenKBP (Babier et al., Med Phys 2021), head-and-neck CT with clinical "
                                       "contours, imported by medadapt import-openkbp",
                        "reference": "https://github.com/ababier/open-kbp", "licence": "MIT (code); data: TCIA",
                        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(training),
                        "file_ending": ".nii.gz"}
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        if partial:
            (tmp / "annotated_classes.json").write_text(json.dumps(annotated, indent=2) + "\n")
        in_set = {s: [c for c in training if case_sets[c] == s] for s in SETS}
        folds = [{"train": in_set["train"], "val": in_set["validation"]},
                 {"train": in_set["validation"], "val": in_set["test"]}]
        (tmp / SPLITS_FILE).write_text(json.dumps(folds, indent=2) + "\n")
        (tmp / SETS_FILE).write_text(json.dumps(case_sets, indent=2) + "\n")
        mapping = {"source": str(source), "medadapt_version": __version__, "structures": structures,
                   "precedence_rule": "where chosen structures overlap, the one named first in --structures keeps "
                                      "the voxel",
                   "intensity": f"HU = clip(stored, {STORED_RANGE[0]}, {STORED_RANGE[1]}) - {HU_OFFSET}; voxels "
                                "absent from ct.csv are air (-1000 HU)",
                   "axes": "OpenKBP grid axis 0 anterior->posterior, 1 right->left, 2 superior->inferior; written "
                           "as x left, y posterior, z superior (LPS), the grid centred on the origin",
                   "splits": {"fold 0": "train -> validation", "fold 1": "validation -> test"},
                   "crop": crop if crop == "none" else
                   f"body: the box of the largest connected region above {BODY_HU} HU (and every labelled voxel), "
                   f"{BODY_MARGIN} voxels wider, each voxel at its world position",
                   "sets": sets, "skipped_without_ct": skipped, "partial": partial,
                   "training": training, "unlabelled": unlabelled, "warnings": warnings, "cases": cases}
        (tmp / MAPPING_JSON).write_text(json.dumps(mapping, indent=2) + "\n")
    return OpenKBPResult(out, labels, training, unlabelled, skipped, warnings, case_sets)
