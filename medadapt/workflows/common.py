"""Pieces shared by the workflows: cache location, run records, data preparation."""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

import medadapt


def cache_root() -> Path:
    """Where preprocessed data is cached: ``$MEDADAPT_CACHE`` or ``~/.cache/medadapt``."""
    env = os.environ.get("MEDADAPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medadapt"


def dataset_cache_dir(dataset_root: Path) -> Path:
    """Per-dataset cache folder: the dataset's name plus a hash of its absolute path."""
    root = Path(dataset_root).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return cache_root() / "preprocessed" / f"{root.name}-{digest}"


def environment() -> dict:
    """Software and machine facts recorded with every result."""
    return {
        "medadapt": medadapt.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
