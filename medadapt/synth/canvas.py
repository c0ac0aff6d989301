"""Rasterising analytic shapes into a HU volume with partial-volume edges.

Two coordinate frames, both in mm and (z, y, x) order:

* **world**: centred on the volume centre; +z superior, +y anterior, +x towards the patient's right (RAS, the
  same directions as the voxel axes of :func:`medadapt.data.io.affine_from_spacing`).
* **patient**: the anatomy's own frame. ``world = R_yaw(diag(s_y, s_x) [y, x]) + t`` in-plane and
  ``z_world = s_z z + t_z``: each case draws a size, a position and a small rotation about z.

Every shape is evaluated only inside its own bounding box as an approximate signed distance ``d`` (mm, negative
inside) and converted into a voxel coverage fraction ``clip(0.5 - d / w, 0, 1)`` where ``w`` is the width of a
voxel projected on the surface normal. Painting blends ``hu += frac * (target - hu)`` and sets the tissue class of
voxels with ``frac >= 0.5``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Tissue classes of the class map (``SyntheticCase.tissue``).
(AIR, FAT, SKIN, MUSCLE, CORTEX, MARROW, AIRWAY, LUNG, ARTERY, VEIN, GLAND, NODE, CSF, SOFT, CARTILAGE, TABLE,
 LUNG_VESSEL) = range(17)
TISSUE_CLASSES = {
    "air": AIR, "fat": FAT, "skin": SKIN, "muscle": MUSCLE, "cortical_bone": CORTEX, "cancellous_bone": MARROW,
    "airway": AIRWAY, "lung": LUNG, "artery": ARTERY, "vein": VEIN, "gland": GLAND, "lymph_node": NODE,
    "csf": CSF, "soft_tissue": SOFT, "cartilage": CARTILAGE, "table": TABLE, "lung_vessel": LUNG_VESSEL,
}

_EPS = 1e-6
_FAR = np.float32(1e4)


class Curve:
    """A parameter that varies with patient z: piecewise-linear through ``(z, value)`` knots, constant beyond."""

    def __init__(self, z: Sequence[float], v: Sequence[float]):
        self.z = np.asarray(z, dtype=np.float64)
        self.v = np.asarray(v, dtype=np.float64)

    def __call__(self, z):
        return np.interp(z, self.z, self.v)


def _eval(p, z: np.ndarray) -> np.ndarray:
    if callable(p):
        return np.asarray(p(z), dtype=np.float32)
    return np.full(z.shape, p, dtype=np.float32)


@dataclass
class Shape:
    """A rasterised shape: bounding-box slices, signed distance ``d`` (mm), voxel width ``w`` along the normal."""

    sl: tuple[slice, slice, slice]
    d: np.ndarray
    w: np.ndarray | float
    zfrac: np.ndarray | None = None

    def frac(self, inset: float = 0.0) -> np.ndarray:
        f = np.clip(np.float32(0.5) - (self.d + np.float32(inset)) / self.w, 0.0, 1.0).astype(np.float32, copy=False)
        if self.zfrac is not None:
            f = np.minimum(f, self.zfrac)
        return f

    def inside(self, inset: float = 0.0) -> np.ndarray:
        m = self.d <= -inset
        if self.zfrac is not None:
            m = m & (self.zfrac >= 0.5)
        return m


class Frame:
    """Voxel grid plus the case's patient transform; converts boxes and coordinates between frames."""

    def __init__(self, shape, spacing, scale=(1.0, 1.0, 1.0), yaw_rad: float = 0.0, shift=(0.0, 0.0, 0.0)):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.yaw = float(yaw_rad)
        self.shift = np.asarray(shift, dtype=np.float64)
        self.centre = (np.asarray(self.shape) - 1) * self.spacing / 2.0
        self.c, self.s = math.cos(self.yaw), math.sin(self.yaw)
        # the same numbers as Python floats, for the scalar arithmetic of :meth:`box`
        self._scale, self._shift = self.scale.tolist(), self.shift.tolist()
        self._centre, self._spacing = self.centre.tolist(), self.spacing.tolist()
        nz, ny, nx = self.shape
        self.WZ = (np.arange(nz) * self.spacing[0] - self.centre[0]).astype(np.float32)
        self.WY = (np.arange(ny) * self.spacing[1] - self.centre[1]).astype(np.float32)
        self.WX = (np.arange(nx) * self.spacing[2] - self.centre[2]).astype(np.float32)
        self.PZ = ((self.WZ - self.shift[0]) / self.scale[0]).astype(np.float32)
        ry = (self.WY - self.shift[1])[:, None]
        rx = (self.WX - self.shift[2])[None, :]
        self.PY = ((self.c * ry + self.s * rx) / self.scale[1]).astype(np.float32)
        self.PX = ((-self.s * ry + self.c * rx) / self.scale[2]).astype(np.float32)
        # voxel size seen in each frame (rotation ignored: it is small)
        self.vox = {"world": self.spacing.astype(np.float32), "patient": (self.spacing / self.scale).astype(np.float32)}

    # frame conversion -------------------------------------------------------------------------------------------
    def to_world(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        z = self.scale[0] * p[..., 0] + self.shift[0]
        y0, x0 = self.scale[1] * p[..., 1], self.scale[2] * p[..., 2]
        y = self.c * y0 - self.s * x0 + self.shift[1]
        x = self.s * y0 + self.c * x0 + self.shift[2]
        return np.stack([z, y, x], axis=-1)

    def world_to_index(self, w) -> np.ndarray:
        return (np.asarray(w, dtype=np.float64) + self.centre) / self.spacing

    def box(self, lo, hi, space: str = "patient") -> tuple[slice, slice, slice] | None:
        """The voxel slices covering the box [lo, hi] (mm, ``space``'s frame), or None where it misses the grid.

        Scalar arithmetic in float64, operation for operation what :meth:`to_world` does on the box's eight
        corners (the same numbers, without numpy's per-call overhead: shapes call this a hundred thousand times
        per cohort)."""
        lo = np.asarray(lo, dtype=np.float64).tolist()
        hi = np.asarray(hi, dtype=np.float64).tolist()
        if space == "patient":
            sz, sy, sx = self._scale
            tz, ty, tx = self._shift
            c, s = self.c, self.s
            zs = [sz * lo[0] + tz, sz * hi[0] + tz]
            ys, xs = [], []
            for py in (lo[1], hi[1]):
                for px in (lo[2], hi[2]):
                    y0, x0 = sy * py, sx * px
                    ys.append(c * y0 - s * x0 + ty)
                    xs.append(s * y0 + c * x0 + tx)
            wlo, whi = (min(zs), min(ys), min(xs)), (max(zs), max(ys), max(xs))
        else:
            wlo, whi = lo, hi
        out = []
        for a, b, centre, spacing, n in zip(wlo, whi, self._centre, self._spacing, self.shape):
            a = max(math.floor((a + centre) / spacing), 0)
            b = min(math.ceil((b + centre) / spacing) + 1, n)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl, space: str = "patient"):
        """Broadcastable coordinates of the voxels in ``sl``: Z (nz,1,1), Y and X (1,ny,nx) or (1,ny,1)/(1,1,nx)."""
        if space == "patient":
            return (self.PZ[sl[0]][:, None, None], self.PY[sl[1], sl[2]][None], self.PX[sl[1], sl[2]][None])
        return (self.WZ[sl[0]][:, None, None], self.WY[sl[1]][None, :, None], self.WX[sl[2]][None, None, :])


# ------------------------------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------------------------------
def ellipsoid(frame: Frame, centre, semi, rot: np.ndarray | None = None, space: str = "patient",
              pad: float = 0.0) -> Shape | None:
    """Ellipsoid with semi-axes ``semi`` along the rows of ``rot`` (local axes in (z, y, x); identity if None)."""
    c = np.asarray(centre, dtype=np.float64)
    a = np.asarray(semi, dtype=np.float64)
    v = frame.vox[space]
    r = a if rot is None else np.full(3, a.max())
    sl = frame.box(c - r - v - pad, c + r + v + pad, space)
    if sl is None:
        return None
    Z, Y, X = frame.coords(sl, space)
    dz, dy, dx = Z - np.float32(c[0]), Y - np.float32(c[1]), X - np.float32(c[2])
    if rot is None:
        u = [dz, dy, dx]
        R = np.eye(3)
    else:
        R = np.asarray(rot, dtype=np.float64)
        u = [np.float32(R[k, 0]) * dz + np.float32(R[k, 1]) * dy + np.float32(R[k, 2]) * dx for k in range(3)]
    inv2 = (1.0 / a ** 2).astype(np.float32)
    g = [u[k] * inv2[k] for k in range(3)]
    q = np.sqrt(u[0] * g[0] + u[1] * g[1] + u[2] * g[2])
    gn = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2])
    ok = gn > _EPS
    gs = np.where(ok, gn, np.float32(1.0))
    d = np.where(ok, (q - 1.0) * q / gs, -_FAR).astype(np.float32)
    n = [(np.float32(R[0, j]) * g[0] + np.float32(R[1, j]) * g[1] + np.float32(R[2, j]) * g[2]) / gs for j in range(3)]
    w = np.abs(n[0]) * v[0] + np.abs(n[1]) * v[1] + np.abs(n[2]) * v[2]
    w = np.maximum(w, np.float32(0.5 * v.min()))
    return Shape(sl, d, w)


def capsule(frame: Frame, a, b, ra: float, rb: float | None = None, space: str = "patient") -> Shape | None:
    """Cone-capped segment from ``a`` to ``b`` with radius ``ra`` at a and ``rb`` at b (a tube piece)."""
    rb = ra if rb is None else rb
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    v = frame.vox[space]
    r = max(ra, rb)
    # the box's bounds as float64 scalars: min/max(a, b) -+ r -+ v, the numbers numpy's vector ops give
    lo, hi = [], []
    for ak, bk, vk in zip(a.tolist(), b.tolist(), v.tolist()):
        lo.append(min(ak, bk) - r - vk)
        hi.append(max(ak, bk) + r + vk)
    sl = frame.box(lo, hi, space)
    if sl is None:
        return None
    Z, Y, X = frame.coords(sl, space)
    ab = (b - a).astype(np.float32)
    L2 = float(ab @ ab) or 1e-9
    pz, py, px = Z - np.float32(a[0]), Y - np.float32(a[1]), X - np.float32(a[2])
    t = np.clip((pz * ab[0] + py * ab[1] + px * ab[2]) / np.float32(L2), 0.0, 1.0)
    ez, ey, ex = pz - t * ab[0], py - t * ab[1], px - t * ab[2]
    dist = np.sqrt(ez * ez + ey * ey + ex * ex)
    d = dist - (np.float32(ra) + t * np.float32(rb - ra))
    inv = 1.0 / np.maximum(dist, np.float32(_EPS))
    w = np.abs(ez * inv) * v[0] + np.abs(ey * inv) * v[1] + np.abs(ex * inv) * v[2]
    w = np.maximum(w, np.float32(0.5 * v.min()))
    return Shape(sl, d.astype(np.float32, copy=False), w)


def tube(frame: Frame, points, radii, space: str = "patient") -> list[Shape]:
    """A tube along a polyline (list of capsules; paint them one after the other)."""
    pts = np.asarray(points, dtype=np.float64)
    rr = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    out = []
    for i in range(len(pts) - 1):
        s = capsule(frame, pts[i], pts[i + 1], rr[i], rr[i + 1], space)
        if s is not None:
            out.append(s)
    return out


def _zrange(frame: Frame, z0: float, z1: float):
    """Slice range and per-slice patient z of the slices touching [z0, z1] (patient frame)."""
    vz = float(frame.vox["patient"][0])
    idx = np.nonzero((frame.PZ >= z0 - vz) & (frame.PZ <= z1 + vz))[0]
    if idx.size == 0:
        return None, None
    zs = slice(int(idx[0]), int(idx[-1]) + 1)
    return zs, frame.PZ[zs]


def _zfrac(Z: np.ndarray, z0: float, z1: float, vz: float) -> np.ndarray:
    lo = np.clip((Z - np.float32(z0)) / np.float32(vz) + 0.5, 0.0, 1.0)
    hi = np.clip((np.float32(z1) - Z) / np.float32(vz) + 0.5, 0.0, 1.0)
    return np.minimum(lo, hi).astype(np.float32)


def prism(frame: Frame, z0: float, z1: float, cy, cx, ay, ax, theta=0.0) -> Shape | None:
    """Stack of axial ellipses between patient z0 and z1. Each parameter is a number or a :class:`Curve` of z.

    ``ay``/``ax`` are the semi-axes along y/x before rotating the ellipse in-plane by ``theta`` (radians).
    """
    zs, Zs = _zrange(frame, z0, z1)
    if zs is None:
        return None
    P = [_eval(p, Zs) for p in (cy, cx, ay, ax, theta)]
    cyv, cxv, ayv, axv, thv = P
    r = np.maximum(ayv, axv)
    v = frame.vox["patient"]
    lo = [z0, float((cyv - r).min()) - v[1], float((cxv - r).min()) - v[2]]
    hi = [z1, float((cyv + r).max()) + v[1], float((cxv + r).max()) + v[2]]
    sl = frame.box(lo, hi, "patient")
    if sl is None:
        return None
    sl = (zs, sl[1], sl[2])
    Z, Y, X = frame.coords(sl, "patient")
    e = (slice(None), None, None)
    dy, dx = Y - cyv[e], X - cxv[e]
    if np.any(thv != 0):
        ct, st = np.cos(thv)[e], np.sin(thv)[e]
        u, w_ = ct * dy + st * dx, -st * dy + ct * dx
    else:
        ct = st = None
        u, w_ = dy, dx
    iu, iw = (1.0 / ayv ** 2)[e], (1.0 / axv ** 2)[e]
    gu, gw = u * iu, w_ * iw
    q = np.sqrt(u * gu + w_ * gw)
    gn = np.sqrt(gu * gu + gw * gw)
    ok = gn > _EPS
    gs = np.where(ok, gn, np.float32(1.0))
    d = np.where(ok, (q - 1.0) * q / gs, -_FAR).astype(np.float32)
    if ct is not None:
        ny_, nx_ = (ct * gu - st * gw) / gs, (st * gu + ct * gw) / gs
    else:
        ny_, nx_ = gu / gs, gw / gs
    w = np.maximum(np.abs(ny_) * v[1] + np.abs(nx_) * v[2], np.float32(0.5 * min(v[1], v[2])))
    return Shape(sl, d, w, _zfrac(Z, z0, z1, v[0]))


def plate(frame: Frame, z0: float, z1: float, points_yx, half_thickness: float, space: str = "patient") -> Shape | None:
    """A vertical plate: an in-plane polyline (y, x) thickened by ``half_thickness``, from z0 to z1."""
    pts = np.asarray(points_yx, dtype=np.float64)
    if space == "patient":
        zs, _ = _zrange(frame, z0, z1)
    else:
        idx = np.nonzero((frame.WZ >= z0) & (frame.WZ <= z1))[0]
        zs = slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else None
    if zs is None:
        return None
    v = frame.vox[space]
    h = half_thickness
    lo = [z0, pts[:, 0].min() - h - v[1], pts[:, 1].min() - h - v[2]]
    hi = [z1, pts[:, 0].max() + h + v[1], pts[:, 1].max() + h + v[2]]
    sl = frame.box(lo, hi, space)
    if sl is None:
        return None
    sl = (zs, sl[1], sl[2])
    Z, Y, X = frame.coords(sl, space)
    Y, X = Y[0], X[0]
    best = np.full(np.broadcast_shapes(Y.shape, X.shape), _FAR, dtype=np.float32)
    for i in range(len(pts) - 1):
        a, b = pts[i].astype(np.float32), pts[i + 1].astype(np.float32)
        ab = b - a
        L2 = float(ab @ ab) or 1e-9
        py, px = Y - a[0], X - a[1]
        t = np.clip((py * ab[0] + px * ab[1]) / np.float32(L2), 0.0, 1.0)
        ey, ex = py - t * ab[0], px - t * ab[1]
        np.minimum(best, np.sqrt(ey * ey + ex * ex), out=best)
    d = np.broadcast_to((best - np.float32(h))[None], (Z.shape[0],) + best.shape)
    w = np.float32(0.5 * (v[1] + v[2]) * 4.0 / math.pi)
    return Shape(sl, d, w, _zfrac(Z, z0, z1, v[0]))


@functools.lru_cache(maxsize=None)
def _within_lut(classes: tuple[int, ...]) -> np.ndarray:
    """1 for the tissue classes in ``classes``, 0 elsewhere (indexed by a class map; read-only, shared)."""
    lut = np.zeros(256, dtype=np.float32)
    lut[list(classes)] = 1.0
    lut.flags.writeable = False
    return lut


# ------------------------------------------------------------------------------------------------------------------
# Canvas
# ------------------------------------------------------------------------------------------------------------------
class Canvas:
    """The HU volume being drawn (float32, world-air to start), its tissue-class map and its structure map
    (``part``: the :mod:`medadapt.synth.structures` id of the named structure each voxel was drawn for, 0 =
    none)."""

    def __init__(self, frame: Frame):
        self.frame = frame
        self.hu = np.full(frame.shape, -1000.0, dtype=np.float32)
        self.cls = np.zeros(frame.shape, dtype=np.uint8)
        self.part = np.zeros(frame.shape, dtype=np.uint8)

    def fill(self, shape: Shape | None, hu, cls: int, inset: float = 0.0,
             within: Sequence[int] | None = None, frac: np.ndarray | None = None,
             part: "int | np.ndarray" = 0) -> np.ndarray | None:
        """Blend ``hu`` into the voxels covered by ``shape`` (shrunk by ``inset`` mm), optionally only over
        voxels whose current class is in ``within``. Returns the fraction used.

        Voxels covered at least half take the tissue class ``cls`` and the structure id ``part`` (a number, or
        an array broadcastable to the shape's box; 0 = no named structure), so a later fill always takes over
        both maps together."""
        if shape is None:
            return None
        f = shape.frac(inset) if frac is None else frac
        sl = shape.sl
        c = self.cls[sl]
        if within is not None:
            f = f * _within_lut(tuple(within))[c]
        h = self.hu[sl]
        hu_arr = np.asarray(hu, dtype=np.float32)
        h += f * (hu_arr - h)
        m = f >= 0.5
        c[m] = cls
        p = self.part[sl]
        if np.ndim(part) == 0:
            p[m] = part
        else:
            p[m] = np.broadcast_to(np.asarray(part, dtype=np.uint8), m.shape)[m]
        return f

    def fill_all(self, shapes: list[Shape], hu, cls: int, inset: float = 0.0,
                 within: Sequence[int] | None = None, part: int = 0) -> None:
        for s in shapes:
            self.fill(s, hu, cls, inset, within, part=part)

