"""One synthetic case: anatomy, lymph nodes, annotation, label map, then scanner effects.

Case ``index`` of a (domain, seed) draws everything from its own generator,
``numpy.random.default_rng(SeedSequence([seed, index, crc32(domain name)]))``, so it is bit-identical whatever
the number of cases generated, in any order or process. The domain name is mixed in so that two domains of the
same region do not share patients (a source and a target cohort must not hold the same anatomy).

The label map: without a ``labels`` map in the spec, 1 = annotated lymph node (as always). With one, each
label's structures are copied from the phantom's structure map (one structure per voxel: the one whose tissue
was drawn last there, i.e. the tissue seen in the image), then the annotated lymph nodes are written on top
(a labelled node wins where a sub-voxel node's single voxel lies on another structure). Building the label map
draws no random numbers, so a domain's images do not depend on its ``labels``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from medadapt.data.io import affine_from_spacing
from medadapt.errors import MedadaptError
from medadapt.synth import head_neck, mediastinum
from medadapt.synth.canvas import Canvas, Frame
from medadapt.synth.nodes import place_nodes
from medadapt.synth.spec import DomainSpec, load_domain
from medadapt.synth.structures import STRUCTURES
from medadapt.synth.tissues import draw_tissues

GENERATOR_VERSION = "1.0"
HU_MIN, HU_MAX = -1024, 3071
_BUILDERS = {"head_neck": head_neck.build, "mediastinum": mediastinum.build}


@dataclass
class SyntheticCase:
    """One generated scan. ``image`` int16 HU and ``label`` uint8 are (z, y, x); the label values are the
    domain's ``dataset_labels`` (1 = annotated node without a ``labels`` map); ``spacing`` is (z, y, x) mm;
    ``nodes`` describes every node drawn (annotated or not); ``tissue`` is the noiseless tissue-class map (see
    ``medadapt.synth.canvas.TISSUE_CLASSES``) and ``structures`` the structure map (ids of
    ``medadapt.synth.structures.STRUCTURES``, 0 = none), both as drawn, before the scanner's blur."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str
    nodes: list[dict]
    tissue: np.ndarray | None = field(default=None, repr=False)
    domain: str = ""
    seed: int = 0
    index: int = 0
    structures: np.ndarray | None = field(default=None, repr=False)

    @property
    def affine(self) -> np.ndarray:
        return affine_from_spacing(self.spacing)

    def structure_mask(self, name: str) -> np.ndarray:
        """Where the phantom drew structure ``name`` (for ``lymph_node``: every node, annotated or not)."""
        if self.structures is None or name not in STRUCTURES:
            raise MedadaptError(f"structure {name!r}: unknown or no structure map in this case; use one of "
                                f"{', '.join(STRUCTURES)}")
        return self.structures == STRUCTURES[name].id


def case_rng(spec: DomainSpec, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), zlib.crc32(spec.name.encode())]))


def check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise MedadaptError(f"{what} must be a non-negative integer, got {value!r}; pass e.g. {what}=0")
    return int(value)


def z_sigma_mm(spec: DomainSpec) -> float:
    """PSF sigma along z: the in-plane blur plus the part of the slice profile (a box of width
    ``slice_thickness_mm``) not already covered by the voxel's own extent (variance (T^2 - dz^2) / 12)."""
    sc = spec.scanner
    extra = max(sc.slice_thickness_mm ** 2 - sc.spacing_mm[0] ** 2, 0.0) / 12.0
    return math.sqrt(sc.blur_sigma_mm ** 2 + extra)


def generate_case(spec: "DomainSpec | str", seed: int = 0, index: int = 0) -> SyntheticCase:
    """Generate case ``index`` of domain ``spec`` (a :class:`DomainSpec` or anything :func:`load_domain` takes)."""
    spec = load_domain(spec)
    seed = check_int(seed, "seed")
    index = check_int(index, "index")
    rng = case_rng(spec, seed, index)
    sc, pa = spec.scanner, spec.patient

    # the patient: size, aspect, position and a small rotation about z
    s = rng.uniform(*pa.scale)
    aspect = rng.normal(1.0, 0.03)
    scale = (rng.uniform(0.93, 1.07) * math.sqrt(s), s / math.sqrt(aspect), s * math.sqrt(aspect))
    yaw = math.radians(rng.uniform(-pa.rotation_deg, pa.rotation_deg))
    shift = (rng.uniform(-1.5, 1.5) * pa.shift_mm, rng.uniform(-1, 1) * pa.shift_mm, rng.uniform(-1, 1) * pa.shift_mm)
    frame = Frame(spec.shape, sc.spacing_mm, scale, yaw, shift)
    canvas = Canvas(frame)
    tissues = draw_tissues(rng, sc.contrast_phase)

    stations = _BUILDERS[spec.region](canvas, rng, tissues, spec)
    label = np.zeros(frame.shape, dtype=np.uint8)
    nodes = place_nodes(canvas, rng, spec, stations, label)
    if spec.labels is not None:
        label = label_map(spec, canvas.part, label)

    # scanner: blur (PSF + slice profile), HU calibration, noise, int16 storage
    img = canvas.hu
    sig = np.array([z_sigma_mm(spec), sc.blur_sigma_mm, sc.blur_sigma_mm]) / np.asarray(sc.spacing_mm)
    if np.any(sig > 0):
        img = gaussian_filter(img, sigma=sig, mode="nearest", truncate=3.0, output=np.float32)
    if sc.hu_scale != 1.0:
        img *= np.float32(sc.hu_scale)
    if sc.hu_offset != 0.0:
        img += np.float32(sc.hu_offset)
    if sc.noise_std_hu > 0:
        noise = rng.standard_normal(frame.shape, dtype=np.float32)
        noise *= np.float32(sc.noise_std_hu)
        img += noise
        del noise
    np.rint(img, out=img)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    image = img.astype(np.int16)

    return SyntheticCase(image=image, label=label, spacing=tuple(float(v) for v in sc.spacing_mm),
                         case_id=spec.case_id(index), nodes=nodes, tissue=canvas.cls, domain=spec.name,
                         seed=seed, index=index, structures=canvas.part)


def label_map(spec: DomainSpec, structures: np.ndarray, node_label: np.ndarray) -> np.ndarray:
    """The label map of a domain with a ``labels`` map: each label's structures from the structure map, then
    the annotated nodes (``node_label`` > 0) on top."""
    lut = np.zeros(256, dtype=np.uint8)
    node_id = 0
    for lab in spec.labels or ():
        for name in lab.structures:
            if name == "lymph_node":
                node_id = lab.id  # the structure map's node voxels include unannotated nodes: not used
            else:
                lut[STRUCTURES[name].id] = lab.id
    out = lut[structures]
    if node_id:
        out[node_label > 0] = node_id
    return out
