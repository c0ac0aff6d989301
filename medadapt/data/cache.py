"""A per-plan disk cache of preprocessed cases, memory-mapped for training (nnU-Net's preprocessed folder)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medadapt.data.dataset import RawDataset
from medadapt.data.preprocessing import PreprocessingPlan, maybe_progress, preprocess_case
from medadapt.utils.atomic import atomic_path, atomic_write_json

FOREGROUND_SAMPLES_PER_CLASS = 10000  # nnU-Net's _sample_foreground_locations num_samples
FOREGROUND_MIN_COVERAGE = 0.01  # ... and min_percent_coverage

def sample_class_locations(seg: np.ndarray, classes: Sequence[int], seed: int = 1234,
                           num_samples: int = FOREGROUND_SAMPLES_PER_CLASS,
                           min_coverage: float = FOREGROUND_MIN_COVERAGE) -> dict[int, np.ndarray]:
    """nnU-Net's ``_sample_foreground_locations``: per class, up to ``num_samples`` voxel coordinates (n, 3) but
    at least ``min_coverage`` of the class's voxels, drawn without replacement with a fixed seed."""
    rs = np.random.RandomState(seed)
    fg_mask = seg != 0
    coords = np.argwhere(fg_mask)
    values = seg[fg_mask]
    out: dict[int, np.ndarray] = {}
    for c in classes:
        locs = coords[values == c]
        if len(locs) == 0:
            out[int(c)] = np.zeros((0, 3), dtype=np.int32)
            continue
        n = min(num_samples, len(locs))
        n = max(n, int(np.ceil(len(locs) * min_coverage)))
        out[int(c)] = locs[rs.choice(len(locs), n, replace=False)].astype(np.int32)
    return out


class CachedCase:
    """One preprocessed case on disk; ``data`` / ``seg`` are memory-mapped on first access (read-only).

    Picklable (for DataLoader workers): the memory maps are reopened in the receiving process.
    """

    def __init__(self, case_id: str, folder: str | Path):
        self.case_id = case_id
        self.folder = Path(folder)
        self._data = self._seg = self._locs = self._props = None

    @property
    def data_path(self) -> Path:
        return self.folder / f"{self.case_id}.npy"

    @property
    def seg_path(self) -> Path:
        return self.folder / f"{self.case_id}_seg.npy"

    @property
    def locs_path(self) -> Path:
        return self.folder / f"{self.case_id}_locs.npz"

    @property
    def meta_path(self) -> Path:
        return self.folder / f"{self.case_id}.json"

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
        return self._data

    @property
    def seg(self) -> np.ndarray:
        if self._seg is None:
            self._seg = np.load(self.seg_path, mmap_mode="r")
        return self._seg

    @property
    def class_locations(self) -> dict[int, np.ndarray]:
        if self._locs is None:
            with np.load(self.locs_path) as z:
                self._locs = {int(k.split("_", 1)[1]): z[k] for k in z.files}
        return self._locs

    @property
    def properties(self) -> dict[str, Any]:
        if self._props is None:
            self._props = json.loads(self.meta_path.read_text(encoding="utf-8"))["properties"]
        return self._props

    @property
    def channel_min(self) -> list[float]:
        """Per-channel minimum of ``data`` (the padding value of patches leaving the volume)."""
        return [float(v) for v in self.properties["channel_min"]]

    def __getstate__(self):
        return {"case_id": self.case_id, "folder": str(self.folder)}

    def __setstate__(self, state):
        self.__init__(state["case_id"], state["folder"])

    def __repr__(self) -> str:
        return f"CachedCase({self.case_id!r}, {str(self.folder)!r})"


def _source_fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([Path(p).name, int(st.st_size), int(st.st_mtime_ns)])
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))


def _is_cached(case: CachedCase, fingerprint: list) -> bool:
    if not all(p.is_file() for p in (case.meta_path, case.data_path, case.seg_path, case.locs_path)):
        return False
    try:
        meta = json.loads(case.meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("source") == fingerprint


def preprocess_dataset(dataset: RawDataset, case_ids: Sequence[str], plan: PreprocessingPlan,
                       cache_dir: str | Path, progress: bool = True) -> list[CachedCase]:
    """Preprocess each case once into ``cache_dir/plan_<hash>/``; cases already there are reused.

    Per case: ``<case>.npy`` (float32 [C, z, y, x]), ``<case>_seg.npy`` (int16 [z, y, x]), ``<case>_locs.npz``
    (sampled foreground voxel coordinates per class) and ``<case>.json`` (revert properties, source-file sizes
    and times). Every file is written atomically and the JSON last, so an interrupted run leaves no half case;
    a case whose source files changed (size or modification time) is preprocessed again.
    """
    folder = Path(cache_dir) / f"plan_{plan.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    if not plan_file.is_file():
        atomic_write_json(plan_file, plan.to_dict())
    classes = sorted(v for v in dataset.labels.values() if v != 0)
    out: list[CachedCase] = []
    for case_id in maybe_progress(list(case_ids), progress, "preprocessing"):
        case = CachedCase(case_id, folder)
        sources = dataset.image_paths(case_id) + [dataset.label_path(case_id)]
        fingerprint = _source_fingerprint(sources)
        if not _is_cached(case, fingerprint):
            images, label = dataset.load_case(case_id)
            pre = preprocess_case(images, label, plan)
            locs = sample_class_locations(pre.seg, classes)
            props = dict(pre.properties)
            props["channel_min"] = [float(pre.data[c].min()) for c in range(pre.data.shape[0])]
            props["classes_present"] = [int(v) for v in np.unique(pre.seg)]
            _save_npy(case.data_path, pre.data)
            _save_npy(case.seg_path, pre.seg)
            with atomic_path(case.locs_path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **{f"class_{c}": v for c, v in locs.items()})
            atomic_write_json(case.meta_path, {"case_id": case_id, "source": fingerprint, "properties": props})
        out.append(case)
    return out
