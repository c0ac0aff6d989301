"""One way to build a run's training from its recipe: used by ``finetune``, every stage of ``seqft`` (fine-tuning,
KD-based fine-tuning, LoRA-based KD, joint training), ``pretrain`` and, through them, the grids.

A recipe (:mod:`medadapt.engine.recipe`) says how a method trains: augmentation, head initialisation, deep
supervision, per-method learning rate and budget, epochs, batch and patches per case, the loss and its Dice
smoothing. This module turns it into what the engine runs, the same way for every workflow:

* :func:`resolve_recipe`: the recipe a method trains with: its ``methods`` entry, then the command line's
  budget, then an epoch of ``cases`` resolved for the number of training cases;
* :func:`training_config`: the engine's settings (the method's learning rate, the model's output activation,
  the precision, ``--lr``); :func:`for_cases` resolves an epoch of ``cases`` in settings made before the cases
  were known (a stream's tasks);
* :func:`recipe_sampler`: the patch sampler with the recipe's augmentation preset, its crop policy and its
  patches per case;
* :func:`prepare_network`: a fresh head initialised and deep supervision set as the recipe says;
* :func:`prepare_strategy`: the strategy prepares the network with torch's generator on the run's
  ``extension`` stream (adapters, LoRA factors, scratch weights).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from medadapt.data.augmentation import Augmentation, augmentation_preset
from medadapt.data.sampling import PatchSampler
from medadapt.engine import EngineOptions, TrainingConfig
from medadapt.engine.recipe import Recipe, load_recipe
from medadapt.utils import seeds

#: crops for what labels play no part in (distillation on buffer samples, masked reconstruction): anywhere
UNBIASED_CROPS = {"oversample_foreground": 0.0}


def resolve_recipe(recipe: "str | Path | Recipe", method: str, *, epochs: int | None = None,
                   iterations_per_epoch: int | None = None, cases: int | None = None) -> Recipe:
    """``recipe`` as ``method`` trains with it: the method's entry of its ``methods`` applied (budget, batch,
    learning rate), then the command line's ``epochs`` and ``iterations_per_epoch`` where given, then an epoch
    of ``cases`` resolved for ``cases`` training cases (left as is when ``cases`` is None: a stream resolves it
    per task, :func:`for_cases`)."""
    resolved = load_recipe(recipe).for_method(method).with_overrides(epochs=epochs,
                                                                      iterations_per_epoch=iterations_per_epoch)
    return resolved if cases is None else resolved.for_cases(cases)


def training_config(recipe: Recipe, method: str, seed: int, activation: str, engine: EngineOptions | None = None,
                    lr: float | None = None) -> TrainingConfig:
    """The engine's settings for ``method`` from ``recipe`` (its learning rate for the method) on a model with
    output ``activation``, at the precision ``engine`` resolves for this process's device; ``lr`` replaces the
    initial learning rate where given (``--lr``)."""
    config = (engine or EngineOptions()).configure(TrainingConfig.from_recipe(recipe, method, seed,
                                                                              activation=activation))
    return config if lr is None else dataclasses.replace(config, initial_lr=lr)


def for_cases(config: TrainingConfig, recipe: Recipe, cases: int) -> TrainingConfig:
    """``config`` (made from ``recipe``) with an epoch of ``cases`` resolved for ``cases`` training cases; the same
    object when the recipe's epoch is a number of iterations."""
    resolved = recipe.for_cases(cases)
    if resolved is recipe:
        return config
    return dataclasses.replace(config, iterations_per_epoch=resolved.iterations_per_epoch)


def recipe_sampler(recipe: Recipe, cases: Sequence[Any], patch_size: Sequence[int], batch_size: int, *,
                   unbiased: bool = False, augmentation: "Augmentation | str | None" = "recipe",
                   case_weights: Sequence[float] | None = None) -> PatchSampler:
    """The patch sampler ``recipe`` trains with on ``cases``: its augmentation preset (nnU-Net's pipeline with a
    third of the patches forced onto foreground, or FSEFT's intensity shift with 1:1 foreground/background
    crops) and its patches per case. ``unbiased``: crops anywhere (samples whose labels play no part);
    ``augmentation``: ``recipe`` (the preset's), None (none: cached features) or another augmentation (a
    pretext task's own)."""
    preset, crops = augmentation_preset(recipe.augmentation, patch_size)
    chosen = preset if isinstance(augmentation, str) and augmentation == "recipe" else augmentation
    return PatchSampler(cases, patch_size, batch_size, augmentation=chosen,
                        patches_per_case=recipe.patches_per_case, case_weights=case_weights,
                        **(UNBIASED_CROPS if unbiased else crops))


def prepare_network(network: torch.nn.Module, recipe: Recipe, seed: int, fresh_head: bool = True) -> torch.nn.Module:
    """``network`` as ``recipe`` trains it: a fresh head (``fresh_head``) re-initialised as PyTorch initialises a
    new convolution when the recipe's ``head_init`` is ``torch`` (:func:`reset_heads`), and deep supervision off
    when the recipe says so. Returns the network (changed in place)."""
    if fresh_head and recipe.head_init == "torch":
        reset_heads(network, seed)
    if recipe.deep_supervision is False:
        from medadapt.models.network import set_deep_supervision

        set_deep_supervision(network, False)
    return network


def prepare_strategy(strategy, network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``strategy.prepare(network)`` with torch's global generator on the run's ``extension`` stream: the
    weights a method adds or re-initialises (scratch, adapters, LoRA factors) come from the seed alone."""
    seeds.seed_global(seed, "extension")
    return strategy.prepare(network)


def reset_heads(network: torch.nn.Module, seed: int) -> None:
    """Re-initialise the segmentation heads as PyTorch initialises a new convolution (a recipe's ``head_init:
    torch``; FSEFT's code: a new ``nn.Conv3d`` classifier), from a generator seeded by ``seed``."""
    from medadapt.models.parts import model_parts

    with seeds.torch_stream(seed, "head"):
        for head in model_parts(network).heads:
            for m in head.modules():
                if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
                    m.reset_parameters()
