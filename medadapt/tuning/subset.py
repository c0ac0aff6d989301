"""Strategies that train a fixed, structurally defined subset of the parameters and freeze the rest.

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer, so they cannot move (not even by
weight decay) and autograd computes no gradient for them. Which parameters belong to which role comes from
:func:`medadapt.models.parts.model_parts` (the module structure), never from parameter names. Every method
trains the segmentation head(s), the task's classifier, as in the DGST paper's baselines.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from medadapt.models.parts import (bias_parameters, decoder_parameters, head_parameters, model_parts,
                                   module_parameters, norm_parameters)
from medadapt.tuning.base import Strategy


class SubsetStrategy(Strategy):
    """Train only ``trainable_subset(model)``; freeze everything else."""

    name: ClassVar[str] = "subset"

    def trainable_subset(self, model: nn.Module) -> list[nn.Parameter]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        keep = {id(p) for p in self.trainable_subset(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        return model


class LinearProbe(SubsetStrategy):
    name = "linear-probe"
    summary = "the segmentation head(s) only"

    def trainable_subset(self, model):
        return head_parameters(model)


class BiasOnly(SubsetStrategy):
    """BitFit: the biases of the convolutions (normalisation shifts are ``affine-norm``'s) + heads."""

    name = "bias"
    summary = "all convolution biases + heads (BitFit)"

    def trainable_subset(self, model):
        return bias_parameters(model) + head_parameters(model)


class AffineNorm(SubsetStrategy):
    name = "affine-norm"
    summary = "affine scale/shift of the normalisation layers + heads"

    def trainable_subset(self, model):
        return norm_parameters(model) + head_parameters(model)


class BiasNorm(SubsetStrategy):
    name = "bias-norm"
    summary = "convolution biases + normalisation affine parameters + heads"

    def trainable_subset(self, model):
        return bias_parameters(model) + norm_parameters(model) + head_parameters(model)


class EncoderOnly(SubsetStrategy):
    name = "encoder-only"
    summary = "the encoder + heads"

    def trainable_subset(self, model):
        return module_parameters([model_parts(model).encoder]) + head_parameters(model)


class DecoderOnly(SubsetStrategy):
    name = "decoder-only"
    summary = "the decoder (which holds the heads)"

    def trainable_subset(self, model):
        return decoder_parameters(model) + head_parameters(model)


class FineTuneLast(SubsetStrategy):
    """FSEFT's FT-Last: the last (highest-resolution) decoder stage — its upsampling and convs — + heads."""

    name = "ft-last"
    summary = "the last decoder stage + heads (FSEFT's FT-Last)"

    def trainable_subset(self, model):
        return module_parameters(model_parts(model).last_stage) + head_parameters(model)
