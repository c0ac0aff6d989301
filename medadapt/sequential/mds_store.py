"""MDS losses computed once per input: a content-addressed store of :func:`medadapt.sequential.buffer.mds_losses`.

Every sequential run with an MDS buffer scores a task's training cases with the *foundation* M_0 (not with the
stream's model), so two runs that share the foundation, the task's cases, R and the seed get the same losses:
``bench medseqft``'s "Seq. FT + MDS" and MedSeqFT rows did this work twice per seed (~4.5 min per task on one
CPU thread at R = 64). The store keeps each result under the digest of everything it depends on: the pretext
network (architecture, masking, weights), each case's id and voxels, the task name (it keys the mask draws),
the patch, R, the seed, the device, torch's version and its thread count (which can change a float's last bits),
so a hit returns exactly the losses a new computation would. It also keeps the seconds the computation took:
a run that reuses a result records that cost as its buffer selection's (Table VII counts what the method costs,
not what the cache saved).

Files: ``<cache>/mds/<digest>.json`` (:func:`medadapt.workflows.common.cache_root`), written atomically; two runs
racing both compute and write the same content. A file that cannot be read is computed again.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medadapt.sequential.buffer import mds_losses
from medadapt.utils.atomic import atomic_write_json
from medadapt.utils.digests import update_with_state_dict

FORMAT = "medadapt-mds-losses/1"


def mds_digest(pretext, cases: Sequence[Any], task: str, patch: Sequence[int], repeats: int, seed: int) -> str:
    """The digest of everything :func:`mds_losses` reads for these arguments (module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "task": task, "patch": [int(p) for p in patch], "repeats": int(repeats),
                         "seed": int(seed), "objective": pretext.objective, "mask": repr(pretext.mask),
                         "network": pretext.spec.to_dict(), "device": str(pretext.device), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}, sort_keys=True).encode())
    update_with_state_dict(h, pretext.network.state_dict())
    for case in cases:
        data = np.ascontiguousarray(case.data)
        h.update(json.dumps([case.case_id, str(data.dtype), list(data.shape),
                             np.asarray(case.channel_min).tolist()]).encode())
        h.update(data.view(np.uint8).tobytes())
    return h.hexdigest()


def stored_mds_losses(pretext, cases: Sequence[Any], task: str, patch: Sequence[int], repeats: int, seed: int,
                      store: Path, progress: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """:func:`mds_losses` of these arguments, from ``store`` when it holds them (computed and stored otherwise),
    and the seconds the computation took (then or now)."""
    path = Path(store) / f"{mds_digest(pretext, cases, task, patch, repeats, seed)}.json"
    found = _read(path)
    if found is not None:
        return found
    t0 = time.perf_counter()
    losses = mds_losses(pretext, cases, task, patch, repeats, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    atomic_write_json(path, {"format": FORMAT, "task": task, "repeats": repeats, "seed": seed, "seconds": seconds,
                             "losses": {c: v.tolist() for c, v in losses.items()}})
    return losses, seconds


def _read(path: Path) -> tuple[dict[str, np.ndarray], float] | None:
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            return None
        return ({c: np.asarray(v, dtype=np.float64) for c, v in record["losses"].items()},
                float(record["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
