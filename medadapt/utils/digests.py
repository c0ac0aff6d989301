"""SHA-256 digests of what a result was made from: a dataset folder's files, a model folder's weights."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

#: the files of a model folder whose bytes are "the model" (plans.json also holds provenance: paths, times)
MODEL_FILES = ("weights.pt", "pretext.pt")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_digest(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def update_with_state_dict(h, state) -> None:
    """Feed a state dict (``{name: tensor}``) into the hash object ``h``: each name, then its tensor's raw bytes,
    in name order (a model's weights as bytes, wherever they were loaded from)."""
    import torch

    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def dataset_digest(folder: str | Path) -> str:
    """SHA-256 of a dataset folder's files (names and bytes; hidden files such as locks and markers left out)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return files_digest(root, files)


def model_digest(folder: str | Path) -> str:
    """SHA-256 of a model folder's weight files (``weights.pt``, and ``pretext.pt`` where there is one)."""
    root = Path(folder)
    return files_digest(root, [root / n for n in MODEL_FILES if (root / n).is_file()])


#: the version of :func:`dataset_content_fingerprint`'s definition (part of every fingerprint)
CONTENT_FINGERPRINT = "medadapt-data-content/1"
_DATASET_JSON_KEYS = ("channel_names", "labels", "file_ending", "regions_class_order")


def image_content_digest(path: str | Path) -> str:
    """SHA-256 of what a NIfTI file holds, not how it is stored: its voxel array (shape, dtype, values after the
    header's scaling) and its geometry (the affine nibabel gives it). Gzip bytes, compression level, file times
    and header padding do not enter."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    data = np.ascontiguousarray(np.asanyarray(img.dataobj))
    h = hashlib.sha256()
    h.update(f"{data.shape}\0{data.dtype.str}\0".encode())
    h.update(np.ascontiguousarray(img.affine, dtype=np.float64).tobytes())
    h.update(data.tobytes())
    return h.hexdigest()


def _content_cache(root: Path) -> Path:
    from medadapt.utils.environ import cache_root

    return cache_root() / "content-digests" / (hashlib.sha256(str(root).encode()).hexdigest()[:16] + ".json")


def dataset_content_fingerprint(folder: str | Path) -> str:
    """A real dataset's fingerprint by content: what ``dataset.json`` says (channels, labels, file ending),
    ``annotated_classes.json`` where there is one (partial labels), and every image's and label map's name, voxels
    and geometry (:func:`image_content_digest`) under ``imagesTr``/``labelsTr``. The same data imported or
    copied elsewhere (other paths, file times, gzip bytes) has the same fingerprint; an edited, added or removed
    case, label or geometry changes it. Each file's digest is cached by its path, size and modification time
    (``$MEDADAPT_CACHE/content-digests``), so a dataset is read once per place it lives."""
    import json

    from medadapt.utils.atomic import atomic_write_json

    root = Path(folder).resolve()
    meta = json.loads((root / "dataset.json").read_text())
    described = {k: meta[k] for k in _DATASET_JSON_KEYS if k in meta}
    h = hashlib.sha256(CONTENT_FINGERPRINT.encode() + b"\0")
    h.update(json.dumps(described, sort_keys=True).encode() + b"\0")
    annotations = root / "annotated_classes.json"
    if annotations.is_file():
        records = json.loads(annotations.read_text())
        h.update(json.dumps({k: sorted(v) for k, v in records.items()}, sort_keys=True).encode() + b"\0")
    cache_file = _content_cache(root)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    fresh: dict[str, list] = {}
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted(p for p in (root / sub).rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(root).as_posix()
            stat = path.stat()
            seen = cache.get(rel)
            if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
                digest = seen[2]
            else:
                digest = image_content_digest(path)
            fresh[rel] = [stat.st_size, stat.st_mtime_ns, digest]
            h.update(f"{rel}\0{digest}\0".encode())
    if fresh != cache:
        try:
            atomic_write_json(cache_file, fresh)
        except OSError:
            pass  # a read-only cache only costs the next call its reading
    return h.hexdigest()


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a model's weights, whatever holds them: a medadapt model folder's weight files
    (:func:`model_digest`); a file (an nnU-Net model zip, a checkpoint) as a whole; any other folder's
    ``plans.json``, ``dataset.json`` and every ``*.pth``/``*.pt`` file (an nnU-Net trained model folder: its
    plans and its folds' checkpoints)."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    if (root / "weights.pt").is_file():
        return model_digest(root)
    files = [root / n for n in ("plans.json", "dataset.json") if (root / n).is_file()]
    files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".pth", ".pt"))
    return files_digest(root, files)
