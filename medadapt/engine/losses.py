"""nnU-Net's training loss: Dice + cross-entropy, summed over deep-supervision outputs.

The soft Dice is nnU-Net's batch Dice (``MemoryEfficientSoftDiceLoss``, foreground classes, smooth 1e-5):
per class, the intersection and sizes are summed over the batch and the patch. Under
DistributedDataParallel these sums are also summed over ranks (as nnU-Net does), so that training on N ranks
with batches of B equals training on one process with the global batch of N·B; that is why the Dice is
written here rather than taken from MONAI's ``DiceCELoss`` (whose value it equals in one process, see
tests/test_engine.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medadapt.engine.distributed import all_reduce_sum

SMOOTH = 1e-5


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i per resolution, the lowest resolution ignored, normalised to sum 1."""
    weights = [1.0 / (2 ** i) for i in range(n)]
    if n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean over foreground classes of the batch soft Dice (sums over ranks when distributed)."""
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = [0, *range(2, probs.ndim)]
    stats = torch.stack([(probs * onehot).sum(axes), probs.sum(axes), onehot.sum(axes)])
    intersection, pred, gt = all_reduce_sum(stats)
    dice = (2 * intersection + SMOOTH) / torch.clamp(pred + gt + SMOOTH, min=1e-8)
    return 1 - dice.mean()


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE + soft Dice (weights 1:1) of one output. DDP averages gradients over ranks: the per-rank CE mean then
    gives the global-batch CE; the Dice is computed on statistics summed over ranks, and that sum's backward
    sums the identical losses' gradients over ranks (a factor of N) which DDP's averaging cancels."""
    return F.cross_entropy(logits, target[:, 0].long()) + soft_dice_loss(logits, target)


class DeepSupervised(nn.Module):
    """``per_output(logits, target)`` summed over deep-supervision outputs with nnU-Net's weights.

    ``outputs`` is one logits tensor or the list of deep-supervision outputs, highest resolution first;
    the target (B, 1, ...) of class indices is downsampled to each output by nearest neighbour.
    """

    def __init__(self, per_output):
        super().__init__()
        self.per_output = per_output

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
            total = total + weight * self.per_output(logits, t)
        return total


class DeepSupervisedDiceCE(DeepSupervised):
    """CE + soft Dice (weights 1:1) as nnU-Net v2 trains with, deep-supervised."""

    def __init__(self):
        super().__init__(dice_ce)


class DeepSupervisedDice(DeepSupervised):
    """The soft (batch) Dice alone, deep-supervised."""

    def __init__(self):
        super().__init__(soft_dice_loss)


class LabelLoss:
    """A criterion ``(outputs, target)`` as a loss term ``(model, batch, outputs)`` on ``batch["label"]``: the
    form every loss of the engine takes, so that terms needing the model or other batch entries (distillation,
    unlabelled volumes, annotation masks) sit beside it."""

    def __init__(self, criterion: nn.Module, name: str):
        self.criterion = criterion
        self.name = name

    def __call__(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:
        return self.criterion(outputs, batch["label"])


def build_loss(spec: dict) -> LabelLoss:
    """The loss a recipe names (``{"name": ..., options}``; see medadapt.engine.recipe.LOSSES)."""
    builders = {"dice_ce": DeepSupervisedDiceCE, "dice": DeepSupervisedDice}
    return LabelLoss(builders[spec["name"]](), spec["name"])
