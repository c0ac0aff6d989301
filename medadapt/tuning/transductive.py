"""FSEFT's transductive inference (Silva-Rodríguez et al., Sec. 3, Eq. 2–3): while the adapter trains on the
support set, the unlabelled query volume(s) it must segment constrain the predicted size of each target
structure to lie within a margin of the size the support set shows.

* **Size prior S** (per class): the structure's voxel count in each support label map at the common
  (preprocessed) resolution, averaged over the support. With k ≥ 5 support scans the estimate is made robust
  as the authors' code makes it: sizes outside (median − std, median + std) are dropped before averaging (if
  that drops all, the median is used).
* **Predicted size Ŝ**: the sum of the sigmoid output over every voxel of the query (its preprocessed
  volume), computed from the frozen backbone's features of the query, which are extracted once
  (sliding window, :func:`query_features`) and reused at every step.
* **L_TI** (Eq. 2): zero inside [(1 − γ)S, (1 + γ)S], linear outside: ``relu((1−γ)S − Ŝ) + relu(Ŝ − (1+γ)S)``.
  medadapt divides it by S, i.e. measures both sizes in units of the prior (the paper calls S a proportion;
  in voxels the term would be thousands of times the Dice loss at λ = 1). The authors' code instead divides
  the error by max(Ŝ, S) and adds the margin outside it (a jump at the margin); medadapt follows the paper's
  continuous hinge. Several classes: the sum over classes; several queries (batch mode): the mean over them.
* **Schedule**: λ·L_TI joins the support loss for the last ``active_fraction`` of the epochs (the paper: the
  last 50 of 100, λ = 1), read from the batch's ``epoch``/``epochs`` entries that the engine adds.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medadapt.errors import MedadaptError

ROBUST_FROM = 5  # support scans from which outliers are dropped
MODES = ("query", "batch")


@dataclasses.dataclass
class Transductive:
    """The options of transductive inference: ``mode`` ``query`` (an adapter trained for each test volume, the
    paper's setting) or ``batch`` (one adapter for all test volumes, the penalty averaged over them),
    ``weight`` λ, ``margin`` γ and the fraction of the epochs at the end during which the term is on."""

    mode: str = "query"
    weight: float = 1.0
    margin: float = 0.1
    active_fraction: float = 0.5

    def check(self) -> None:
        if self.mode not in MODES:
            raise MedadaptError(f"--transductive {self.mode!r}: choose one of {', '.join(MODES)}")
        if not 0 <= self.margin < 1:
            raise MedadaptError(f"--ti-margin {self.margin}: must be in [0, 1) (the paper's best: 0.1-0.3)")
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise MedadaptError(f"--ti-lambda {self.weight}: must be a positive number (the paper: 1)")
        if not 0 < self.active_fraction <= 1:
            raise MedadaptError(f"TI active fraction {self.active_fraction}: must be in (0, 1]")

    def priors(self, support, labels: dict[str, int]) -> list[float]:
        """S per foreground class of ``labels`` (in id order) from the support cases' preprocessed label maps
        (``.seg``, dataset ids): the voxel counts of the scans that hold the structure (a scan without it says
        nothing about its size), made robust for k >= 5. A class no support scan holds is an error."""
        out = []
        for name, value in sorted(((n, v) for n, v in labels.items() if v != 0), key=lambda kv: kv[1]):
            sizes = [int(np.count_nonzero(np.asarray(c.seg) == value)) for c in support]
            sizes = [n for n in sizes if n > 0]
            if not sizes:
                raise MedadaptError(f"--transductive: no support scan holds {name!r} ({len(support)} drawn), so no "
                                    "size prior can be formed; use more shots or another --seed")
            out.append(size_prior(sizes))
        return out

    def term(self, model: nn.Module, queries, priors: Sequence[float], patch_size,
             activation: str = "sigmoid") -> "TransductiveTerm":
        """The loss term for ``model`` (prepared by its strategy) on the preprocessed ``queries``."""
        tail = transductive_tail(model)
        feats = [query_features(model, tail, q.data, patch_size) for q in queries]
        return TransductiveTerm(tail, feats, priors, margin=self.margin, weight=self.weight,
                                active_fraction=self.active_fraction, activation=activation)


def transductive_tail(model: nn.Module) -> nn.Module:
    """The module TI runs on cached features: the full-resolution head (a spatial adapter and its classifier).
    Every trainable parameter must lie in it, or the cached features would go stale as training moves them."""
    from medadapt.models.parts import model_parts

    tail = model_parts(model).heads[-1]
    inside = {id(p) for p in tail.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise MedadaptError(f"--transductive: the method trains {outside[0]} and others outside the classifier "
                            "head, so the query's features cannot be computed once; use --method spatial-adapter")
    return tail


def size_prior(sizes: Sequence[float]) -> float:
    """S from the support's voxel counts of one structure (see the module docstring)."""
    s = np.asarray(sizes, dtype=np.float64)
    if s.size == 0:
        raise MedadaptError("size prior: no support scans")
    if s.size >= ROBUST_FROM:
        med, std = np.median(s), np.std(s)
        kept = s[(s > med - std) & (s < med + std)]
        return float(kept.mean()) if kept.size else float(med)
    return float(s.mean())


def size_constraint(predicted: torch.Tensor, prior: float | torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 in units of the prior: ``(relu((1−γ)S − Ŝ) + relu(Ŝ − (1+γ)S)) / S``."""
    prior = torch.as_tensor(prior, dtype=predicted.dtype, device=predicted.device)
    low, high = (1 - margin) * prior, (1 + margin) * prior
    return (torch.relu(low - predicted) + torch.relu(predicted - high)) / prior


class TransductiveTerm:
    """λ·L_TI as a loss term ``(model, batch, outputs)``: the predicted size of each class on each query from
    ``tail`` (the trainable module that maps the cached backbone features to logits) against the priors."""

    def __init__(self, tail: nn.Module, features: Sequence[torch.Tensor], priors: Sequence[float],
                 margin: float = 0.1, weight: float = 1.0, active_fraction: float = 0.5,
                 activation: str = "sigmoid"):
        Transductive(weight=weight, margin=margin, active_fraction=active_fraction).check()
        if not features:
            raise MedadaptError("--transductive: no query volumes to constrain")
        if any(not p > 0 for p in priors):
            raise MedadaptError("--transductive: a target structure has no voxels in any support scan, so no size "
                                "prior can be formed; draw other support scans")
        self.tail = tail
        self.features = list(features)
        self.priors = [float(p) for p in priors]
        self.margin = float(margin)
        self.weight = float(weight)
        self.active_fraction = float(active_fraction)
        self.activation = activation  # softmax models: the foreground channels of the softmax
        self.last: dict[str, list[float]] = {}

    def active(self, batch: dict) -> bool:
        epoch, epochs = batch.get("epoch"), batch.get("epochs")
        if epoch is None or epochs is None:
            return True
        return epoch >= epochs - int(round(self.active_fraction * epochs))

    def predicted_sizes(self) -> torch.Tensor:
        """Ŝ [queries, classes]: sums of the class probabilities (sigmoid outputs; for a softmax model the
        softmax of its foreground channels) over each query's voxels."""
        sizes = []
        for f in self.features:
            f = f.to(next(self.tail.parameters()).device)
            logits = self.tail(f)
            probs = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, 1)[:, 1:]
            sizes.append(probs.sum(dim=(0, *range(2, f.ndim))))
        return torch.stack(sizes)

    def __call__(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:
        if not self.active(batch):
            return torch.zeros((), device=next(self.tail.parameters()).device)
        sizes = self.predicted_sizes()
        prior = torch.tensor(self.priors, dtype=sizes.dtype, device=sizes.device)
        penalty = size_constraint(sizes, prior, self.margin).sum(1).mean()
        self.last = {"predicted": sizes.detach().cpu().tolist(), "prior": self.priors}
        return self.weight * penalty


@torch.no_grad()
def query_features(model: nn.Module, tail: nn.Module, volume: np.ndarray, patch_size: Sequence[int],
                   overlap: float = 0.5) -> torch.Tensor:
    """The input of ``tail`` for a whole preprocessed volume [C, z, y, x]: the frozen network run by sliding
    window (Gaussian-blended, as prediction does), ``tail``'s input captured by a forward pre-hook."""
    from monai.inferers import sliding_window_inference

    captured = {}

    def grab(module, args):
        captured["x"] = args[0]

    def features(x):
        handle = tail.register_forward_pre_hook(grab)
        try:
            model(x)
        finally:
            handle.remove()
        return captured.pop("x")

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.from_numpy(np.array(volume, dtype=np.float32))[None].to(device)  # a copy: the cache is read-only
        out = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=2, predictor=features,
                                       overlap=overlap, mode="gaussian", sigma_scale=0.125,
                                       padding_mode="constant", cval=0.0)
    finally:
        model.train(was_training)
    return out.float().cpu()
