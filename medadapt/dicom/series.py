"""DICOM files on disk: find them, group CT images by series, sort the slices, geometry and HU.

Conventions (docs/dicom.md):

* Slices are sorted by their position along the slice normal ``n = row direction x column direction`` (the
  cross product of the two ImageOrientationPatient vectors), never by InstanceNumber or file name.
* Arrays are (z, y, x) = (slice, row, column), as everywhere in medadapt; voxel (k, j, i) is the centre of
  pixel (row j, column i) of the k-th sorted slice, exactly where DICOM's ImagePositionPatient puts it (no
  half-voxel shift).
* ``affine_lps`` maps (i, j, k, 1) to DICOM patient coordinates (LPS, mm); ``affine`` is the same map in
  NIfTI's RAS (x and y negated), the affine the NIfTI files are written with.
* HU = stored value x RescaleSlope + RescaleIntercept, per slice.

Refused, each as one line naming the series or file and the fix: slices of different size or orientation, a
non-axial series, a gantry tilt, two slices at one position, a missing slice, a non-uniform slice spacing,
compressed pixel data without a decoder (the message names the package to install).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medadapt.errors import MedadaptError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: |n . z| at least this: the series counts as axial (about 2.6 degrees)
AXIAL_MIN_COS = 0.999
#: relative tolerance on slice spacing (uniform spacing, missing slices)
SPACING_RTOL = 0.01
#: absolute tolerance in mm (positions written with few digits)
SPACING_ATOL_MM = 0.01
#: slices whose offset deviates from the normal by more than this (radians) are a gantry tilt
TILT_MAX_RAD = 1e-3

#: pip packages of pydicom's decoder plugins, by plugin name
_PLUGIN_PACKAGES = {"gdcm": "python-gdcm", "pylibjpeg": "pylibjpeg with pylibjpeg-libjpeg / pylibjpeg-openjpeg",
                    "pillow": "pillow", "pyjpegls": "pyjpegls"}


def _pydicom():
    import pydicom

    return pydicom


# ---------------------------------------------------------------------------------------------------- scanning
@dataclass
class Scan:
    """What a folder tree holds: CT image headers by series UID, RTSTRUCT and SEG files, the rest counted."""

    root: Path
    ct: dict[str, list[tuple[Path, object]]] = field(default_factory=dict)
    rtstructs: list[tuple[Path, object]] = field(default_factory=list)
    others: dict[str, int] = field(default_factory=dict)
    not_dicom: int = 0
    #: CT series left out (localizers, single slices, enhanced multi-frame CT), with the reason
    ignored: dict[str, str] = field(default_factory=dict)

    @property
    def files_read(self) -> int:
        return (sum(len(v) for v in self.ct.values()) + len(self.rtstructs) + sum(self.others.values())
                + self.not_dicom)

    def describe(self) -> str:
        """``'120 files: 118 CT, 1 RTSTRUCT, 1 not DICOM'`` (for error messages)."""
        parts = []
        n_ct = sum(len(v) for v in self.ct.values())
        if n_ct:
            parts.append(f"{n_ct} CT")
        if self.rtstructs:
            parts.append(f"{len(self.rtstructs)} RTSTRUCT")
        parts += [f"{n} {m}" for m, n in sorted(self.others.items())]
        if self.not_dicom:
            parts.append(f"{self.not_dicom} not DICOM")
        return f"{self.files_read} file(s)" + (": " + ", ".join(parts) if parts else "")


def _walk(root: Path):
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan(root: str | Path) -> Scan:
    """Read the header of every file under ``root`` (pixel data is not read) and sort them by kind."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    if not root.exists():
        raise MedadaptError(f"{root}: not found; pass the folder that holds the DICOM export")
    out = Scan(root=root)
    for path in _walk(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            out.not_dicom += 1
            continue
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        modality = str(ds.get("Modality", "") or "?")
        if sop_class == CT_IMAGE_STORAGE or (not sop_class and modality == "CT" and "ImagePositionPatient" in ds):
            uid = str(ds.get("SeriesInstanceUID", ""))
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
            if "LOCALIZER" in image_type:
                out.ignored.setdefault(uid, "a localizer (scout), not a volume")
                out.others["CT localizer"] = out.others.get("CT localizer", 0) + 1
                continue
            out.ct.setdefault(uid, []).append((path, ds))
        elif sop_class == ENHANCED_CT_IMAGE_STORAGE:
            out.ignored.setdefault(str(ds.get("SeriesInstanceUID", "")),
                                   f"{path}: enhanced (multi-frame) CT, which medadapt does not read; export the "
                                   "series as classic single-frame CT images")
            out.others["enhanced CT"] = out.others.get("enhanced CT", 0) + 1
        elif sop_class == RTSTRUCT_STORAGE or modality == "RTSTRUCT":
            out.rtstructs.append((path, ds))
        else:
            out.others[modality] = out.others.get(modality, 0) + 1
    for uid in [u for u, items in out.ct.items() if len(items) < 2]:
        out.ignored[uid] = "a single slice, not a volume"
        del out.ct[uid]
    return out


# ---------------------------------------------------------------------------------------------------- series
@dataclass
class CTSeries:
    """One CT series, slices sorted along the normal, with its geometry; pixel data is read on demand."""

    uid: str
    files: list[Path]
    headers: list[object]
    sop_uids: list[str]
    positions: np.ndarray  # (n, 3) ImagePositionPatient of the sorted slices, LPS mm
    row_dir: np.ndarray  # direction of increasing column index i (LPS)
    col_dir: np.ndarray  # direction of increasing row index j (LPS)
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows = along j, between columns = along i), mm
    slice_spacing: float
    rows: int
    columns: int

    # ------------------------------------------------------------------ identity
    @property
    def first(self):
        return self.headers[0]

    @property
    def patient_id(self) -> str:
        return str(self.first.get("PatientID", "") or "")

    @property
    def study_uid(self) -> str:
        return str(self.first.get("StudyInstanceUID", "") or "")

    @property
    def frame_of_reference(self) -> str:
        return str(self.first.get("FrameOfReferenceUID", "") or "")

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))

    def label(self) -> str:
        """How messages name the series: its folder, description and UID."""
        desc = f" {self.description!r}" if self.description else ""
        return f"CT series{desc} in {self.folder} (SeriesInstanceUID {self.uid})"

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.files), self.rows, self.columns)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) spacing in mm, medadapt's order."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def affine_lps(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, 0] = self.row_dir * self.pixel_spacing[1]
        a[:3, 1] = self.col_dir * self.pixel_spacing[0]
        a[:3, 2] = self.normal * self.slice_spacing
        a[:3, 3] = self.positions[0]
        return a

    @property
    def affine(self) -> np.ndarray:
        """The NIfTI (RAS) affine of the (x, y, z) = (i, j, k) voxel axes."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    def to_voxel(self, points_lps: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates (i, j, k) of (n, 3) LPS points."""
        inv = np.linalg.inv(self.affine_lps)
        pts = np.asarray(points_lps, float)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def slice_index(self, sop_uid: str) -> int | None:
        """The sorted index of the slice with this SOPInstanceUID, None if it is not in the series."""
        index = self.__dict__.get("_sop_index")
        if index is None:
            index = self.__dict__["_sop_index"] = {u: k for k, u in enumerate(self.sop_uids)}
        return index.get(sop_uid)

    # ------------------------------------------------------------------ pixels
    def check_decodable(self) -> None:
        """One line naming the file and the package to install when the pixel data cannot be decoded here."""
        seen = set()
        for path, ds in zip(self.files, self.headers):
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if ts is None or ts in seen:
                continue
            seen.add(ts)
            _check_decoder(path, ts)

    def read_hu(self) -> np.ndarray:
        """The HU volume (z, y, x): int16 where slope and intercept keep values whole, else float32."""
        pydicom = _pydicom()
        self.check_decodable()
        out = None
        for k, path in enumerate(self.files):
            ds = pydicom.dcmread(path)
            try:
                raw = ds.pixel_array
            except Exception as exc:  # pydicom raises many types for undecodable data
                ts = ds.file_meta.get("TransferSyntaxUID")
                raise MedadaptError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}; transfer syntax "
                                    f"{getattr(ts, 'name', ts)}); re-export the series uncompressed") from exc
            if raw.shape != (self.rows, self.columns):
                raise MedadaptError(f"{path}: pixel data has shape {raw.shape}, expected ({self.rows}, "
                                    f"{self.columns}) (one grey-level frame); export the series as single-frame "
                                    "monochrome CT")
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            if out is None:
                whole = slope == round(slope) and intercept == round(intercept)
                out = np.empty(self.shape, np.int16 if whole else np.float32)
            if out.dtype == np.int16:
                hu = raw.astype(np.int32) * int(slope) + int(intercept) if slope != 1 else \
                    raw.astype(np.int32) + int(intercept)
                if slope != round(slope) or intercept != round(intercept) or hu.min() < -32768 or hu.max() > 32767:
                    out = out.astype(np.float32)
                    out[k] = raw.astype(np.float32) * slope + intercept
                else:
                    out[k] = hu
            else:
                out[k] = raw.astype(np.float32) * slope + intercept
        return out

    def to_volume(self):
        """The series as a :class:`medadapt.data.io.Volume` (float32 HU) for prediction."""
        from medadapt.data.io import Volume

        return Volume(self.read_hu().astype(np.float32), self.spacing, self.affine, self.folder)


def _check_decoder(path: Path, ts) -> None:
    from pydicom.uid import UID

    ts = UID(str(ts))
    if not ts.is_compressed:
        return
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError, ImportError) as exc:
        raise MedadaptError(f"{path}: pixel data is compressed as {ts.name} ({ts}), which pydicom cannot decode; "
                            "re-export the series uncompressed (e.g. gdcmconv --raw or dcmdjpeg)") from exc
    if decoder.is_available:
        return
    packages = []
    for line in decoder.missing_dependencies:
        plugin = line.split(" ", 1)[0]
        packages.append(_PLUGIN_PACKAGES.get(plugin, plugin))
    want = " or ".join(packages) if packages else "a decoder plugin for pydicom"
    raise MedadaptError(f"{path}: pixel data is compressed as {ts.name} ({ts}) and no decoder for it is "
                        f"installed; pip install {want} (or re-export the series uncompressed)")


def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], float)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise MedadaptError(f"{path}: {keyword} is missing or malformed ({value!r}); the file is not a usable CT "
                            "image, re-export the series")
    return arr


def build_series(uid: str, items: list[tuple[Path, object]]) -> CTSeries:
    """Sort one series' slices and check its geometry (see the module docstring for what is refused)."""
    paths = [p for p, _ in items]
    headers = [d for _, d in items]
    first_path, first = paths[0], headers[0]
    name = f"CT series in {Path(os.path.commonpath([str(p.parent) for p in paths]))} (SeriesInstanceUID {uid})"

    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    for p, d in zip(paths, headers):
        if (int(d.get("Rows", 0) or 0), int(d.get("Columns", 0) or 0)) != (rows, cols):
            raise MedadaptError(f"{p}: {d.get('Rows')}x{d.get('Columns')} pixels but {first_path.name} of the same "
                                f"series has {rows}x{cols}; {name} mixes images of two sizes, export one series")
        if np.max(np.abs(_floats(d, "ImageOrientationPatient", 6, p) - iop)) > 1e-4:
            raise MedadaptError(f"{p}: ImageOrientationPatient differs from {first_path.name} of the same series; "
                                f"{name} mixes orientations, export one series")
        if np.max(np.abs(_floats(d, "PixelSpacing", 2, p) - spacing)) > 1e-4:
            raise MedadaptError(f"{p}: PixelSpacing differs from {first_path.name} of the same series; "
                                f"{name} mixes pixel spacings, export one series")
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    positions = np.stack([_floats(d, "ImagePositionPatient", 3, p) for p, d in zip(paths, headers)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    paths = [paths[i] for i in order]
    headers = [headers[i] for i in order]

    tilt = float(first.get("GantryDetectorTilt", 0) or 0)
    offset = positions[-1] - positions[0]
    if np.linalg.norm(offset) > 0:
        sin = np.linalg.norm(np.cross(offset / np.linalg.norm(offset), normal))
        if abs(tilt) > 1e-3 or sin > TILT_MAX_RAD:
            deg = tilt if abs(tilt) > 1e-3 else float(np.degrees(np.arcsin(min(1.0, sin))))
            raise MedadaptError(f"{name}: gantry tilt of {deg:.3g} degrees (slices are sheared, not stacked along "
                                "their normal); resample it to an untilted grid first (medadapt does not yet), "
                                "or export an untilted reconstruction")
    if abs(normal[2]) < AXIAL_MIN_COS:
        plane = {0: "sagittal", 1: "coronal", 2: "oblique axial"}[int(np.argmax(np.abs(normal)))]
        raise MedadaptError(f"{first_path}: {name} is not axial (ImageOrientationPatient "
                            f"{', '.join(f'{v:g}' for v in iop)}: {plane}); medadapt imports axial CT only, export "
                            "or reformat the series axially")

    gaps = np.diff(along)
    if np.any(gaps < SPACING_ATOL_MM):
        k = int(np.argmin(gaps))
        raise MedadaptError(f"{paths[k + 1]}: two slices at position {along[k]:.4g} mm ({paths[k].name} and "
                            f"{paths[k + 1].name}) in {name}; the export holds a slice twice or two acquisitions, "
                            "keep one")
    step = float(np.median(gaps))
    tol = SPACING_RTOL * step + SPACING_ATOL_MM
    bad = np.abs(gaps - step) > tol
    if np.any(bad):
        k = int(np.argmax(bad))
        ratio = gaps[k] / step
        if abs(ratio - round(ratio)) * step <= tol and round(ratio) >= 2:
            raise MedadaptError(f"{name}: {int(round(ratio)) - 1} slice(s) missing between positions "
                                f"{along[k]:.4g} and {along[k + 1]:.4g} mm (slice spacing {step:.4g} mm); export "
                                "the complete series")
        raise MedadaptError(f"{name}: slice spacing is not uniform ({gaps.min():.4g} to {gaps.max():.4g} mm); "
                            "resample it to one spacing first (medadapt does not yet) or export a uniformly "
                            "spaced reconstruction")

    return CTSeries(uid=uid, files=paths, headers=headers,
                    sop_uids=[str(d.get("SOPInstanceUID", "")) for d in headers], positions=positions,
                    row_dir=row_dir, col_dir=col_dir, normal=normal,
                    pixel_spacing=(float(spacing[0]), float(spacing[1])), slice_spacing=step, rows=rows,
                    columns=cols)


def load_series(path: str | Path, what: str = "--reference") -> CTSeries:
    """The one CT series under ``path`` (a series folder); a clear line when there is none or several."""
    found = scan(path)
    if not found.ct:
        raise MedadaptError(f"{what} {path}: no CT series here ({found.describe()}); pass the folder of the CT "
                            "series' .dcm files")
    if len(found.ct) > 1:
        listing = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in found.ct.items())
        raise MedadaptError(f"{what} {path}: {len(found.ct)} CT series here ({listing}); pass the folder of one")
    uid, items = next(iter(found.ct.items()))
    return build_series(uid, items)
