"""MONAI's SwinUNETR as a medadapt network: built from a plans-style spec, roles declared, MONAI's keys kept.

:class:`SwinUNETR` subclasses :class:`monai.networks.nets.SwinUNETR` and adds only what medadapt needs:

* the builder's signature ``(input_channels, num_classes, deep_supervision, **arch_kwargs)``; ``arch_kwargs``
  are MONAI's constructor arguments (``feature_size``, ``depths``, ``num_heads``, ``window_size``, ...).
  SwinUNETR has no deep supervision: ``deep_supervision`` is accepted and ignored, the forward returns one
  logits tensor (the engine's losses and the predictor take one tensor or a list);
* ``axis_order`` (medadapt's own argument): ``"zyx"`` (default) feeds medadapt's arrays as they are, spatial
  axes (z, y, x) = the image file's voxel axes reversed; ``"xyz"`` is MONAI's layout (the file's voxel axes i,
  j, k in order, as MONAI's ``LoadImage`` gives them): the forward then reverses the spatial axes on the way in
  and back on the way out, so weights trained in a MONAI pipeline see what they were trained on. A MONAI
  checkpoint imported with ``medadapt import-monai`` is built with ``"xyz"``;
* :meth:`medadapt_parts`: encoder = the Swin transformer (``swinViT``) and the conv encoder blocks
  ``encoder1``-``encoder4``, ``encoder10``; decoder = ``decoder5``-``decoder1``; head = ``out`` (its 1x1x1
  conv); last stage = ``decoder1`` (the highest-resolution decoder block: its transposed conv and conv block);
  adapter sites = the ten conv blocks ``encoder1``-``encoder4``, ``encoder10``, ``decoder5``-``decoder1``;
  extra biases = the relative-position bias tables of the window attentions (additive biases of the attention
  logits, see docs/swinunetr.md);
* :meth:`medadapt_init_weights`: MONAI's own initialisation (each layer's ``reset_parameters``, the
  relative-position bias tables truncated-normal with std 0.02), which the constructor already applies;
  :func:`medadapt.models.network.build_network` therefore leaves it alone (no nnU-Net He init), and
  ``scratch`` re-draws it with this method;
* an input-size check that raises :class:`~medadapt.errors.MedadaptError` (one line) instead of MONAI's
  ``ValueError``: every axis of the patch must be a multiple of ``patch_size ** 5`` (32), and in training the
  deepest feature map (patch / 32) must have more than one voxel (instance normalisation needs two).

The module tree, and therefore the state-dict keys, are MONAI's exactly (``swinViT.layers1.0.blocks.0.attn.qkv
.weight``, ``encoder1.layer.conv1.conv.weight``, ``out.conv.conv.weight``, ...): MONAI checkpoints load as
they are, and a model folder's ``weights.pt`` loads into MONAI's own class.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.networks.layers import trunc_normal_
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import ModelParts

AXIS_ORDERS = ("zyx", "xyz")


class SwinUNETR(MonaiSwinUNETR):
    """MONAI's SwinUNETR with medadapt's builder signature, roles and initialisation (see the module doc)."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 axis_order: str = "zyx", **arch_kwargs: Any):
        if axis_order not in AXIS_ORDERS:
            raise MedadaptError(f"SwinUNETR axis_order {axis_order!r}: use 'zyx' (medadapt's arrays) or 'xyz' "
                                "(MONAI's array layout)")
        super().__init__(in_channels=input_channels, out_channels=num_classes, **arch_kwargs)
        self.axis_order = axis_order

    # -- medadapt hooks -----------------------------------------------------------------------------------
    def medadapt_parts(self) -> ModelParts:
        encoder = nn.ModuleList([self.swinViT, self.encoder1, self.encoder2, self.encoder3, self.encoder4,
                                 self.encoder10])
        decoder = nn.ModuleList([self.decoder5, self.decoder4, self.decoder3, self.decoder2, self.decoder1])
        sites = [self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.encoder10,
                 self.decoder5, self.decoder4, self.decoder3, self.decoder2, self.decoder1]
        return ModelParts(encoder=encoder, decoder=decoder, heads=[self.out], last_stage=[self.decoder1],
                          adapter_sites=sites, extra_biases=relative_position_bias_tables(self))

    def medadapt_init_weights(self) -> None:
        """Re-draw every weight as MONAI's constructor draws it (used by the ``scratch`` strategy)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for table in relative_position_bias_tables(self):
            with torch.no_grad():
                trunc_normal_(table, std=0.02)

    def medadapt_encode(self, x_in: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's outputs, as MONAI's forward computes them: the five conv encoder blocks' maps and the
        Swin stage the decoder takes directly (``hidden_states_out[3]``), shallow to deep (axes as given)."""
        if self.axis_order == "xyz":
            x_in = x_in.permute(0, 1, *range(x_in.ndim - 1, 1, -1))
        self._check_input_size(x_in.shape[2:])
        hidden = self.swinViT(x_in, self.normalize)
        return [self.encoder1(x_in), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]

    # -- forward ------------------------------------------------------------------------------------------
    def _check_input_size(self, spatial_shape) -> None:
        shape = [int(s) for s in spatial_shape]
        factor = int(np.power(self.patch_size, 5))
        if any(s % factor for s in shape):
            raise MedadaptError(f"SwinUNETR input {tuple(shape)}: every axis of the patch must be a multiple of "
                                f"{factor} (patch_size {self.patch_size} to the 5th power); choose such a patch size")
        if self.training and int(np.prod([s // factor for s in shape])) < 2:
            raise MedadaptError(f"SwinUNETR input {tuple(shape)}: its deepest feature map (the patch / {factor}) has "
                                "one voxel, which instance normalisation cannot train on; make one axis of the "
                                f"patch at least {2 * factor}")

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if self.axis_order == "zyx":
            return super().forward(x_in)
        reverse = (0, 1, *range(x_in.ndim - 1, 1, -1))
        return super().forward(x_in.permute(reverse)).permute(reverse)


def relative_position_bias_tables(model: nn.Module) -> list[nn.Parameter]:
    """The learned relative-position bias tables of the Swin window attentions in ``model``, in module order."""
    tables = []
    for module in model.modules():
        table = getattr(module, "relative_position_bias_table", None)
        if isinstance(table, nn.Parameter):
            tables.append(table)
    return tables
