"""Pieces shared by the workflows: cache location, run records, data preparation."""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import medadapt
from medadapt.errors import MedadaptError
from medadapt.utils.digests import update_with_state_dict
from medadapt.utils.environ import cache_root  # noqa: F401  (the cache's root, where it always was)


def dataset_cache_dir(dataset_root: Path) -> Path:
    """Per-dataset cache folder: the dataset's name plus a hash of its absolute path."""
    root = Path(dataset_root).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return cache_root() / "preprocessed" / f"{root.name}-{digest}"


def environment() -> dict:
    """Software and machine facts recorded with every result."""
    return {
        "medadapt": medadapt.__version__,
        "medadapt_commit": source_commit(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        # the instruction set PyTorch's CPU kernels dispatch to (AVX2, AVX512, ...): float results are
        # reproducible bit for bit only where it is the same (BENCHMARKS.md, MedSeqFT's Table VII on idle cores)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit medadapt runs from (``+dirty`` if its tracked files differ), or None outside a checkout.

    The version number alone does not tell which code made a stored result (a benchmark cell, a foundation
    model), and finished results are reused across code changes."""
    src = Path(medadapt.__file__).resolve().parent.parent
    try:
        if Path(_git(src, "rev-parse", "--show-toplevel")).resolve() != src:
            return None  # installed into a folder of some other repository
        commit = _git(src, "rev-parse", "HEAD")
        dirty = _git(src, "status", "--porcelain", "--untracked-files=no", "--", "medadapt")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def model_fingerprint(folder, state: dict[str, torch.Tensor]) -> str:
    """SHA-1 of a model folder's network (architecture, extensions) and its weights ``state`` (the folder's
    loaded state dict): which foundation a run started from, whatever path it was found under."""
    digest = hashlib.sha1(json.dumps([folder.network.to_dict(), folder.extensions], sort_keys=True).encode())
    update_with_state_dict(digest, state)
    return digest.hexdigest()[:16]


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_datasets(data) -> list:
    """The datasets a pretraining run reads (one path or several): loaded and validated, each given once, with
    distinct names (model folders record which dataset is which by name)."""
    from medadapt.data.dataset import RawDataset

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise MedadaptError("--data: give at least one dataset")
    datasets = [RawDataset.load(p) for p in paths]
    roots = [ds.root.resolve() for ds in datasets]
    if len(set(roots)) != len(roots):
        raise MedadaptError(f"--data: a dataset is given twice ({[str(p) for p in paths]}); give each once")
    names = [ds.name for ds in datasets]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MedadaptError(f"--data: several datasets are named {dup} in their dataset.json; give them distinct "
                            "\"name\"s (the model folder records which dataset annotates what by name)")
    return datasets
