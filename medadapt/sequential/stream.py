"""A stream of segmentation tasks on real (or synthetic) nnU-Net raw datasets, for sequential fine-tuning.

A stream file is YAML: ``tasks`` in training order and, optionally, ``unseen`` tasks that test how well the
refined model transfers (MedSeqFT's Table VI). Each task is a dataset folder (relative paths are relative to
the file); its labels are its ``dataset.json``'s::

    name: ct-stream                       # optional (default: the file's name)
    tasks:
      - name: liver                       # optional (default: the dataset's name)
        data: ../nnUNet_raw/Dataset003_Liver
      - data: ../nnUNet_raw/Dataset008_HepaticVessel
        split: ../splits/hepaticvessel_test.txt   # optional: its test cases (a list, or splits_final.json
                                                  # with fold: N); default the fixed 80/20 split
    unseen:
      - data: ../nnUNet_raw/Dataset040_KiTS

A plain YAML list is read as ``tasks``. ``medadapt synth --stream ct-stream --out DIR`` writes the built-in
synthetic stream's datasets and such a file (``DIR/stream.yaml``). Every mistake is one
:class:`~medadapt.errors.MedadaptError` naming the file and the key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medadapt.data.dataset import RawDataset
from medadapt.data.splits import Split
from medadapt.errors import MedadaptError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class StreamTask:
    """One task of a stream: a name (a folder name in run folders) and its dataset."""

    name: str
    data: Path
    split: Split | None = None  #: its own test cases (a splits file); None: the run's fixed random split

    def dataset(self) -> RawDataset:
        return RawDataset.load(self.data)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "data": str(self.data), **({"split": self.split.record()} if self.split else {})}


@dataclass(frozen=True)
class Stream:
    name: str
    tasks: tuple[StreamTask, ...]
    unseen: tuple[StreamTask, ...]
    source: Path

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "source": str(self.source),
                "tasks": [t.record() for t in self.tasks], "unseen": [t.record() for t in self.unseen]}


def load_stream(path: "str | os.PathLike[str]") -> Stream:
    """Read and check a stream file: every task's dataset must load and label at least one structure."""
    path = Path(path)
    if not path.is_file():
        raise MedadaptError(f"{path}: no such stream file; give a YAML file listing the tasks' datasets "
                            "(docs/sequential.md), e.g. one written by 'medadapt synth --stream ct-stream'")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedadaptError(f"{path}: not readable YAML ({first}); fix the file") from None
    if isinstance(raw, list):
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise MedadaptError(f"{path}: must hold a mapping with 'tasks' (or a list of tasks); it is empty or "
                            f"a {type(raw).__name__}")
    unknown = sorted(set(raw) - {"name", "description", "tasks", "unseen"})
    if unknown:
        raise MedadaptError(f"{path}: unknown key(s) {unknown}; a stream has name, description, tasks, unseen")
    name = str(raw.get("name") or path.stem)
    tasks = _tasks(path, raw.get("tasks"), "tasks", required=True)
    unseen = _tasks(path, raw.get("unseen"), "unseen", required=False)
    names = [t.name for t in tasks + unseen]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MedadaptError(f"{path}: task name(s) {dup} appear more than once; give each task its own 'name'")
    return Stream(name=name, tasks=tuple(tasks), unseen=tuple(unseen), source=path.resolve())


def _beside(path: Path, value: Any) -> Path:
    """A path from the stream file: ``~`` expanded, a relative one taken from the file's folder."""
    found = Path(os.path.expanduser(str(value)))
    return found if found.is_absolute() else (path.parent / found).resolve()


def _tasks(path: Path, items: Any, key: str, required: bool) -> list[StreamTask]:
    if items is None:
        if required:
            raise MedadaptError(f"{path}: has no '{key}'; list the tasks' datasets in training order")
        return []
    if not isinstance(items, list) or (required and not items):
        raise MedadaptError(f"{path}: '{key}' must be a non-empty list of tasks (each with 'data')")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: {key}[{i}]"
        if isinstance(item, str):
            item = {"data": item}
        if not isinstance(item, dict) or "data" not in item:
            raise MedadaptError(f"{where}: a task needs 'data' (its nnU-Net raw dataset folder)")
        extra = sorted(set(item) - {"name", "data", "split", "fold"})
        if extra:
            raise MedadaptError(f"{where}: unknown key(s) {extra}; a task has 'data' and optionally 'name', "
                                "'split' and 'fold' (its labels are its dataset.json's)")
        data = _beside(path, item["data"])
        try:
            dataset = RawDataset.load(data)
        except MedadaptError as exc:
            raise MedadaptError(f"{where}: {exc}") from None
        if not [v for v in dataset.labels.values() if v != 0]:
            raise MedadaptError(f"{where}: {data / 'dataset.json'} labels no structure (only background); a task "
                                "needs at least one foreground label")
        if not dataset.case_ids:
            raise MedadaptError(f"{where}: {data} has no training cases; add cases to imagesTr/labelsTr")
        split = None
        if item.get("split") is not None:
            if str(item["split"]) == "none":
                raise MedadaptError(f"{where}: split none: a stream's task is scored after every stage, so it needs "
                                    "a test part; give a splits file or leave 'split' out")
            try:
                split = Split.parse(_beside(path, item["split"]), item.get("fold"), option="split")
                split.apply(dataset.case_ids)
            except MedadaptError as exc:
                raise MedadaptError(f"{where}: {exc}") from None
        elif item.get("fold") is not None:
            raise MedadaptError(f"{where}: 'fold' names a fold of a splits file; give the file as 'split'")
        name = str(item.get("name") or dataset.name)
        if not _NAME.match(name):
            raise MedadaptError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names a "
                                "folder)")
        out.append(StreamTask(name=name, data=data, split=split))
    return out


def write_synthetic_stream(stream: str, out: "str | os.PathLike[str]", cases: int = 25, seed: int = 0,
                           downsample: tuple[int, int, int] | None = None, progress: bool = True) -> Path:
    """Write a built-in synthetic task stream (``medadapt.synth`` task set, e.g. ``ct-stream``): each task's
    cohort as an nnU-Net raw dataset under ``out/`` and ``out/stream.yaml`` listing them; returns that file."""
    from medadapt.synth import write_dataset
    from medadapt.synth.tasks import load_task_stream
    from medadapt.utils.atomic import atomic_write_text

    spec_stream = load_task_stream(stream)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict[str, str]]] = {"tasks": [], "unseen": []}
    for group, tasks in (("tasks", spec_stream.tasks), ("unseen", spec_stream.unseen)):
        for task in tasks:
            spec = task.spec()
            if downsample:
                spec = spec.downsampled(tuple(downsample))
            write_dataset(spec, out / task.name, num_cases=cases, seed=seed, progress=progress)  # resumes
            entries[group].append({"name": task.name, "data": task.name})
    doc = {"name": spec_stream.name, "description": spec_stream.description, **entries}
    target = out / "stream.yaml"
    atomic_write_text(target, yaml.safe_dump(doc, sort_keys=False))
    return target
