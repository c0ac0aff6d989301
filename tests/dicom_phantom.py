"""Synthetic DICOM test data written with pydicom directly (not with medadapt's own CT writer): a CT phantom
series with chosen geometry, rescale and transfer syntax, and RTSTRUCTs from masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SHAPE = (20, 64, 64)  # z, y, x
SPACING = (2.5, 1.5, 1.25)  # z, y, x mm
ORIGIN = (-40.0, -48.0, -25.0)  # LPS of the first voxel


def phantom(shape=SHAPE):
    """HU image and two masks: a ring (a hole on every slice it is on) and two islands per slice."""
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    rng = np.random.default_rng(0)
    hu = np.where((x - 32) ** 2 + (y - 32) ** 2 < 29 ** 2, 40, -1000) + rng.integers(-30, 31, shape)
    r2 = (x - 22) ** 2 + (y - 24) ** 2
    ring = (r2 < 10 ** 2) & (r2 >= 4 ** 2) & (z >= 3) & (z < 15)
    islands = (((x - 42) ** 2 + (y - 42) ** 2 < 5 ** 2) | ((x - 50) ** 2 + (y - 20) ** 2 < 4 ** 2)) & (z >= 5) & (z < 12)
    return hu.astype(np.int16), ring, islands


def write_ct(folder, hu, *, spacing=SPACING, origin=ORIGIN, row=(1, 0, 0), col=(0, 1, 0), slope=1.0,
             intercept=-1024.0, patient="P001", study=None, frame_of_reference=None, series_uid=None,
             description="CT", tilt_mm=0.0, z_positions=None, transfer_syntax=ExplicitVRLittleEndian,
             pixel_bytes=None, skip=()):
    """One file per slice in a shuffled order with scrambled InstanceNumbers; returns the UIDs.

    ``tilt_mm``: each slice shifted this much along the column direction (a gantry tilt); ``z_positions``:
    the slices' offsets along the normal (default k x spacing); ``skip``: slice indices not written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    uids = {"study": study or generate_uid(), "series": series_uid or generate_uid(),
            "for": frame_of_reference or generate_uid(), "sops": []}
    nz = hu.shape[0]
    order = np.random.default_rng(1).permutation(nz)
    for rank, k in enumerate(order):
        k = int(k)
        sop = generate_uid()
        uids["sops"].append((k, sop))
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, sop
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = patient + "^", patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["for"]
        ds.SeriesDescription = description
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.InstanceNumber = int(rank + 1)  # deliberately not the slice order
        zk = z_positions[k] if z_positions is not None else k * spacing[0]
        pos = np.asarray(origin) + zk * normal + k * tilt_mm * col
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        if tilt_mm:
            ds.GantryDetectorTilt = float(np.degrees(np.arctan(tilt_mm / spacing[0])))
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.rint((hu[k].astype(np.float64) - intercept) / slope).astype(np.int16)
        if pixel_bytes is not None:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([pixel_bytes])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{rank:04d}", enforce_file_format=True)
    return uids


def rtstruct(path, series, masks: dict, **kwargs):
    """An RTSTRUCT of ``masks`` (name -> boolean (z, y, x) mask) on ``series`` (medadapt's writer)."""
    from medadapt.dicom.rtstruct import build_rtstruct_from_masks, save_dataset

    return save_dataset(build_rtstruct_from_masks(masks, series, **kwargs), path)


def dsc(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())
