"""Strategies that train every parameter: full fine-tuning and training from scratch."""
from __future__ import annotations

from torch import nn

from medadapt.tuning.base import Strategy


class FullFineTuning(Strategy):
    name = "full"
    summary = "every parameter, from the foundation model"


class FromScratch(Strategy):
    """Every parameter, re-initialised as nnU-Net initialises a new network (He, negative slope 1e-2).

    Uses nnU-Net's learning rate for training from random initialisation (1e-2) unless the user gives one:
    the fine-tuning rate of 1e-3 is meant for moving away from a good starting point, not for learning one.
    """

    name = "scratch"
    default_lr = 1e-2
    summary = "every parameter, from random initialisation"

    def prepare(self, model: nn.Module) -> nn.Module:
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        model.apply(InitWeights_He(1e-2))
        return super().prepare(model)
