"""Data: NIfTI I/O, nnU-Net v2 raw datasets, preprocessing, splits, patch sampling and augmentation.

Names are imported lazily so that ``import medadapt.data.io`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Volume": "io", "read_image": "io", "read_label": "io", "write_volume": "io", "write_label": "io",
    "RawDataset": "dataset", "find_images": "dataset",
    "IntensityProperties": "preprocessing", "PreprocessingPlan": "preprocessing", "PreprocessedCase": "preprocessing",
    "CachedCase": "cache", "compute_intensity_properties": "preprocessing", "normalize": "preprocessing",
    "resample": "resampling", "resample_to_shape": "resampling", "plan_from_dataset": "preprocessing",
    "preprocess_case": "preprocessing", "revert_prediction": "preprocessing", "preprocess_dataset": "cache",
    "train_test_split": "splits", "draw_shots": "splits",
    "PatchSampler": "sampling", "Augmentation": "augmentation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
