"""Which modules of a network are its encoder, decoder, last decoder stage and segmentation head(s).

Strategies decide what to train from these roles, never from parameter-name substrings. nnU-Net's networks
(``PlainConvUNet``, ``ResidualEncoderUNet`` and anything else with ``encoder`` and ``decoder.seg_layers``) are
recognised from their structure. Any other network declares its parts by defining a method::

    def medadapt_parts(self) -> medadapt.models.ModelParts: ...

(MONAI's SwinUNETR does so in :mod:`medadapt.models.swin`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medadapt.errors import MedadaptError

NORM_TYPES: tuple[type, ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                nn.ConvTranspose3d)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)


@dataclass
class ModelParts:
    """Roles of a segmentation network's modules.

    ``heads`` are the 1x1x1 output convolutions (one per deep-supervision resolution); ``last_stage`` the
    modules of the highest-resolution decoder stage (FSEFT's "last block": its upsampling and its convs).
    ``adapter_sites``: the blocks after which medadapt's residual conv adapters go (each returns one
    channel-first feature map); empty: after every ``stages`` entry of the encoder and decoder (nnU-Net).
    ``extra_biases``: additive bias parameters that are no layer's ``bias`` attribute (SwinUNETR's
    relative-position bias tables, added to the attention logits); the bias strategies train them with the
    layer biases.
    """

    encoder: nn.Module | None
    decoder: nn.Module | None
    heads: list[nn.Module] = field(default_factory=list)
    last_stage: list[nn.Module] = field(default_factory=list)
    adapter_sites: list[nn.Module] = field(default_factory=list)
    extra_biases: list[nn.Parameter] = field(default_factory=list)


def model_parts(model: nn.Module) -> ModelParts:
    hook = getattr(model, "medadapt_parts", None)
    if callable(hook):
        parts = hook()
        if not isinstance(parts, ModelParts):
            raise TypeError(f"{type(model).__name__}.medadapt_parts() must return medadapt.models.ModelParts")
        return parts
    encoder = getattr(model, "encoder", None)
    decoder = getattr(model, "decoder", None)
    seg_layers = getattr(decoder, "seg_layers", None) if decoder is not None else None
    if isinstance(encoder, nn.Module) and isinstance(seg_layers, nn.ModuleList):
        last_stage = [m[-1] for m in (getattr(decoder, "transpconvs", None), getattr(decoder, "stages", None))
                      if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)]
        return ModelParts(encoder=encoder, decoder=decoder, heads=list(seg_layers), last_stage=last_stage)
    raise MedadaptError(
        f"cannot tell the encoder, decoder and segmentation head of a {type(model).__name__}; "
        "give the network a medadapt_parts() method returning medadapt.models.ModelParts"
    )


def encoder_features(model: nn.Module, x) -> list:
    """The encoder's outputs for input ``x``: every feature map the encoder hands the decoder (nnU-Net's skips,
    shallow to deep; a SwinUNETR's encoder blocks and Swin stages), as a list.

    A network says how it encodes with a ``medadapt_encode(x)`` method (SwinUNETR, :mod:`medadapt.models.swin`);
    an nnU-Net network's ``encoder`` returns its skips itself. Knowledge distillation between encoders (MedSeqFT)
    compares these maps."""
    hook = getattr(model, "medadapt_encode", None)
    if callable(hook):
        return list(hook(x))
    encoder = model_parts(model).encoder
    if encoder is None:
        raise MedadaptError(f"{type(model).__name__} declares no encoder; give it a medadapt_encode(x) method")
    out = encoder(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters (nnU-Net's decoder references the encoder; these are the encoder's own)."""
    return module_parameters([model_parts(model).encoder])


def head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for head in model_parts(model).heads for p in head.parameters()}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return _unique(p for head in model_parts(model).heads for p in head.parameters())


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The additive biases of the layers that are not normalisation layers (convolutions, Linear layers: BitFit's
    set), then the network's declared ``extra_biases`` (SwinUNETR's relative-position bias tables)."""
    layer_biases = [m.bias for m in model.modules()
                    if not is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter)]
    return _unique(layer_biases + list(model_parts(model).extra_biases))


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine scale and shift of every normalisation layer."""
    return _unique(p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False))


def module_parameters(modules) -> list[nn.Parameter]:
    return _unique(p for m in modules if m is not None for p in m.parameters())


def decoder_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's own top-level modules (its children that hold no part of the encoder; nnU-Net's decoder keeps
    a reference to the encoder, which is left out), heads included: what covers every decoder layer without
    reaching into the encoder."""
    parts = model_parts(model)
    if parts.decoder is None:
        return []
    encoder = {id(m) for m in parts.encoder.modules()} if parts.encoder is not None else set()

    def own(module: nn.Module) -> list[nn.Module]:
        if id(module) in encoder:
            return []
        if not any(id(m) in encoder for m in module.modules()):
            return [module]
        return [m for child in module.children() for m in own(child)]

    return own(parts.decoder)


def decoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The decoder's own parameters: nnU-Net's decoder keeps a reference to the encoder, which is excluded."""
    parts = model_parts(model)
    encoder = {id(p) for p in module_parameters([parts.encoder])}
    return [p for p in module_parameters([parts.decoder]) if id(p) not in encoder]
