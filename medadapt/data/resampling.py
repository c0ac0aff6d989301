"""Resampling to a target spacing, as nnU-Net v2 does it.

Images: cubic B-spline (order 3); along an anisotropic low-resolution axis (spacing ratio > 3) in-plane cubic
and nearest along that axis (nnU-Net's ``resample_data_or_seg`` rule). Labels: one-hot masks interpolated
linearly, then argmax (nearest along an anisotropic axis). Probabilities: trilinear (``resample_to_shape``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANISO_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD: a spacing ratio above this makes an axis "low resolution"

def new_shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's rule: round(old_shape * spacing / target_spacing), at least 1 voxel."""
    return tuple(max(1, int(round(s * sp / tsp))) for s, sp, tsp in zip(shape, spacing, target_spacing))


def _lowres_axis(spacing: Sequence[float]) -> int | None:
    """The single anisotropic axis per nnU-Net (max/min spacing > 3 and a unique largest spacing), else None."""
    sp = np.asarray(spacing, float)
    if sp.max() / sp.min() <= ANISO_THRESHOLD:
        return None
    axes = np.where(sp.max() / sp == 1)[0]
    return int(axes[0]) if len(axes) == 1 else None


def separate_axis(spacing: Sequence[float], target_spacing: Sequence[float]) -> int | None:
    axis = _lowres_axis(spacing)
    if axis is not None:
        return axis
    sp = np.asarray(spacing, float)
    if sp.max() / sp.min() > ANISO_THRESHOLD:  # anisotropic but no unique low-res axis: nnU-Net goes 3D
        return None
    return _lowres_axis(target_spacing)


def _zoom_cubic(array: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Cubic B-spline resize with pixel-area alignment (like skimage.transform.resize, order 3, mode edge).

    Axes whose length does not change are split off and looped over (per slice / per row): the tensor-product
    spline is the identity along them, so the result is the same, several times faster.
    """
    new_shape = tuple(int(s) for s in new_shape)
    same = [i for i in range(array.ndim) if array.shape[i] == new_shape[i]]
    if 0 < len(same) < array.ndim and array.ndim == 3:
        changed = [i for i in range(3) if i not in same]
        moved = np.moveaxis(array, same + changed, [0, 1, 2])
        target = tuple(new_shape[i] for i in changed)
        if len(same) == 1:
            out = np.stack([_zoom_cubic(sl, target) for sl in moved])
        else:  # one changing axis: zoom the (rows, length) array, identity along the rows
            rows = moved.reshape(-1, moved.shape[2])
            out = _zoom_cubic(rows, (rows.shape[0], target[0])).reshape(moved.shape[0], moved.shape[1], target[0])
        return np.ascontiguousarray(np.moveaxis(out, [0, 1, 2], same + changed))
    if tuple(array.shape) == new_shape:
        return np.asarray(array, dtype=np.float32).copy()
    factors = [n / o for n, o in zip(new_shape, array.shape)]
    out = ndimage.zoom(array, factors, order=3, mode="nearest", grid_mode=True, output=np.float32, prefilter=True)
    if tuple(out.shape) != tuple(new_shape):  # pragma: no cover - guarded by scipy's own rounding
        raise RuntimeError(f"resize produced {out.shape}, expected {tuple(new_shape)}")
    return out


def _nearest_along(array: np.ndarray, axis: int, new_len: int) -> np.ndarray:
    """Nearest-neighbour resize along one axis, pixel-centre aligned (nnU-Net's order_z = 0)."""
    old_len = array.shape[axis]
    if new_len == old_len:
        return array
    idx = np.floor((np.arange(new_len) + 0.5) * (old_len / new_len)).astype(np.int64)
    return np.take(array, np.clip(idx, 0, old_len - 1), axis=axis)


def resample_image_to_shape(array: np.ndarray, new_shape: Sequence[int], axis: int | None) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(array.shape) == new_shape:
        return array.copy()
    if axis is None:
        return _zoom_cubic(array, new_shape)
    # in-plane cubic, slice by slice along the low-res axis, then nearest along it
    moved = np.moveaxis(array, axis, 0)
    plane = tuple(s for i, s in enumerate(new_shape) if i != axis)
    if tuple(moved.shape[1:]) != plane:
        moved = np.stack([_zoom_cubic(sl, plane) for sl in moved])
    moved = _nearest_along(moved, 0, new_shape[axis])
    return np.ascontiguousarray(np.moveaxis(moved, 0, axis))


def _interp_mask(mask: np.ndarray, new_shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """Linear interpolation of one binary mask (nearest along ``axis`` if given), pixel-area aligned."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    if axis is None:
        return F.interpolate(t[None, None], size=new_shape, mode="trilinear", align_corners=False)[0, 0]
    t = t.movedim(axis, 0)
    plane = tuple(s for i, s in enumerate(new_shape) if i != axis)
    if tuple(t.shape[1:]) != plane:
        t = F.interpolate(t[:, None], size=plane, mode="bilinear", align_corners=False)[:, 0]
    if t.shape[0] != new_shape[axis]:
        idx = torch.from_numpy(np.clip(np.floor((np.arange(new_shape[axis]) + 0.5) * (t.shape[0] / new_shape[axis])),
                                       0, t.shape[0] - 1).astype(np.int64))
        t = t.index_select(0, idx)
    return t.movedim(0, axis)


def resample_label_to_shape(label: np.ndarray, new_shape: Sequence[int], axis: int | None) -> np.ndarray:
    label = np.asarray(label)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(label.shape) == new_shape:
        return label.copy()
    values = np.unique(label)
    if len(values) == 1:
        return np.full(new_shape, values[0], dtype=label.dtype)
    best = None
    out = torch.zeros(new_shape, dtype=torch.int64)
    for v in values:  # running argmax over one-hot channels: memory stays at two float volumes
        p = _interp_mask(label == v, new_shape, axis)
        if best is None:
            best = p
            out.fill_(int(v))
        else:
            better = p > best
            out[better] = int(v)
            best = torch.maximum(best, p)
    return out.numpy().astype(label.dtype)


def resample(array: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], is_label: bool) -> np.ndarray:
    """Resample a (z, y, x) array from ``spacing`` to ``target_spacing`` (mm, same order).

    New shape = round(old_shape * spacing / target_spacing). Images: cubic B-spline (order 3); if the spacing is
    anisotropic (max/min > 3) in-plane cubic and nearest along the low-resolution axis (nnU-Net). Labels: each
    label's one-hot mask is interpolated linearly (nearest along an anisotropic axis) and the argmax is kept.
    Returns float32 for images, the input dtype for labels.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"resample expects a 3D (z, y, x) array, got shape {array.shape}")
    new_shape = new_shape_for_spacing(array.shape, spacing, target_spacing)
    axis = separate_axis(spacing, target_spacing)
    if is_label:
        return resample_label_to_shape(array, new_shape, axis)
    return resample_image_to_shape(array, new_shape, axis)


def resample_to_shape(array, shape: Sequence[int]):
    """Trilinear resize of a channel-first array/tensor ``[C, z, y, x]`` to spatial ``shape`` (pixel-area aligned).

    Used for probabilities/logits. Returns the same kind (numpy or torch, same device) as the input; integer
    inputs come back as float32.
    """
    shape = tuple(int(s) for s in shape)
    is_np = isinstance(array, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(array)) if is_np else array
    if t.ndim != 4:
        raise ValueError(f"resample_to_shape expects [C, z, y, x], got shape {tuple(t.shape)}")
    if tuple(t.shape[1:]) == shape:
        out = t
    else:
        if not t.is_floating_point() or (t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu"):
            t = t.float()
        out = F.interpolate(t[None], size=shape, mode="trilinear", align_corners=False)[0]
    return out.numpy() if is_np else out
