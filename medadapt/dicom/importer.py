"""``medadapt import-dicom``: CT series and RT Structure Sets under a folder -> an nnU-Net v2 raw dataset.

1. Every file's header is read; CT images are grouped by SeriesInstanceUID, RTSTRUCTs kept aside.
2. One CT series per patient (``--series`` chooses where an export has several).
3. Each RTSTRUCT goes to the series it references (RTReferencedSeriesSequence), else to the series with its
   frame of reference (a warning: the referenced series is not in the export); one whose frame of reference
   matches no series is refused. Contours whose referenced images are absent are placed by position (a
   warning with the count).
4. ROI names map to labels by the ``--roi`` rules (:mod:`medadapt.dicom.names`); each label must match an ROI
   in some case, else the ROI names seen are listed.
5. Each matched ROI is rasterised (:mod:`medadapt.dicom.rtstruct`); ROIs of one label are united; where ROIs
   of different labels overlap, the label listed first in ``--roi`` wins (the overlap is recorded).
6. Written into a temporary folder beside ``--out`` and renamed into place at the end, so an interrupted or
   refused import leaves nothing: ``imagesTr/<case>_0000.nii.gz`` (HU, int16), ``labelsTr/<case>.nii.gz``,
   ``imagesTs/<case>_0000.nii.gz`` for cases without a matching ROI, ``dataset.json``, and the mapping:
   ``dicom_import.json`` (per case: series, structure sets, which ROI became which label, which were left out
   and why, overlaps, warnings) and ``dicom_import.csv`` (one row per ROI).
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from medadapt.dicom.names import RoiRule, assign, parse_roi_options
from medadapt.dicom.rtstruct import StructureSet, rasterise, read_rtstruct
from medadapt.dicom.series import CTSeries, Scan, build_series, scan
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import check_new_folder, new_folder

MAPPING_JSON = "dicom_import.json"
MAPPING_CSV = "dicom_import.csv"


@dataclass
class CaseRecord:
    case: str
    series: CTSeries
    structure_sets: list[StructureSet] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    out: Path
    labels: dict[str, int]
    training: list[str]
    test: list[str]
    warnings: list[str]
    mapping: dict


def case_id_for(patient_id: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9-]+", "_", patient_id).strip("_") or "case"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _series_listing(items: list[CTSeries]) -> str:
    return "; ".join(f"{s.uid} ({s.description or 'no description'}, {s.shape[0]} slices, {s.folder})"
                     for s in items)


def select_series(found: Scan, series_uids: list[str] | None) -> list[CTSeries]:
    """The series to import, one per patient; one line for an empty export or an ambiguous patient."""
    if not found.ct:
        ignored = "".join(f"; ignored: {why}" for why in list(found.ignored.values())[:3])
        raise MedadaptError(f"{found.root}: no CT series found ({found.describe()}{ignored}); pass the folder that "
                            "holds the CT images exported with their structure sets")
    uids = list(found.ct)
    if series_uids:
        unknown = [u for u in series_uids if u not in found.ct]
        if unknown:
            raise MedadaptError(f"--series {unknown[0]}: no CT series with this SeriesInstanceUID under "
                                f"{found.root}; series found: {', '.join(uids)}")
        uids = [u for u in uids if u in series_uids]
    series = [build_series(u, found.ct[u]) for u in uids]
    by_patient: dict[str, list[CTSeries]] = {}
    for s in series:
        by_patient.setdefault(s.patient_id, []).append(s)
    for pid, items in by_patient.items():
        if len(items) > 1:
            raise MedadaptError(f"{found.root}: patient {pid!r} has {len(items)} CT series ({_series_listing(items)})"
                                "; choose one per patient with --series UID (repeat --series for each patient)")
    return series


def attach_structure_sets(found: Scan, series: list[CTSeries]) -> dict[str, list[tuple[StructureSet, list[str]]]]:
    """Structure sets by the UID of the series they belong to, with the warnings of the match."""
    by_uid = {s.uid: s for s in series}
    out: dict[str, list[tuple[StructureSet, list[str]]]] = {s.uid: [] for s in series}
    all_fors: dict[str, list[str]] = {}
    for uid, items in found.ct.items():
        all_fors.setdefault(str(items[0][1].get("FrameOfReferenceUID", "")), []).append(uid)
    for path, ds in found.rtstructs:
        ss = read_rtstruct(path, ds)
        warnings: list[str] = []
        target = next((u for u in ss.referenced_series if u in by_uid), None)
        if target is None and any(u in found.ct for u in ss.referenced_series):
            continue  # belongs to a series not chosen with --series
        if target is None:
            candidates = [s for s in series if s.frame_of_reference and s.frame_of_reference in ss.frames_of_reference]
            if len(candidates) > 1:
                same_patient = [s for s in candidates if s.patient_id == ss.patient_id]
                candidates = same_patient or candidates
            if not candidates:
                if any(f in all_fors for f in ss.frames_of_reference if f):
                    continue  # its series was left out with --series
                fors = ", ".join(f for f in ss.frames_of_reference if f) or "none given"
                raise MedadaptError(f"{path}: the RTSTRUCT's frame of reference ({fors}) matches no CT series under "
                                    f"{found.root}; export the CT series the structures were drawn on together "
                                    "with the structure set")
            if len(candidates) > 1:
                raise MedadaptError(f"{path}: the RTSTRUCT's frame of reference is shared by {len(candidates)} CT "
                                    f"series ({_series_listing(candidates)}); choose one with --series UID")
            target = candidates[0].uid
            refs = ", ".join(ss.referenced_series) or "no series"
            warnings.append(f"{path.name}: references {refs}, which is not in the export; matched to "
                            f"{by_uid[target].uid} by frame of reference")
        s = by_uid[target]
        refs = ss.referenced_sops()
        absent = [u for u in refs if s.slice_index(u) is None]
        if absent:
            warnings.append(f"{path.name}: {len(absent)} of the {len(refs)} images its contours reference are not "
                            f"in the export; those contours are placed by slice position")
        out[target].append((ss, warnings))
    return out


def _roi_names_seen(structure_sets) -> list[str]:
    seen: list[str] = []
    for items in structure_sets.values():
        for ss, _ in items:
            for r in ss.rois:
                if r.name not in seen:
                    seen.append(r.name)
    return seen


def check_rules(rules: list[RoiRule], structure_sets) -> list[str]:
    """A rule whose patterns match no ROI of any case is an error listing the names seen; a single pattern
    that matches nothing (others of its rule do) is a warning."""
    seen = _roi_names_seen(structure_sets)
    warnings = []
    for rule in rules:
        if not any(rule.matches(n) for n in seen):
            listing = ", ".join(repr(n) for n in seen[:40]) + (" ..." if len(seen) > 40 else "")
            raise MedadaptError(f"--roi {rule.text!r}: matches no ROI in any case; ROI names seen: "
                                f"{listing or 'none (no RTSTRUCT found)'}; fix the pattern (case, spaces, "
                                "underscores and hyphens are ignored; * and ? are wildcards)")
        for p in rule.patterns:
            if not any(rule.pattern_matches(p, n) for n in seen):
                warnings.append(f"--roi {rule.text!r}: pattern {p!r} matches no ROI in any case")
    return warnings


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case", "split", "rtstruct", "roi", "label", "voxels", "matched_by",
                                        "reason"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in w.fieldnames})
    return buf.getvalue()


def write_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """medadapt.data.io.write_volume's file (same header), without its C-order copy: the (z, y, x) array's
    transpose is already the Fortran-ordered (x, y, z) block NIfTI stores (seconds saved on a 512^2 x 300 CT)."""
    import nibabel as nib

    from medadapt.utils.atomic import atomic_path

    img = nib.Nifti1Image(np.asarray(array_zyx).transpose(2, 1, 0), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def import_dicom(source: str | Path, out: str | Path, roi: list[str], series_uids: list[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> ImportResult:
    """Import every CT series (with its structure sets) under ``source`` into the raw dataset ``out``."""
    from medadapt import __version__

    source, out = Path(source), Path(out)
    rules = parse_roi_options(roi)
    check_new_folder(out)
    found = scan(source)
    series = select_series(found, series_uids)
    attached = attach_structure_sets(found, series)
    global_warnings = check_rules(rules, attached)
    for s in series:
        s.check_decodable()
    labels = {"background": 0, **{r.label: i + 1 for i, r in enumerate(rules)}}

    taken: set[str] = set()
    plan = sorted(series, key=lambda s: (s.patient_id, s.uid))
    with new_folder(out) as tmp:
        for d in ("imagesTr", "labelsTr"):
            (tmp / d).mkdir()
        cases, rows, training, test = [], [], [], []
        all_warnings = list(global_warnings)
        for s in plan:
            case = case_id_for(s.patient_id, taken)
            if progress:
                progress(f"{case}: {s.shape[0]} slices, {len(attached[s.uid])} structure set(s)")
            record = {"case": case, "patient_id": s.patient_id, "series_uid": s.uid,
                      "series_description": s.description, "folder": str(s.folder), "slices": s.shape[0],
                      "spacing_zyx_mm": list(s.spacing), "structure_sets": [], "rois": [], "overlaps": [],
                      "warnings": []}
            masks: dict[int, list] = {}  # label id -> its ROIs' rasters (boxes of the volume)
            for ss, warnings in attached[s.uid]:
                record["structure_sets"].append(str(ss.path))
                record["warnings"] += warnings
                for r in ss.rois:
                    idx, how, also = assign(rules, r.name)
                    row = {"case": case, "rtstruct": str(ss.path), "roi": r.name}
                    if idx is None:
                        row.update(label=None, reason="no --roi pattern matches")
                    elif not r.contours:
                        row.update(label=None, reason="no contours")
                    else:
                        raster = rasterise(r, s, ss.path)
                        n = raster.voxels
                        if n == 0:
                            why = ("only " + ", ".join(f"{c} {t}" for t, c in raster.left_out.items()) +
                                   " contours (not areas)") if raster.left_out else "its contours enclose no voxel centre"
                            row.update(label=None, reason=why)
                        else:
                            label_id = idx + 1
                            masks.setdefault(label_id, []).append(raster)
                            row.update(label=rules[idx].label, voxels=n, matched_by=how)
                            notes = []
                            if also:
                                notes.append("also matches " + ", ".join(also) + "; the first --roi wins")
                            if raster.left_out:
                                notes.append("left out " + ", ".join(f"{c} {t}" for t, c in raster.left_out.items())
                                             + " contour(s)")
                            if notes:
                                row["reason"] = "; ".join(notes)
                    record["rois"].append({k: v for k, v in row.items() if k not in ("case",)})
                    rows.append(row)
            label_map = np.zeros(s.shape, np.uint8)
            for label_id in sorted(masks, reverse=True):  # the first --roi is painted last: it keeps overlaps
                for raster in masks[label_id]:
                    label_map[raster.box][raster.cropped] = label_id
            for label_id in sorted(masks):
                lost = {}
                for raster in masks[label_id]:
                    owners = label_map[raster.box][raster.cropped]
                    for v, n in zip(*np.unique(owners[owners != label_id], return_counts=True)):
                        lost[int(v)] = lost.get(int(v), 0) + int(n)
                if lost:
                    record["overlaps"].append({"label": rules[label_id - 1].label, "voxels": sum(lost.values()),
                                               "kept_by": [rules[o - 1].label for o in sorted(lost)]})
            hu = s.read_hu()
            split = "imagesTr" if masks else "imagesTs"
            (tmp / split).mkdir(exist_ok=True)
            write_nifti(hu, s.affine, tmp / split / f"{case}_0000.nii.gz")
            if masks:
                write_nifti(label_map, s.affine, tmp / "labelsTr" / f"{case}.nii.gz")
                training.append(case)
            else:
                test.append(case)
            record["split"] = split
            for row in rows:
                if row["case"] == case:
                    row["split"] = split
            if not attached[s.uid]:
                record["warnings"].append("no RTSTRUCT references this series")
            all_warnings += [f"{case}: {w}" for w in record["warnings"]]
            cases.append(record)
            del hu, label_map, masks

        if not training:
            raise MedadaptError(f"{source}: no case has an ROI that matches --roi with contours; check the patterns "
                                f"against the ROI names in {MAPPING_CSV} of a trial import")
        dataset_json = {"name": out.name, "description": f"imported from DICOM ({source}) by medadapt import-dicom",
                        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(training),
                        "file_ending": ".nii.gz"}
        mapping = {"source": str(source), "medadapt_version": __version__,
                   "rules": [{"label": r.label, "patterns": r.patterns, "tg263_aliases": r.aliases} for r in rules],
                   "labels": labels, "precedence": [r.label for r in rules],
                   "precedence_rule": "where ROIs of different labels overlap, the label listed first in --roi "
                                      "keeps the voxel",
                   "rasterisation": "voxel centre inside, even-odd rule over the contours on a slice (holes and "
                                    "islands), contours placed by slice position",
                   "training": training, "test": test, "warnings": all_warnings, "cases": cases}
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        (tmp / MAPPING_JSON).write_text(json.dumps(mapping, indent=2) + "\n")
        (tmp / MAPPING_CSV).write_text(_csv_text(rows))
    return ImportResult(out=out, labels=labels, training=training, test=test, warnings=all_warnings,
                        mapping=mapping)
