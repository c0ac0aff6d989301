"""Lymph nodes: sampling sizes and shapes, placing them at nodal stations without colliding with anatomy,
painting them (with optional necrotic centre), and applying the annotation policy to build the label map."""
from __future__ import annotations

import math

import numpy as np

from medadapt.synth.canvas import FAT, GLAND, LUNG, MUSCLE, NODE, Canvas, ellipsoid
from medadapt.synth.spec import DomainSpec
from medadapt.synth.stations import Station
from medadapt.synth.structures import LYMPH_NODE

_POSITION_TRIES = 25
_SIZE_TRIES = 4
_MAX_FORBIDDEN = 0.03
_MAX_NODE_OVERLAP = 0.10


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (rows: the node's local axes in (z, y, x))."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q) + 1e-12
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _sample_axes(rng: np.random.Generator, spec: DomainSpec) -> np.ndarray:
    ns = spec.nodes
    lo, hi = ns.long_axis_mm
    if ns.size_distribution == "log_uniform" and hi > lo:
        long_ = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        long_ = rng.uniform(lo, hi)
    r = np.sort(rng.uniform(*ns.short_to_long, size=2))[::-1]
    return np.array([long_, long_ * r[0], long_ * r[1]])  # full diameters, long >= mid >= short


def _fits(canvas: Canvas, shape, centre_world: np.ndarray, st: Station) -> bool:
    """True if the node mostly lies in fat: little muscle / gland / lung, almost nothing else, no big overlap
    with nodes already placed, and its centre voxel in fat."""
    f = canvas.frame
    idx = np.round(f.world_to_index(centre_world)).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.asarray(f.shape)):
        return False
    if canvas.cls[tuple(idx)] != FAT:
        return False
    if shape is None:
        return False
    inside = shape.inside()
    n = int(inside.sum())
    if n == 0:
        return True
    cls = canvas.cls[shape.sl][inside]
    counts = np.bincount(cls, minlength=256).astype(np.float64) / n
    if counts[MUSCLE] > st.muscle_tol or counts[LUNG] > st.lung_tol or counts[GLAND] > st.gland_tol:
        return False
    if counts[NODE] > _MAX_NODE_OVERLAP:
        return False
    other = 1.0 - counts[FAT] - counts[MUSCLE] - counts[LUNG] - counts[GLAND] - counts[NODE]
    return other <= _MAX_FORBIDDEN


def place_nodes(canvas: Canvas, rng: np.random.Generator, spec: DomainSpec, stations: list[Station],
                label: np.ndarray) -> list[dict]:
    """Draw, place, paint and (maybe) annotate this case's nodes; fills ``label`` in place."""
    ns, ann = spec.nodes, spec.annotation
    f = canvas.frame
    target = int(rng.integers(ns.count[0], ns.count[1] + 1))
    weights = np.array([s.weight for s in stations], dtype=np.float64)
    weights /= weights.sum()
    p_right = rng.uniform(0.25, 0.75)
    clusters: list[tuple[Station, int, np.ndarray]] = []  # (station, side, patient centre)
    nodes: list[dict] = []
    for _ in range(target):
        placed = False
        for _size_try in range(_SIZE_TRIES):
            axes = _sample_axes(rng, spec)
            rot = random_rotation(rng)
            semi = axes / 2.0
            rn = float(semi[0] + semi[1]) / 2.0  # typical in-plane radius, for station offsets
            for _pos_try in range(_POSITION_TRIES):
                if clusters and rng.random() < ns.cluster_fraction:
                    st, side, c0 = clusters[int(rng.integers(len(clusters)))]
                    centre_p = c0 + rng.normal(0.0, 7.0, 3) * np.array([1.5, 1.0, 1.0])
                    new_cluster = False
                else:
                    st = stations[int(rng.choice(len(stations), p=weights))]
                    side = 1 if rng.random() < p_right else -1
                    centre_p = st.sample(rng, rn, side)
                    new_cluster = True
                centre_w = f.to_world(centre_p)
                shape = ellipsoid(f, centre_w, semi, rot, space="world")
                if not _fits(canvas, shape, centre_w, st):
                    continue
                node = _paint_node(canvas, rng, spec, shape, centre_w, semi, rot, axes)
                node["station"] = st.name if not st.bilateral else f"{st.name}{'R' if side > 0 else 'L'}"
                eligible = float(axes[2]) >= ann.min_annotated_diameter_mm
                draw = rng.random()
                node["eligible"] = bool(eligible)
                node["annotated"] = bool(eligible and draw < ann.annotated_fraction)
                if node["annotated"]:
                    node["label_voxels"] = _label_node(label, shape)
                else:
                    node["label_voxels"] = 0
                nodes.append(node)
                if new_cluster:
                    clusters.append((st, side, centre_p))
                placed = True
                break
            if placed:
                break
    return nodes


def _paint_node(canvas: Canvas, rng, spec: DomainSpec, shape, centre_w, semi, rot, axes) -> dict:
    ns = spec.nodes
    f = canvas.frame
    frac = shape.frac()
    # tiny nodes: the linear edge ramp over-estimates coverage; rescale to the true volume
    true_vox = (4.0 / 3.0) * math.pi * float(np.prod(semi)) / float(np.prod(f.spacing))
    s = float(frac.sum())
    if s > true_vox * 1.02:
        frac = frac * np.float32(true_vox / s)
    hu = float(rng.uniform(*ns.hu))
    canvas.fill(shape, hu, NODE, frac=frac, part=LYMPH_NODE)
    inside = shape.inside()
    canvas.cls[shape.sl][inside] = NODE  # the tissue and structure maps follow the geometry, like the label
    canvas.part[shape.sl][inside] = LYMPH_NODE
    necro_draw, necro_scale, necro_hu = rng.random(), rng.uniform(0.4, 0.65), rng.uniform(*ns.necrotic_hu)
    necrotic = bool(axes[0] >= ns.necrotic_min_long_axis_mm and necro_draw < ns.necrotic_fraction)
    if necrotic:
        inner = ellipsoid(f, centre_w, semi * necro_scale, rot, space="world")
        canvas.fill(inner, necro_hu, NODE, within=[NODE], part=LYMPH_NODE)
    centre_mm = np.asarray(centre_w) + f.centre  # array-index mm (index * spacing), (z, y, x)
    return {
        "centre_mm": [round(float(v), 3) for v in centre_mm],
        "centre_voxel": [round(float(v), 3) for v in centre_mm / f.spacing],
        "axes_mm": [round(float(v), 3) for v in axes],
        "long_axis_mm": round(float(axes[0]), 3),
        "short_axis_mm": round(float(axes[2]), 3),
        "orientation": [[round(float(v), 5) for v in row] for row in rot],
        "hu": round(hu, 2),
        "necrotic": necrotic,
        "necrotic_hu": round(float(necro_hu), 2) if necrotic else None,
    }


def _label_node(label: np.ndarray, shape) -> int:
    """Voxels whose centre lies in the node; a node smaller than a voxel still gets its best-covered voxel."""
    inside = shape.inside()
    view = label[shape.sl]
    if inside.any():
        view[inside] = 1
        return int(inside.sum())
    frac = shape.frac()
    if frac.max() <= 0:
        return 0
    k = np.unravel_index(int(np.argmax(frac)), frac.shape)
    view[k] = 1
    return 1
