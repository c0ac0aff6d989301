"""Every random stream of a run, from the run's seed *and* the purpose the stream serves: the one helper.

A run has one seed (``--seed``; the split has its own, ``--split-seed``). Each kind of random draw gets a
stream of its own, NumPy's ``SeedSequence([seed, code, *keys])`` with ``code`` the purpose's number below and
``keys`` what the purpose counts by (epoch and iteration, task, case). So no two purposes share a stream: a
fresh head drawn by a fine-tuning run with seed s is not the initial head of a foundation pretrained with seed
s (both used to be ``torch.manual_seed(s)``), and the k shots drawn with seed s are not the first entries of
the train/test permutation of split seed s. Streams are independent of the order things are computed in
(a case's stream is keyed by its id, a batch's by its epoch and iteration), so a resumed run draws what the
uninterrupted one drew.

Runs and benchmark cells record :func:`record` (the scheme's version and every stream's seed sequence by
name), and their identities carry :data:`SCHEME`, so a folder written under another scheme is never resumed
or reused as if it were this one's.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: the version of the seeding; in run identities and benchmark cell keys
SCHEME = "medadapt-seeds/2"

#: purpose -> (the second word of its seed sequence, what it draws). The codes of the three streams that were
#: already apart before this scheme (calibration, KD buffer batches, random buffer picks) are kept.
PURPOSES: dict[str, tuple[int, str]] = {
    "network": (0x6E6574, "a new network's initial weights (pretraining; MONAI's initialisation of what an "
                          "import does not cover)"),
    "head": (0x68656164, "a fresh segmentation head (nnU-Net's or PyTorch's initialisation)"),
    "split": (0x73706C74, "the train/test split (from --split-seed)"),
    "shots": (0x73686F74, "which training cases are the k shots"),
    "batches": (0x62617463, "each training batch's patches and augmentation, by (epoch, iteration[, rank])"),
    "epoch": (0x65706F63, "torch's global generator from each epoch's start (dropout; steps that draw)"),
    "extension": (0x6578746E, "weights a strategy adds or re-initialises (adapters, LoRA factors, scratch)"),
    "drst": (0x64727374, "DGST's random selection of gradient entries (DRST), one generator per run"),
    "calibration": (0x5CA11B, "SGST's calibration patches, by case"),
    "kd-buffer": (0x6B64, "KD-based FFT's buffer batches, by step"),
    "mds": (0x6D6473, "MDS's random maskings, by (task, case)"),
    "buffer": (0x62756666, "a random buffer's picks, by task"),
    "ti": (0x7469, "transductive inference's own draws"),
}


def _word(key: Any) -> int:
    if isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, (int, np.integer)):
        if key < 0:
            raise ValueError(f"seed key {key}: must be a non-negative integer")
        return int(key)
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))
    raise TypeError(f"seed key {key!r}: an integer or a string")


def sequence(seed: int, purpose: str, *keys: Any) -> list[int]:
    """The seed sequence ``[seed, code, *keys]`` of one stream (strings as their CRC-32)."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random-stream purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r}: must be a non-negative integer")
    return [int(seed), PURPOSES[purpose][0], *(_word(k) for k in keys)]


def numpy_rng(seed: int, purpose: str, *keys: Any) -> np.random.Generator:
    """A NumPy generator on the stream (seed, purpose, keys)."""
    return np.random.default_rng(sequence(seed, purpose, *keys))


def torch_seed(seed: int, purpose: str, *keys: Any) -> int:
    """A 63-bit integer for ``torch.manual_seed`` / ``torch.Generator.manual_seed`` on the stream."""
    state = np.random.SeedSequence(sequence(seed, purpose, *keys)).generate_state(1, np.uint64)[0]
    return int(state) & (2 ** 63 - 1)


def torch_generator(seed: int, purpose: str, *keys: Any, device: "str | torch.device" = "cpu") -> torch.Generator:
    """A ``torch.Generator`` (on ``device``) seeded on the stream."""
    return torch.Generator(device=device).manual_seed(torch_seed(seed, purpose, *keys))


@contextlib.contextmanager
def torch_stream(seed: int, purpose: str, *keys: Any) -> Iterator[None]:
    """Run the block with torch's global CPU generator on the stream, restoring it afterwards (for code that
    draws from the global generator: layer constructors, ``reset_parameters``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, purpose, *keys))
        yield


def seed_global(seed: int, purpose: str, *keys: Any) -> None:
    """Set torch's global CPU generator to the stream (where the draws that follow must stay global)."""
    torch.manual_seed(torch_seed(seed, purpose, *keys))


def record(seed: int | None, split_seed: int | None = None, purposes: "tuple[str, ...] | None" = None
           ) -> dict[str, Any]:
    """What a run records of its streams: the scheme, the seeds, and each purpose's seed sequence (before its
    per-draw keys) with what it draws."""
    names = purposes or tuple(PURPOSES)
    streams = {}
    for name in names:
        base = split_seed if name == "split" else seed
        if base is None:
            continue
        streams[name] = {"sequence": sequence(base, name), "draws": PURPOSES[name][1]}
    return {"scheme": SCHEME, "seed": seed, "split_seed": split_seed, "streams": streams}
