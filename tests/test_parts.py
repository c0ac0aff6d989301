"""Roles (encoder, decoder, heads, last stage) from the structure: nnU-Net's networks and a documented hook."""
import pytest
import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import ModelParts, model_parts
from medadapt.tuning import make_strategy, method_names
from tests.conftest import any_strategy, random_batches, segmentation_loss


def residual_encoder_unet():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(0)
    return ResidualEncoderUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], 2, [1, 1], True,
                               nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                               {"inplace": True}, deep_supervision=True)


class TinyNet(nn.Module):
    """Not an nnU-Net network: declares its parts with medadapt_parts()."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU())
        self.up = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.body(x)))

    def medadapt_parts(self):
        return ModelParts(encoder=self.body, decoder=self.up, heads=[self.head], last_stage=[self.up])


@pytest.mark.parametrize("method", method_names(training_only=True))
def test_every_method_trains_a_residual_encoder_unet(method):
    model = residual_encoder_unet()
    strategy = any_strategy(method, gamma=2, rank=2, reduction=2)
    model = strategy.prepare(model)
    if strategy.needs_calibration:
        strategy.calibrate(model, segmentation_loss, random_batches(1))
    opt = torch.optim.SGD(strategy.parameters(model), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    strategy.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in random_batches(2):
        opt.zero_grad()
        segmentation_loss(model, batch).backward()
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed
    assert all(p.requires_grad or torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    strategy.finalize(model)


def test_custom_network_declares_its_parts():
    net = TinyNet()
    parts = model_parts(net)
    assert parts.heads == [net.head]
    model = make_strategy("linear-probe").prepare(net)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    model = make_strategy("ft-last").prepare(TinyNet())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"up.weight", "up.bias", "head.weight",
                                                                             "head.bias"}


def test_unknown_network_gets_a_clear_error():
    with pytest.raises(MedadaptError, match="medadapt_parts"):
        model_parts(nn.Sequential(nn.Conv3d(1, 2, 1)))
