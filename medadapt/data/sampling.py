"""nnU-Net's training patch sampler (``nnUNetDataLoader3D``), with optional augmentation.

Per batch of B: each sample draws a random case (with replacement); sample j is *forced foreground* iff
``not j < round(B * (1 - oversample_foreground))`` (nnU-Net's rule, so B=2, p=0.33 forces the last sample).
A forced sample is centred on a random stored foreground voxel of a random foreground class present in the
case; the others are placed uniformly so the patch lies inside the volume. Volumes smaller than the patch are
centred and padded with the channel minimum (label 0). All randomness comes from the Generator passed to
:meth:`PatchSampler.sample`.

Cases may be drawn with given probabilities (``case_weights``; e.g. uniform over datasets when several are
assembled), and each drawn case may give several patches (``patches_per_case``: FSEFT trains on 6 patches of
one volume per step; the foreground rule above still applies per batch position), and cases seen through a label template (:class:`medadapt.data.partial.TemplateCase`) have their
label crops translated to template ids (``label_lut``) and add their annotation records to the batch
(``annotated`` [B, C], bool), which the loss uses to leave unannotated classes out.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from medadapt.data.augmentation import Augmentation
from medadapt.errors import MedadaptError
from medadapt.utils import seeds


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value) -> np.ndarray:
    """Crop the last three axes of ``array`` at ``start`` (may lie outside), filling outside with ``pad_value``
    (a scalar or, for a leading channel axis, one value per channel). Reads only the needed part of a memmap."""
    array_spatial = array.shape[-3:]
    lead = array.shape[:-3]
    out = np.empty((*lead, *size), dtype=array.dtype)
    src, dst, empty, inside = [], [], False, True
    for s, n, d in zip(start, size, array_spatial):
        lo, hi = max(int(s), 0), min(int(s) + int(n), d)
        if hi <= lo:
            empty = True
            break
        inside &= lo == s and hi == s + n
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    if not inside or empty:
        pv = np.asarray(pad_value, dtype=array.dtype)
        if pv.ndim == 1 and lead:
            out[...] = pv.reshape(-1, *([1] * (out.ndim - 1)))
        else:
            out[...] = pv
    if not empty:
        ell = (Ellipsis,)
        out[ell + tuple(dst)] = array[ell + tuple(src)]
    return out


class PatchSampler:
    """Random training patches from preprocessed cases (objects with ``.data`` float [C, z, y, x], ``.seg``
    int [z, y, x] and ``.class_locations`` {class: (n, 3) voxel coordinates}, e.g. :class:`CachedCase`)."""

    def __init__(self, cases: Sequence[Any], patch_size: Sequence[int], batch_size: int,
                 oversample_foreground: float = 0.33, augmentation: Augmentation | None = None,
                 case_weights: Sequence[float] | None = None, patches_per_case: int = 1,
                 positive_fraction: float | None = None):
        self.cases = list(cases)
        if not self.cases:
            raise MedadaptError("PatchSampler: no training cases; the few-shot training set is empty")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise MedadaptError(f"patch_size: {tuple(patch_size)} must be three positive integers (z, y, x)")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise MedadaptError(f"batch_size: {batch_size!r} must be a positive integer")
        self.batch_size = int(batch_size)
        if isinstance(patches_per_case, bool) or int(patches_per_case) != patches_per_case or patches_per_case < 1 \
                or self.batch_size % int(patches_per_case):
            raise MedadaptError(f"patches_per_case: {patches_per_case!r} must be a positive divisor of the batch size "
                                f"{self.batch_size}")
        self.patches_per_case = int(patches_per_case)
        if not 0.0 <= float(oversample_foreground) <= 1.0:
            raise MedadaptError(f"oversample_foreground: {oversample_foreground} must be within [0, 1]")
        self.oversample_foreground = float(oversample_foreground)
        if positive_fraction is not None and not 0.0 <= float(positive_fraction) <= 1.0:
            raise MedadaptError(f"positive_fraction: {positive_fraction} must be within [0, 1]")
        #: MONAI's RandCropByPosNegLabel instead of nnU-Net's rule: each patch is centred on a foreground voxel
        #: with this probability, else on a background voxel (FSEFT's code: pos = neg = 1, i.e. 1/2)
        self.positive_fraction = None if positive_fraction is None else float(positive_fraction)
        if augmentation is not None and tuple(augmentation.patch_size) != self.patch_size:
            raise MedadaptError(f"augmentation patch_size {augmentation.patch_size} differs from the sampler's "
                                f"{self.patch_size}; build both with the same patch size")
        self.augmentation = augmentation
        channels = {int(c.data.shape[0]) for c in self.cases}
        if len(channels) != 1:
            raise MedadaptError(f"PatchSampler: cases have different channel counts {sorted(channels)}; "
                                "preprocess all cases with one plan")
        for c in self.cases:
            if c.data.ndim != 4 or tuple(c.seg.shape) != tuple(c.data.shape[1:]):
                raise ValueError(f"case {getattr(c, 'case_id', c)}: data {c.data.shape} / seg {c.seg.shape} "
                                 "must be [C, z, y, x] / [z, y, x]")
        self._mins: dict[int, np.ndarray] = {}
        self.case_weights = None
        if case_weights is not None:
            w = np.asarray(case_weights, dtype=float)
            if w.shape != (len(self.cases),) or not np.all(w >= 0) or not w.sum() > 0:
                raise MedadaptError(f"case_weights: need one non-negative weight per case ({len(self.cases)}), "
                                    "not all zero")
            self.case_weights = w / w.sum()
        annotated = [getattr(c, "annotated", None) is not None for c in self.cases]
        if any(annotated) and not all(annotated):
            raise ValueError("PatchSampler: some cases carry annotation records and some do not")
        self.partial = all(annotated)

    def crop_label(self, i: int, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Case ``i``'s label map cropped (padded with 0), in template ids where the case has a lookup table."""
        case = self.cases[i]
        lab = crop_with_padding(case.seg, start, size, 0)
        lut = getattr(case, "label_lut", None)
        return lut[lab] if lut is not None else lab

    def force_foreground(self, j: int) -> bool:
        """nnU-Net's ``get_do_oversample``: the last samples of each batch are forced to contain foreground."""
        return not j < round(self.batch_size * (1 - self.oversample_foreground))

    def _channel_min(self, i: int) -> np.ndarray:
        if i not in self._mins:
            case = self.cases[i]
            try:
                m = np.asarray(case.channel_min, dtype=np.float32)
            except (AttributeError, KeyError, TypeError):
                data = case.data
                m = np.asarray([data[c].min() for c in range(data.shape[0])], dtype=np.float32)
            self._mins[i] = m
        return self._mins[i]

    def _lower_bound(self, shape: Sequence[int], force_fg: bool, class_locations, rng: np.random.Generator,
                     seg=None) -> list[int]:
        P = self.patch_size
        lo = [0 if s >= p else (s - p) // 2 for s, p in zip(shape, P)]
        hi = [s - p if s >= p else (s - p) // 2 for s, p in zip(shape, P)]
        if self.positive_fraction is not None:  # MONAI's positive/negative centres (see __init__)
            force_fg = bool(rng.random() < self.positive_fraction)
            if not force_fg and seg is not None:
                voxel = None
                for _ in range(32):  # a uniformly drawn voxel of label 0 (rejection; background dominates CT)
                    v = [int(rng.integers(s)) for s in shape]
                    if seg[tuple(v)] == 0:
                        voxel = v
                        break
                if voxel is not None:
                    return [int(min(max(v - p // 2, l), h)) for v, p, l, h in zip(voxel, P, lo, hi)]
        if force_fg and class_locations:
            eligible = [k for k in sorted(class_locations) if len(class_locations[k]) > 0]
            if eligible:
                locs = class_locations[eligible[int(rng.integers(len(eligible)))]]
                voxel = locs[int(rng.integers(len(locs)))]
                # patch centred on the voxel, clamped into [lo, hi] on both sides (the voxel stays inside)
                return [int(min(max(int(v) - p // 2, l), h)) for v, p, l, h in zip(voxel, P, lo, hi)]
        return [int(rng.integers(l, h + 1)) for l, h in zip(lo, hi)]

    def sample(self, rng: np.random.Generator, case_indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """One batch: ``image`` float32 [B, C, *patch], ``label`` int64 [B, 1, *patch]; random cases unless
        ``case_indices`` names them."""
        P = self.patch_size
        if case_indices is not None:
            picks = list(case_indices)
        else:  # batch_size / patches_per_case cases, each giving patches_per_case patches (FSEFT: 6 per volume)
            n = self.batch_size // self.patches_per_case
            picks = (rng.integers(0, len(self.cases), size=n) if self.case_weights is None
                     else rng.choice(len(self.cases), size=n, p=self.case_weights))
            if self.patches_per_case > 1:
                picks = np.repeat(picks, self.patches_per_case)
        B = len(picks)
        images, labels = [], []
        for j in range(B):
            i = int(picks[j])
            case = self.cases[i]
            data = case.data
            lb = self._lower_bound(data.shape[1:], self.force_foreground(j), case.class_locations, rng, case.seg)
            mins = self._channel_min(i)
            aug = self.augmentation
            matrix = aug.draw_spatial(rng) if aug is not None else None
            if matrix is None:
                start, size = lb, P
                center = [(p - 1) / 2.0 for p in P]
            else:  # crop exactly the region this rotation/scaling reads (plus the trilinear neighbour)
                c = np.asarray(lb, float) + (np.asarray(P, float) - 1) / 2.0
                h = aug.source_half_extent(matrix)
                start = [int(math.floor(v)) for v in c - h]
                end = [int(math.floor(v)) + 2 for v in c + h]
                size = [e - s for s, e in zip(start, end)]
                center = list(c - np.asarray(start, float))
            img = crop_with_padding(data, start, size, mins).astype(np.float32, copy=False)
            lab = self.crop_label(i, start, size)
            img_t = torch.from_numpy(img)
            lab_t = torch.from_numpy(lab.astype(np.int64, copy=False))[None]
            if aug is not None:
                img_t, lab_t = aug.apply(img_t, lab_t, matrix, center, rng)
            images.append(img_t)
            labels.append(lab_t)
        batch = {"image": torch.stack(images), "label": torch.stack(labels)}
        if self.partial:
            batch["annotated"] = torch.from_numpy(np.stack([self.cases[int(i)].annotated for i in picks]))
        return batch


class TaskMixSampler:
    """Batches from several tasks' samplers: each batch comes from one task, drawn with probabilities
    ``weights`` (default uniform) from the same generator, and says which (``batch["task"]``, its index)."""

    def __init__(self, samplers: Sequence[Any], weights: Sequence[float] | None = None):
        if not samplers:
            raise MedadaptError("joint training needs at least one task")
        self.samplers = list(samplers)
        w = np.ones(len(self.samplers)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(self.samplers),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {weights!r}: one non-negative weight per task, not all zero")
        self.weights = w / w.sum()

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        task = int(rng.choice(len(self.samplers), p=self.weights))
        batch = self.samplers[task].sample(rng)
        batch["task"] = task
        return batch


# -- one-time calibration (SGST) ---------------------------------------------------------------------------------
# The one definition both training loops use (medadapt's engine, nnU-Net's trainer in medadapt.nnunet): every
# training case gives exactly one patch, centred on a foreground voxel that the calibration's own seeded stream
# picks (a foreground class of the case uniformly, then one of its stored voxels uniformly), with no augmentation,
# in batches of the loop's batch size, cases in sorted case-id order. Each case draws from its own stream
# (the ``calibration`` stream of medadapt.utils.seeds, keyed by the case id), so a case's patch does not depend on
# which other cases are in the set, nor on the order the loop holds them in, nor on anything training draws.

#: second word of the calibration's seed sequence (seed, CALIBRATION_STREAM, crc32(case id))
CALIBRATION_STREAM = seeds.PURPOSES["calibration"][0]


@dataclasses.dataclass(frozen=True)
class CalibrationPatch:
    """Where one case's calibration patch lies on the case's (preprocessed) voxel grid."""

    case_id: str
    start: tuple[int, int, int]  #: lower corner (may be negative: then the crop is padded)
    voxel: tuple[int, int, int]  #: the foreground voxel the patch is centred on (inside the patch)
    label: Any  #: its class: a key of the case's class locations (an int label, or a tuple for nnU-Net regions)


def _foreground_classes(class_locations: Mapping) -> list:
    """Keys of foreground classes with at least one stored voxel. nnU-Net's key of annotated voxels (a tuple
    starting with -1, present with an ignore label) and background are not foreground."""
    keys = []
    for k, locs in class_locations.items():
        if locs is None or len(locs) == 0:
            continue
        if isinstance(k, tuple):
            if -1 in k:
                continue
        elif int(k) <= 0:
            continue
        keys.append(k)
    return sorted(keys, key=lambda k: (1, tuple(k)) if isinstance(k, tuple) else (0, (int(k),)))


def _centred_start(voxel: Sequence[int], shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """Lower corner of the patch centred on ``voxel``, moved inside the volume where it fits (the voxel stays in
    the patch); a volume smaller than the patch is centred in it (the sampler's rule)."""
    out = []
    for v, s, p in zip(voxel, shape, patch_size):
        lo, hi = (0, s - p) if s >= p else ((s - p) // 2, (s - p) // 2)
        out.append(int(min(max(int(v) - p // 2, lo), hi)))
    return tuple(out)


def calibration_plan(cases: Iterable[tuple[str, Sequence[int], Mapping]], patch_size: Sequence[int],
                     batch_size: int, seed: int) -> list[list[CalibrationPatch]]:
    """The calibration set of a strategy's one-time look at the data (SGST), as batches of patch positions.

    ``cases``: ``(case_id, spatial shape (z, y, x), class_locations)`` per training case, where class_locations
    maps a class to stored foreground voxel coordinates, (n, 3) or nnU-Net's (n, 4) with a leading channel
    column (only the last three columns are read). Returns one :class:`CalibrationPatch` per case, cases in
    sorted id order, in consecutive batches of ``batch_size`` (the last may be smaller). Every calibration
    patch holds foreground, so a training case without any foreground voxel (a scan in which no structure is
    annotated, which happens with lymph nodes) gives no patch and is left out of the calibration; if no case
    has foreground, :class:`MedadaptError` says so.
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise MedadaptError(f"calibration patch size {tuple(patch_size)}: must be three positive integers (z, y, x)")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise MedadaptError(f"calibration batch size {batch_size!r}: must be a positive integer")
    listed = [(str(cid), tuple(int(s) for s in shape), locs) for cid, shape, locs in cases]
    if not listed:
        raise MedadaptError("calibration: no training cases")
    ids = [cid for cid, _, _ in listed]
    if len(set(ids)) != len(ids):
        raise MedadaptError(f"calibration: case ids repeat ({sorted(i for i in set(ids) if ids.count(i) > 1)})")
    patches = []
    for cid, shape, locs in sorted(listed, key=lambda c: c[0]):
        if len(shape) != 3:
            raise MedadaptError(f"case {cid}: spatial shape {shape} is not three-dimensional")
        classes = _foreground_classes(locs or {})
        if not classes:
            continue  # nothing to centre a patch on: the case holds no annotated structure
        rng = seeds.numpy_rng(int(seed), "calibration", cid)
        label = classes[int(rng.integers(len(classes)))]
        coords = np.asarray(locs[label])
        voxel = tuple(int(v) for v in coords[int(rng.integers(len(coords)))][-3:])
        if any(not 0 <= v < s for v, s in zip(voxel, shape)):
            raise MedadaptError(f"case {cid}: stored foreground voxel {voxel} lies outside its volume {shape}; "
                                "preprocess the case again")
        patches.append(CalibrationPatch(cid, _centred_start(voxel, shape, patch), voxel, label))
    if not patches:
        raise MedadaptError(f"calibration: none of the {len(listed)} training cases has a foreground voxel, so "
                            "there is no gradient signal to select entries from; train on cases that hold the "
                            "structures")
    b = int(batch_size)
    return [patches[i:i + b] for i in range(0, len(patches), b)]


def crop_calibration_patch(data, seg, patch: CalibrationPatch, patch_size: Sequence[int], pad_value,
                           seg_pad_value=0, label_lut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``data`` [C, z, y, x] and ``seg`` ([z, y, x] or [1, z, y, x]) at the patch; checks that the crop
    holds the foreground voxel the patch is centred on (a :class:`MedadaptError` if the stored foreground
    locations do not match the segmentation)."""
    img = crop_with_padding(data, patch.start, patch_size, pad_value)
    lab = crop_with_padding(seg, patch.start, patch_size, seg_pad_value)
    if label_lut is not None:  # a case seen through a label template: its ids are the template's
        lab = label_lut[lab]
    local = tuple(v - s for v, s in zip(patch.voxel, patch.start))
    labels = list(patch.label) if isinstance(patch.label, tuple) else [patch.label]
    if not np.isin(np.asarray(lab[(Ellipsis, *local)]), labels).any():
        raise MedadaptError(f"case {patch.case_id}: voxel {patch.voxel} of its stored foreground locations is not "
                            f"class {patch.label} in its segmentation; preprocess the case again")
    return img, lab


def calibration_batches(sampler: PatchSampler, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """medadapt's engine side of :func:`calibration_plan`: batches ``image`` float32 [B, C, *patch] and ``label``
    int64 [B, 1, *patch] of the sampler's cases, cropped as the sampler crops (the image padded with the
    channel minimum, the label with 0), without augmentation; ``case_ids`` names the cases of each batch."""
    ids = [str(getattr(c, "case_id", i)) for i, c in enumerate(sampler.cases)]
    index = {cid: i for i, cid in enumerate(ids)}
    plan = calibration_plan([(cid, c.data.shape[1:], c.class_locations) for cid, c in zip(ids, sampler.cases)],
                            sampler.patch_size, sampler.batch_size, seed)
    for group in plan:
        images, labels = [], []
        for p in group:
            i = index[p.case_id]
            case = sampler.cases[i]
            img, lab = crop_calibration_patch(case.data, case.seg, p, sampler.patch_size, sampler._channel_min(i),
                                              label_lut=getattr(case, "label_lut", None))
            images.append(torch.from_numpy(img.astype(np.float32, copy=False)))
            labels.append(torch.from_numpy(lab.astype(np.int64, copy=False))[None])
        batch = {"image": torch.stack(images), "label": torch.stack(labels), "case_ids": [p.case_id for p in group]}
        if sampler.partial:
            batch["annotated"] = torch.from_numpy(np.stack([sampler.cases[index[p.case_id]].annotated for p in group]))
        yield batch
