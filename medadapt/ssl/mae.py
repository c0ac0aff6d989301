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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medadapt.data.augmentation import Augmentation
from medadapt.engine.reconstruction import (NNSSL_BLOCK_SIZE, NNSSL_MASK_RATIO, REDUCTIONS,  # noqa: F401
                                           MaskConfig, MaskedReconstructionLoss, mae_loss)
from medadapt.errors import MedadaptError


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
