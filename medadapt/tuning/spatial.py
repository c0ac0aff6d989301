"""FSEFT's spatial adapter as a strategy: the foundation frozen, its classifier replaced by a spatial adapter
and a new classifier (medadapt.models.spatial_adapter), only those trained.

With every foundation parameter frozen and the input not requiring gradients, autograd records nothing in
the backbone: a training step runs the backbone's forward pass and the adapter's forward and backward, not
the backbone's backward (bench-speed measures the ratio to full fine-tuning).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from medadapt.models.spatial_adapter import (EXTENSION, NORMS, SpatialAdapterConfig, apply_extension_record,
                                             extension_record, inject_spatial_adapter)
from medadapt.tuning.base import Strategy
from medadapt.tuning.method import Method, Option


class SpatialAdapter(Strategy):
    name = "spatial-adapter"

    def __init__(self, kernel_size: int = 3, width: int | None = None, norm: str = "instance"):
        self.config_ = SpatialAdapterConfig(kernel_size=kernel_size, width=width, norm=norm)

    def prepare(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        head = inject_spatial_adapter(model, self.config_)
        for p in head.parameters():
            p.requires_grad_(True)
        return model

    def architecture(self, model: nn.Module) -> list[dict[str, Any]]:
        return [extension_record(model)]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "kernel_size": self.config_.kernel_size, "width": self.config_.width,
                "norm": self.config_.norm}


METHODS = (
    Method(SpatialAdapter, summary="frozen foundation; a SwinUNETR decoder block + new classifier on its last feature "
                                   "map (FSEFT)", display="Spatial adapter",
           options=(Option("kernel_size", int, 3, "kernel size of its convolutions (1: FSEFT's MLP comparison)",
                           flag="--adapter-kernel-size", minimum=1, rule=lambda k: k % 2 == 1, rule_text="odd"),
                    Option("width", int, None, "its output channels", flag="--adapter-width", minimum=1,
                           default_text="the feature map's"),
                    Option("norm", str, "instance", "its normalisation: instance without affine parameters, as the "
                           "authors' code; batch: the text's batch normalisation", flag="--adapter-norm",
                           choices=tuple(NORMS))),
           extension=EXTENSION, rebuild=apply_extension_record, cacheable=True),
)
