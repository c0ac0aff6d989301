"""nnU-Net's training loss: Dice + cross-entropy, summed over deep-supervision outputs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i per resolution, the lowest resolution ignored, normalised to sum 1."""
    weights = [1.0 / (2 ** i) for i in range(n)]
    if n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisedDiceCE(nn.Module):
    """CE + soft Dice (foreground classes, batch Dice, smooth 1e-5, weights 1:1) as nnU-Net v2 trains with.

    ``outputs`` is one logits tensor or the list of deep-supervision outputs, highest resolution first;
    the target (B, 1, ...) of class indices is downsampled to each output by nearest neighbour.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                                  smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=1.0, lambda_ce=1.0)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        total = outputs[0].new_zeros(())
        for weight, logits in zip(deep_supervision_weights(len(outputs)), outputs):
            if weight == 0.0:
                continue
            t = target
            if t.shape[2:] != logits.shape[2:]:
                t = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest").long()
            total = total + weight * self.dice_ce(logits, t)
        return total
