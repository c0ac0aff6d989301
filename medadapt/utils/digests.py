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


def dataset_fingerprint(folder: str | Path) -> str:
    """A real dataset's fingerprint without reading its images: ``dataset.json``'s bytes and every file's name,
    size and modification time under ``imagesTr``/``labelsTr`` (an edited, added or removed case changes it;
    copying the folder elsewhere with its times kept does not)."""
    root = Path(folder)
    h = hashlib.sha256((root / "dataset.json").read_bytes())
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted(p for p in (root / sub).rglob("*") if p.is_file() and not p.name.startswith(".")):
            stat = path.stat()
            h.update(f"\0{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
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
