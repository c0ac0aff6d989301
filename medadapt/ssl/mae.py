"""Masked-volume reconstruction (a CNN masked autoencoder): random 3D block masking, the masked-voxel MSE.

This is the recipe of MIC-DKFZ nnssl's ``BaseMAETrainer`` (``nnssl/training/nnsslTrainer/masked_image_modeling/
BaseMAETrainer.py`` with ``create_blocky_mask``, and ``MAEMSELoss`` in ``nnssl/training/loss/mse_loss.py``), the
masked-autoencoder pretraining nnssl uses for nnU-Net's ResEnc U-Nets:

* **masking**: the patch is divided into cubic blocks of ``block_size`` voxels (nnssl: 16); per sample, exactly
  ``int(mask_ratio × blocks)`` of them (nnssl: 75 %) are drawn without replacement (a random permutation), and
  every voxel of a drawn block is masked in every channel (one mask per sample, shared by its channels);
* **input**: the masked voxels are set to 0 (nnssl multiplies the patch by its keep-mask); the network sees the
  masked patch and outputs as many channels as it takes in (no deep supervision);
* **loss**: the squared error between the output and the unmasked patch, averaged over the masked voxels only;
  the visible voxels contribute nothing (no gradient either).

Deviations (docs/ssl.md): the block size may differ per axis, and a patch need not be a multiple of it (nnssl
requires one: its mask is ``patch // block`` blocks repeated up to the patch): the blocks cover the patch
(``ceil(patch / block)`` per axis) and the mask is cropped to it, so a block at the far border may be partly
outside the patch. The loss divides by the masked voxel *entries* (voxels × channels), so with several channels
it is their mean; nnssl divides the channel sum by the masked voxel count (the same for one channel, CT's case).
The block count is ``floor(mask_ratio × blocks)`` as nnssl's ``int()``, computed so that a product such as
0.29 × 100 that floats just below an integer still gives it. Every random draw comes from the generator passed
in (a NumPy ``Generator`` or a ``torch.Generator``), never from a global stream: a seeded run is reproducible and
a resumed run continues as the uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medadapt.data.augmentation import Augmentation
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


def _permutation(n: int, rng: "np.random.Generator | torch.Generator") -> torch.Tensor:
    if isinstance(rng, np.random.Generator):
        return torch.from_numpy(rng.permutation(n))
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng, device=rng.device).cpu()
    raise TypeError(f"random_block_mask: rng must be a numpy.random.Generator or a torch.Generator, "
                    f"not {type(rng).__name__}")


def random_block_mask(shape: Sequence[int], config: MaskConfig,
                      rng: "np.random.Generator | torch.Generator") -> torch.Tensor:
    """A random block mask for a batch of ``shape`` [B, C, Z, Y, X]: bool [B, 1, Z, Y, X], True = masked.

    Per sample, ``config.masked_blocks`` of the blocks covering the patch are drawn without replacement from
    ``rng`` (samples in order); the mask is the same for every channel (it broadcasts over C). On the CPU."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        raise MedadaptError(f"mask: batch shape {shape} is not [B, C, Z, Y, X]")
    batch, spatial = shape[0], shape[2:]
    k = config.masked_blocks(spatial)
    grid = config.grid(spatial)
    n = math.prod(grid)
    blocks = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        blocks[b, _permutation(n, rng)[:k]] = True
    mask = blocks.view(batch, 1, *grid)
    for axis, size in enumerate(config.block_size, start=2):
        mask = mask.repeat_interleave(size, dim=axis)
    return mask[:, :, :spatial[0], :spatial[1], :spatial[2]].contiguous()


def apply_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` [B, C, ...] with the voxels where ``mask`` (bool, [B, 1 or C, ...]) is True set to 0."""
    return image.masked_fill(mask.to(image.device), 0.0)


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


class MaskedSampler:
    """Turns the batches of ``sampler`` (an object with ``sample(rng)`` giving ``{"image": [B, C, Z, Y, X], ...}``)
    into masked-reconstruction batches ``{"image": masked, "target": original, "mask": mask}`` (the labels are
    dropped). The mask is drawn from the same ``rng`` right after the patches, so a run's masks follow from its
    seed and a resumed run draws the masks the uninterrupted one would have."""

    def __init__(self, sampler, config: MaskConfig):
        self.sampler = sampler
        self.config = config
        patch = getattr(sampler, "patch_size", None)
        if patch is not None:
            config.masked_blocks(patch)  # a patch the mask cannot work on fails here, before training
        self.patch_size = patch
        self.batch_size = getattr(sampler, "batch_size", None)

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image = self.sampler.sample(rng)["image"]
        mask = random_block_mask(image.shape, self.config, rng)
        return {"image": apply_mask(image, mask), "target": image, "mask": mask}


def mae_augmentation(patch_size: Sequence[int]) -> Augmentation:
    """nnssl ``BaseMAETrainer``'s training augmentation: nnU-Net's spatial transform (rotation and scaling, each
    with p=0.2, scale 0.7-1.4) and mirroring, and none of nnU-Net's intensity transforms."""
    return Augmentation(patch_size, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
                        p_gamma=0.0, p_inverted_gamma=0.0)


def mask_config_from_loss(loss: Mapping[str, Any], source: str = "recipe") -> MaskConfig:
    """The masking a recipe's resolved ``loss`` spec (``{"name": "mae", "block_size": ..., "mask_ratio": ...}``)
    gives; a :class:`MedadaptError` naming ``source`` if the loss is another."""
    if loss.get("name") != "mae":
        raise MedadaptError(f"{source}: trains with loss {loss.get('name')!r}; masked-volume reconstruction needs a "
                            "recipe whose loss is mae (e.g. cpu-mae-pretrain, mae-nnssl)")
    return MaskConfig.from_dict(loss)
