"""Loading checkpoints without running their code.

A ``.pth`` file is a pickle: unpickling with ``weights_only=False`` runs whatever code the file names, so a
foundation model downloaded from elsewhere could run anything on the planning workstation. Every checkpoint
medadapt reads goes through :func:`load`: ``torch.load(weights_only=True)`` (tensors and plain containers only)
with an allow-list of the numpy data types that nnU-Net's and MONAI's checkpoints hold in their metadata. A file
that names any other global is refused with one line naming it; ``--trust-model`` (:func:`trusting`) lets a
user who trusts the file load it as nnU-Net itself does (``weights_only=False``).
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from medadapt.errors import MedadaptError

_TRUST = [False]


def numpy_safe_globals() -> list:
    """The numpy objects a checkpoint's metadata holds (nnU-Net's plans and MONAI's ``best_acc`` hold numpy
    scalars and arrays): data, never code, so ``weights_only=True`` may rebuild them."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / < 2
    multiarray = core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                          np.int8, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)]
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


@contextlib.contextmanager
def trusting(trust: bool = True) -> Iterator[None]:
    """Within this block :func:`load` unpickles any object (the ``--trust-model`` opt-in)."""
    before = _TRUST[0]
    _TRUST[0] = bool(trust)
    try:
        yield
    finally:
        _TRUST[0] = before


def set_trust(trust: bool) -> None:
    """For the command line: ``--trust-model`` for the rest of the process."""
    _TRUST[0] = bool(trust)


def load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load`` of ``path`` on the CPU without running code from it (unless trusted); one-line errors."""
    path = Path(path)
    try:
        if _TRUST[0]:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        name = unsafe.group(1) if unsafe else None
        if name is None:  # not a pickle torch can read at all
            raise MedadaptError(f"{path}: not a readable {what} ({_first_line(exc)})") from None
        raise MedadaptError(
            f"{path}: the {what} holds a Python object ({name}) that loading it would run as "
            "code; medadapt loads tensors and plain data only. If you trust where the file comes from, pass "
            "--trust-model") from None
    except FileNotFoundError:
        raise MedadaptError(f"{path}: no such {what} file") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line
        raise MedadaptError(f"{path}: not a readable {what} ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
