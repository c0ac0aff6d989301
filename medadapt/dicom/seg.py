"""DICOM-SEG (a Segmentation object) from a label map, with highdicom.

One segment per label present in the map (BINARY, empty frames omitted), each referencing the source CT images
it lies on, the segmentation algorithm named (medadapt, its version, the model's name in the algorithm's
parameters), segment category "Anatomical Structure" (SNOMED CT 123037004) and the label's name as its type in
medadapt's private coding scheme (99MEDADAPT): medadapt does not know the SNOMED code of an arbitrary label.
New series and instance UIDs; patient, study and frame of reference are the source images'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medadapt.dicom.series import CTSeries
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path


def build_seg(labelmap: np.ndarray, series: CTSeries, labels: dict[int, str], *, model_name: str = "",
              software_version: str = "", series_description: str = "medadapt"):
    """A highdicom Segmentation for the (z, y, x) ``labelmap`` in the series' geometry."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if tuple(labelmap.shape) != tuple(series.shape):
        raise ValueError(f"label map shape {labelmap.shape} != series shape {series.shape}")
    present = [v for v in sorted(labels) if np.any(labelmap == v)]
    if not present:
        raise MedadaptError("the label map has none of the labels " + ", ".join(labels.values()) +
                            " (it is empty); a DICOM-SEG needs at least one segment: write --format rtstruct or "
                            "nifti instead")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medadapt", family=codes.DCM.ArtificialIntelligence, version=software_version or "unknown",
        parameters={"model": (model_name or "unnamed")[:64]})
    descriptions, segment_map = [], np.zeros(labelmap.shape, np.uint16)
    for number, v in enumerate(present, start=1):
        name = str(labels[v])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value=f"L{v}", scheme_designator="99MEDADAPT",
                                                       meaning=name[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
        segment_map[labelmap == v] = number
    source = [pydicom.dcmread(p, stop_before_pixels=False) for p in series.files]
    for ds in source:  # Type 2 attributes highdicom copies: empty where an export left them out
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            if kw not in ds:
                setattr(ds, kw, "")
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=segment_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=902,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medadapt",
        manufacturer_model_name=(model_name or "medadapt")[:64], software_versions=software_version or "unknown",
        device_serial_number="0", series_description=series_description[:64],
        content_label="MEDADAPT", content_description=f"medadapt {model_name}".strip()[:64])
    return seg, {number: v for number, v in enumerate(present, start=1)}


def write_seg(labelmap: np.ndarray, series: CTSeries, labels: dict[int, str], path: str | Path, **kwargs) -> Path:
    """Build the DICOM-SEG (see :func:`build_seg`) and write it to ``path`` atomically."""
    seg, _ = build_seg(labelmap, series, labels, **kwargs)
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path


def read_seg_labelmap(path: str | Path, series: CTSeries) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG back as a (z, y, x) label map on the series' slices (segment numbers), with segment labels."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    numbers = list(seg.segment_numbers)
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_uids, segment_numbers=numbers,
                                            combine_segments=True, skip_overlap_checks=False)
    names = {n: seg.get_segment_description(n).segment_label for n in numbers}
    return np.asarray(arr), names
