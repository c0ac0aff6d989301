"""The interface between the engine and a training method, defined here, below both: what one step works with
(:class:`StepContext`), the plain step (:func:`default_train_step`), a loss term's shape (:data:`LossTerm`), and
the calls the engine makes on a method (:class:`TrainingStrategy`). The methods themselves
(:mod:`medadapt.tuning`) implement it; the engine knows none of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

#: a loss term: ``term(model, batch, outputs) -> scalar tensor``
LossTerm = Callable[[nn.Module, dict, Any], torch.Tensor]


@dataclasses.dataclass
class StepContext:
    """What one training step works with, as the engine gives it to :meth:`TrainingStrategy.train_step`."""

    model: nn.Module  #: the network (the object the strategy prepared; its parameters)
    forward: nn.Module  #: what the forward pass runs through: the model, its DDP wrapper or its compiled form
    optimizer: torch.optim.Optimizer
    loss: LossTerm  #: the recipe's loss
    loss_terms: Sequence[LossTerm] = ()  #: further terms (distillation, unlabelled volumes, ...)
    grad_clip: float | None = None  #: gradient-norm clipping of the model's parameters (None: none)
    #: autocast and loss scaling (:class:`medadapt.engine.precision.MixedPrecision`; None: plain fp32). A step
    #: runs its forward pass and losses under ``precision.autocast()``, calls ``precision.backward(loss)`` (or
    #: ``precision.grad``) and steps every optimiser with ``precision.step(optimizer, params, clip)``, which
    #: unscales and clips before the optimiser's hooks see the gradients and skips the step on inf/NaN; the
    #: engine calls ``precision.update()`` after the step.
    precision: Any = None

    def __post_init__(self) -> None:
        if self.precision is None:
            from medadapt.engine.precision import MixedPrecision

            self.precision = MixedPrecision("fp32")


def default_train_step(ctx: StepContext, batch: dict) -> torch.Tensor:
    """One iteration: forward and the recipe's loss plus every extra term (under autocast), backward (of the
    scaled loss), unscale, clip, step (skipped by the scaler on inf/NaN gradients). Returns the (detached)
    loss; the engine checks it is finite once the step is queued (one host synchronisation per iteration)."""
    ctx.optimizer.zero_grad(set_to_none=True)
    with ctx.precision.autocast():
        outputs = ctx.forward(batch["image"])
        loss = ctx.loss(ctx.model, batch, outputs)
        for term in ctx.loss_terms:
            loss = loss + term(ctx.model, batch, outputs)
    ctx.precision.backward(loss)
    ctx.precision.step(ctx.optimizer, ctx.model.parameters(), ctx.grad_clip)
    return loss.detach()


@runtime_checkable
class TrainingStrategy(Protocol):
    """What the engine calls on a training method (:class:`medadapt.tuning.base.Strategy` implements it)."""

    name: str

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters to hand to the optimizer."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer exists (a method that hooks it)."""

    #: whether :meth:`calibrate` must run once before the first training step (e.g. SGST's selection)
    needs_calibration: bool

    def calibrate(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                  batches: Iterable[dict]) -> None:
        """Look at the training data once before training (``loss_fn(model, batch)`` gives a scalar loss)."""

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        """One iteration; returns the (detached) loss."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a resumed run."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
