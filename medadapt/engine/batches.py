"""Training batches, drawn in the training process or in background worker processes.

Batch ``i`` of a run (``i = epoch * iterations_per_epoch + iteration``) is ``sampler.sample(rng_i)`` with
``rng_i`` a NumPy generator on the ``batches`` stream of (seed, epoch, iteration[, rank]) alone
(:func:`batch_seed`, :mod:`medadapt.utils.seeds`). So a
batch's randomness depends only on the seed, the rank and the iteration: the same run sees the same batches
with 0, 1 or 8 workers, and a run resumed at an epoch boundary sees the batches the uninterrupted run would
have seen. A sampler must draw all its randomness from the generator it is given (medadapt's samplers do).

With ``workers > 0`` the batches come from a ``torch.utils.data.DataLoader`` over the run's remaining batch
indices (``batch_size=None``: the sampler makes whole batches, as nnU-Net's data loader does), which keeps the
workers' results in order and prefetches ``prefetch`` batches per worker, pinned on CUDA. Workers are forked
on Linux, so the sampler (and its memory-mapped cases) is shared, not pickled.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from medadapt.errors import MedadaptError
from medadapt.utils import seeds


def batch_seed(seed: int, epoch: int, iteration: int, rank: int | None = None) -> list[int]:
    """The seed sequence of one batch's generator (the ``batches`` stream)."""
    return seeds.sequence(seed, "batches", int(epoch), int(iteration), *([int(rank)] if rank is not None else []))


def default_workers() -> int:
    """``--workers auto``: one worker per CPU core available to this process but one (the training process),
    at most 8 (nnU-Net's background augmentation uses a similar number per GPU); 0 on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def check_workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise MedadaptError(f"--workers {workers!r}: must be a non-negative integer (0: draw batches in the "
                            "training process) or auto")
    return workers


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of the run, by index (see the module docstring)."""

    def __init__(self, sampler, seed: int, iterations_per_epoch: int, rank: int | None):
        self.sampler = sampler
        self.seed = seed
        self.iterations_per_epoch = iterations_per_epoch
        self.rank = rank

    def __getitem__(self, index: int) -> dict:
        epoch, iteration = divmod(int(index), self.iterations_per_epoch)
        rng = np.random.default_rng(batch_seed(self.seed, epoch, iteration, self.rank))
        return self.sampler.sample(rng)

    def __len__(self) -> int:  # not used: the indices come from the DataLoader's sampler
        raise TypeError("_Batches has no length; iterate it through batch_stream")


def batch_stream(sampler, seed: int, iterations_per_epoch: int, start: int, stop: int, workers: int = 0,
                 rank: int | None = None, pin_memory: bool = False, prefetch: int = 2) -> Iterator[dict]:
    """Batches ``start`` .. ``stop - 1`` of a run, in order, drawn in ``workers`` background processes
    (0: here, one at a time, when asked for)."""
    dataset = _Batches(sampler, seed, iterations_per_epoch, rank)
    if workers == 0:
        return (dataset[i] for i in range(start, stop))
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=workers,
                                         pin_memory=pin_memory, prefetch_factor=prefetch,
                                         multiprocessing_context=context, persistent_workers=False)
    return iter(loader)
