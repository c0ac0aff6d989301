"""Per-case, per-class overlap and surface metrics: DSC, NSD at a tolerance in mm, HD95 in mm.

NSD and HD95 follow the reference implementation of the normalized surface Dice, DeepMind's
``surface-distance`` package (Nikolov et al. 2018, "Deep learning to achieve clinically applicable segmentation
of head and neck anatomy for radiotherapy", arXiv:1809.04430; https://github.com/google-deepmind/surface-distance),
which is also what MONAI's ``compute_surface_dice(..., use_subvoxels=True)`` computes. The code here is our own;
``tests/test_metrics.py`` checks it against that package. Definitions (also in ``docs/metrics.md``):

* Surface elements ("surfels"). Every 2x2x2 block of neighbouring voxels (a cube whose corners are 8 voxel
  centres, including blocks that stick half a voxel out of the volume; everything outside the volume is
  background) whose corners are neither all foreground nor all background holds one surfel. Its position is the
  centre of the block, i.e. half a voxel off the voxel grid on every axis. Its area is the area of the marching-
  cubes surface inside the block: the surface passes through the midpoints of the block's edges that join a
  foreground and a background corner, ambiguous faces separate the minority corners (so a code and its complement
  have the same area), and the polygons are split into triangles as the reference's lookup table does (a pentagon
  into the triangle of its three vertices on parallel edges plus two, a non-planar hexagon into the triangle on
  every second vertex plus three). Each triangle's area is scaled by the spacing: a triangle with area vector
  (a0, a1, a2) in voxel units has area sqrt((a0 s1 s2)^2 + (a1 s0 s2)^2 + (a2 s0 s1)^2) mm^2. The 256 areas depend
  only on the spacing and are tabulated once per spacing (:func:`surfel_area_table`). In 2D the surfels are
  contour segments with lengths in mm.
* Distances: from each surfel of one mask to the nearest surfel position of the other, Euclidean in mm with each
  axis scaled by its own spacing (found with a KD-tree; the reference gets the same values from a distance
  transform of the surfel grid).
* NSD(tau) = (area of S_pred within tau of S_gt + area of S_gt within tau of S_pred) / (area S_pred + area S_gt).
  ``d <= tau`` allows 1e-6 mm for floating-point rounding.
* HD95 = max(P95 of the pred -> gt distances, P95 of the gt -> pred distances), each an *area-weighted*
  percentile: the smallest distance d for which the surfels at distance <= d hold at least 95 % of the surface
  area (the reference's ``compute_robust_hausdorff(distances, 95)``).
* DSC = 2|P ∩ G| / (|P| + |G|) counting voxels.

Empty masks follow :data:`EMPTY_POLICY` instead of the reference's NaN/inf.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
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


# --------------------------------------------------------------------------------------------- surfel areas
def _corner_bit(corner: tuple[int, ...]) -> int:
    """Bit of a block corner in the neighbourhood code, as in the reference's encoding kernel: the corner with the
    lowest index on every axis is the most significant bit (128 in 3D), the highest-index corner is bit 0."""
    index = 0
    for c in corner:
        index = 2 * index + c
    return 1 << (2 ** len(corner) - 1 - index)


def _polygon_triangles(n: int, edge_axes: list[int]) -> list[tuple[int, int, int]]:
    """Triangles (vertex indices) of a marching-cubes polygon with ``n`` vertices in cyclic order.

    Triangles, quadrilaterals and the hexagon around a corner and its three neighbours are planar, so any split
    gives the same area. The two non-planar cases are split as in the reference's table: the pentagon around
    three corners of one face into the triangle of its three consecutive vertices on parallel block edges plus a
    fan of two; the hexagon around a "staircase" of four corners into the triangle on every second vertex plus
    three ears.
    """
    if n == 6:
        return [(0, 1, 2), (2, 3, 4), (4, 5, 0), (0, 2, 4)]
    start = 0
    if n == 5:
        start = next(s for s in range(5) if edge_axes[s] == edge_axes[(s + 1) % 5] == edge_axes[(s + 2) % 5])
    return [(start, (start + i) % n, (start + i + 1) % n) for i in range(1, n - 1)]


@functools.lru_cache(maxsize=None)
def _unit_surfel_elements(ndim: int) -> np.ndarray:
    """For every neighbourhood code, the absolute area vectors of its surface triangles (3D) or the absolute
    coordinate differences of its contour segments (2D) in voxel units; shape (2**2**ndim, k, ndim), zero-padded.

    The surface inside a 2^ndim block passes through the midpoints of the block edges that join a foreground and
    a background corner. With more than half of the corners foreground, the complement is used: ambiguous faces
    then separate the minority corners, as in the reference (a code and its complement get the same area). Each
    edge-connected group of minority corners is enclosed by one polygon (3D) or one segment (2D).
    """
    corners = list(itertools.product((0, 1), repeat=ndim))
    n_codes = 2 ** len(corners)
    elements: list[list[np.ndarray]] = []
    for code in range(n_codes):
        inside = {c for c in corners if code & _corner_bit(c)}
        if len(inside) > len(corners) // 2:
            inside = set(corners) - inside
        found: list[np.ndarray] = []
        todo = set(inside)
        while todo:  # edge-connected groups of corners
            group, stack = set(), [todo.pop()]
            while stack:
                c = stack.pop()
                group.add(c)
                for axis in range(ndim):
                    nb = tuple(1 - v if a == axis else v for a, v in enumerate(c))
                    if nb in todo:
                        todo.discard(nb)
                        stack.append(nb)
            # Polygon vertices: midpoints of the edges from the group to a background corner.
            cut = []
            for c in sorted(group):
                for axis in range(ndim):
                    nb = tuple(1 - v if a == axis else v for a, v in enumerate(c))
                    if nb not in inside:
                        cut.append((axis, (np.asarray(c, float) + np.asarray(nb, float)) / 2))
            if ndim == 2:
                assert len(cut) == 2
                found.append(np.abs(cut[1][1] - cut[0][1]))
                continue
            # Order the vertices into a cycle: consecutive vertices lie on a common face of the block (each face
            # the polygon crosses holds exactly two of its vertices).
            faces: dict[tuple[int, float], list[int]] = {}
            for i, (axis, p) in enumerate(cut):
                for a in range(ndim):
                    if a != axis:
                        faces.setdefault((a, float(p[a])), []).append(i)
            nbrs: dict[int, list[int]] = {i: [] for i in range(len(cut))}
            for members in faces.values():
                assert len(members) == 2
                nbrs[members[0]].append(members[1])
                nbrs[members[1]].append(members[0])
            cycle = [0]
            while len(cycle) < len(cut):
                nxt = [j for j in nbrs[cycle[-1]] if j not in cycle]
                cycle.append(nxt[0])
            pts = [cut[i][1] for i in cycle]
            for i, j, k in _polygon_triangles(len(pts), [cut[i][0] for i in cycle]):
                found.append(np.abs(np.cross(pts[j] - pts[i], pts[k] - pts[i])) / 2)
        elements.append(found)
    width = max(len(e) for e in elements)
    table = np.zeros((n_codes, width, ndim))
    for code, found in enumerate(elements):
        if found:
            table[code, : len(found)] = found
    return table


@functools.lru_cache(maxsize=64)
def _surfel_area_table_cached(spacing: tuple[float, ...]) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if len(s) == 3:  # an area vector (a0, a1, a2) scales by (s1 s2, s0 s2, s0 s1)
        scale = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])
    else:  # a segment (d0, d1) scales by (s0, s1)
        scale = s
    table = np.linalg.norm(_unit_surfel_elements(len(s)) * scale, axis=-1).sum(axis=-1)
    table.setflags(write=False)
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area in mm^2 (3D; contour length in mm in 2D) of the surfel of every neighbourhood code, indexed by
    code (256 codes in 3D, 16 in 2D; codes 0 and all-ones have none). See the module docstring."""
    sp = _check_spacing(spacing, len(spacing))
    if len(sp) not in (2, 3):
        raise ValueError(f"surfel areas are defined in 2D and 3D, got spacing {sp}")
    return _surfel_area_table_cached(sp)


def surfels(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Surfels of a boolean mask: (block indices (n, ndim), areas (n,) in mm^2, or mm in 2D).

    Block index g on each axis is the 2^ndim block whose lowest corner is voxel g, so its centre (the surfel
    position) is at voxel coordinate g + 0.5; g runs from -1 (half a voxel outside the volume) up. Only the
    mask's bounding box padded by one voxel is examined; outside it every block is all background.
    """
    mask = np.asarray(mask, dtype=bool)
    table = surfel_area_table(_check_spacing(spacing, mask.ndim))
    # Bounding box: one pass over the volume for the first axis, the others from the projection of that slab.
    present = np.flatnonzero(mask.any(axis=tuple(range(1, mask.ndim))))
    if len(present) == 0:
        return np.zeros((0, mask.ndim), dtype=np.int64), np.zeros(0, dtype=np.float64)
    lo, hi = [int(present[0])], [int(present[-1]) + 1]
    slab = mask[lo[0] : hi[0]].any(axis=0)
    for axis in range(slab.ndim):
        present = np.flatnonzero(slab.any(axis=tuple(a for a in range(slab.ndim) if a != axis)))
        lo.append(int(present[0]))
        hi.append(int(present[-1]) + 1)
    sub = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    padded = np.zeros(tuple(n + 2 for n in sub.shape), dtype=np.uint8)
    padded[tuple(slice(1, -1) for _ in sub.shape)] = sub
    out_shape = tuple(n + 1 for n in sub.shape)
    code = np.zeros(out_shape, dtype=np.uint8)
    for corner in itertools.product((0, 1), repeat=mask.ndim):
        shift = _corner_bit(corner).bit_length() - 1
        code |= padded[tuple(slice(c, c + n) for c, n in zip(corner, out_shape))] << np.uint8(shift)
    full = len(table) - 1
    where = np.nonzero((code != 0) & (code != full))
    blocks = np.stack(where, axis=1).astype(np.int64) + (np.asarray(lo, dtype=np.int64) - 1)
    return blocks, table[code[where]]


class SurfaceDistances(NamedTuple):
    """Directed surfel distances in mm and the surfel areas (mm^2; mm in 2D) they are weighted by."""

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray
    pred_areas: np.ndarray
    gt_areas: np.ndarray


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """For each surfel of ``pred`` the distance in mm to the nearest surfel of ``gt``, and vice versa, with areas.

    Both masks must be non-empty (boolean, same shape).
    """
    sp = np.asarray(_check_spacing(spacing, np.ndim(pred)), dtype=np.float64)
    bp, ap = surfels(pred, spacing)
    bg, ag = surfels(gt, spacing)
    if len(bp) == 0 or len(bg) == 0:
        raise ValueError("surface_distances needs two non-empty masks")
    # Block indices times spacing; the common half-voxel offset of the surfel positions cancels in differences.
    xp = bp * sp
    xg = bg * sp
    d_pg = cKDTree(xg).query(xp, k=1)[0]
    d_gp = cKDTree(xp).query(xg, k=1)[0]
    return SurfaceDistances(np.asarray(d_pg, np.float64), np.asarray(d_gp, np.float64), ap, ag)


def area_weighted_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    """The smallest distance d such that the surfels at distance <= d hold at least ``percentile`` % of the area.

    Computed like the reference's ``compute_robust_hausdorff``: sort by (distance, area), cumulative area over
    total area, first index where it reaches ``percentile / 100``.
    """
    order = np.lexsort((areas, distances))
    d = distances[order]
    w = areas[order]
    cum = np.cumsum(w) / np.sum(w)
    i = int(np.searchsorted(cum, percentile / 100.0))
    return float(d[min(i, len(d) - 1)])


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
    sd = surface_distances(pred, gt, spacing)
    tau = float(tolerance_mm) + TOLERANCE_EPS_MM
    within = float(np.sum(sd.pred_areas[sd.pred_to_gt <= tau])) + float(np.sum(sd.gt_areas[sd.gt_to_pred <= tau]))
    nsd = min(1.0, within / (float(np.sum(sd.pred_areas)) + float(np.sum(sd.gt_areas))))
    hd95 = max(
        area_weighted_percentile(sd.pred_to_gt, sd.pred_areas, HD_PERCENTILE),
        area_weighted_percentile(sd.gt_to_pred, sd.gt_areas, HD_PERCENTILE),
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
