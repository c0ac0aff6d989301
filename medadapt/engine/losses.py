"""The engine's label losses: Dice + cross-entropy (nnU-Net's), summed over deep-supervision outputs, for a
softmax output (one channel per label, background included) or a sigmoid output (one independent channel per
foreground class, FSEFT's partially labelled foundation models and nnU-Net's region-based training).

The recipe names the terms (``dice_ce``: Dice + cross-entropy; ``dice``: Dice alone) and the model's output
activation decides their form, as nnU-Net's trainer picks ``DC_and_CE_loss`` or ``DC_and_BCE_loss`` from its
label manager: softmax → soft Dice over the foreground classes + categorical CE; sigmoid → soft Dice over
every class channel + binary CE (BCE with logits, weights 1:1).

The soft Dice is nnU-Net's ``MemoryEfficientSoftDiceLoss`` (smooth 1e-5, or the recipe's ``loss.smooth``:
FSEFT's code uses 1, which keeps a patch without foreground from rewarding an empty prediction): with ``batch_dice`` (nnU-Net's
default for 3d_fullres) the intersection and sizes of a class are summed over the batch and the patch, else
per sample (then averaged). Under DistributedDataParallel the batch sums are also summed over ranks (as
nnU-Net does), so that training on N ranks with batches of B equals training on one process with the global
batch of N·B; that is why the Dice is written here rather than taken from MONAI's ``DiceCELoss`` (whose value
it equals in one process, see tests/test_engine.py).

**Partial labels (sigmoid only).** A batch may carry ``annotated`` [B, C] (bool): which classes each sample's
case annotates (FSEFT Eq. 1, its annotation vector w_n). A class a case does not annotate is neither
foreground nor background for that case: it contributes nothing to the loss, hence no gradient.

* per-sample Dice (``batch_dice: false``): Eq. 1 exactly,
  ``L = mean_n [ Σ_k w_nk (1 − Dice_nk) / Σ_k w_nk ]`` over the samples with at least one annotated class;
* batch Dice: per class, the sums run over the samples that annotate it, then the mean over the classes that
  some sample annotates;
* BCE: the mean over the voxels of the annotated (sample, class) pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medadapt.engine.distributed import all_reduce_sum

SMOOTH = 1e-5
ACTIVATIONS = ("softmax", "sigmoid")


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i per resolution, the lowest resolution ignored, normalised to sum 1."""
    weights = [1.0 / (2 ** i) for i in range(n)]
    if n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def class_targets(target: torch.Tensor, channels: int, activation: str) -> torch.Tensor:
    """The binary target per output channel [B, K, ...] of a label map (B, 1, ...) of class ids: softmax, K =
    labels with background (channel c = label c); sigmoid, K = foreground classes (channel c = label c + 1)."""
    if activation == "softmax":
        return F.one_hot(target[:, 0].long(), channels).movedim(-1, 1)
    ids = torch.arange(1, channels + 1, device=target.device).view(1, channels, *([1] * (target.ndim - 2)))
    return target.long() == ids


def _dice_from_stats(stats: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    intersection, pred, gt = stats
    return (2 * intersection + smooth) / torch.clamp(pred + gt + smooth, min=1e-8)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True,
                   smooth: float = SMOOTH) -> torch.Tensor:
    """1 − mean over foreground classes of the softmax soft Dice (batch sums over ranks when distributed)."""
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = class_targets(target, logits.shape[1], "softmax")[:, 1:].to(probs.dtype)
    axes = [0, *range(2, probs.ndim)] if batch_dice else list(range(2, probs.ndim))
    stats = torch.stack([(probs * onehot).sum(axes), probs.sum(axes), onehot.sum(axes)])
    if batch_dice:
        stats = all_reduce_sum(stats)
    return 1 - _dice_from_stats(stats, smooth).mean()


def dice_ce(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True,
            smooth: float = SMOOTH) -> torch.Tensor:
    """CE + soft Dice (weights 1:1) of one output. DDP averages gradients over ranks: the per-rank CE mean then
    gives the global-batch CE; the Dice is computed on statistics summed over ranks, and that sum's backward
    sums the identical losses' gradients over ranks (a factor of N) which DDP's averaging cancels."""
    return F.cross_entropy(logits, target[:, 0].long()) + soft_dice_loss(logits, target, batch_dice, smooth)


def sigmoid_dice_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None,
                      batch_dice: bool = True, smooth: float = SMOOTH) -> torch.Tensor:
    """1 − soft Dice of independent sigmoid channels, over the annotated (sample, class) pairs only."""
    probs = torch.sigmoid(logits)
    onehot = class_targets(target, logits.shape[1], "sigmoid").to(probs.dtype)
    w = (torch.ones(logits.shape[:2], dtype=probs.dtype, device=logits.device) if annotated is None
         else annotated.to(device=logits.device, dtype=probs.dtype))
    axes = list(range(2, probs.ndim))
    stats = torch.stack([(probs * onehot).sum(axes), probs.sum(axes), onehot.sum(axes)])  # [3, B, K]
    if batch_dice:
        stats = all_reduce_sum((stats * w).sum(1))  # [3, K]: sums over the samples annotating each class
        counts = all_reduce_sum(w.sum(0))
        labelled = counts > 0
        if not labelled.any():
            return logits.sum() * 0.0
        return 1 - _dice_from_stats(stats, smooth)[labelled].mean()
    per_case = w.sum(1)
    labelled = per_case > 0
    if not labelled.any():
        return logits.sum() * 0.0
    loss = ((1 - _dice_from_stats(stats, smooth)) * w).sum(1)[labelled] / per_case[labelled]
    return loss.mean()


def masked_bce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, the mean over the voxels of the annotated (sample, class) pairs."""
    onehot = class_targets(target, logits.shape[1], "sigmoid").to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    if annotated is None:
        return bce.mean()
    w = annotated.to(device=logits.device, dtype=logits.dtype)
    voxels = logits[0, 0].numel()
    total = w.sum() * voxels
    if total == 0:
        return logits.sum() * 0.0
    return (bce.flatten(2).sum(2) * w).sum() / total


class DeepSupervised(nn.Module):
    """``per_output(logits, target, annotated)`` summed over deep-supervision outputs with nnU-Net's weights.

    ``outputs`` is one logits tensor or the list of deep-supervision outputs, highest resolution first;
    the target (B, 1, ...) of class ids is downsampled to each output by nearest neighbour.
    """

    def __init__(self, per_output):
        super().__init__()
        self.per_output = per_output

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        total = outputs[0].new_zeros(())
        for weight, logits in zip(deep_supervision_weights(len(outputs)), outputs):
            if weight == 0.0:
                continue
            t = target
            if t.shape[2:] != logits.shape[2:]:
                t = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest").long()
            total = total + weight * self.per_output(logits, t, annotated)
        return total


def _softmax_terms(dice_only: bool, batch_dice: bool, smooth: float = SMOOTH):
    def per_output(logits, target, annotated):
        if annotated is not None and not bool(annotated.all()):
            from medadapt.errors import MedadaptError

            raise MedadaptError("a softmax output cannot learn from partially annotated cases (a class a case "
                                "does not annotate would count as background); train a sigmoid model")
        if dice_only:
            return soft_dice_loss(logits, target, batch_dice, smooth)
        return dice_ce(logits, target, batch_dice, smooth)
    return per_output


def _sigmoid_terms(dice_only: bool, batch_dice: bool, smooth: float = SMOOTH):
    def per_output(logits, target, annotated):
        loss = sigmoid_dice_loss(logits, target, annotated, batch_dice, smooth)
        return loss if dice_only else loss + masked_bce(logits, target, annotated)
    return per_output


class DeepSupervisedDiceCE(DeepSupervised):
    """CE + soft Dice (weights 1:1) as nnU-Net v2 trains with, deep-supervised (softmax output)."""

    def __init__(self, batch_dice: bool = True):
        super().__init__(_softmax_terms(False, batch_dice))


class DeepSupervisedDice(DeepSupervised):
    """The soft Dice alone, deep-supervised (softmax output)."""

    def __init__(self, batch_dice: bool = True):
        super().__init__(_softmax_terms(True, batch_dice))


class LabelLoss:
    """A criterion ``(outputs, target, annotated)`` as a loss term ``(model, batch, outputs)`` on
    ``batch["label"]`` (and ``batch["annotated"]`` where the batch has it): the form every loss of the engine
    takes, so that terms needing the model or other batch entries (distillation, unlabelled volumes) sit
    beside it."""

    def __init__(self, criterion: nn.Module, name: str, activation: str = "softmax"):
        self.criterion = criterion
        self.name = name
        self.activation = activation

    def __call__(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:
        return self.criterion(outputs, batch["label"], batch.get("annotated"))


def build_loss(spec: dict, activation: str = "softmax"):
    """The loss term a recipe names (``{"name": ..., options}``; see medadapt.engine.recipe.LOSSES): a label loss
    in the form of the model's output ``activation``, or (``mae``) masked-volume reconstruction, which has no
    activation and reads the masked batch (:class:`medadapt.engine.reconstruction.MaskedReconstructionLoss`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"output activation {activation!r}: not one of {ACTIVATIONS}")
    if spec["name"] == "mae":
        from medadapt.engine.reconstruction import MaskedReconstructionLoss

        return MaskedReconstructionLoss()
    dice_only = {"dice_ce": False, "dice": True}[spec["name"]]
    terms = _softmax_terms if activation == "softmax" else _sigmoid_terms
    smooth = float(spec.get("smooth", SMOOTH))  # the soft Dice's smoothing: nnU-Net's 1e-5 unless a recipe names it
    return LabelLoss(DeepSupervised(terms(dice_only, bool(spec.get("batch_dice", True)), smooth)), spec["name"],
                     activation)
