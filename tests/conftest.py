import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them, and keep tests deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_unet():
    """A tiny nnU-Net PlainConvUNet (3 stages, 4-8-16 features, conv bias, InstanceNorm, deep supervision)."""
    from medadapt.models import build_network, preset

    def make(seed: int = 0, num_classes: int = 2):
        torch.manual_seed(seed)
        return build_network(preset("cpu-tiny", input_channels=1, num_classes=num_classes))

    return make
