"""Strategies that train every parameter: full fine-tuning and training from scratch."""
from __future__ import annotations

from torch import nn

from medadapt.tuning.base import Strategy
from medadapt.tuning.method import Method


class FullFineTuning(Strategy):
    name = "full"


class FromScratch(Strategy):
    """Every parameter, re-initialised as a new network of its kind: nnU-Net's He initialisation (negative slope
    1e-2), or the network's own where its class declares one (MONAI's for SwinUNETR; see
    :func:`medadapt.models.network.initialize_weights`).

    Uses nnU-Net's learning rate for training from random initialisation (1e-2) unless the user gives one:
    the fine-tuning rate of 1e-3 is meant for moving away from a good starting point, not for learning one.
    """

    name = "scratch"
    default_lr = 1e-2

    def prepare(self, model: nn.Module) -> nn.Module:
        from medadapt.models.network import initialize_weights

        initialize_weights(model)
        return super().prepare(model)


METHODS = (
    Method(FromScratch, summary="every parameter, from random initialisation", display="From scratch"),
    Method(FullFineTuning, summary="every parameter, from the foundation model", display="Full"),
)
