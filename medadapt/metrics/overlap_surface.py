"""Per-case, per-class overlap and surface metrics: DSC, NSD at a tolerance in mm, HD95 in mm.

Definitions (also in ``docs/metrics.md``):

* Boundary (surface) of a mask: its foreground voxels that have at least one face-connected (6-neighbour)
  background voxel, where everything outside the volume counts as background (so foreground voxels on the
  volume border are boundary voxels). This is ``mask & ~binary_erosion(mask)`` with scipy's default
  cross-shaped structuring element and ``border_value=0``, exactly MONAI's ``get_mask_edges`` edges.
* Distances are Euclidean distances in mm between boundary *voxel centres*, with each axis scaled by its own
  spacing (anisotropic spacing handled exactly): for every boundary voxel of one mask, the distance to the
  nearest boundary voxel of the other.
* NSD(tau) = (#{s in S_pred : d(s, S_gt) <= tau} + #{s in S_gt : d(s, S_pred) <= tau}) / (|S_pred| + |S_gt|),
  counting boundary voxels (no sub-voxel surface areas). ``<=`` allows 1e-6 mm for floating-point rounding.
* HD95 = max(P95{d(s, S_gt) : s in S_pred}, P95{d(s, S_pred) : s in S_gt}), the 95th percentiles taken with
  linear interpolation between order statistics (``numpy.percentile(method="linear")``, which is what
  ``torch.quantile`` in MONAI's ``compute_hausdorff_distance`` does).
* DSC = 2|P ∩ G| / (|P| + |G|) counting voxels.

These match MONAI 1.6's ``compute_surface_dice`` (``use_subvoxels=False``) and ``compute_hausdorff_distance``
(``percentile=95``) on non-empty masks (``tests/test_metrics.py`` checks it); they are computed here with
scipy so that the boundaries and distances are extracted once per class for both metrics, without one-hot
torch tensors of the whole volume, and without depending on MONAI internals that change between versions.
Empty masks follow :data:`EMPTY_POLICY` instead of MONAI's NaN/inf.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.spatial import cKDTree

EMPTY_POLICY = (
    "both prediction and ground truth empty for a class: DSC 1, NSD 1, HD95 0 mm; "
    "exactly one of them empty: DSC 0, NSD 0, HD95 undefined (NaN, left out of the HD95 mean/std and "
    "counted as hd95_undefined)"
)

#: Floating-point allowance in mm for ``d <= tolerance`` (a one-voxel distance equal to the tolerance counts).
TOLERANCE_EPS_MM = 1e-6

#: Percentile used for HD95.
HD_PERCENTILE = 95.0


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError:
        raise ValueError(f"spacing must be a sequence of {ndim} numbers (mm), got {spacing!r}") from None
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} values but the arrays are {ndim}D")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing {sp} must be finite and positive (mm)")
    return sp


def check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """Validate an nnU-Net style ``{name: value}`` mapping; return the foreground classes sorted by value.

    Background (value 0) is dropped. Raises ValueError for non-integer or duplicate values or no foreground.
    """
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must be a dict {{name: value}}, got {type(labels).__name__}")
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"labels[{name!r}] = {value!r}: label values must be integers "
                "(region-based labels such as lists are not supported)"
            )
        value = int(value)
        if value < 0:
            raise ValueError(f"labels[{name!r}] = {value}: label values must be >= 0")
        if value in seen:
            raise ValueError(f"labels {seen[value]!r} and {name!r} both have value {value}")
        seen[value] = str(name)
        if value != 0:
            out[str(name)] = value
    if not out:
        raise ValueError(f"labels {dict(labels)!r} has no foreground class (every value is 0)")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def boundary_coords(mask: np.ndarray) -> np.ndarray:
    """Indices (n, ndim) of the boundary voxels of a boolean mask (definition in the module docstring).

    Works on the mask's bounding box grown by one voxel (clipped to the volume), which gives the same boundary
    as the full volume: the grown box's faces are either background or the volume border.
    """
    lo, hi = [], []
    for axis, n in enumerate(mask.shape):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(present) == 0:
            return np.zeros((0, mask.ndim), dtype=np.int64)
        lo.append(max(int(present[0]) - 1, 0))
        hi.append(min(int(present[-1]) + 2, n))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = mask[box]
    structure = generate_binary_structure(mask.ndim, 1)  # face neighbours only (6 in 3D)
    edge = sub & ~binary_erosion(sub, structure=structure, border_value=0)
    return np.argwhere(edge) + np.asarray(lo, dtype=np.int64)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances in mm: (each pred boundary voxel -> gt boundary, each gt -> pred).

    Both masks must be non-empty (boolean, same shape).
    """
    sp = np.asarray(_check_spacing(spacing, pred.ndim), dtype=np.float64)
    bp = boundary_coords(pred).astype(np.float64) * sp
    bg = boundary_coords(gt).astype(np.float64) * sp
    if len(bp) == 0 or len(bg) == 0:
        raise ValueError("surface_distances needs two non-empty masks")
    d_pg = cKDTree(bg).query(bp, k=1)[0]
    d_gp = cKDTree(bp).query(bg, k=1)[0]
    return np.asarray(d_pg, dtype=np.float64), np.asarray(d_gp, dtype=np.float64)


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0) -> dict:
    """DSC, NSD and HD95 of two boolean masks of the same shape; see the module docstring and EMPTY_POLICY."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    _check_spacing(spacing, pred.ndim)
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    out = {"gt_voxels": n_gt, "pred_voxels": n_pred}
    if n_pred == 0 and n_gt == 0:
        return {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, **out}
    if n_pred == 0 or n_gt == 0:
        return {"dsc": 0.0, "nsd": 0.0, "hd95": float("nan"), **out}
    inter = int(np.count_nonzero(pred & gt))
    dsc = 2.0 * inter / (n_pred + n_gt)
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    tau = float(tolerance_mm) + TOLERANCE_EPS_MM
    nsd = (int(np.count_nonzero(d_pg <= tau)) + int(np.count_nonzero(d_gp <= tau))) / (len(d_pg) + len(d_gp))
    hd95 = max(
        float(np.percentile(d_pg, HD_PERCENTILE, method="linear")),
        float(np.percentile(d_gp, HD_PERCENTILE, method="linear")),
    )
    return {"dsc": float(dsc), "nsd": float(nsd), "hd95": hd95, **out}


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    labels: dict[str, int],
    tolerance_mm: float = 1.0,
    case: str | None = None,
) -> list[dict]:
    """Metrics of one case, one dict per foreground class of ``labels`` (sorted by label value).

    ``pred`` and ``gt`` are integer label maps of the same shape in (z, y, x) order, ``spacing`` in mm in the
    same order, ``labels`` an nnU-Net style ``{name: value}`` mapping (background 0 is skipped). Values present
    in the arrays but not in ``labels`` are ignored here (``evaluate_folders`` rejects them).

    Each dict has ``class``, ``label``, ``dsc``, ``nsd``, ``hd95`` (mm, NaN when undefined), ``gt_voxels``,
    ``pred_voxels`` and ``tolerance_mm``; with ``case`` given, also ``case`` (first), as :func:`summarize` wants.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected 3D (or 2D) label maps, got {pred.ndim}D arrays of shape {pred.shape}")
    _check_spacing(spacing, pred.ndim)
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    rows = []
    for name, value in check_labels(labels).items():
        row = {} if case is None else {"case": str(case)}
        row.update({"class": name, "label": value})
        row.update(binary_metrics(pred == value, gt == value, spacing, tol))
        row["tolerance_mm"] = tol
        rows.append(row)
    return rows
