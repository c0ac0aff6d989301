"""A task cut from a multi-structure dataset: some of its structures, renumbered, everything else background.

FSEFT's tasks are one structure each of TotalSegmentator or FLARE (the authors' partition files name the cases
per structure); a benchmark grid's dataset ``{data: PATH, labels: [aorta]}`` is such a task. The images are not
copied (linked where the file system allows it), the label maps are rewritten with a lookup table, and the
folder appears complete or not at all (written beside and renamed).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medadapt.data.dataset import RawDataset
from medadapt.errors import MedadaptError

MARKER = ".subset.json"  # what the folder was cut from (a folder cut from other data is refused)


def check_labels(dataset: RawDataset, labels: Sequence[str], where: str) -> None:
    """One line if ``labels`` is empty, repeats a name or names a structure ``dataset`` does not label."""
    available = [n for n, v in dataset.labels.items() if v != 0]
    if not labels:
        raise MedadaptError(f"{where}: names no structure; list some of {available}")
    for name in labels:
        if name not in available:
            raise MedadaptError(f"{where}: {name!r} is not a label of {dataset.root} (its labels: "
                                f"{', '.join(available)}); use one of those names")
        if list(labels).count(name) > 1:
            raise MedadaptError(f"{where}: {name!r} is listed twice; list each structure once")


def write_label_subset(source: str | Path, labels: Sequence[str], out: str | Path, fingerprint: str) -> Path:
    """``source``'s cases with only ``labels`` (ids 1..N in this order) in ``out``; nothing is done if ``out``
    already holds the subset of the same ``fingerprint`` (the source's, :func:`medadapt.utils.digests.dataset_content_fingerprint`)."""
    dataset = RawDataset.load(source)
    check_labels(dataset, labels, f"labels of {dataset.root}")
    out = Path(out)
    made = {"source": str(Path(dataset.root).resolve()), "labels": list(labels), "fingerprint": fingerprint}
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == made:
            return out
        raise MedadaptError(f"{out}: holds a subset of other data or labels ({marker}); delete the folder to "
                            "re-make it")
    lut = np.zeros(max(dataset.labels.values()) + 1, dtype=np.uint8)
    for i, name in enumerate(labels, start=1):
        lut[dataset.labels[name]] = i
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    for cid in dataset.case_ids:
        for image in dataset.image_paths(cid):
            _link(image, tmp / "imagesTr" / image.name)
        label_path = dataset.label_path(cid)
        img = nib.load(str(label_path))
        values = np.asarray(img.dataobj)
        if values.size and (values.min() < 0 or values.max() >= len(lut)):
            raise MedadaptError(f"{label_path}: holds label values outside dataset.json's labels; fix the file")
        cut = nib.Nifti1Image(lut[values.astype(np.int64)], img.affine, img.header)
        cut.set_data_dtype(np.uint8)
        nib.save(cut, str(tmp / "labelsTr" / label_path.name))
    meta = json.loads((Path(dataset.root) / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{name: i for i, name in enumerate(labels, start=1)}}
    meta["numTraining"] = len(dataset.case_ids)
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    (tmp / MARKER).write_text(json.dumps(made))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _link(src: Path, dest: Path) -> None:
    """``dest`` as a symbolic link to ``src`` (absolute), or a copy where links are not allowed."""
    try:
        dest.symlink_to(Path(src).resolve())
    except OSError:
        shutil.copyfile(src, dest)
