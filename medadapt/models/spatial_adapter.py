"""FSEFT's spatial adapter: a SwinUNETR decoder block and a new classifier on the last feature map of a frozen
foundation model (Silva-Rodríguez et al., Sec. 3, "Few-shot adapters", and Sec. 4, "Spatial adapter training").

The foundation's classifier (its full-resolution segmentation head) is replaced by::

    features (C_f channels, the head's input) -> UnetResBlock(C_f -> width, kernel k) -> Conv 1x1x1 (width -> K)

``UnetResBlock`` is MONAI's residual block, the decoder block of SwinUNETR the paper names: conv k³ → norm →
LeakyReLU → conv k³ → norm, plus a 1×1×1 conv → norm on the skip path when the width changes (always present
in MONAI's block when in ≠ out; with in = out the skip is the identity), summed and passed through LeakyReLU
(negative slope 0.01). "Three stacked convolutions and one skip connection": conv1, conv2 and the skip conv.
The paper says batch normalisation; the authors' code (``fseft/models/adapters.py``: MONAI's ``UnetResBlock``
with ``norm_name="instance"``) uses instance normalisation without affine parameters, which is medadapt's
default (``norm="instance"``; ``norm="batch"`` is the text's reading). The classifier is a new 1×1×1
convolution with PyTorch's default initialisation, as the code's ``LinearProbe``. ``kernel_size=1`` gives the paper's Fig. 2a comparison, an "MLP" adapter (per-voxel, no spatial
context). The classifier gives one output per target class (sigmoid for a sigmoid model).

The adapter replaces the head *module* wherever the network keeps it (``model_parts(model).heads[-1]``, the
full-resolution head), so the network's own forward runs it; deep supervision is switched off (the adapter
sits on the last feature map only). A model folder records it as an extension
``{"type": "spatial-adapter", "kernel_size", "width"}`` and rebuilds it on load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import model_parts

EXTENSION = "spatial-adapter"
#: the adapter's normalisation -> MONAI's norm_name (instance: InstanceNorm, affine False, no running stats)
NORMS = {"instance": "instance", "batch": "batch"}


@dataclass(frozen=True)
class SpatialAdapterConfig:
    kernel_size: int = 3
    width: int | None = None  #: the adapter's output channels; None: the feature map's channels (the paper's)
    #: instance (the authors' code: instance norm without affine parameters) or batch (the text)
    norm: str = "instance"

    def __post_init__(self):
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise MedadaptError(f"spatial adapter: kernel_size {self.kernel_size!r} must be an odd positive integer "
                                "(3: the paper's spatial adapter; 1: its MLP comparison)")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise MedadaptError(f"spatial adapter: width {self.width!r} must be a positive integer")
        if self.norm not in NORMS:
            raise MedadaptError(f"spatial adapter: norm {self.norm!r} is not one of {', '.join(NORMS)}")


class SpatialAdapterHead(nn.Module):
    """``classifier(adapter(features))``: what replaces the foundation's classifier."""

    def __init__(self, in_channels: int, out_channels: int, config: SpatialAdapterConfig, dims: int = 3):
        # MONAI imported here, not with the module: importing any of it loads all of MONAI (seconds), which
        # the method registry (it imports this module's config) and every process listing methods would pay
        from monai.networks.blocks.dynunet_block import UnetResBlock

        super().__init__()
        width = config.width or in_channels
        self.adapter = UnetResBlock(dims, in_channels, width, kernel_size=config.kernel_size, stride=1,
                                    norm_name=NORMS[config.norm],
                                    act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.classifier = conv(width, out_channels, kernel_size=1)
        self.config = config

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.adapter(features))


def _head_conv(head: nn.Module) -> nn.Module:
    convs = [m for m in head.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if len(convs) != 1:
        raise MedadaptError(f"cannot place a spatial adapter before a {type(head).__name__} head: it is not one "
                            "1x1 convolution")
    return convs[0]


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise MedadaptError("the segmentation head is not a submodule of the network")


def inject_spatial_adapter(model: nn.Module, config: SpatialAdapterConfig) -> SpatialAdapterHead:
    """Replace the full-resolution head of ``model`` by a :class:`SpatialAdapterHead` with the head's input and
    output channels (its weights new, from torch's global generator: the adapter as MONAI initialises it, the
    classifier as PyTorch initialises a new convolution, as the authors' code does). Deep supervision off."""
    from medadapt.models.network import set_deep_supervision

    if has_spatial_adapter(model):
        raise MedadaptError("this network already has a spatial adapter")
    head = model_parts(model).heads[-1]
    conv = _head_conv(head)
    weight = conv.weight
    new = SpatialAdapterHead(conv.in_channels, conv.out_channels, config, dims=weight.dim() - 2)
    new.to(device=weight.device, dtype=weight.dtype)
    parent, name = _parent_of(model, head)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
    set_deep_supervision(model, False)
    return new


def spatial_adapter_of(model: nn.Module) -> SpatialAdapterHead | None:
    return next((m for m in model.modules() if isinstance(m, SpatialAdapterHead)), None)


def has_spatial_adapter(model: nn.Module) -> bool:
    return spatial_adapter_of(model) is not None


def extension_record(model: nn.Module) -> dict:
    head = spatial_adapter_of(model)
    return {"type": EXTENSION, "kernel_size": head.config.kernel_size,
            "width": head.config.width, "norm": head.config.norm}


def apply_extension_record(model: nn.Module, record: dict) -> None:
    inject_spatial_adapter(model, SpatialAdapterConfig(kernel_size=int(record["kernel_size"]),
                                                       width=None if record.get("width") is None
                                                       else int(record["width"]),
                                                       # folders written before the option had batch norm
                                                       norm=str(record.get("norm", "batch"))))
