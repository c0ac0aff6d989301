"""nnU-Net's own preprocessing and prediction export for models that came from nnU-Net.

A model loaded from an nnU-Net trained model folder carries its plans in ``preprocessing["nnunet"]``; for it,
:func:`medadapt.data.preprocessing.preprocess_case` and :class:`medadapt.inference.Predictor` hand each case
to nnunetv2's code instead of medadapt's re-implementation:

* :func:`preprocess_case`: the configuration's preprocessor (``DefaultPreprocessor.run_case_npy``):
  transpose_forward, crop to the nonzero region, normalization with the plans' scheme and stored foreground
  intensity properties, resampling with the plans' resampling functions;
* :func:`revert_logits`: ``convert_predicted_logits_to_segmentation_with_correct_shape``: logits resampled
  with the plans' ``resampling_fn_probabilities``, argmax, crop reverted, transpose_backward.

Images come from medadapt's NIfTI reader: (z, y, x) arrays = the file's voxel axes reversed, spacing in the
same order, which is what nnU-Net's ``SimpleITKIO`` and ``NibabelIO`` readers return, so the arrays nnU-Net's
code sees are the ones nnU-Net's own pipeline would read.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from medadapt.errors import MedadaptError

#: readers whose arrays equal medadapt's (z, y, x) NIfTI arrays; NibabelIOWithReorient reorients to RAS first
SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO")


def _managers(nnunet: dict[str, Any], labels: dict[str, int] | None = None):
    from medadapt.nnunet.env import import_nnunet, quiet

    handler = import_nnunet("nnunetv2.utilities.plans_handling.plans_handler")
    with quiet():
        pm = handler.PlansManager(nnunet["plans"])
        cm = pm.get_configuration(nnunet["configuration"])
        dataset_json = {"labels": labels or {"background": 0}, "channel_names": {}}
        lm = pm.get_label_manager(dataset_json)
    return pm, cm, lm, dataset_json


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def preprocess_case(images: Sequence, label, plan):
    """nnU-Net's preprocessing of one case (medadapt :class:`Volume` s) -> medadapt ``PreprocessedCase``."""
    from medadapt.data.dataset import validate_geometry
    from medadapt.data.preprocessing import PreprocessedCase
    from medadapt.nnunet.env import quiet

    info = plan.nnunet
    if len(images) != len(plan.normalization):
        where = images[0].path if images and images[0].path is not None else "input"
        raise MedadaptError(f"{where}: {len(images)} channel image(s) but the model's nnU-Net plans expect "
                            f"{len(plan.normalization)}; give one file per channel (_0000, _0001, ...)")
    validate_geometry(list(images), label)
    ref = images[0]
    data = np.stack([np.asarray(v.array, dtype=np.float32) for v in images])
    seg = None
    labels = None
    if label is not None:
        lab = np.asarray(label.array)
        seg = lab[None].astype(np.int16, copy=False)
        labels = {"background": 0, **{f"label_{int(v)}": int(v) for v in np.unique(lab) if v != 0}}
    pm, cm, _, dataset_json = _managers(info, labels)
    properties = {"spacing": [float(s) for s in ref.spacing]}
    preprocessor = cm.preprocessor_class(verbose=False)
    with quiet():
        data, seg, properties = preprocessor.run_case_npy(data, seg, properties, pm, cm, dataset_json)
    properties.pop("class_locations", None)  # medadapt's cache samples its own
    out_seg = None
    if label is not None:  # (without a label, nnU-Net returns its nonzero mask as seg: not needed)
        out_seg = np.asarray(seg[0], dtype=np.int16).copy()
        out_seg[out_seg < 0] = 0  # nnU-Net marks background outside the nonzero mask -1; its trainer maps it to 0
    props = {
        "nnunet": _jsonable(properties),
        "original_shape": [int(s) for s in ref.array.shape],
        "original_spacing": [float(s) for s in ref.spacing],
        "original_affine": np.asarray(ref.affine, float).tolist(),
        "target_spacing": [float(s) for s in cm.spacing],
        "resampled_shape": [int(s) for s in data.shape[1:]],
    }
    return PreprocessedCase(data=np.ascontiguousarray(data, dtype=np.float32), seg=out_seg, properties=props)


def revert_logits(logits: torch.Tensor, properties: dict[str, Any], plan, labels: dict[str, int]) -> np.ndarray:
    """Logits [K, z, y, x] on the preprocessed grid -> int16 label map in the original file's geometry,
    with nnU-Net's own export code (what ``nnUNetPredictor`` does with its logits)."""
    from medadapt.nnunet.env import import_nnunet

    export = import_nnunet("nnunetv2.inference.export_prediction")
    pm, cm, lm, _ = _managers(plan.nnunet, labels)
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    seg = export.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.float().cpu(), pm, cm, lm, dict(properties["nnunet"]), return_probabilities=False,
        num_threads_torch=torch.get_num_threads())
    seg = np.ascontiguousarray(np.asarray(seg), dtype=np.int16)
    expected = tuple(int(s) for s in properties["original_shape"])
    if tuple(seg.shape) != expected:  # pragma: no cover - would be a bug
        raise RuntimeError(f"reverted prediction has shape {seg.shape}, expected {expected}")
    return seg
