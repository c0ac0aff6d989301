"""Partially labelled datasets assembled into one label template (FSEFT's foundation-model training data).

Each dataset in nnU-Net v2 raw format labels only some structures. The **template** is the union of the
datasets' foreground label names, in order of first appearance over the datasets as given: class ``k`` of the
template (its sigmoid output channel ``k``) has template label id ``k + 1``; classes are matched across datasets
by name. Each case comes with its **annotation record**, the template classes it annotates (FSEFT's annotation
vector w_n): by default every foreground label of its dataset's ``dataset.json``; a dataset whose cases
annotate different subsets gives the records in ``annotated_classes.json`` next to ``dataset.json``::

    {"case_001": ["liver", "spleen"], "case_002": ["liver"], ...}

(one entry per case, label names of ``dataset.json``). A class a case does not annotate is neither foreground
nor background for that case: the loss leaves it out (medadapt.engine.losses), and a label map may not hold
voxels of it.

Label maps stay on disk in their dataset's own ids; :class:`TemplateCase` translates them to template ids
patch by patch (a lookup table), so the preprocessing cache is shared with every other use of the dataset.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medadapt.data.dataset import RawDataset
from medadapt.errors import MedadaptError

ANNOTATIONS_FILE = "annotated_classes.json"
SAMPLING = ("cases", "datasets")


def _normalised(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


@dataclass
class LabelTemplate:
    """The classes of a partially labelled model and which datasets annotate which of them."""

    classes: list[str]
    #: per dataset: ``{"name", "path", "labels" (its dataset.json labels), "annotates" (template classes its
    #: cases annotate at least once), "cases", "per_case_records" (whether annotated_classes.json gave them)}``
    datasets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, int]:
        """The model's labels: background 0, then the template classes 1..C."""
        return {"background": 0, **{name: i + 1 for i, name in enumerate(self.classes)}}

    def lookup_table(self, labels: dict[str, int]) -> np.ndarray:
        """Dataset label id -> template label id (background stays 0)."""
        lut = np.zeros(max(labels.values()) + 1, dtype=np.int16)
        ids = self.labels
        for name, value in labels.items():
            if value != 0:
                lut[value] = ids[name]
        return lut

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "datasets": [dict(d) for d in self.datasets]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelTemplate":
        return cls(classes=[str(c) for c in d["classes"]], datasets=list(d.get("datasets", [])))


def build_template(datasets: Sequence[RawDataset]) -> LabelTemplate:
    """The union of the datasets' foreground label names (first appearance order). Names that differ only in
    case, spaces, hyphens or underscores are refused: they would silently become two classes."""
    classes: list[str] = []
    seen: dict[str, tuple[str, RawDataset]] = {}
    for ds in datasets:
        for name in ds.labels:
            if ds.labels[name] == 0:
                continue
            key = _normalised(name)
            if key in seen and seen[key][0] != name:
                other_name, other = seen[key]
                raise MedadaptError(
                    f"{ds.root / 'dataset.json'}: label {name!r} and label {other_name!r} of "
                    f"{other.root / 'dataset.json'} look like one structure spelled two ways; datasets are "
                    "joined by label name, so rename one of them to match the other")
            if key not in seen:
                seen[key] = (name, ds)
                classes.append(name)
    if not classes:
        raise MedadaptError("--data: the datasets label no foreground class; give datasets with labelled structures")
    return LabelTemplate(classes=classes)


def annotation_records(dataset: RawDataset) -> tuple[dict[str, list[str]], bool]:
    """``{case: [label names it annotates]}`` and whether they come from ``annotated_classes.json`` (else every
    case annotates every foreground label of ``dataset.json``)."""
    foreground = [n for n, v in dataset.labels.items() if v != 0]
    path = dataset.root / ANNOTATIONS_FILE
    if not path.is_file():
        return {cid: list(foreground) for cid in dataset.case_ids}, False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedadaptError(f"{path}: not valid JSON ({exc}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise MedadaptError(f'{path}: must map each case id to the label names it annotates, e.g. '
                            '{"case_001": ["liver", "spleen"]}')
    unknown_cases = sorted(set(raw) - set(dataset.case_ids))
    if unknown_cases:
        raise MedadaptError(f"{path}: case(s) {unknown_cases[:5]} are not in {dataset.root / 'imagesTr'}; remove "
                            "their records or add the cases")
    records: dict[str, list[str]] = {}
    for cid in dataset.case_ids:
        if cid not in raw:
            raise MedadaptError(f"{path}: no annotation record for case {cid!r}; add "
                                f'"{cid}": [the label names it annotates] or delete the file if every case '
                                "annotates every label of dataset.json")
        names = raw[cid]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MedadaptError(f"{path}: the record of case {cid!r} must be a list of label names, "
                                f"e.g. {foreground[:2]}")
        bad = sorted(set(names) - set(foreground))
        if bad:
            raise MedadaptError(f"{path}: case {cid!r} names {bad}, which are not foreground labels of "
                                f"{dataset.root / 'dataset.json'} ({foreground}); fix the record")
        records[cid] = [n for n in foreground if n in names]
    return records, True


class TemplateCase:
    """A preprocessed case (:class:`~medadapt.data.cache.CachedCase`) seen through a label template: its
    label map's ids become template ids when cropped (``label_lut``), its foreground locations are keyed by
    template id and limited to annotated classes, and ``annotated`` [C] says which template classes it
    annotates."""

    def __init__(self, case, lut: np.ndarray, annotated: np.ndarray, dataset: str):
        self.case = case
        self.case_id = f"{dataset}/{case.case_id}"  # unique across the assembled datasets
        self.label_lut = lut
        self.annotated = annotated
        self.dataset = dataset
        self._locs = None

    @property
    def data(self):
        return self.case.data

    @property
    def seg(self):
        return self.case.seg

    @property
    def channel_min(self):
        return self.case.channel_min

    @property
    def class_locations(self) -> dict[int, np.ndarray]:
        if self._locs is None:
            self._locs = {int(self.label_lut[k]): v for k, v in self.case.class_locations.items()
                          if 0 < k < len(self.label_lut) and self.annotated[int(self.label_lut[k]) - 1]}
        return self._locs


def template_cases(dataset: RawDataset, cases: Sequence, template: LabelTemplate,
                   records: dict[str, list[str]]) -> list[TemplateCase]:
    """Wrap a dataset's preprocessed cases; refuses a case whose label map holds a class its record omits."""
    lut = template.lookup_table(dataset.labels)
    ids = template.labels
    out = []
    for case in cases:
        names = records[case.case_id]
        annotated = np.zeros(len(template.classes), dtype=bool)
        for name in names:
            annotated[ids[name] - 1] = True
        present = {int(v) for v in case.properties.get("classes_present", [])} - {0}
        by_id = {v: n for n, v in dataset.labels.items()}
        stray = sorted(by_id[v] for v in present if by_id.get(v) not in names)
        if stray:
            raise MedadaptError(
                f"{dataset.root / ANNOTATIONS_FILE}: case {case.case_id!r} has voxels of {stray} in its label map "
                f"but its record says it annotates only {names}; add them to the record")
        out.append(TemplateCase(case, lut, annotated, dataset.name))
    return out


def sampling_weights(cases: Sequence[TemplateCase], how: str) -> np.ndarray | None:
    """Probability of drawing each case: ``cases`` uniform over all cases (None: the sampler's own uniform
    draw), ``datasets`` uniform over datasets, then over the dataset's cases."""
    if how not in SAMPLING:
        raise MedadaptError(f"--sampling {how!r}: unknown; choose one of {', '.join(SAMPLING)}")
    if how == "cases":
        return None
    names = [c.dataset for c in cases]
    counts = {n: names.count(n) for n in set(names)}
    w = np.asarray([1.0 / (len(counts) * counts[n]) for n in names])
    return w / w.sum()
