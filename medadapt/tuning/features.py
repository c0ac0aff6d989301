"""Training a head on cached backbone features (``finetune --feature-cache``; beyond the FSEFT paper).

A method that trains nothing below the backbone's last feature map (the linear probe, the spatial adapter,
transductive inference's query, which is cached already) sees the same input features for a support volume
at every step: the frozen network is deterministic and no input-space augmentation is applied. So each
support volume's features are computed once, by the predictor's sliding window (Gaussian-blended, the tail's
input captured by a forward hook: :func:`medadapt.tuning.transductive.query_features`), stored, and training
draws its patches from them: a step runs only the head's forward and backward.

What the cache cannot do: input-space augmentation (FSEFT's intensity shift, nnU-Net's whole pipeline) is not
applied (the features of a shifted input are not the shifted features); only the crop policy remains. Deep
supervision is off (only the full-resolution head is trained; the lower heads are frozen). A patch of
features is cut from the volume's blended features, whereas an uncached step recomputes them from the patch
alone (features near a patch border then see zero padding): the two differ there, which the benchmark
measures (docs/benchmark.md).

Cache folder: ``<dataset cache>/features-<key>/<case>.npy`` with ``<case>.json`` recording what it was made
from (the foundation's weights, the preprocessed case's digest, the patch, the overlap, the tail); a file whose
record no longer matches is stale and refused with one line naming it. Runs sharing the cache (a grid's cells
run side by side) compute each case once: a case is checked and written under a lock on its own file
(``<case>.lock``), so a second run waits for the first and reads its features; the record is written before
the features, so features on disk always have their record.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_path, atomic_write_json
from medadapt.utils.digests import file_sha256
from medadapt.utils.hashing import stable_hash
from medadapt.utils.lock import waiting_lock

OVERLAP = 0.5
FORMAT = "medadapt-feature-cache/1"


def trainable_tail(model: nn.Module, option: str = "--feature-cache") -> nn.Module:
    """The full-resolution head of ``model`` if every trainable parameter lies in it, once the other heads
    (deep supervision's, unused without it) are frozen; else one line naming ``option`` and the fix."""
    from medadapt.models.network import set_deep_supervision
    from medadapt.models.parts import model_parts

    parts = model_parts(model)
    tail = parts.heads[-1]
    inside = {id(p) for p in tail.parameters()}
    for head in parts.heads[:-1]:
        for p in head.parameters():
            p.requires_grad_(False)
    set_deep_supervision(model, False)
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise MedadaptError(f"{option}: the method trains {outside[0]} and others below the last feature map, so "
                            "the features cannot be computed once; use --method linear-probe or spatial-adapter")
    return tail


class FeatureCase:
    """A support case seen through its cached features: ``data`` the feature map [C_f, z, y, x] (memory-mapped),
    ``seg``, ``class_locations`` and ``annotated`` those of the preprocessed case."""

    def __init__(self, case, path: Path):
        self.case = case
        self.case_id = getattr(case, "case_id", path.stem)
        self.path = Path(path)
        self._data = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.path, mmap_mode="r")
        return self._data

    @property
    def seg(self):
        return self.case.seg

    @property
    def class_locations(self):
        return self.case.class_locations

    @property
    def channel_min(self) -> list[float]:
        return [float(v) for v in np.asarray(self.data).reshape(self.data.shape[0], -1).min(1)]

    def __getattr__(self, name: str) -> Any:  # annotated, label_lut (partially labelled cases)
        if name in ("annotated", "label_lut"):
            return getattr(self.case, name, None)
        raise AttributeError(name)

    def __getstate__(self):
        return {"case": self.case, "case_id": self.case_id, "path": self.path, "_data": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


def feature_cases(model: nn.Module, tail: nn.Module, cases: Sequence, patch_size: Sequence[int], root: Path,
                  foundation: str, progress: bool = False) -> list[FeatureCase]:
    """The support ``cases`` as :class:`FeatureCase` objects, computing (and storing) the features of those
    not yet in ``root`` for ``foundation`` (the foundation's fingerprint); a stored file made from other
    inputs is refused (stale)."""
    from tqdm.auto import tqdm

    from medadapt.tuning.transductive import query_features

    channels = next(m for m in tail.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))).in_channels
    setting = {"format": FORMAT, "foundation": foundation, "patch": [int(p) for p in patch_size],
               "overlap": OVERLAP, "channels": int(channels)}
    folder = Path(root) / f"features-{stable_hash(setting, 12)}"
    out = []
    for case in tqdm(cases, desc="cache features", disable=not progress, unit="case", leave=False):
        cid = getattr(case, "case_id")
        path, meta = folder / f"{cid}.npy", folder / f"{cid}.json"
        source = getattr(case, "data_path", None)
        expected = {**setting, "case": cid, "data": file_sha256(source)[:16] if source is not None else None}
        with waiting_lock(folder / f"{cid}.lock"):  # one writer; a run racing it waits, then reads
            if path.is_file():
                try:
                    stored = json.loads(meta.read_text())
                except (OSError, json.JSONDecodeError):
                    stored = None
                if stored != expected:
                    raise MedadaptError(f"{path}: a stale feature cache (made from another model, data or "
                                        f"setting); delete {folder} and run again")
            else:
                feats = query_features(model, tail, case.data, patch_size, overlap=OVERLAP)[0].numpy()
                atomic_write_json(meta, expected)  # before the features: features on disk have their record
                with atomic_path(path, suffix=".npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, feats.astype(np.float32))
        out.append(FeatureCase(case, path))
    return out


__all__ = ["trainable_tail", "feature_cases", "FeatureCase"]
