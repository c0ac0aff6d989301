"""Mergeable LoRA (low-rank adaptation) for every convolution and Linear weight of a network.

Each convolution's and ``nn.Linear``'s ``weight`` is re-parametrised with :mod:`torch.nn.utils.parametrize`::

    W_eff = W0 + scale * (B @ A).reshape(W0.shape),      scale = alpha / rank

where the weight is viewed as a matrix ``W0.reshape(W0.shape[0], -1)``:

* ``nn.Linear``          weight ``(out, in)``             ->  rows = out, cols = in (the matrix itself)
* ``nn.ConvNd``          weight ``(out, in/groups, *k)``  ->  rows = out, cols = in/groups * prod(k)
* ``nn.ConvTransposeNd`` weight ``(in, out/groups, *k)``  ->  rows = in,  cols = out/groups * prod(k)

``A`` (rank x cols) is initialised like LoRA/peft (``kaiming_uniform_(a=sqrt(5))``) and ``B`` (rows x rank) with
zeros, so an injected network computes exactly what the foundation model computes until ``B`` is trained. For a
Linear layer this is LoRA as published (Hu et al.) and as peft's ``lora.Linear`` computes it; for a ConvNd it
is the same update as peft's conv LoRA (an ``in -> rank`` conv with the layer's kernel followed by a 1x1
``rank -> out`` conv). The base weight ``W0`` is frozen; the bias is left untouched (the strategy decides).
In a SwinUNETR the Linear layers are the attention's ``qkv`` and ``proj``, the MLPs' ``linear1``/``linear2`` and
the patch-merging ``reduction``; its relative-position bias tables are no layer weight and get no LoRA.

Rank: a layer whose matrix is smaller than ``config.rank`` (``min(rows, cols) < rank``, e.g. a first conv with
one input channel and a 1x1x1 kernel) gets rank ``min(rows, cols)`` -- a larger rank adds parameters but no
expressiveness. The scale stays ``alpha / config.rank`` for every layer so that all layers share one step size.

Merging: :func:`merge_lora` calls ``parametrize.remove_parametrizations(..., leave_parametrized=True)``, so the
merged kernel is computed by the very function the forward pass uses; the network gets back its original module
classes (plain ``nn.Conv3d``, ``nn.Linear`` ...), its original ``state_dict`` keys and a trainable ``weight``.

State dict while injected (for a conv or Linear layer at ``<m>``): ``<m>.parametrizations.weight.original`` (``W0``),
``<m>.parametrizations.weight.0.lora_A``, ``<m>.parametrizations.weight.0.lora_B``, and ``<m>.bias`` as before.
``copy.deepcopy`` and ``state_dict()``/``load_state_dict()`` work; pickling the whole module (``torch.save(model)``)
does not (a torch restriction on parametrised modules): save a state dict, or merge first.

Why not HF peft (checked: peft 0.21.2, the newest the package index serves here, with transformers 5.23.0):
its LoRA dispatches ``nn.Conv1d/2d/3d`` (Conv3d, with merging, since peft PR #2082) but has no layer for
``nn.ConvTranspose*d`` -- nnU-Net's decoder upsamples with ``ConvTranspose3d`` -- and ``import peft`` imports
``transformers``, whose ``image_utils`` imports ``torchvision`` (which fails in this environment: "operator
torchvision::nms does not exist"). Decision: LoRA is implemented here, with no dependency beyond torch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from medadapt.errors import MedadaptError

_TARGET_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters: ``rank`` of the update and ``alpha`` (update scale = alpha / rank)."""

    rank: int = 4
    alpha: float = 4.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MedadaptError(f"LoRA rank must be a whole number >= 1 (got {self.rank!r})")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise MedadaptError(f"LoRA alpha must be a positive number (got {self.alpha!r})")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


class LoRAParametrization(nn.Module):
    """``W -> W + scale * (B @ A).reshape(W.shape)``; registered on a conv's or Linear layer's ``weight``."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        rows = weight.shape[0]
        cols = weight[0].numel()
        rank = min(rank, rows, cols)
        self.rank = rank
        self.scale = float(scale)
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, shape: torch.Size) -> torch.Tensor:
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}"


def _lora_of(module: nn.Module) -> LoRAParametrization | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, LoRAParametrization):
            return p
    return None


def _adapter_module_ids(model: nn.Module) -> set[int]:
    # Convs inside medadapt's residual adapters are already trainable additions: never LoRA them.
    from medadapt.models.adapters import ConvAdapter

    return {id(m) for a in model.modules() if isinstance(a, ConvAdapter) for m in a.modules()}


def lora_targets(model: nn.Module, skip: Iterable[nn.Module] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs :func:`inject_lora` would give a LoRA update: every conv / transposed conv /
    Linear layer outside ``skip`` and outside medadapt adapters."""
    skipped = {id(m) for s in skip for m in s.modules()} | _adapter_module_ids(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _TARGET_TYPES) and id(m) not in skipped]


def inject_lora(model: nn.Module, config: LoRAConfig, skip: Iterable[nn.Module] = ()) -> list[nn.Module]:
    """Add a LoRA update to the weight of every ConvNd/ConvTransposeNd/Linear layer of ``model``, in place.

    Layers in ``skip`` (or inside a module in ``skip``; pass the segmentation heads) and inside medadapt adapters
    are left alone. Each injected weight ``W0`` is frozen; ``A``/``B`` are trainable; biases and all other
    parameters keep their ``requires_grad``. Returns the injected modules, in ``model.modules()`` order.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError("inject_lora needs a medadapt.models.lora.LoRAConfig")
    if has_lora(model):
        raise MedadaptError("this network already has LoRA layers; merge_lora() it before injecting again")
    targets = [m for _, m in lora_targets(model, skip)]
    for m in targets:
        if parametrize.is_parametrized(m, "weight"):
            raise MedadaptError(f"cannot add LoRA to {m}: its weight is already parametrised")
    for m in targets:
        lora = LoRAParametrization(m.weight.detach(), config.rank, config.scale)
        parametrize.register_parametrization(m, "weight", lora)
        m.parametrizations.weight.original.requires_grad_(False)
    return targets


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """The conv and Linear modules that carry a LoRA update."""
    return [m for m in model.modules() if _lora_of(m) is not None]


def lora_ranks(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of every layer carrying a LoRA update (a layer's rank may be below the config's:
    module docstring)."""
    return {name: lora.rank for name, m in model.named_modules() if (lora := _lora_of(m)) is not None}


def has_lora(model: nn.Module) -> bool:
    return any(_lora_of(m) is not None for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All LoRA factors (``A`` then ``B`` per layer), in module order; nothing else."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        lora = _lora_of(m)
        if lora is not None:
            params += [lora.lora_A, lora.lora_B]
    return params


def lora_delta_weight(module: nn.Module) -> torch.Tensor:
    """``W_eff - W0`` of one injected layer, shaped like its weight."""
    lora = _lora_of(module)
    if lora is None:
        raise ValueError(f"{type(module).__name__} has no LoRA update")
    return lora.delta(module.parametrizations.weight.original.shape)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place; returns ``model`` as a plain network.

    Afterwards the modules are their original classes, ``state_dict()`` has the original keys and every merged
    ``weight`` is an ordinary trainable parameter. A network without LoRA is returned unchanged.
    """
    for m in lora_modules(model):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        m.weight.requires_grad_(True)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict :func:`merge_lora` would leave, computed without changing ``model``."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    merged = {id(m): m.weight.detach().clone() for m in lora_modules(model)}
    # every path to a module (nnU-Net reaches each conv as both ``conv`` and ``all_modules.0``)
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in merged:
            state[f"{name}.weight" if name else "weight"] = merged[id(m)]
    return state
