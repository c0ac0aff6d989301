"""FSEFT's transductive inference (Silva-Rodríguez et al., Sec. 3, Eq. 2–3): while the adapter trains on the
support set, the unlabelled query volume(s) it must segment constrain the predicted size of each target
structure to lie within a margin γ of the size the support set shows.

The text leaves the constraint's normalisation open (Eq. 2 mixes a proportion S with a sum Ŝ, and its first
case has a typo), so it is settled by the authors' released code (jusiro/fewshot-finetuning, first commit
e3a4193, ``fseft/transductive/TI_modules.py`` and ``utils.py``), which is medadapt's default; the other readings
stay options (docs/methods.md, "FSEFT"):

* **Size prior S** (per class): the voxel count of the *largest connected component* (26-connectivity) of the
  structure in each support label map, at the query's resolution (support and query are preprocessed to the
  plan's spacing; a different voxel volume is converted), averaged over the support. With k ≥ 5 support scans
  the mean is taken over the sizes inside (median − std, median + std) (the median if none is). A support
  scan without the structure says nothing about its size and is left out.
* **Predicted size Ŝ**: the sum of the sigmoid output over every voxel of the query, from the frozen
  backbone's features of the query, extracted once (sliding window, :func:`query_features`) and run through
  the trainable head tile by tile (tiles of the training patch, as the code runs its classifier on patches, so
  that an instance-normalised adapter sees the statistics it trains with).
* **Error** (``error``): ``max`` (the code, default): the relative error e = (S − Ŝ) / max(Ŝ, S), the maximum
  detached, bounded in [−1, 1]; the code's penalty is |e| − γ if e > γ (under-segmentation), |e| + γ if
  e < −γ (over-segmentation), 0 inside the band. ``prior``: e = (S − Ŝ) / S with the continuous hinge
  relu(|e| − γ) (medadapt's earlier reading; unbounded when the head over-segments). ``proportion``: the
  text's Eq. 2 with both sizes as proportions of the query's voxels, the continuous hinge
  relu((1 − γ)S − Ŝ) + relu(Ŝ − (1 + γ)S) over |Ω|.
* **Step** (``step``): ``epoch`` (the code, default): once per epoch, after the epoch's support steps, its own
  optimiser step on λ·L_TI alone (no step when every class is inside its band); ``every``: Eq. 3, λ·L_TI summed
  into the loss of every support step.
* **Schedule**: on for the last ``active_fraction`` of the epochs (the code and the text: the last 50 of 100).
  λ and γ default to the shipped TI commands' 0.1 and 0.3 (the text: λ = 1; Fig. 2b sweeps γ).
  Several classes: the sum over classes; several queries (``batch`` mode): the mean over them.
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
ERRORS = ("max", "prior", "proportion")
STEPS = ("epoch", "every")


@dataclasses.dataclass
class Transductive:
    """The options of transductive inference: ``mode`` ``query`` (an adapter trained for each test volume, the
    paper's setting) or ``batch`` (one adapter for all test volumes, the penalty averaged over them),
    ``weight`` λ, ``margin`` γ, the fraction of the epochs at the end during which the term is on, the error's
    normalisation and when it steps (see the module docstring)."""

    mode: str = "query"
    weight: float = 0.1
    margin: float = 0.3
    active_fraction: float = 0.5
    error: str = "max"
    step: str = "epoch"

    def check(self) -> None:
        if self.mode not in MODES:
            raise MedadaptError(f"--transductive {self.mode!r}: choose one of {', '.join(MODES)}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise MedadaptError(f"--ti-margin {self.margin}: must be in [0, 1) (the authors' commands: 0.3, "
                                "0.5 for the kidney)")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not (self.weight > 0 and np.isfinite(self.weight)):
            raise MedadaptError(f"--ti-lambda {self.weight}: must be a positive number (the authors' commands: "
                                "0.1; the text: 1)")
        if not 0 < self.active_fraction <= 1:
            raise MedadaptError(f"TI active fraction {self.active_fraction}: must be in (0, 1]")
        if self.error not in ERRORS:
            raise MedadaptError(f"--ti-error {self.error!r}: choose one of {', '.join(ERRORS)}")
        if self.step not in STEPS:
            raise MedadaptError(f"--ti-step {self.step!r}: choose one of {', '.join(STEPS)}")

    def record(self) -> dict:
        """The options as recorded in a run's identity."""
        return dataclasses.asdict(self)

    def priors(self, support, labels: dict[str, int], query_spacing: Sequence[float] | None = None) -> list[float]:
        """S per foreground class of ``labels`` (in id order) from the support cases' preprocessed label maps
        (``.seg``, dataset ids): the largest component's voxel count in each scan that holds the structure,
        made robust for k >= 5, in voxels of ``query_spacing`` (default: the support's own). A class whose
        largest component is empty in every support scan is an error."""
        out = []
        for name, value in sorted(((n, v) for n, v in labels.items() if v != 0), key=lambda kv: kv[1]):
            sizes = []
            for c in support:
                n = largest_component_size(np.asarray(c.seg) == value)
                if n > 0:
                    sizes.append(n * _voxel_volume(c) / _volume(query_spacing, c))
            if not sizes:
                raise MedadaptError(f"--transductive: no support scan holds {name!r} (the largest connected "
                                    f"component is empty in all {len(support)} drawn), so no size prior can be "
                                    "formed; use more shots or another --seed")
            out.append(size_prior(sizes))
        return out

    def term(self, model: nn.Module, queries, priors: Sequence[float], patch_size,
             activation: str = "sigmoid") -> "TransductiveTerm":
        """The constraint for ``model`` (prepared by its strategy) on the preprocessed ``queries``: a loss term
        (``step: every``) or an epoch hook (``step: epoch``) of the engine."""
        tail = transductive_tail(model)
        feats = [query_features(model, tail, q.data, patch_size) for q in queries]
        cls = TransductiveEpochStep if self.step == "epoch" else TransductiveTerm
        return cls(tail, feats, priors, margin=self.margin, weight=self.weight,
                   active_fraction=self.active_fraction, activation=activation, error=self.error,
                   tile=patch_size)


def _voxel_volume(case) -> float:
    spacing = case_spacing(case)
    return float(np.prod(spacing)) if spacing is not None else 1.0


def _volume(spacing, case) -> float:
    if spacing is None:
        return _voxel_volume(case)
    return float(np.prod(spacing))


def case_spacing(case) -> list[float] | None:
    """A preprocessed case's voxel spacing where its properties record one (None: the plan's, shared)."""
    try:
        sp = case.properties.get("spacing_after_resampling") or case.properties.get("spacing")
    except (AttributeError, OSError, KeyError, ValueError):
        return None
    return None if sp is None else [float(v) for v in sp]


def largest_component_size(mask: np.ndarray) -> int:
    """Voxels of the largest 26-connected component of ``mask`` (0 if empty): the code's
    ``extract_topk_largest_candidates(label, 1)`` (cc3d, connectivity 26)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n == 1:
        return int(mask.sum())
    return int(np.bincount(labelled.ravel())[1:].max())


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
    """S from the support's sizes of one structure (see the module docstring)."""
    s = np.asarray(sizes, dtype=np.float64)
    if s.size == 0:
        raise MedadaptError("size prior: no support scans")
    if s.size >= ROBUST_FROM:
        med, std = np.median(s), np.std(s)
        kept = s[(s > med - std) & (s < med + std)]
        return float(kept.mean()) if kept.size else float(med)
    return float(s.mean())


def size_penalty(predicted: torch.Tensor, prior: float | torch.Tensor, margin: float, error: str = "max",
                 voxels: float | None = None) -> torch.Tensor:
    """L_TI per class (no λ) of predicted sizes Ŝ against priors S, elementwise; ``error`` as in the module
    docstring (``voxels``: the query's voxel count, for ``proportion``)."""
    prior = torch.as_tensor(prior, dtype=predicted.dtype, device=predicted.device)
    if error == "max":
        e = (prior - predicted) / torch.maximum(predicted.detach(), prior)
        return torch.where(e > margin, e.abs() - margin,
                           torch.where(e < -margin, e.abs() + margin, torch.zeros_like(e)))
    if error == "prior":
        return size_constraint(predicted, prior, margin)
    if error == "proportion":
        if voxels is None or not voxels > 0:
            raise MedadaptError("--ti-error proportion: the query's voxel count is needed")
        low, high = (1 - margin) * prior, (1 + margin) * prior
        return (torch.relu(low - predicted) + torch.relu(predicted - high)) / voxels
    raise MedadaptError(f"--ti-error {error!r}: choose one of {', '.join(ERRORS)}")


def size_constraint(predicted: torch.Tensor, prior: float | torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 in units of the prior (``error: prior``): ``(relu((1−γ)S − Ŝ) + relu(Ŝ − (1+γ)S)) / S``."""
    prior = torch.as_tensor(prior, dtype=predicted.dtype, device=predicted.device)
    low, high = (1 - margin) * prior, (1 + margin) * prior
    return (torch.relu(low - predicted) + torch.relu(predicted - high)) / prior


class TransductiveTerm:
    """λ·L_TI as a loss term ``(model, batch, outputs)`` summed into every support step (Eq. 3, ``step:
    every``): the predicted size of each class on each query from ``tail`` (the trainable module that maps the
    cached backbone features to logits) against the priors."""

    def __init__(self, tail: nn.Module, features: Sequence[torch.Tensor], priors: Sequence[float],
                 margin: float = 0.3, weight: float = 0.1, active_fraction: float = 0.5,
                 activation: str = "sigmoid", error: str = "max", tile: Sequence[int] | None = None):
        Transductive(weight=weight, margin=margin, active_fraction=active_fraction, error=error).check()
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
        self.error = error
        self.tile = tuple(int(t) for t in tile) if tile is not None else None
        self.last: dict[str, list[float]] = {}

    def is_active(self, epoch: int | None, epochs: int | None) -> bool:
        if epoch is None or epochs is None:
            return True
        return epoch >= epochs - int(round(self.active_fraction * epochs))

    def active(self, batch: dict) -> bool:
        return self.is_active(batch.get("epoch"), batch.get("epochs"))

    def _tiles(self, f: torch.Tensor):
        spatial = f.shape[2:]
        tile = self.tile or tuple(spatial)
        ranges = [range(0, n, t) for n, t in zip(spatial, tile)]
        for z in ranges[0]:
            for y in ranges[1]:
                for x in ranges[2]:
                    yield f[:, :, z:z + tile[0], y:y + tile[1], x:x + tile[2]]

    def predicted_sizes(self) -> torch.Tensor:
        """Ŝ [queries, classes]: sums of the class probabilities (sigmoid outputs; for a softmax model the
        softmax of its foreground channels) over each query's voxels, the head run tile by tile."""
        sizes = []
        device = next(self.tail.parameters()).device
        for f in self.features:
            total = 0
            for part in self._tiles(f):
                logits = self.tail(part.to(device))
                probs = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, 1)[:, 1:]
                total = total + probs.sum(dim=(0, *range(2, part.ndim)))
            sizes.append(total)
        return torch.stack(sizes)

    def penalty(self) -> torch.Tensor:
        """L_TI (without λ): summed over classes, averaged over queries."""
        sizes = self.predicted_sizes()
        prior = torch.tensor(self.priors, dtype=sizes.dtype, device=sizes.device)
        voxels = torch.tensor([float(np.prod(f.shape[2:])) for f in self.features], dtype=sizes.dtype,
                              device=sizes.device)[:, None]
        per_class = torch.stack([size_penalty(sizes[i], prior, self.margin, self.error, float(voxels[i]))
                                 for i in range(sizes.shape[0])])
        self.last = {"predicted": sizes.detach().cpu().tolist(), "prior": self.priors}
        return per_class.sum(1).mean()

    def __call__(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:
        if not self.active(batch):
            return torch.zeros((), device=next(self.tail.parameters()).device)
        return self.weight * self.penalty()


class TransductiveEpochStep(TransductiveTerm):
    """λ·L_TI as its own optimiser step once per epoch (``step: epoch``, the authors' code): an engine epoch
    hook. Inside every band nothing steps (the code zeroes the gradients and returns)."""

    name = "ti"

    def __call__(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:  # not a loss term
        raise TypeError("TransductiveEpochStep is an epoch hook (Trainer(epoch_hooks=...)), not a loss term")

    def on_epoch_end(self, optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> dict[str, float] | None:
        if not self.is_active(epoch, epochs):
            return None
        optimizer.zero_grad(set_to_none=True)
        loss = self.weight * self.penalty()
        value = float(loss.detach())
        if value > 0:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # (the code leaves these gradients to the next epoch's first step)
        return {"ti_penalty": value}


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
