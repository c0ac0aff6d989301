"""Residual bottleneck conv adapters after every encoder and decoder stage of a U-Net (or SwinUNETR conv block).

An adapter computes ``x + up(act(down(x)))``: ``down`` a 3x3x3 conv ``C -> max(1, C // reduction)`` (spatial, as
FSEFT's spatial adapters argue for dense prediction), LeakyReLU(0.01), ``up`` a 1x1x1 conv back to ``C``. ``up``'s
weight and bias start at zero, so an adapted network computes exactly what the foundation model computes until the
adapters are trained. The conv ops have the dimensionality of the network (found from the stage's convs).

Placement: after the convolution blocks of every stage of the encoder (``model_parts(model).encoder.stages[i]``)
and of the decoder (``decoder.stages[i]``) of nnU-Net's PlainConvUNet and ResidualEncoderUNet. The adapted encoder
output is both the skip connection and the next stage's input. A network that declares ``adapter_sites`` in its
:class:`~medadapt.models.parts.ModelParts` gets them there instead: SwinUNETR after each of its ten conv blocks
(``encoder1``-``encoder4`` and ``encoder10``, whose outputs are the skip connections and the bottleneck, and
``decoder5``-``decoder1``); not inside the Swin transformer, whose blocks work on channel-last token windows,
not on feature maps a spatial conv adapter can take.

Mechanism: the adapter becomes a child ``medadapt_adapter`` of the module that produces the stage's output (the
stage itself, or, where the stage is an ``nn.Sequential`` whose forward would also run a new child, its last
non-``Sequential`` element), and a forward hook -- the module-level function :func:`_adapter_hook`, not a closure --
returns ``module.medadapt_adapter(output)`` (the adapter includes the residual). Hooks live in the module's
``_forward_hooks`` dict, so ``copy.deepcopy`` carries them and they call the copy's own adapter;
:func:`remove_adapters` finds them by identity of the function, so it also works on copies (hook handles would not).

State dict: the base network's keys are unchanged; the adapters add keys containing ``.medadapt_adapter.`` (e.g.
``encoder.stages.0.0.medadapt_adapter.down.weight``; nnU-Net's decoder keeps a reference to the encoder, so the
encoder's adapters also appear under ``decoder.encoder.``). Load a foundation state dict into an adapted network
with :func:`load_base_state`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import model_parts

ADAPTER_NAME = "medadapt_adapter"

_CONV_BY_DIM = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck width of each adapter: ``max(1, C // reduction)`` for a stage with ``C`` output channels."""

    reduction: int = 4

    def __post_init__(self):
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 1:
            raise MedadaptError(f"adapter reduction must be a whole number >= 1 (got {self.reduction!r})")


class ConvAdapter(nn.Module):
    """``x + up(act(down(x)))`` with a spatial ``down`` conv and a zero-initialised 1x1 ``up`` conv."""

    def __init__(self, channels: int, reduction: int = 4, dim: int = 3):
        super().__init__()
        if dim not in _CONV_BY_DIM:
            raise ValueError(f"adapters need a 1, 2 or 3-D network (got {dim}-D)")
        conv = _CONV_BY_DIM[dim]
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.hidden = hidden
        self.down = conv(channels, hidden, kernel_size=3, padding=1, bias=True)
        self.act = nn.LeakyReLU(0.01)
        self.up = conv(hidden, channels, kernel_size=1, bias=True)
        # He init for the LeakyReLU that follows (as nnU-Net initialises its convs); the up projection starts at 0.
        nn.init.kaiming_normal_(self.down.weight, a=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"


def _adapter_hook(module: nn.Module, args, output):
    """Forward hook: the hooked module's output passed through its adapter (which adds the residual)."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a medadapt adapter can only follow a module returning one tensor, not {type(output)}")
    return getattr(module, ADAPTER_NAME)(output)


def _output_module(stage: nn.Module) -> nn.Module:
    # A Sequential runs every child, so an adapter added to it would run twice; its output is its last element's.
    block = stage
    while isinstance(block, nn.Sequential):
        if len(block) == 0:
            raise MedadaptError(f"cannot place an adapter after an empty stage ({type(stage).__name__})")
        block = block[-1]
    return block


def _last_conv(block: nn.Module) -> nn.Module:
    convs = [m for name, m in block.named_modules() if isinstance(m, _CONV_TYPES) and ADAPTER_NAME not in name]
    if not convs:
        raise MedadaptError(f"cannot place an adapter after a {type(block).__name__}: it has no convolution")
    return convs[-1]


def _stages(model: nn.Module) -> list[nn.Module]:
    parts = model_parts(model)
    if parts.adapter_sites:
        return list(parts.adapter_sites)
    stages = []
    for role, part in (("encoder", parts.encoder), ("decoder", parts.decoder)):
        part_stages = getattr(part, "stages", None)
        if not isinstance(part_stages, (nn.Sequential, nn.ModuleList)):
            raise MedadaptError(
                f"cannot place adapters in a {type(model).__name__}: its {role} has no 'stages' list "
                "(adapters support nnU-Net's PlainConvUNet and ResidualEncoderUNet, and networks that declare "
                "adapter_sites in medadapt_parts())"
            )
        stages += list(part_stages)
    return stages


def inject_adapters(model: nn.Module, config: AdapterConfig, skip: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """Add a residual adapter after every encoder and decoder stage (or declared adapter site) of ``model``, in
    place; not after a stage inside a module of ``skip`` (a decoder that trains in full needs none).

    The base parameters keep their ``requires_grad`` (the strategy freezes them); the adapters' are trainable.
    Returns the adapters, encoder stages first, on the device and dtype of the stage they follow.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError("inject_adapters needs a medadapt.models.adapters.AdapterConfig")
    if has_adapters(model):
        raise MedadaptError("this network already has adapters; remove_adapters() it before injecting again")
    skipped = {id(m) for s in skip for m in s.modules()}
    blocks = [_output_module(stage) for stage in _stages(model) if id(stage) not in skipped]
    adapters = []
    for block in blocks:
        conv = _last_conv(block)
        weight = conv.weight
        adapter = ConvAdapter(conv.out_channels, config.reduction, dim=weight.dim() - 2)
        adapter.to(device=weight.device, dtype=weight.dtype)
        block.add_module(ADAPTER_NAME, adapter)
        block.register_forward_hook(_adapter_hook)
        adapters.append(adapter)
    return adapters


def _adapted_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "_modules", {}).get(ADAPTER_NAME), ConvAdapter)]


def has_adapters(model: nn.Module) -> bool:
    return bool(_adapted_blocks(model))


def adapters_of(model: nn.Module) -> list[ConvAdapter]:
    return [m._modules[ADAPTER_NAME] for m in _adapted_blocks(model)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (and nothing else), in module order."""
    return [p for a in adapters_of(model) for p in a.parameters()]


def remove_adapters(model: nn.Module) -> nn.Module:
    """Remove every adapter and its hook, in place; returns ``model`` with its original keys and outputs."""
    for block in _adapted_blocks(model):
        hook_ids = [k for k, fn in block._forward_hooks.items() if fn is _adapter_hook]
        for k in hook_ids:
            block._forward_hooks.pop(k)
            block._forward_hooks_with_kwargs.pop(k, None)
            block._forward_hooks_always_called.pop(k, None)
        del block._modules[ADAPTER_NAME]
    return model


def is_adapter_key(key: str) -> bool:
    return f".{ADAPTER_NAME}." in f".{key}"


def load_base_state(model: nn.Module, state_dict: dict) -> None:
    """Load a foundation (adapter-free) state dict into an adapted network.

    Strict for everything but the adapters: raises :class:`MedadaptError` naming the keys if any base key is missing
    from ``state_dict`` or ``state_dict`` has keys the network does not, before loading anything. The adapters keep
    their current weights (their keys may be present in ``state_dict``, then they are loaded too).
    """
    expected = set(model.state_dict().keys())
    given = set(state_dict.keys())
    missing = sorted(k for k in expected - given if not is_adapter_key(k))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        def some(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {some(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
        raise MedadaptError("the weights do not fit this network: " + "; ".join(problems)
                            + "; build the network from the same plans/preset as the checkpoint")
    model.load_state_dict(state_dict, strict=False)
