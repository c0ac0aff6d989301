"""Masked-volume reconstruction as the engine trains it: the masking's settings (:class:`MaskConfig`, which a
recipe's ``mae`` loss names and :func:`medadapt.engine.recipe.parse_recipe` checks) and the masked-voxel MSE
(:func:`mae_loss`, the loss term :class:`MaskedReconstructionLoss`). They are nnssl ``BaseMAETrainer``'s; the
masking itself and the masked batches are :mod:`medadapt.ssl.mae`'s (its docstring has the recipe and the
deviations).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medadapt.errors import MedadaptError

#: nnssl ``BaseMAETrainer``'s masking: blocks of 16 voxels per axis, 75 % of them masked
NNSSL_BLOCK_SIZE = (16, 16, 16)
NNSSL_MASK_RATIO = 0.75
REDUCTIONS = ("mean", "none")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How patches are masked: ``block_size`` voxels per axis (z, y, x; an int means a cube) and the fraction
    ``mask_ratio`` of the blocks that are masked, in (0, 1). Defaults: nnssl's (16 voxels, 0.75)."""

    block_size: tuple[int, int, int] = NNSSL_BLOCK_SIZE
    mask_ratio: float = NNSSL_MASK_RATIO

    def __post_init__(self) -> None:
        block = self.block_size
        if isinstance(block, (int, np.integer)) and not isinstance(block, bool):
            block = (int(block),) * 3
        if (not isinstance(block, (list, tuple)) or len(block) != 3
                or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block)):
            raise MedadaptError(f"mask block_size {self.block_size!r}: give one positive integer (a cube) or three "
                                "(z, y, x), in voxels, e.g. 16")
        ratio = self.mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0 < float(ratio) < 1:
            raise MedadaptError(f"mask mask_ratio {self.mask_ratio!r}: give the fraction of blocks to mask, a number "
                                "between 0 and 1 exclusive, e.g. 0.75")
        object.__setattr__(self, "block_size", tuple(int(b) for b in block))
        object.__setattr__(self, "mask_ratio", float(ratio))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "MaskConfig":
        """From ``{"block_size": ..., "mask_ratio": ...}`` (other keys, such as a loss spec's ``name``, ignored;
        a missing key takes nnssl's value)."""
        if not isinstance(raw, Mapping):
            raise MedadaptError(f"mask {raw!r}: expected a mapping with block_size and mask_ratio")
        return cls(block_size=raw.get("block_size", NNSSL_BLOCK_SIZE),
                   mask_ratio=raw.get("mask_ratio", NNSSL_MASK_RATIO))

    def to_dict(self) -> dict[str, Any]:
        return {"block_size": list(self.block_size), "mask_ratio": self.mask_ratio}

    def grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Blocks per axis covering a patch of ``spatial`` (z, y, x) voxels."""
        return tuple(math.ceil(int(s) / b) for s, b in zip(spatial, self.block_size))

    def masked_blocks(self, spatial: Sequence[int]) -> int:
        """How many blocks of a ``spatial`` patch one mask hides: ``floor(mask_ratio × blocks)``; a
        :class:`MedadaptError` if that is none."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3 or min(spatial) < 1:
            raise MedadaptError(f"mask: patch {spatial} is not three positive sizes (z, y, x)")
        n = math.prod(self.grid(spatial))
        k = int(math.floor(self.mask_ratio * n + 1e-9))
        if k < 1:
            raise MedadaptError(f"mask: a {'x'.join(map(str, spatial))} patch holds {n} block(s) of "
                                f"{'x'.join(map(str, self.block_size))} voxels, and mask_ratio {self.mask_ratio:g} "
                                "masks none of them; use smaller blocks or a larger patch")
        return k


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The squared error of ``pred`` against ``target`` ([B, C, Z, Y, X]) over the voxels ``mask`` hides
    (bool [B, 1 or C, Z, Y, X], True = masked); the visible voxels count for nothing.

    ``reduction="mean"``: the mean over every masked voxel entry of the batch (nnssl's normalisation: a sample
    with more masked voxels weighs more), a scalar; ``"none"``: the mean over each sample's own masked voxel
    entries, shape [B] (what scores samples one by one)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"mae_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"mae_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                         "[B, C, Z, Y, X] (the network's output channels must equal its input channels)")
    if mask.ndim != 5 or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:] \
            or mask.shape[1] not in (1, pred.shape[1]):
        raise ValueError(f"mae_loss: mask {tuple(mask.shape)} does not fit the prediction {tuple(pred.shape)}")
    weight = mask.to(device=pred.device, dtype=pred.dtype).expand_as(pred)
    squared = (pred - target.to(pred.dtype)) ** 2 * weight
    if reduction == "mean":
        count = weight.sum()
        if count == 0:
            raise ValueError("mae_loss: the mask hides no voxel")
        return squared.sum() / count
    counts = weight.flatten(1).sum(1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"mae_loss: the mask hides no voxel of sample(s) {empty}")
    return squared.flatten(1).sum(1) / counts


class MaskedReconstructionLoss:
    """The engine's loss term for masked-volume reconstruction: :func:`mae_loss` of the network's output against
    ``batch["target"]`` over ``batch["mask"]`` (batches from :class:`MaskedSampler`). A deep-supervised network's
    full-resolution output (its first) is the reconstruction; the lower resolutions are not scored."""

    name = "mae"

    def __call__(self, model: torch.nn.Module, batch: dict, outputs) -> torch.Tensor:
        if "mask" not in batch or "target" not in batch:
            raise MedadaptError("the recipe's loss mae reconstructs masked patches, but the batches are not masked; "
                                "use it with 'medadapt pretrain --objective mae' or 'medadapt pretrain-ssl-head'")
        pred = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return mae_loss(pred, batch["target"], batch["mask"])
