"""The strategy interface: how a fine-tuning method tells any training loop what to train.

A strategy is a small object, not a trainer subclass. Any loop (medadapt's engine, a MONAI loop, a plain
PyTorch loop) uses it the same way::

    strategy = medadapt.tuning.make_strategy("dgst", gamma=1)
    model = strategy.prepare(model)                        # freeze / re-initialise / inject layers
    optimizer = torch.optim.SGD(strategy.parameters(model), lr=1e-3, momentum=0.99, nesterov=True)
    strategy.attach(optimizer)                             # enforce update masks around optimizer.step()
    ...                                                    # the usual forward / backward / step
    model = strategy.finalize(model)                       # e.g. fold low-rank updates into the weights

Masks are enforced with ``torch.optim`` step pre/post hooks, so they hold for every optimizer, including
its momentum and weight decay, and the loop needs no strategy-specific code.

The training step itself belongs to the strategy (:meth:`Strategy.train_step`), so that a method which routes
different losses to different parameters (a distillation term to some weights only, a second optimiser, an
alternating update) is a strategy, not an engine of its own. The engine hands it a :class:`StepContext` (the
model, the module to run forward through, the optimiser, the recipe's loss term and any extra terms, the
clipping) and knows no method; the default step is :func:`default_train_step`: forward, the sum of every loss
term, backward, clip, step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

# the engine's side of the interface, defined below both (re-exported: methods import them from here)
from medadapt.engine.strategy import LossTerm, StepContext, default_train_step  # noqa: F401


#: how a method that freezes part of the network treats the foundation's decoder: ``pretrained`` (as the
#: encoder: the method applies to it) or ``new`` (a decoder trained on a pretext task, e.g. an MAE's
#: reconstruction decoder, is a new module for segmentation: it trains in full, like the heads, and the method
#: applies to the encoder; MedSeqFT, Sec. II-B: every strategy updates "newly added modules (e.g., decoders or
#: segmentation heads)")
DECODER_POLICIES = ("pretrained", "new")


class Strategy:
    """Base class: train every parameter (full fine-tuning). A method's name is its class's ``name``; its
    summary, options and capabilities are its definition's (:class:`medadapt.tuning.method.Method`)."""

    name: ClassVar[str] = "strategy"  #: (every method's class names itself: its definition's name)
    #: learning rate the engine uses when the user gives none (None: the engine's fine-tuning default)
    default_lr: ClassVar[float | None] = None
    #: False for a method that evaluates the foundation as it is (its own heads, no training step)
    trains: ClassVar[bool] = True
    #: True for a method that freezes part of the network (the only ones a ``decoder`` policy concerns)
    freezes: ClassVar[bool] = False
    #: the decoder policy (:data:`DECODER_POLICIES`), set by :func:`medadapt.tuning.make_strategy`
    decoder: str = "pretrained"

    def dense_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules the method trains in full whatever it does elsewhere: the heads, and with the ``new``
        decoder policy every module of the decoder (not reaching into the encoder)."""
        from medadapt.models.parts import decoder_modules, model_parts

        heads = list(model_parts(model).heads)
        if self.decoder != "new":
            return heads
        own = decoder_modules(model)
        inside = {id(m) for d in own for m in d.modules()}
        return own + [h for h in heads if id(h) not in inside]

    def dense_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of :meth:`dense_modules`, each once."""
        seen, out = set(), []
        for module in self.dense_modules(model):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def decoder_record(self) -> dict[str, Any]:
        """What :meth:`config` records of the decoder policy: nothing for the default (so the records of runs
        written before the policy existed are unchanged)."""
        return {} if self.decoder == "pretrained" else {"decoder": self.decoder}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make ``model`` ready for training with this strategy; returns the model to train."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters to hand to the optimizer."""
        return [p for p in model.parameters() if p.requires_grad]

    def updated_per_step(self, model: nn.Module) -> int:
        """How many parameter entries one optimizer step may change (the trainable count for most methods)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def attach(self, optimizer) -> None:
        """Register whatever hooks this strategy needs on ``optimizer`` (none by default)."""

    #: whether :meth:`calibrate` must run once before the first training step (e.g. SGST's selection)
    needs_calibration: ClassVar[bool] = False

    def calibrate(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                  batches: Iterable[dict]) -> None:
        """Look at the training data once before training (``loss_fn(model, batch)`` gives a scalar loss)."""

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        """One training iteration on ``batch`` (already on the device); returns the loss. Override to route
        losses to different parameters; the default is :func:`default_train_step`."""
        return default_train_step(ctx, batch)

    def architecture(self, model: nn.Module) -> list[dict[str, Any]]:
        """Modules the strategy leaves in the final model beyond the plain network (e.g. adapters), as data
        that :func:`medadapt.models.model_folder.ModelFolder.load_network` can rebuild. Empty by default."""
        return []

    def finalize(self, model: nn.Module) -> nn.Module:
        """Return the trained model in its plain architecture (identity by default)."""
        return model

    def finalized_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights :meth:`finalize` would give, leaving ``model`` as it is (training goes on after a
        checkpoint; a parametrized network cannot be deep-copied to finalize a copy)."""
        return model.state_dict()

    def config(self) -> dict[str, Any]:
        """Hyper-parameters, recorded with results."""
        return {"name": self.name, **self.decoder_record()}

    def notes(self, model: nn.Module) -> dict[str, Any]:
        """How the method met this network, once :meth:`prepare` has run: recorded with the run (``run.json``'s
        ``method_notes``); a ``say`` entry is also told to the user (e.g. LoRA's ranks clamped to what a layer
        allows). Empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that must survive a resumed run."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
