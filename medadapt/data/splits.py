"""Deterministic train/test splits and nested few-shot draws.

Both depend only on the *sorted* case ids and the seed, never on file-system order, so a run can be
reproduced anywhere from its seed. Each has its own random stream (:mod:`medadapt.utils.seeds`: ``split`` from
the split seed, ``shots`` from the run's seed), so a split seed and a run seed of the same value do not draw
the same permutation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from medadapt.errors import MedadaptError
from medadapt.utils import seeds


def _sorted_unique(case_ids: Sequence[str], what: str) -> list[str]:
    ids = sorted(str(c) for c in case_ids)
    dupes = sorted({c for i, c in enumerate(ids) if i and ids[i - 1] == c})
    if dupes:
        raise MedadaptError(f"{what}: case ids {dupes[:5]} appear more than once; give each case once")
    return ids


def train_test_split(case_ids: Sequence[str], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split case ids into (train, test), both sorted.

    The test set has round(test_fraction * N) cases (half rounds up), at least 1 when N >= 2 and
    test_fraction > 0, and never all of them; which cases is a seeded permutation of the sorted ids.
    """
    if not 0.0 <= float(test_fraction) < 1.0:
        raise MedadaptError(f"test_fraction: {test_fraction} is outside [0, 1); use e.g. 0.2 for an 80/20 split")
    ids = _sorted_unique(case_ids, "train_test_split")
    n = len(ids)
    n_test = int(math.floor(test_fraction * n + 0.5))
    if n >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = 0
    perm = seeds.numpy_rng(seed, "split").permutation(n)
    test_idx = set(int(i) for i in perm[:n_test])
    train = [c for i, c in enumerate(ids) if i not in test_idx]
    test = [c for i, c in enumerate(ids) if i in test_idx]
    return train, test


def draw_shots(train_ids: Sequence[str], k: int, seed: int) -> list[str]:
    """The k annotated cases of a k-shot run: the first k of a seeded permutation of the sorted train ids.

    Draws are nested for one seed (the 3-shot cases are the first 3 of the 5-shot cases, and so on).
    """
    ids = _sorted_unique(train_ids, "draw_shots")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise MedadaptError(f"--shots: {k!r} is not an integer; give the number of annotated training cases")
    k = int(k)
    if k < 1 or k > len(ids):
        if not ids:
            raise MedadaptError(f"--shots: {k} requested but the train split is empty; add labelled cases")
        raise MedadaptError(f"--shots: {k} is outside 1..{len(ids)} (the train split has {len(ids)} cases); "
                            f"choose --shots between 1 and {len(ids)} or add labelled cases")
    perm = seeds.numpy_rng(seed, "shots").permutation(len(ids))
    return [ids[int(i)] for i in perm[:k]]
