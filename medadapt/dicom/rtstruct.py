"""RT Structure Sets: read their ROIs, rasterise contours in a CT's geometry, and write label maps as contours.

Rasterising (docs/dicom.md):

* Only CLOSED_PLANAR contours are areas; POINT and OPEN_* contours are left out (and recorded).
* A contour lies on the slice at its position along the slice normal (the nearest slice centre; its
  ReferencedSOPInstanceUID is used to find the series, not to place it, so exports whose referenced images are
  gone still import by position).
* A voxel belongs to the ROI when its centre is inside the ROI's contours on its slice by the even-odd rule:
  inside an odd number of them. Several contours on one slice are islands, a contour inside another is a hole
  (XOR), as plastimatch's ``--xor-contours`` and the TPSs read them.
* A contour point more than one voxel beyond the image's edge is refused (the structure set belongs to a
  larger or another image).

Writing: the contours of each label on each slice are the marching-squares iso-lines at 0.5 of the slice's
mask (scikit-image), which pass half-way between voxel centres inside and outside; collinear vertices are
dropped. Outer contours and holes are both written, so the even-odd rule gives back the mask exactly. Points
are in patient coordinates (LPS mm) on the slice's own ImagePositionPatient plane, and each contour references
its image.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medadapt.dicom.series import CT_IMAGE_STORAGE, RTSTRUCT_STORAGE, CTSeries
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path

#: how far (voxels) beyond the image's outer edge a contour point may lie
OUTSIDE_TOLERANCE_VOXELS = 1.0

#: ROI display colours, one per label (cycled)
PALETTE = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220),
           (255, 128, 0), (128, 0, 255), (0, 128, 128), (200, 100, 100), (100, 200, 100), (100, 100, 200),
           (128, 128, 0), (255, 105, 180), (139, 69, 19), (70, 130, 180)]


@dataclass
class Contour:
    points: np.ndarray  # (n, 3) LPS mm
    geometric_type: str
    referenced_sop: str | None


@dataclass
class Roi:
    number: int
    name: str
    contours: list[Contour] = field(default_factory=list)
    color: tuple[int, int, int] | None = None
    frame_of_reference: str = ""


@dataclass
class StructureSet:
    path: Path
    sop_uid: str
    patient_id: str
    study_uid: str
    frames_of_reference: list[str]
    referenced_series: list[str]
    rois: list[Roi]
    #: the dataset, for referenced SOP instances
    dataset: object = None

    def referenced_sops(self) -> set[str]:
        return {c.referenced_sop for r in self.rois for c in r.contours if c.referenced_sop}


# ---------------------------------------------------------------------------------------------------- reading
def _float_values(item, tag: int) -> np.ndarray:
    """A DS element as float64, parsed straight from its bytes where pydicom has not converted it yet."""
    elem = item.get_item(tag) if tag in item else None
    if elem is None:
        return np.zeros(0)
    value = elem.value
    if value is None:
        return np.zeros(0)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).strip(b"\x00 ")
        return np.array(value.split(b"\\"), dtype=np.float64) if value else np.zeros(0)
    if isinstance(value, (str, int, float)):
        return np.array([float(value)])
    return np.array([float(v) for v in value], np.float64)


def read_rtstruct(path: str | Path, ds=None) -> StructureSet:
    """The ROIs of an RTSTRUCT file: names, numbers, colours and contours (points in LPS mm)."""
    import pydicom

    path = Path(path)
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise MedadaptError(f"{path}: cannot be read as DICOM ({exc}); re-export the structure set") from exc
    if "StructureSetROISequence" not in ds:
        raise MedadaptError(f"{path}: RTSTRUCT without a StructureSetROISequence; re-export the structure set")
    fors, series = [], []
    for ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
        fors.append(str(ref.get("FrameOfReferenceUID", "")))
        for study in ref.get("RTReferencedStudySequence") or []:
            for s in study.get("RTReferencedSeriesSequence") or []:
                series.append(str(s.get("SeriesInstanceUID", "")))
    rois: dict[int, Roi] = {}
    for item in ds.StructureSetROISequence:
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError) as exc:
            raise MedadaptError(f"{path}: an ROI without a valid ROINumber; re-export the structure set") from exc
        name = str(item.get("ROIName", "") or f"ROI {number}")
        for_uid = str(item.get("ReferencedFrameOfReferenceUID", "") or "")
        if for_uid and for_uid not in fors:
            fors.append(for_uid)
        rois[number] = Roi(number=number, name=name, frame_of_reference=for_uid)
    for item in ds.get("ROIContourSequence") or []:
        roi = rois.get(int(item.get("ReferencedROINumber", -1)))
        if roi is None:
            continue
        color = item.get("ROIDisplayColor")
        if color is not None and len(color) == 3:
            roi.color = tuple(int(v) for v in color)
        for c in item.get("ContourSequence") or []:
            data = _float_values(c, 0x30060050)
            if data.size % 3 or not data.size:
                raise MedadaptError(f"{path}: ROI {roi.name!r} has a contour whose ContourData is not x, y, z "
                                    "triples; re-export the structure set")
            ref = None
            for img in c.get("ContourImageSequence") or []:
                ref = str(img.get("ReferencedSOPInstanceUID", "")) or None
                break
            roi.contours.append(Contour(points=data.reshape(-1, 3),
                                        geometric_type=str(c.get("ContourGeometricType", "CLOSED_PLANAR")),
                                        referenced_sop=ref))
    return StructureSet(path=path, sop_uid=str(ds.get("SOPInstanceUID", "")),
                        patient_id=str(ds.get("PatientID", "") or ""),
                        study_uid=str(ds.get("StudyInstanceUID", "") or ""), frames_of_reference=fors,
                        referenced_series=series, rois=list(rois.values()), dataset=ds)


# ---------------------------------------------------------------------------------------------------- rasterising
@dataclass
class Raster:
    """An ROI's mask as a box of the volume (``box``: z, y, x slices) and the mask inside it."""

    shape: tuple[int, int, int]
    box: tuple[slice, slice, slice] = (slice(0, 0), slice(0, 0), slice(0, 0))
    cropped: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))
    contours: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # geometric type -> count

    @property
    def voxels(self) -> int:
        return int(self.cropped.sum())

    @property
    def mask(self) -> np.ndarray:
        """The whole (z, y, x) boolean mask."""
        out = np.zeros(self.shape, bool)
        out[self.box] = self.cropped
        return out


def fill_even_odd(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels (rows, columns) whose centre is inside an odd number of ``polygons`` ((n, 2) arrays of column i,
    row j vertex coordinates): the even-odd rule over all of them at once, so holes and islands need no
    bookkeeping.

    A scanline fill: each edge crossing pixel row j (half-open in y, so a vertex on the row counts once) at x
    toggles the parity of every pixel at or right of x; the cumulative parity along the row is the mask."""
    ny, nx = shape
    rows, xs = [], []
    for poly in polygons:
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        j0 = np.maximum(np.ceil(lo), 0).astype(np.int64)  # rows j with lo <= j < hi
        j1 = np.minimum(np.ceil(hi), ny).astype(np.int64)
        n = np.maximum(j1 - j0, 0)
        if not n.any():
            continue
        edge = np.repeat(np.arange(len(n)), n)
        j = j0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n))
        t = (j - y0[edge]) / (y1[edge] - y0[edge])
        rows.append(j)
        xs.append(x0[edge] + t * (x1[edge] - x0[edge]))
    if not rows:
        return np.zeros(shape, bool)
    j = np.concatenate(rows)
    col = np.clip(np.ceil(np.concatenate(xs)), 0, nx).astype(np.int64)  # pixels i >= x
    r0, r1 = int(j.min()), int(j.max()) + 1
    toggles = np.bincount((j - r0) * (nx + 1) + col, minlength=(r1 - r0) * (nx + 1)).reshape(r1 - r0, nx + 1)
    out = np.zeros(shape, bool)
    out[r0:r1] = (np.cumsum(toggles[:, :nx], axis=1) & 1).astype(bool)
    return out


def rasterise(roi: Roi, series: CTSeries, source: Path | str = "") -> Raster:
    """The ROI's mask in the series' geometry: voxel centres inside by the even-odd rule, per slice."""
    nz, ny, nx = series.shape
    out = Raster(shape=series.shape)
    margin = 0.5 + OUTSIDE_TOLERANCE_VOXELS
    by_slice: dict[int, list[np.ndarray]] = {}
    for contour in roi.contours:
        if contour.geometric_type != "CLOSED_PLANAR":
            out.left_out[contour.geometric_type] = out.left_out.get(contour.geometric_type, 0) + 1
            continue
        ijk = series.to_voxel(contour.points)
        k = float(np.mean(ijk[:, 2]))
        lo, hi = ijk.min(axis=0), ijk.max(axis=0)
        if (lo[0] < -margin or lo[1] < -margin or hi[0] > nx - 1 + margin or hi[1] > ny - 1 + margin
                or k < -0.5 - 1e-3 or k > nz - 0.5 + 1e-3):
            where = series.affine_lps[:3, :3] @ np.array([0, 0, k]) + series.affine_lps[:3, 3]
            raise MedadaptError(
                f"{source}: ROI {roi.name!r} has contours outside the image (a contour at z = {where[2]:.4g} mm, "
                f"voxels x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, slice {k:.1f} of an image of "
                f"{nx} x {ny} x {nz}) of {series.label()}; export the structure set with the CT it was drawn on")
        if len(ijk) < 3:
            continue
        by_slice.setdefault(int(np.clip(round(k), 0, nz - 1)), []).append(ijk[:, :2])
        out.contours += 1
    if not by_slice:
        return out
    allpts = np.concatenate([p for polys in by_slice.values() for p in polys])
    x0, y0 = (max(0, int(np.floor(v))) for v in allpts.min(axis=0))
    x1, y1 = (int(np.ceil(v)) + 1 for v in allpts.max(axis=0))
    x1, y1 = min(max(x1, x0), nx), min(max(y1, y0), ny)
    z0, z1 = min(by_slice), max(by_slice) + 1
    out.box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    out.cropped = np.zeros((z1 - z0, y1 - y0, x1 - x0), bool)
    offset = np.array([x0, y0], float)
    for kk, polys in by_slice.items():
        out.cropped[kk - z0] = fill_even_odd([p - offset for p in polys], (y1 - y0, x1 - x0))
    return out


# ---------------------------------------------------------------------------------------------------- contours
def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """Vertices of a closed polygon (no repeated last point) without those on a straight line between their
    neighbours: the same polygon, fewer points."""
    if len(pts) < 4:
        return pts
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    a, b = pts - prev, nxt - pts
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return pts[keep] if keep.sum() >= 3 else pts


def mask_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Outer contours and holes of a 2D mask as (n, 2) (row, column) vertex arrays in voxel coordinates."""
    from skimage.measure import find_contours

    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask2d.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask2d[r0:r1, c0:c1], 1).astype(np.float32)
    out = []
    for c in find_contours(crop, 0.5):
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]
        c = _drop_collinear(c)
        if len(c) >= 3:
            out.append(c + (r0 - 1, c0 - 1))
    return out


# ---------------------------------------------------------------------------------------------------- writing
def _ds_bytes(values: np.ndarray) -> bytes:
    """DS values (at most 16 characters each) joined by backslashes, padded to an even length."""
    text = "\\".join(map(repr, np.round(np.asarray(values, np.float64), 3).tolist()))
    if len(text) % 2:
        text += " "
    return text.encode("ascii")


def new_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def copy_patient_study(src, dst) -> None:
    """The patient and study modules of the referenced images, kept as they are."""
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
               "SpecificCharacterSet", "IssuerOfPatientID", "PatientAge"):
        if kw in src:
            setattr(dst, kw, src.get(kw))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if kw not in dst:
            setattr(dst, kw, "")


def build_rtstruct(labelmap: np.ndarray, series: CTSeries, labels: dict[int, str], **kwargs):
    """An RTSTRUCT dataset with one ROI per entry of ``labels`` (id -> name) from a (z, y, x) label map in the
    series' geometry (ROI colours by label id)."""
    if tuple(labelmap.shape) != tuple(series.shape):
        raise ValueError(f"label map shape {labelmap.shape} != series shape {series.shape}")
    order = sorted(labels)
    present = set(np.flatnonzero(labelmap.reshape(labelmap.shape[0], -1).max(axis=1) > 0).tolist())

    def slice_masks(k: int):
        if k in present:
            sl = labelmap[k]
            here = np.bincount(sl.ravel()) if sl.dtype.kind == "u" else None
            for n, v in enumerate(order):
                if here is None or (v < len(here) and here[v]):
                    yield n, sl == v

    return _build(series, [str(labels[v]) for v in order], slice_masks,
                  colors=[PALETTE[(v - 1) % len(PALETTE)] for v in order], **kwargs)


def build_rtstruct_from_masks(masks: dict[str, np.ndarray], series: CTSeries, **kwargs):
    """An RTSTRUCT with one ROI per (name, boolean (z, y, x) mask): ROIs may overlap."""
    names = list(masks)

    def slice_masks(k: int):
        for n, name in enumerate(names):
            yield n, masks[name][k]

    return _build(series, names, slice_masks, colors=[PALETTE[n % len(PALETTE)] for n in range(len(names))],
                  **kwargs)


def _build(series: CTSeries, names: list[str], slice_masks, *, colors, series_description: str = "medadapt",
           structure_set_label: str = "medadapt", software_version: str = "", model_name: str = "",
           interpreted_type: str = "ORGAN"):
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    now = datetime.datetime.now()
    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = sop_uid
    copy_patient_study(series.first, ds)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 901
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "medadapt"
    ds.ManufacturerModelName = (model_name or "medadapt")[:64]
    if software_version:
        ds.SoftwareVersions = software_version[:64]
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = series.frame_of_reference
    ds.PositionReferenceIndicator = series.first.get("PositionReferenceIndicator", "") or ""
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetName = (model_name or structure_set_label)[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")

    def image_ref(k: int) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID = str(series.headers[k].get("SOPClassUID", CT_IMAGE_STORAGE))
        r.ReferencedSOPInstanceUID = series.sop_uids[k]
        return r

    for_uid = series.frame_of_reference
    s = Dataset()
    s.SeriesInstanceUID = series.uid
    s.ContourImageSequence = Sequence([image_ref(k) for k in range(series.shape[0])])
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Component Management (retired), as TPSs write
    st.ReferencedSOPInstanceUID = series.study_uid
    st.RTReferencedSeriesSequence = Sequence([s])
    fr = Dataset()
    fr.FrameOfReferenceUID = for_uid
    fr.RTReferencedStudySequence = Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])

    # per slice and ROI: contours
    per_roi: list[list[tuple[int, np.ndarray]]] = [[] for _ in names]
    dy, dx = series.pixel_spacing
    for k in range(series.shape[0]):
        for n, m in slice_masks(k):
            if not m.any():
                continue
            for c in mask_contours(m):
                pts = (series.positions[k][None, :] + c[:, 1:2] * dx * series.row_dir[None, :]
                       + c[:, 0:1] * dy * series.col_dir[None, :])
                per_roi[n].append((k, pts))

    roi_seq, contour_seq, obs_seq = [], [], []
    tag_data = Tag(0x30060050)
    for n, name in enumerate(names, start=1):
        r = Dataset()
        r.ROINumber = n
        r.ReferencedFrameOfReferenceUID = for_uid
        r.ROIName = str(name)[:64]
        r.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_seq.append(r)
        rc = Dataset()
        rc.ROIDisplayColor = list(colors[n - 1])
        rc.ReferencedROINumber = n
        items = []
        for i, (k, pts) in enumerate(per_roi[n - 1], start=1):
            c = Dataset()
            c.ContourImageSequence = Sequence([image_ref(k)])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourNumber = i
            raw = _ds_bytes(pts.ravel())
            c[tag_data] = RawDataElement(tag_data, "DS", len(raw), raw, 0, False, True, True, False)
            # as if read from explicit little endian: pydicom writes the raw bytes as they are instead of
            # parsing every number back into a DSfloat (seconds for a large structure set)
            c.set_original_encoding(False, True, c._character_set)
            items.append(c)
        if items:
            rc.ContourSequence = Sequence(items)
        contour_seq.append(rc)
        o = Dataset()
        o.ObservationNumber = n
        o.ReferencedROINumber = n
        o.RTROIInterpretedType = interpreted_type
        o.ROIInterpreter = ""
        obs_seq.append(o)
    ds.StructureSetROISequence = Sequence(roi_seq)
    ds.ROIContourSequence = Sequence(contour_seq)
    ds.RTROIObservationsSequence = Sequence(obs_seq)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def save_dataset(ds, path: str | Path) -> Path:
    """Write a DICOM dataset atomically (DICOM file format, with preamble)."""
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_rtstruct(labelmap: np.ndarray, series: CTSeries, labels: dict[int, str], path: str | Path,
                   **kwargs) -> Path:
    """Build the RTSTRUCT (see :func:`build_rtstruct`) and write it to ``path`` atomically."""
    return save_dataset(build_rtstruct(labelmap, series, labels, **kwargs), path)
