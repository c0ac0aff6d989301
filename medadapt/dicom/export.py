"""Label maps back to DICOM (``medadapt to-dicom``, ``predict --format rtstruct|seg``) and raw datasets out as
DICOM exports (``medadapt dataset-to-dicom``).

A NIfTI label map is put on the reference series' grid when it is that grid, possibly with its voxel axes
permuted or flipped (a map written in RAS order, say); any other geometry (another spacing, field of view or
origin) is refused: predict on the series itself, or resample first.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medadapt.dicom.series import CTSeries, load_series
from medadapt.errors import MedadaptError

FORMATS = ("rtstruct", "seg")
#: tolerances of "the same grid": mm on the origin, relative on the spacing / direction cosines
GRID_ATOL_MM = 1e-2
GRID_RTOL = 1e-3


def read_labelmap(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label map as a (z, y, x) view (no copy: the file's Fortran-ordered block transposed) and its
    affine; the checks of medadapt.data.io.read_label (3D, whole non-negative numbers)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise MedadaptError(f"{path}: file not found; check the path")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise MedadaptError(f"{path}: cannot be read as NIfTI ({exc}); re-export it as .nii.gz") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MedadaptError(f"{path}: label map has shape {data.shape}, expected a 3D volume")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise MedadaptError(f"{path}: label map has non-integer values; labels must be integers 0..N")
        data = data.astype(np.int16)
    return data.transpose(2, 1, 0), img.affine.copy()


def labelmap_on_series(array_zyx: np.ndarray, affine: np.ndarray, series: CTSeries, source) -> np.ndarray:
    """The label map on the series' (z, y, x) grid; one line when it is another grid."""
    import nibabel as nib

    data = np.asarray(array_zyx).transpose(2, 1, 0)
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.io_orientation(series.affine)
    transform = nib.orientations.ornt_transform(current, target)
    if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # axes permuted or flipped
        data = nib.orientations.apply_orientation(data, transform)
    aff = affine @ nib.orientations.inv_ornt_aff(transform, np.asarray(array_zyx).shape[::-1])
    shape_xyz = series.shape[::-1]
    if tuple(data.shape) != tuple(shape_xyz):
        raise MedadaptError(f"{source}: label map of {'x'.join(map(str, data.shape))} voxels, but {series.label()} has "
                            f"{'x'.join(map(str, shape_xyz))}; write the label map on the series' grid (medadapt "
                            "predict --input SERIES does) or resample it")
    ref = series.affine
    scale = np.abs(ref[:3, :3]).max()
    if (np.max(np.abs(aff[:3, 3] - ref[:3, 3])) > GRID_ATOL_MM
            or np.max(np.abs(aff[:3, :3] - ref[:3, :3])) > GRID_RTOL * scale):
        raise MedadaptError(f"{source}: label map's geometry (origin {np.round(aff[:3, 3], 3).tolist()} mm, spacing "
                            f"{np.round(np.linalg.norm(aff[:3, :3], axis=0), 4).tolist()} mm) is not that of "
                            f"{series.label()} (origin {np.round(ref[:3, 3], 3).tolist()}, spacing "
                            f"{np.round(np.linalg.norm(ref[:3, :3], axis=0), 4).tolist()}); write the label map on "
                            "the series' grid (medadapt predict --input SERIES does) or resample it")
    return data.transpose(2, 1, 0)


def parse_labels(text: str | None, where: str = "--labels") -> dict[int, str] | None:
    """``--labels`` as ``1=GTVn,2=Parotid_L``, ``GTVn,Parotid_L`` (ids 1, 2, ...) or a dataset.json / plans.json
    path (its labels)."""
    if not text:
        return None
    p = Path(text)
    if p.suffix == ".json" or p.is_file() or p.is_dir():
        f = p / "dataset.json" if p.is_dir() else p
        if p.is_dir() and not f.is_file():
            f = p / "plans.json"
        try:
            meta = json.loads(f.read_text())
            labels = meta["labels"]
            return {int(v): str(k) for k, v in labels.items() if int(v) != 0}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise MedadaptError(f"{where} {text}: not a dataset.json or plans.json with labels; pass one, or "
                                "write the names as 1=NAME,2=NAME") from None
    out: dict[int, str] = {}
    for i, item in enumerate(t.strip() for t in text.split(",")):
        key, sep, name = item.partition("=")
        try:
            value, name = (int(key), name.strip()) if sep else (i + 1, key.strip())
        except ValueError:
            raise MedadaptError(f"{where} {text!r}: {key!r} is not a label id; write e.g. 1=GTVn,2=Parotid_L") from None
        if not name or value <= 0:
            raise MedadaptError(f"{where} {text!r}: write positive ids and names, e.g. 1=GTVn,2=Parotid_L")
        out[value] = name
    return out


def label_names_for(labelmap: np.ndarray, names: dict[int, str] | None, source) -> dict[int, str]:
    """id -> name for every label in the map (named ones first as given, others ``label_<id>``)."""
    if labelmap.size and labelmap.min() < 0:
        raise MedadaptError(f"{source}: label map has negative values; labels must be 0 (background) and 1..N")
    seen: set[int] = set()
    for sl in labelmap:  # slice by slice: a whole-volume bincount would cast 78M voxels to int64 at once
        seen.update(int(v) for v in np.flatnonzero(np.bincount(sl.reshape(-1))))
    present = sorted(v for v in seen if v != 0)
    out = dict(names or {})
    for v in present:
        out.setdefault(v, f"label_{v}")
    return dict(sorted(out.items()))


def write_labelmap(labelmap: np.ndarray, series: CTSeries, labels: dict[int, str], out: str | Path, fmt: str,
                   model_name: str = "") -> Path:
    """Write the (z, y, x) label map on ``series`` as an RTSTRUCT or a DICOM-SEG, atomically."""
    from medadapt import __version__

    if fmt == "rtstruct":
        from medadapt.dicom.rtstruct import write_rtstruct

        return write_rtstruct(labelmap, series, labels, out, software_version=f"medadapt {__version__}",
                              model_name=model_name,
                              series_description=f"medadapt {model_name}".strip())
    if fmt == "seg":
        from medadapt.dicom.seg import write_seg

        return write_seg(labelmap, series, labels, out, model_name=model_name, software_version=__version__,
                         series_description=f"medadapt {model_name}".strip())
    raise MedadaptError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def to_dicom(labelmap_path: str | Path, reference: str | Path, out: str | Path, fmt: str,
             labels: dict[int, str] | None = None, model_name: str = "") -> Path:
    """``medadapt to-dicom``: a NIfTI label map on a CT series -> an RTSTRUCT or DICOM-SEG file."""
    if fmt not in FORMATS:
        raise MedadaptError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise MedadaptError(f"--out {out}: is a folder; give the file to write, e.g. {out / ('rs.dcm' if fmt == 'rtstruct' else 'seg.dcm')}")
    array, affine = read_labelmap(labelmap_path)
    series = load_series(reference)
    if fmt == "seg":
        series.check_decodable()  # highdicom reads the source images' pixel data
    grid = labelmap_on_series(array, affine, series, labelmap_path)
    return write_labelmap(grid, series, label_names_for(grid, labels, labelmap_path), out, fmt, model_name)


def dataset_to_dicom(dataset: str | Path, out: str | Path, roi_names: dict[str, str] | None = None,
                     cases: int | None = None, progress=None) -> list[Path]:
    """Each case of a raw dataset as a DICOM export: ``<out>/<case>/CT/CT.<k>.dcm`` and ``<out>/<case>/RS.dcm``
    (one ROI per label, named by ``roi_names`` (label -> ROI name) or the label's name)."""
    from medadapt.data.dataset import RawDataset
    from medadapt.dicom.ctwriter import reorient_lps, write_ct_series
    from medadapt.dicom.rtstruct import write_rtstruct

    ds = RawDataset.load(dataset)
    roi_names = dict(roi_names or {})
    unknown = [k for k in roi_names if k not in ds.labels or ds.labels[k] == 0]
    if unknown:
        raise MedadaptError(f"--roi-name {unknown[0]}: not a label of {ds.root / 'dataset.json'} "
                            f"({', '.join(k for k, v in ds.labels.items() if v)})")
    if ds.num_channels != 1:
        raise MedadaptError(f"{ds.root}: {ds.num_channels} channels; a DICOM CT export has one (the CT)")
    out = Path(out)
    ids = ds.case_ids[:cases] if cases else ds.case_ids
    existing = [c for c in ids if (out / c).exists()]
    if existing:
        raise MedadaptError(f"--out {out}: {out / existing[0]} exists; choose a new folder (or remove it)")
    names = {v: roi_names.get(k, k) for k, v in ds.labels.items() if v != 0}
    written = []
    for case in ids:
        if progress:
            progress(case)
        images, label = ds.load_case(case)
        tmp = out / f".{case}.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        write_ct_series(images[0].array, images[0].affine, tmp / "CT", patient_id=case,
                        series_description=f"{ds.name} {case}")
        series = load_series(tmp / "CT")
        lab, _ = reorient_lps(label.array, label.affine)
        write_rtstruct(lab, series, names, tmp / "RS.dcm", structure_set_label="export",
                       series_description=f"{ds.name} structures")
        tmp.rename(out / case)
        written.append(out / case)
    return written
