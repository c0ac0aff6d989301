"""NIfTI reading and writing.

Arrays follow nnU-Net's (and SimpleITK's) convention: axes are the file's voxel axes reversed, i.e. (z, y, x)
for a usual axial CT, and ``spacing`` is given in the same order, in millimetres. Nothing is reoriented on
reading; the affine is kept so that outputs can be written back in the input's exact geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path

NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A 3D image or label map: ``array`` in (z, y, x) order, ``spacing`` in mm (same order), file affine."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path | None = None

    @property
    def orientation(self) -> str:
        """Axis codes of the file's voxel axes (nibabel convention, e.g. ``"RAS"``)."""
        return "".join(nib.aff2axcodes(self.affine))


def _load(path: str | Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise MedadaptError(f"{path}: file not found; check the path (and the dataset's file_ending)")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise MedadaptError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-export it as "
                            ".nii.gz") from exc


def _to_3d(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MedadaptError(
            f"{path}: image has shape {tuple(img.shape)}, expected a 3D volume; "
            "split multi-channel or 4D images into one file per channel (_0000, _0001, ...)"
        )
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:  # a truncated .nii.gz: EOFError, zlib.error, OSError; a short .nii: ValueError
        raise MedadaptError(f"{path}: its voxel data cannot be read ({type(exc).__name__}: {exc}); the file is "
                            "truncated or corrupt: copy or export it again") from exc
    return data


def _spacing(img: nib.Nifti1Image) -> tuple[float, float, float]:
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return (zooms[2], zooms[1], zooms[0])


def read_image(path: str | Path) -> Volume:
    """Read an intensity image as float32; rejects non-3D images and NaN/inf voxels."""
    path = Path(path)
    img = _load(path)
    data = _to_3d(img, path).astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise MedadaptError(
            f"{path}: {n_bad} voxels are NaN or infinite; replace them (e.g. with the image minimum) before use"
        )
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), _spacing(img), img.affine.copy(), path)


def read_label(path: str | Path) -> Volume:
    """Read a label map as int16; rejects non-3D maps and non-integer values."""
    path = Path(path)
    img = _load(path)
    data = _to_3d(img, path)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.asarray(data, dtype=np.float64)
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise MedadaptError(f"{path}: label map has non-integer values; labels must be integers 0..N")
    data = np.asarray(data).astype(np.int16)
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), _spacing(img), img.affine.copy(), path)


def write_volume(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path, dtype=np.uint8) -> None:
    """Write a (z, y, x) array as NIfTI with the given affine, atomically."""
    data = np.ascontiguousarray(np.asarray(array_zyx).transpose(2, 1, 0)).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_label(array_zyx: np.ndarray, reference: Volume, path: str | Path) -> None:
    """Write a label map in the geometry of ``reference`` (its affine), atomically."""
    if tuple(array_zyx.shape) != tuple(reference.array.shape):
        raise ValueError(f"label shape {array_zyx.shape} != reference shape {reference.array.shape}")
    dtype = np.uint8 if array_zyx.max(initial=0) < 256 else np.int16
    write_volume(array_zyx, reference.affine, path, dtype=dtype)


def affine_from_spacing(spacing_zyx: tuple[float, float, float], origin_xyz=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A RAS affine with the given (z, y, x) spacing: voxel axis i (x) -> R, j (y) -> A, k (z) -> S."""
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]
    aff[:3, 3] = origin_xyz
    return aff


def strip_nifti_ending(name: str) -> str:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name
