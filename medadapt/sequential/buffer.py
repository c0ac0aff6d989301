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
from a generator seeded by (seed, task, case), so scores are reproducible and independent of the order cases
are scored in.

The selection is recorded in the run folder (``buffer.json``): each case's task, id and score, R, K, the rule.
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medadapt.data.sampling import crop_with_padding
from medadapt.errors import MedadaptError

SELECTIONS = ("none", "random", "mds")


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


def _case_seed(seed: int, task: str, case: str) -> int:
    return (int(seed) * 0x9E3779B1 + zlib.crc32(f"{task}/{case}".encode())) % (2 ** 63)


def mds_scores(pretext, cases: Sequence[Any], task: str, patch: Sequence[int], repeats: int, seed: int = 0,
               batch: int = 8, device: "str | torch.device" = "cpu", progress: bool = True) -> dict[str, float]:
    """Each case's pretext loss under the foundation's ``pretext`` model (:func:`medadapt.ssl.load_pretext`),
    averaged over ``repeats`` random maskings (module docstring); ``{case_id: score}``."""
    if repeats < 1:
        raise MedadaptError(f"--mds-repeats {repeats}: must be at least 1")
    scores = {}
    for case in tqdm(cases, desc=f"MDS {task}", disable=not progress, unit="case", leave=False):
        tiles = case_tiles(case, patch).to(device)
        generator = torch.Generator(device=tiles.device).manual_seed(_case_seed(seed, task, case.case_id))
        total = 0.0
        for _ in range(repeats):
            losses = [pretext.sample_losses(tiles[i:i + batch], generator) for i in range(0, len(tiles), batch)]
            total += float(torch.cat(losses).mean())
        scores[case.case_id] = total / repeats
    return scores


def lowest(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` case ids with the lowest scores (ties broken by case id)."""
    return [c for c, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


def random_pick(case_ids: Sequence[str], k: int, seed: int, task_index: int) -> list[str]:
    """``k`` case ids drawn uniformly without replacement, seeded by (seed, task index)."""
    rng = np.random.default_rng([int(seed), 0x62756666, int(task_index)])
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
