"""Strategies that train a fixed, structurally defined subset of the parameters and freeze the rest.

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer, so they cannot move (not even by
weight decay) and autograd computes no gradient for them. Which parameters belong to which role comes from
:func:`medadapt.models.parts.model_parts` (the module structure), never from parameter names. Every method
trains the segmentation head(s), the task's classifier, as in the DGST paper's baselines.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from medadapt.models.parts import (bias_parameters, decoder_parameters, is_conv, model_parts, module_parameters,
                                   norm_parameters)
from medadapt.tuning.base import Strategy
from medadapt.tuning.method import Method


def _detach_bias(module: nn.Module, args) -> None:
    module._medadapt_bias = module._parameters["bias"]
    module._parameters["bias"] = None


def _add_bias(module: nn.Module, args, output):
    bias = module._medadapt_bias
    module._parameters["bias"] = bias
    del module._medadapt_bias
    return output + bias.view(1, -1, *([1] * (output.ndim - 2)))


def decouple_bias(conv: nn.Module) -> None:
    """Compute ``conv(x) + b`` as a bias-free convolution followed by an addition.

    PyTorch's CPU convolution backward computes the weight gradient whenever the bias needs one, even for a
    frozen weight; with the bias added separately a frozen weight costs no gradient (bias-only training gets
    cheaper, as it does with cuDNN). Same parameters and state-dict keys; forward hooks only.
    """
    if _add_bias not in conv._forward_hooks.values():
        conv.register_forward_pre_hook(_detach_bias)
        conv.register_forward_hook(_add_bias)


def recouple_bias(model: nn.Module) -> None:
    """Remove :func:`decouple_bias`'s hooks (found by identity, so this also works on deep copies)."""
    for m in model.modules():
        for hooks, fn in ((m._forward_pre_hooks, _detach_bias), (m._forward_hooks, _add_bias)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]


class SubsetStrategy(Strategy):
    """Train only ``trainable_subset(model)`` and the heads; freeze everything else."""

    name: ClassVar[str] = "subset"
    freezes: ClassVar[bool] = True

    def trainable_subset(self, model: nn.Module) -> list[nn.Parameter]:
        """The method's parameters besides the heads (which every method trains)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        keep = {id(p) for p in self.trainable_subset(model) + self.dense_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        for m in model.modules():  # (a Linear layer's backward computes no gradient for a frozen weight)
            if is_conv(m) and m.bias is not None and m.bias.requires_grad and not m.weight.requires_grad:
                decouple_bias(m)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        recouple_bias(model)
        return model


class LinearProbe(SubsetStrategy):
    name = "linear-probe"

    def trainable_subset(self, model):
        return []


class BiasOnly(SubsetStrategy):
    """BitFit: the biases of the convolutions and Linear layers, and the network's declared extra biases
    (SwinUNETR's relative-position bias tables); normalisation shifts are ``affine-norm``'s) + heads."""

    name = "bias"

    def trainable_subset(self, model):
        return bias_parameters(model)


class AffineNorm(SubsetStrategy):
    name = "affine-norm"

    def trainable_subset(self, model):
        return norm_parameters(model)


class BiasNorm(SubsetStrategy):
    name = "bias-norm"

    def trainable_subset(self, model):
        return bias_parameters(model) + norm_parameters(model)


class EncoderOnly(SubsetStrategy):
    name = "encoder-only"

    def trainable_subset(self, model):
        return module_parameters([model_parts(model).encoder])


class DecoderOnly(SubsetStrategy):
    name = "decoder-only"

    def trainable_subset(self, model):
        return decoder_parameters(model)


class FineTuneLast(SubsetStrategy):
    """FSEFT's FT-Last: the last (highest-resolution) decoder stage — its upsampling and convs — + heads."""

    name = "ft-last"

    def trainable_subset(self, model):
        return module_parameters(model_parts(model).last_stage)


class Generalization(Strategy):
    """No adaptation: the foundation's own outputs for the target structures, matched by label name (FSEFT's
    "Generalization" row). The workflow keeps the foundation's heads for the dataset's classes and skips
    training."""

    name = "generalization"
    trains = False

    def prepare(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []


METHODS = (
    Method(LinearProbe, summary="the segmentation head(s) only",
           display="LinearProb", cacheable=True),
    Method(BiasOnly, summary="all layer biases + heads (BitFit)",
           display="Bias"),
    Method(AffineNorm, summary="affine scale/shift of the normalisation layers + heads",
           display="Affine-IN"),
    Method(BiasNorm, summary="layer biases + normalisation affine parameters + heads",
           display="Bias+Norm"),
    Method(EncoderOnly, summary="the encoder + heads",
           display="Encoder Only"),
    Method(DecoderOnly, summary="the decoder (which holds the heads)",
           display="Decoder Only"),
    Method(FineTuneLast, summary="the last decoder stage + heads (FSEFT's FT-Last)",
           display="FT-last"),
    Method(Generalization, summary="no training: the foundation's own outputs for the target's structures, by name "
                                   "(zero-shot)",
           display="Generalization"),
)
