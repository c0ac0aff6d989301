"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A killed process therefore leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz``) so writers that infer
    the format from the file name keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically, the same bytes for the same object wherever it is written.

    Saved to a path, torch names the archive's records after the file (``<stem>/data.pkl``), here the random
    temporary name: identical weights saved twice would differ in bytes (and in any file digest). Saved to an open
    file, the records are ``archive/...`` whatever the name."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_new_folder(out: str | os.PathLike, option: str = "--out") -> None:
    """``out`` may become a new folder: absent or empty (one line otherwise)."""
    from medadapt.errors import MedadaptError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedadaptError(f"{option} {out}: exists and is not empty; choose a new dataset folder (or remove it)")


@contextlib.contextmanager
def new_folder(out: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Build the new folder ``out`` whole or not at all: yields a temporary folder beside it (with the mode a
    plain ``mkdir`` gives under the umask, not mkdtemp's 0700), renamed to ``out`` when the block ends; removed
    on any error, so an interrupted or refused run leaves nothing. ``out`` must be absent or empty, when the
    block starts and when it ends."""
    out = Path(out)
    check_new_folder(out, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        check_new_folder(out, option)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
