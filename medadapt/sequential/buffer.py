"""The replay buffer of sequential fine-tuning: MedSeqFT's Maximum Data Similarity selection (Sec. III-C).

After task t, K of its training cases join the buffer, which grows task by task; the next tasks' knowledge
distillation runs the encoders on them. MDS picks the K cases "most similar to the pre-training distribution":
every training case goes through the *foundation* M_0 with its self-supervised pretext head, its pretext loss
is averaged over R random maskings (the paper: 1000), and the K lowest go in. ``random`` (the paper's
ablation) draws K cases uniformly instead.

A case's pretext loss for one masking (decided here, the paper says "pass all training samples through M_0"):
the preprocessed volume is cut into patch-sized tiles that cover it (the last tile of an axis is shifted back
inside; a volume smaller than the patch is padded with its channel minimum, like the training sampler), each
tile gets an independent random masking, and the case's loss is the mean of its tiles' losses. So the score
looks at the whole volume, at the resolution and patch size the foundation was trained on. Mask draws come
from the case's own stream (``mds`` of :mod:`medadapt.utils.seeds`, keyed by task and case), so scores are
reproducible and independent of the order cases are scored in. Many maskings of a case share one forward pass
(:func:`mds_losses`), and :func:`buffer_stability` measures from one run at a large R how the buffer changes
with R (the first R maskings of a run are a run at R), so R can be set where the buffer stops changing.

The selection is recorded in the run folder (``buffer.json``): each case's task, id and score, R, K, the rule.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medadapt.data.sampling import crop_with_padding
from medadapt.errors import MedadaptError
from medadapt.utils import seeds

SELECTIONS = ("none", "random", "mds")
#: voxels per MDS forward pass when no batch is given: 64 tiles of 16 x 32 x 32, one of nnU-Net's 3d_fullres
MDS_BATCH_VOXELS = 2 ** 20


@dataclasses.dataclass(frozen=True)
class BufferEntry:
    task: str
    case: str
    score: float | None  #: the mean pretext loss (MDS), None for a random pick


def tile_starts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, ...]]:
    """Start corners of patch-sized tiles covering a volume of ``shape`` (a volume smaller than the patch on an
    axis gets one tile centred on it; otherwise the last tile is shifted back inside the volume)."""
    per_axis = []
    for n, p in zip(shape, patch):
        if n <= p:
            per_axis.append([(n - p) // 2])
            continue
        starts = list(range(0, n - p + 1, p))
        if starts[-1] + p < n:
            starts.append(n - p)
        per_axis.append(starts)
    return list(itertools.product(*per_axis))


def case_tiles(case, patch: Sequence[int]) -> torch.Tensor:
    """The tiles of a cached case's image, ``[n_tiles, C, *patch]`` (float32)."""
    data = np.asarray(case.data)
    pad = np.asarray(case.channel_min, dtype=data.dtype)
    tiles = [crop_with_padding(data, s, patch, pad) for s in tile_starts(data.shape[1:], patch)]
    return torch.from_numpy(np.stack(tiles).astype(np.float32, copy=False))



def mds_losses(pretext, cases: Sequence[Any], task: str, patch: Sequence[int], repeats: int, seed: int = 0,
               batch: int | None = None, device: "str | torch.device" = "cpu", progress: bool = True
               ) -> dict[str, np.ndarray]:
    """Each case's pretext loss for each of ``repeats`` random maskings, ``{case_id: float64 [repeats]}`` (a
    masking's loss: the mean over the case's tiles, module docstring).

    Batched: the (masking, tile) pairs of a case, masking-major, go through the network ``batch`` at a time,
    so many maskings share one forward pass (a case with a few tiles no longer runs a small batch per
    masking); ``batch=None``: as many as hold :data:`MDS_BATCH_VOXELS` voxels (at least 1, at most 64). Masks are drawn per sample in that order from the case's own stream (``mds``, keyed by task and
    case), so the draws do not depend on ``batch``, and the first R maskings of a longer run are exactly a run
    with ``repeats = R`` (what :func:`buffer_stability` uses)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MedadaptError(f"--mds-repeats {repeats!r}: must be a positive integer")
    if batch is None:
        batch = max(1, min(64, MDS_BATCH_VOXELS // max(1, int(np.prod(patch)))))
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MedadaptError(f"MDS batch {batch!r}: must be a positive integer")
    out: dict[str, np.ndarray] = {}
    for case in tqdm(cases, desc=f"MDS {task}", disable=not progress, unit="case", leave=False):
        tiles = case_tiles(case, patch).to(device)
        n = len(tiles)
        generator = seeds.torch_generator(seed, "mds", f"{task}/{case.case_id}", device=tiles.device)
        pairs = repeats * n
        losses = []
        for start in range(0, pairs, batch):
            index = torch.arange(start, min(start + batch, pairs), device=tiles.device) % n
            losses.append(pretext.sample_losses(tiles[index], generator).double().cpu())
        out[case.case_id] = torch.cat(losses).view(repeats, n).mean(dim=1).numpy()
    return out


def mds_scores(pretext, cases: Sequence[Any], task: str, patch: Sequence[int], repeats: int, seed: int = 0,
               batch: int | None = None, device: "str | torch.device" = "cpu", progress: bool = True
               ) -> dict[str, float]:
    """Each case's pretext loss under the foundation's ``pretext`` model (:func:`medadapt.ssl.load_pretext`),
    averaged over ``repeats`` random maskings (module docstring, :func:`mds_losses`); ``{case_id: score}``."""
    losses = mds_losses(pretext, cases, task, patch, repeats, seed=seed, batch=batch, device=device,
                        progress=progress)
    return {c: float(v.mean()) for c, v in losses.items()}


def buffer_stability(losses: dict[str, np.ndarray], k: int, repeats: Sequence[int] | None = None
                     ) -> list[dict[str, Any]]:
    """How the K-case MDS buffer changes with the number of maskings R: for each R (default: powers of two up
    to the number measured, and that number), the buffer from the first R maskings of every case, its overlap
    with the buffer of all maskings, its Spearman correlation with the full ranking, and whether it equals the
    buffer of every larger R listed (``settled``). ``losses``: :func:`mds_losses`'s output."""
    from scipy.stats import spearmanr

    if not losses:
        raise MedadaptError("MDS stability: no cases were scored")
    total = min(len(v) for v in losses.values())
    if repeats is None:
        repeats = sorted({*(2 ** i for i in range(total.bit_length()) if 2 ** i <= total), total})
    repeats = [int(r) for r in repeats if 1 <= int(r) <= total]
    ids = sorted(losses)
    full = {c: float(losses[c][:total].mean()) for c in ids}
    final = set(lowest(full, k))
    rows = []
    for r in repeats:
        scores = {c: float(losses[c][:r].mean()) for c in ids}
        picked = lowest(scores, k)
        rho = spearmanr([full[c] for c in ids], [scores[c] for c in ids]).correlation if len(ids) > 2 else None
        rows.append({"repeats": r, "buffer": picked, "shared_with_final": len(final & set(picked)),
                     "spearman_with_final": None if rho is None or rho != rho else float(rho)})
    for i, row in enumerate(rows):
        row["settled"] = all(set(later["buffer"]) == set(row["buffer"]) for later in rows[i:])
    return rows


def settled_repeats(rows: Sequence[dict[str, Any]]) -> int | None:
    """The smallest R of :func:`buffer_stability`'s rows from which the buffer no longer changes (None if only
    the largest R measured has it, i.e. it had not settled within the measurement)."""
    settled = [r["repeats"] for r in rows if r["settled"]]
    if not settled or (len(rows) > 1 and settled == [rows[-1]["repeats"]]):
        return None
    return settled[0]


def lowest(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` case ids with the lowest scores (ties broken by case id)."""
    return [c for c, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


def random_pick(case_ids: Sequence[str], k: int, seed: int, task_index: int) -> list[str]:
    """``k`` case ids drawn uniformly without replacement, seeded by (seed, task index)."""
    rng = seeds.numpy_rng(seed, "buffer", int(task_index))
    ids = sorted(case_ids)
    return sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))


def check_buffer_size(k: int, available: int, task: str) -> None:
    if k < 1:
        raise MedadaptError(f"--buffer-size {k}: must be at least 1")
    if k > available:
        raise MedadaptError(f"--buffer-size {k}: task {task!r} has only {available} training case(s); use "
                            f"--buffer-size {available} or less")


def buffer_record(entries: Sequence[BufferEntry], selection: str, size: int, repeats: int | None,
                  seed: int) -> dict[str, Any]:
    return {"selection": selection, "size_per_task": size, "repeats": repeats, "seed": seed,
            "entries": [dataclasses.asdict(e) for e in entries]}
