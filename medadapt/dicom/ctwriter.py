"""A NIfTI CT image as a DICOM CT series, as a planning system exports one (for the synthetic cohorts, tests and
benchmarks: ``medadapt dataset-to-dicom``).

The image is first reoriented to DICOM's usual axial order (columns to the patient's left, rows to posterior,
slices to superior: ImageOrientationPatient 1\\0\\0\\0\\1\\0), so the series looks like a scanner's. Stored values
are HU + 1024 as unsigned 16 bit with RescaleIntercept -1024, RescaleSlope 1.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from medadapt.dicom.series import CT_IMAGE_STORAGE
from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path


def reorient_lps(array_zyx: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (z, y, x) array and RAS affine reoriented so that voxel axes i, j, k run to L, P, S."""
    import nibabel as nib

    data = np.asarray(array_zyx).transpose(2, 1, 0)
    current = nib.orientations.io_orientation(affine_ras)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(data, transform)
    affine = affine_ras @ nib.orientations.inv_ornt_aff(transform, np.asarray(array_zyx).shape[::-1])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine


def write_ct_series(array_zyx: np.ndarray, affine_ras: np.ndarray, folder: str | Path, *, patient_id: str,
                    patient_name: str = "", study_uid: str | None = None, frame_of_reference: str | None = None,
                    series_description: str = "CT", study_date: str | None = None) -> dict:
    """Write one file per slice to ``folder`` (CT.<k>.dcm, each atomically); returns the UIDs used."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    data, aff = reorient_lps(array_zyx, affine_ras)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    dx, dy, dz = (float(np.linalg.norm(lps[:3, a])) for a in range(3))
    row_dir, col_dir = lps[:3, 0] / dx, lps[:3, 1] / dy
    shifted = np.rint(data) + 1024
    if shifted.size and (shifted.min() < 0 or shifted.max() > 65535):
        raise MedadaptError("the image has values outside -1024..64511 HU; it is not a CT image in HU")
    stored = shifted.astype(np.uint16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    date = study_date or now.strftime("%Y%m%d")
    uids = {"study": study_uid or generate_uid(), "series": generate_uid(),
            "frame_of_reference": frame_of_reference or generate_uid(), "sop": []}
    nz, ny, nx = stored.shape
    for k in range(nz):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "medadapt"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "medadapt"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name or f"{patient_id}^"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.KVP = "120"
        ds.SliceThickness = f"{dz:.6g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = uids["study"]
        ds.SeriesInstanceUID = uids["series"]
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.Laterality = ""
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = lps[:3, 3] + k * lps[:3, 2]
        ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = uids["frame_of_reference"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{pos[2]:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        with atomic_path(folder / f"CT.{k + 1:04d}.dcm", suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        uids["sop"].append(sop)
    return uids
