"""nnU-Net v2 preprocessing: reorientation, intensity normalization and resampling of one case, and the plan.

Conventions (see docs/data.md for the reasoning):

* arrays are (z, y, x) = the file's voxel axes reversed, spacing in the same order, as in :mod:`medadapt.data.io`;
* per case: reorient to the plan's orientation -> normalize on the original grid -> resample to the target
  spacing (nnU-Net's order: ``DefaultPreprocessor`` normalizes before resampling);
* images: cubic B-spline (order 3) resampling; along an anisotropic low-resolution axis (spacing ratio > 3)
  in-plane cubic and nearest along that axis, exactly nnU-Net's ``resample_data_or_seg`` rule;
* labels: one-hot maps interpolated linearly, then argmax (nearest along an anisotropic axis);
* predictions are brought back with :func:`revert_prediction` (trilinear on probabilities, argmax, undo the
  reorientation), giving a label map in the input file's exact geometry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from medadapt.data.dataset import RawDataset, validate_geometry
from medadapt.data.io import Volume
from medadapt.data.resampling import (ANISO_THRESHOLD, resample_image_to_shape, resample_label_to_shape,
                                      separate_axis, new_shape_for_spacing, resample_to_shape)
from medadapt.errors import MedadaptError

FOREGROUND_SAMPLES_PER_INTENSITY = 10000  # nnU-Net's fingerprint: foreground voxels sampled per case
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes; part of the cache key

# ---------------------------------------------------------------------------------------------- normalization
_SCHEME_ALIASES = {
    "ct": "CT", "ctnormalization": "CT",
    "zscore": "ZScore", "zscorenormalization": "ZScore",
    "none": "none", "nonorm": "none", "nonormalization": "none",
    "scaleintensityrange": "ScaleIntensityRange", "scaleintensityranged": "ScaleIntensityRange",
}
SCHEMES = ("CT", "ZScore", "none", "ScaleIntensityRange")


def canonical_scheme(scheme: str, option: str = "normalization") -> str:
    """``"ct"``/``"CTNormalization"`` -> ``"CT"`` etc.; unknown names raise MedadaptError naming ``option``."""
    key = str(scheme).strip().lower().replace("_", "").replace("-", "")
    if key not in _SCHEME_ALIASES:
        raise MedadaptError(f"{option}: unknown normalization scheme {scheme!r}; use one of "
                            f"{', '.join(SCHEMES)} (CT for CT images, ZScore for anything else, "
                            "ScaleIntensityRange for MONAI models)")
    return _SCHEME_ALIASES[key]


def scheme_for_channel(channel_name: str) -> str:
    """nnU-Net's mapping from a ``channel_names`` entry to a normalization scheme."""
    name = str(channel_name).strip().lower()
    if name == "ct":
        return "CT"
    if name in ("nonorm", "none"):
        return "none"
    return "ZScore"


@dataclass
class IntensityProperties:
    """Foreground intensity statistics of one channel (nnU-Net's ``foreground_intensity_properties_per_channel``)."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float
    median: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in
                ("mean", "std", "percentile_00_5", "percentile_99_5", "min", "max", "median")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityProperties":
        try:
            return cls(**{k: float(d[k]) for k in
                          ("mean", "std", "percentile_00_5", "percentile_99_5", "min", "max", "median")})
        except (KeyError, TypeError, ValueError) as exc:
            raise MedadaptError(f"intensity_properties: malformed entry {d!r} ({exc}); re-create the plan") from None


@dataclass(frozen=True)
class IntensityRange:
    """Parameters of the ``ScaleIntensityRange`` scheme: MONAI's ``ScaleIntensityRange(a_min, a_max, b_min, b_max,
    clip)``, the normalisation of MONAI's CT pipelines (SwinUNETR/UNETR on BTCV: a_min -175, a_max 250, b_min 0,
    b_max 1, clip). Kept apart from nnU-Net's schemes: it is fixed by the model, not measured on the data.

    ``x -> (x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, clipped to [b_min, b_max] with ``clip``,
    computed in float32 in MONAI's order of operations (so the values equal MONAI's bit for bit).
    """

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True

    def __post_init__(self):
        values = (self.a_min, self.a_max, self.b_min, self.b_max)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
            raise MedadaptError(f"intensity range: {values} must be four finite numbers (a_min, a_max, b_min, b_max)")
        if not self.a_max > self.a_min:
            raise MedadaptError(f"intensity range: a_max {self.a_max:g} must be above a_min {self.a_min:g}")
        if not self.b_max > self.b_min:
            raise MedadaptError(f"intensity range: b_max {self.b_max:g} must be above b_min {self.b_min:g}")
        if not isinstance(self.clip, bool):
            raise MedadaptError(f"intensity range: clip {self.clip!r} must be true or false")

    def apply(self, image: np.ndarray) -> np.ndarray:
        out = np.asarray(image, dtype=np.float32)
        out = (out - np.float32(self.a_min)) / np.float32(self.a_max - self.a_min)
        out = out * np.float32(self.b_max - self.b_min) + np.float32(self.b_min)
        if self.clip:
            np.clip(out, np.float32(self.b_min), np.float32(self.b_max), out=out)
        return out.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"a_min": float(self.a_min), "a_max": float(self.a_max), "b_min": float(self.b_min),
                "b_max": float(self.b_max), "clip": bool(self.clip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityRange":
        try:
            return cls(a_min=float(d["a_min"]), a_max=float(d["a_max"]), b_min=float(d.get("b_min", 0.0)),
                       b_max=float(d.get("b_max", 1.0)), clip=d.get("clip", True))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedadaptError(f"intensity_ranges: malformed entry {d!r} ({exc!r}); give a_min, a_max, b_min, "
                                "b_max, clip") from None


def sample_foreground(image: np.ndarray, label: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``num_samples`` raw foreground (label > 0) intensities of one case, drawn without replacement."""
    fg = np.asarray(image)[np.asarray(label) > 0]
    if fg.size > num_samples:
        fg = rng.choice(fg, num_samples, replace=False)
    return fg.astype(np.float64, copy=False)


def properties_from_samples(samples: np.ndarray) -> IntensityProperties:
    v = np.asarray(samples, dtype=np.float64)
    if v.size == 0:
        raise MedadaptError("intensity statistics: the training labels contain no foreground voxels (label > 0); "
                            "CT normalization needs annotated foreground: check labelsTr or use ZScore")
    p005, p995 = np.percentile(v, (0.5, 99.5))
    return IntensityProperties(mean=float(v.mean()), std=float(v.std()), percentile_00_5=float(p005),
                               percentile_99_5=float(p995), min=float(v.min()), max=float(v.max()),
                               median=float(np.median(v)))


def compute_intensity_properties(images: list[np.ndarray], labels: list[np.ndarray], num_samples: int = 10000,
                                 seed: int = 0) -> IntensityProperties:
    """Statistics of the foreground voxels of one channel over several cases.

    Per case, up to ``num_samples`` foreground voxels (label > 0) are drawn (all of them when there are fewer),
    as nnU-Net's fingerprint extractor does; mean/std/percentiles are computed on the pooled raw samples.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    samples = [sample_foreground(im, lab, num_samples, rng) for im, lab in zip(images, labels)]
    return properties_from_samples(np.concatenate(samples) if samples else np.zeros(0))


def normalize(image: np.ndarray, scheme: str, props: IntensityProperties | None,
              intensity_range: IntensityRange | None = None) -> np.ndarray:
    """Normalize one channel; returns a new float32 array.

    ``"CT"``: clip to [percentile_00_5, percentile_99_5] of the training foreground, then (x - mean) / std
    (nnU-Net's CTNormalization). ``"ZScore"``: (x - mean(x)) / std(x) over the whole image (nnU-Net's
    ZScoreNormalization without mask). ``"none"``: cast only. ``"ScaleIntensityRange"``: MONAI's transform of
    that name with ``intensity_range`` (see :class:`IntensityRange`).
    """
    scheme = canonical_scheme(scheme)
    out = np.array(image, dtype=np.float32, copy=True)
    if scheme == "ScaleIntensityRange":
        if intensity_range is None:
            raise MedadaptError("normalization: scheme ScaleIntensityRange needs its intensity range "
                                "(a_min, a_max, b_min, b_max); give it in the plan's intensity_ranges")
        return intensity_range.apply(out)
    if scheme == "CT":
        if props is None:
            raise MedadaptError("normalization: scheme CT needs the training foreground intensity properties; "
                                "re-create the plan from the training cases")
        np.clip(out, props.percentile_00_5, props.percentile_99_5, out=out)
        out -= np.float32(props.mean)
        out /= np.float32(max(props.std, 1e-8))
    elif scheme == "ZScore":
        mean = float(out.mean(dtype=np.float64))
        std = float(out.std(dtype=np.float64))
        out -= np.float32(mean)
        out /= np.float32(max(std, 1e-8))
    return out


# ---------------------------------------------------------------------------------------------- orientation
def _ornt_between(affine: np.ndarray, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    start = io_orientation(np.asarray(affine, float))
    end = start.copy() if target is None else axcodes2ornt(tuple(target))
    return start, end


def _apply_ornt_zyx(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform (defined on voxel axes i, j, k) to a (z, y, x) = (k, j, i) array."""
    ijk = np.asarray(array).transpose(2, 1, 0)
    out = apply_orientation(ijk, transform)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def _is_identity(transform: np.ndarray) -> bool:
    return bool(np.array_equal(transform[:, 0], np.arange(3)) and np.all(transform[:, 1] == 1))


def reorient(volume: Volume, target: str | None) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """``volume`` reoriented to axis codes ``target`` (e.g. ``"RAS"``): (array zyx, spacing zyx, new affine)."""
    start, end = _ornt_between(volume.affine, target)
    t = ornt_transform(start, end)
    if _is_identity(t):
        return volume.array, tuple(float(s) for s in volume.spacing), np.asarray(volume.affine, float).copy()
    arr = _apply_ornt_zyx(volume.array, t)
    sp_ijk = list(volume.spacing)[::-1]
    new_ijk = [0.0, 0.0, 0.0]
    for i in range(3):
        new_ijk[int(t[i, 0])] = float(sp_ijk[i])
    ijk_shape = tuple(volume.array.shape[::-1])
    affine = np.asarray(volume.affine, float) @ inv_ornt_aff(t, ijk_shape)
    return arr, (new_ijk[2], new_ijk[1], new_ijk[0]), affine


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class PreprocessingPlan:
    """How cases are preprocessed; JSON-friendly via :meth:`to_dict` / :meth:`from_dict`."""

    target_spacing: tuple[float, float, float]  # (z, y, x) mm, in the plan orientation
    normalization: list[str]  # one scheme per channel: "CT", "ZScore" or "none"
    intensity_properties: list[IntensityProperties | None]  # one per channel (needed by "CT")
    orientation: str | None = None  # axis codes of the training data, e.g. "RAS"; None = never reorient
    #: an nnU-Net model's plans ({"plans", "configuration", ...}): cases then go through nnunetv2's own
    #: preprocessor and export code (the nnU-Net plugin's case backend, medadapt.plugins); the fields above only
    #: describe them
    nnunet: dict[str, Any] | None = None
    #: one per channel: the range of a "ScaleIntensityRange" channel, None for the others; None when no
    #: channel uses that scheme (and then absent from to_dict(), so older plans keep their cache key)
    intensity_ranges: list[IntensityRange | None] | None = None

    def __post_init__(self):
        self.target_spacing = tuple(float(s) for s in self.target_spacing)
        self.normalization = [canonical_scheme(s) for s in self.normalization]
        if len(self.intensity_properties) != len(self.normalization):
            raise MedadaptError(f"normalization: {len(self.normalization)} schemes but "
                                f"{len(self.intensity_properties)} intensity property entries; re-create the plan")
        ranged = [s == "ScaleIntensityRange" for s in self.normalization]
        if any(ranged) or self.intensity_ranges is not None:
            ranges = list(self.intensity_ranges or [])
            if len(ranges) != len(self.normalization) or any(
                    (r is None) == uses for r, uses in zip(ranges, ranged)):
                raise MedadaptError("intensity_ranges: give one range per ScaleIntensityRange channel and null for "
                                    f"every other channel (normalization {self.normalization}, intensity_ranges "
                                    f"{self.intensity_ranges}); fix the plan")
            self.intensity_ranges = [r if r is None or isinstance(r, IntensityRange) else IntensityRange.from_dict(r)
                                     for r in ranges]
        if self.orientation is not None:
            codes = str(self.orientation).upper()
            try:
                axcodes2ornt(tuple(codes))
                ok = len(codes) == 3
            except Exception:
                ok = False
            if not ok:
                raise MedadaptError(f"orientation: {self.orientation!r} is not a valid 3-letter axis code such as "
                                    "'RAS' or 'LPS'; fix the plan")
            self.orientation = codes

    def to_dict(self) -> dict[str, Any]:
        out = {
            "target_spacing": [float(s) for s in self.target_spacing],
            "normalization": list(self.normalization),
            "intensity_properties": [p.to_dict() if p is not None else None for p in self.intensity_properties],
            "orientation": self.orientation,
        }
        if self.nnunet is not None:
            out["nnunet"] = self.nnunet
        if self.intensity_ranges is not None:
            out["intensity_ranges"] = [r.to_dict() if r is not None else None for r in self.intensity_ranges]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessingPlan":
        try:
            return cls(
                target_spacing=tuple(float(s) for s in d["target_spacing"]),
                normalization=list(d["normalization"]),
                intensity_properties=[IntensityProperties.from_dict(p) if p is not None else None
                                      for p in d["intensity_properties"]],
                orientation=d.get("orientation"),
                nnunet=d.get("nnunet"),
                intensity_ranges=d.get("intensity_ranges"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MedadaptError(f"preprocessing plan: malformed ({exc!r}); re-create it") from None

    def key(self) -> str:
        """Short hash of the plan (and the cache format version): names the plan's cache subfolder."""
        blob = json.dumps({"plan": self.to_dict(), "cache_version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def fullres_target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """nnU-Net's 3d_fullres target spacing: per-axis median, except for strongly anisotropic data.

    If the median's worst axis is > 3x coarser than the others *and* has < 1/3 of their voxels, that axis takes
    the 10th percentile of its spacings instead (kept just above the finest in-plane spacing).
    """
    sp = np.asarray(spacings, float)
    sz = np.asarray(shapes, float)
    target = np.percentile(sp, 50, axis=0)
    target_size = np.percentile(sz, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min(target_size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(sp[:, worst], 10))
        if t < max(target[i] for i in others):
            t = max(max(target[i] for i in others), t) + 1e-5
        target[worst] = t
    return tuple(float(v) for v in target)


def maybe_progress(iterable, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def plan_from_dataset(dataset: RawDataset, case_ids: Sequence[str], normalization: list[str] | None = None,
                      progress: bool = True) -> PreprocessingPlan:
    """A plan from the given (training) cases: median spacing, per-channel scheme and foreground statistics."""
    return plan_from_datasets([(dataset, case_ids)], normalization, progress)


def plan_from_datasets(parts: Sequence[tuple[RawDataset, Sequence[str]]], normalization: list[str] | None = None,
                       progress: bool = True) -> PreprocessingPlan:
    """One plan for the given cases of one or several datasets (assembled for one model, as nnU-Net plans one
    fingerprint): the median spacing and the pooled foreground intensity statistics of all the cases, the
    orientation of the first. The datasets must have the same channels (names, in order)."""
    parts = [(ds, list(ids)) for ds, ids in parts]
    if not parts or not any(ids for _, ids in parts):
        raise MedadaptError("preprocessing plan: no training cases given; the train split is empty")
    dataset = parts[0][0]
    for other, _ in parts[1:]:
        if other.channel_names != dataset.channel_names:
            raise MedadaptError(
                f"{other.root / 'dataset.json'}: channel_names {other.channel_names} differ from "
                f"{dataset.root / 'dataset.json'}'s {dataset.channel_names}; one model needs the same input "
                "channels from every dataset")
    n_ch = dataset.num_channels
    if normalization is None:
        schemes = [scheme_for_channel(dataset.channel_names[str(c)]) for c in range(n_ch)]
    else:
        if len(normalization) != n_ch:
            raise MedadaptError(f"normalization: {len(normalization)} scheme(s) given but "
                                f"{dataset.root / 'dataset.json'} lists {n_ch} channel(s); give one per channel")
        schemes = [canonical_scheme(s) for s in normalization]
        if "ScaleIntensityRange" in schemes:
            raise MedadaptError("normalization: ScaleIntensityRange is fixed by a model (its intensity range), not "
                                "planned from data; build the PreprocessingPlan with intensity_ranges directly")

    rng = np.random.default_rng(0)
    orientation: str | None = None
    spacings, shapes = [], []
    samples: list[list[np.ndarray]] = [[] for _ in range(n_ch)]
    for ds, case in maybe_progress([(ds, c) for ds, ids in parts for c in ids], progress, "planning"):
        images, label = ds.load_case(case)
        if orientation is None:
            orientation = images[0].orientation
        arr, sp, _ = reorient(images[0], orientation)
        spacings.append(sp)
        shapes.append(arr.shape)
        for c, img in enumerate(images):
            if schemes[c] == "CT":
                samples[c].append(sample_foreground(img.array, label.array, FOREGROUND_SAMPLES_PER_INTENSITY, rng))
    props: list[IntensityProperties | None] = []
    for c in range(n_ch):
        if schemes[c] == "CT":
            pooled = np.concatenate(samples[c])
            if pooled.size == 0:
                raise MedadaptError(
                    f"{dataset.root / 'labelsTr'}: the training cases' labels have no foreground voxels, so CT "
                    "normalization statistics cannot be computed; annotate the cases or use ZScore normalization")
            props.append(properties_from_samples(pooled))
        else:
            props.append(None)
    return PreprocessingPlan(target_spacing=fullres_target_spacing(spacings, shapes), normalization=schemes,
                             intensity_properties=props, orientation=orientation)


# ---------------------------------------------------------------------------------------------- one case
@dataclass
class PreprocessedCase:
    data: np.ndarray  # float32 [C, z, y, x]
    seg: np.ndarray | None  # int16 [z, y, x]
    properties: dict[str, Any] = field(default_factory=dict)  # JSON-friendly; what revert_prediction needs


def preprocess_case(images: list[Volume], label: Volume | None, plan: PreprocessingPlan) -> PreprocessedCase:
    """Reorient -> normalize -> resample one case. Channels (and the label) must share one geometry.

    A plan from an nnU-Net model (``plan.nnunet``) runs nnunetv2's own preprocessor instead.
    """
    if plan.nnunet is not None:  # nnunetv2's own preprocessor, from the nnU-Net plugin (medadapt.plugins)
        from medadapt.plugins import case_backend

        return case_backend("nnunet", "a model with nnU-Net plans").preprocess_case(images, label, plan)
    if len(images) != len(plan.normalization):
        where = images[0].path if images and images[0].path is not None else "input"
        raise MedadaptError(f"{where}: {len(images)} channel image(s) but the model's plan expects "
                            f"{len(plan.normalization)}; give one file per channel (_0000, _0001, ...)")
    validate_geometry(images, label)
    ref = images[0]
    start, end = _ornt_between(ref.affine, plan.orientation)
    reoriented = [reorient(v, plan.orientation) for v in images]
    shape = reoriented[0][0].shape
    spacing = reoriented[0][1]
    new_shape = new_shape_for_spacing(shape, spacing, plan.target_spacing)
    axis = separate_axis(spacing, plan.target_spacing)

    data = np.empty((len(images), *new_shape), dtype=np.float32)
    for c, (arr, _, _) in enumerate(reoriented):
        normed = normalize(arr, plan.normalization[c], plan.intensity_properties[c],
                           plan.intensity_ranges[c] if plan.intensity_ranges is not None else None)
        data[c] = resample_image_to_shape(normed, new_shape, axis)
    seg = None
    if label is not None:
        lab, _, _ = reorient(label, plan.orientation)
        if lab.shape != shape:
            raise MedadaptError(f"{label.path}: label shape differs from the image; it must be in the image's geometry")
        seg = resample_label_to_shape(lab.astype(np.int16, copy=False), new_shape, axis).astype(np.int16, copy=False)

    properties = {
        "original_shape": [int(s) for s in ref.array.shape],
        "original_spacing": [float(s) for s in ref.spacing],
        "original_affine": np.asarray(ref.affine, float).tolist(),
        "original_orientation": ref.orientation,
        "ornt_start": start.tolist(),
        "ornt_end": end.tolist(),
        "reoriented_shape": [int(s) for s in shape],
        "reoriented_spacing": [float(s) for s in spacing],
        "reoriented_affine": np.asarray(reoriented[0][2], float).tolist(),
        "target_spacing": [float(s) for s in plan.target_spacing],
        "resampled_shape": [int(s) for s in new_shape],
    }
    return PreprocessedCase(data=data, seg=seg, properties=properties)


def revert_prediction(probabilities: torch.Tensor, properties: dict[str, Any],
                      thresholds: Sequence[float] | None = None, label_ids: Sequence[int] | None = None,
                      channels: Sequence[int] | None = None, transform=None) -> np.ndarray:
    """Probabilities (or logits) ``[K, z, y, x]`` on the preprocessed grid -> int16 label map (z, y, x) in the
    ORIGINAL file geometry: trilinear resize to the reoriented original shape, decide, undo reorientation.

    Softmax (``thresholds`` None): channel k is label k, the argmax wins. Sigmoid: channel k is foreground
    class k with probability threshold ``thresholds[k]``; a voxel gets the most probable class among those at
    or above their thresholds, else background. ``label_ids`` gives each channel's label id in the output
    (default: k for softmax, k + 1 for sigmoid). ``channels``: use only these channels of ``probabilities``, in
    this order (default all); ``transform``: applied to each channel before it is resampled (e.g. the sigmoid
    of a logit). One channel is handled at a time: besides the input, memory holds the running best value and
    label map at the original size and one resampled channel.
    """
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"revert_prediction expects [C, z, y, x], got {tuple(probabilities.shape)}")
    channels = list(range(probabilities.shape[0])) if channels is None else [int(c) for c in channels]
    K = len(channels)
    sigmoid = thresholds is not None
    if sigmoid and len(thresholds) != K:
        raise ValueError(f"{len(thresholds)} thresholds for {K} sigmoid channels")
    ids = list(label_ids) if label_ids is not None else [k + 1 if sigmoid else k for k in range(K)]
    shape = tuple(int(s) for s in properties["reoriented_shape"])
    with torch.no_grad():
        # running decision, one channel at a time: memory stays at two full-size float volumes
        best, seg = None, None
        for c, channel in enumerate(channels):
            p = probabilities[channel:channel + 1]
            view = transform is None and tuple(p.shape[1:]) == shape  # p is the input itself: never written
            if transform is not None:
                p = transform(p)
            p = (resample_to_shape(p, shape) if tuple(p.shape[1:]) != shape else p)[0]
            if sigmoid:
                p = torch.where(p >= float(thresholds[c]), p, torch.full_like(p, -torch.inf))
            if best is None:
                seg = torch.zeros(shape, dtype=torch.int16, device=p.device)
                if sigmoid:
                    best = torch.full_like(p, -torch.inf)
                else:
                    best = p.clone() if view else p
                    seg[...] = ids[c]
                    continue
            better = p > best
            seg[better] = ids[c]
            torch.maximum(best, p, out=best)
            del p, better
    seg = seg.to(torch.int16).cpu().numpy()
    start = np.asarray(properties["ornt_start"], float)
    end = np.asarray(properties["ornt_end"], float)
    back = ornt_transform(end, start)
    if not _is_identity(back):
        seg = _apply_ornt_zyx(seg, back)
    expected = tuple(int(s) for s in properties["original_shape"])
    if tuple(seg.shape) != expected:  # pragma: no cover - would be a bug
        raise RuntimeError(f"reverted prediction has shape {seg.shape}, expected {expected}")
    return np.ascontiguousarray(seg)
