"""LoRA and adapters as strategies: frozen foundation model, new small modules + heads trained."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.adapters import AdapterConfig, adapter_parameters, inject_adapters
from medadapt.models.lora import LoRAConfig, inject_lora, lora_parameters, merge_lora, merged_state_dict
from medadapt.tuning.base import Strategy
from medadapt.tuning.method import Method, Option


def _freeze_all_but(model: nn.Module, keep: list[nn.Parameter]) -> None:
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


#: the type of the modules an adapter run leaves in the network, as plans.json records them
ADAPTER_EXTENSION = "adapter"


def rebuild_adapters(network: nn.Module, record: dict[str, Any]) -> None:
    """Re-create the adapters of a model folder's ``extensions`` entry (their weights come with the state dict)."""
    inject_adapters(network, AdapterConfig(reduction=int(record["reduction"])))


class LoRA(Strategy):
    """Low-rank updates W0 + (alpha/r)·B·A of every convolution, transposed-convolution and Linear weight (heads
    are trained in full); ``finalize`` folds them into the weights, giving back the plain architecture."""

    name = "lora"
    rank_option = "rank"  #: what error messages call the rank (a subclass's command-line option)
    freezes = True

    def __init__(self, rank: int = 4, alpha: float | None = None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MedadaptError(f"{self.name}: {self.rank_option} {rank!r} must be a positive integer")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise MedadaptError(f"{self.name}: alpha {alpha!r} must be positive")
        self.config_ = LoRAConfig(rank=rank, alpha=alpha)

    def prepare(self, model: nn.Module) -> nn.Module:
        inject_lora(model, self.config_, skip=self.dense_modules(model))
        _freeze_all_but(model, lora_parameters(model) + self.dense_parameters(model))
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        return merge_lora(model)

    def notes(self, model: nn.Module) -> dict[str, Any]:
        """The layers whose matrix is smaller than the rank (``min(rows, cols) < r``) get rank ``min(rows, cols)``
        (:mod:`medadapt.models.lora`): which, and the rank each got."""
        from medadapt.models.lora import lora_ranks

        requested = self.config_.rank
        clamped = {name: rank for name, rank in lora_ranks(model).items() if rank < requested}
        notes: dict[str, Any] = {"lora_ranks": {"requested": requested, "clamped": clamped}}
        if clamped:
            ranks = sorted(set(clamped.values()))
            notes["say"] = (f"LoRA rank {requested}: {len(clamped)} layer(s) are too small for it and get rank "
                            f"{', '.join(map(str, ranks))} (min(rows, cols) of their weight): "
                            f"{', '.join(list(clamped)[:3])}{', ...' if len(clamped) > 3 else ''}; the ranks "
                            "used are in run.json (method_notes)")
        return notes

    def finalized_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return merged_state_dict(model)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.config_.rank, "alpha": self.config_.alpha, **self.decoder_record()}


class Adapter(Strategy):
    """Zero-initialised residual bottleneck conv adapters after every encoder and decoder stage (the network's
    declared adapter sites) + heads."""

    name = "adapter"
    freezes = True

    def __init__(self, reduction: int = 4):
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise MedadaptError(f"{self.name}: reduction {reduction!r} must be a positive integer")
        self.config_ = AdapterConfig(reduction=reduction)

    def prepare(self, model: nn.Module) -> nn.Module:
        inject_adapters(model, self.config_, skip=self.dense_modules(model))
        _freeze_all_but(model, adapter_parameters(model) + self.dense_parameters(model))
        return model

    def architecture(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"type": ADAPTER_EXTENSION, "reduction": self.config_.reduction}]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.config_.reduction, **self.decoder_record()}


METHODS = (
    Method(LoRA, summary="low-rank update of every conv and Linear weight (rank r, alpha) + heads; merged after "
                         "training", display="LoRA",
           options=(Option("rank", int, 4, "rank r", flag="--lora-rank", minimum=1),
                    Option("alpha", float, None, "alpha; scale = alpha/r", flag="--lora-alpha", above=0,
                           default_text="r"))),
    Method(Adapter, summary="residual bottleneck conv adapters after each stage (zero-init) + heads",
           display="Adapter",
           options=(Option("reduction", int, 4, "channel reduction factor of the bottleneck",
                           flag="--adapter-reduction", minimum=1),),
           extension=ADAPTER_EXTENSION, rebuild=rebuild_adapters),
)
