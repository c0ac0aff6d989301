"""A model folder's self-supervised pretext network: its record in ``plans.json`` and :func:`load_pretext`.

Scoring downstream cases by the foundation's own self-supervised loss (MedSeqFT's MDS, Sec. III-C: the loss
averaged over many random maskings) needs the network that the pretext task trained, with its reconstruction
head. A model folder records it in ``plans.json`` under ``pretext``::

    {"objective": "mae",                              # masked-volume reconstruction (medadapt.ssl.mae)
     "mask": {"block_size": [z, y, x], "mask_ratio": r},
     "network": {...},                                # the pretext network's spec: output channels = input channels
     "weights": "weights.pt" | "pretext.pt",
     "provenance": {...}}                             # how it was trained (recipe, data, seed)

* ``weights.pt``: the folder *is* a self-supervised foundation (``medadapt pretrain --objective mae``): the
  network in ``weights.pt`` is the pretext network, and it has no segmentation head.
* ``pretext.pt``: a supervised foundation with a reconstruction pathway added (``medadapt pretrain-ssl-head``):
  ``pretext.pt`` holds the pretext network's own tensors (its decoder, trained as a copy of the foundation's,
  and its reconstruction head); its encoder is the foundation's, read from ``weights.pt``, so the pathway
  always sits on exactly the encoder it was trained on.

``load_pretext(folder).sample_losses(images, generator)`` gives one reconstruction loss per image for one
random masking, without gradients.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.model_folder import ModelFolder, load_model_folder
from medadapt.models.network import NetworkSpec, build_network, set_deep_supervision
from medadapt.models.parts import model_parts
from medadapt.ssl.mae import MaskConfig, apply_mask, mae_loss, random_block_mask

PRETEXT_FILE = "pretext.pt"
WEIGHTS_FILE = "weights.pt"
OBJECTIVES = ("mae",)


@dataclasses.dataclass
class PretextRecord:
    """The ``pretext`` record of a model folder's ``plans.json`` (see the module docstring)."""

    objective: str
    mask: MaskConfig
    network: NetworkSpec
    weights: str  #: ``weights.pt`` (a self-supervised foundation) or ``pretext.pt`` (an added pathway)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise MedadaptError(f"pretext objective {self.objective!r}: not one of {', '.join(OBJECTIVES)}; "
                                "upgrade medadapt")
        if self.weights not in (WEIGHTS_FILE, PRETEXT_FILE):
            raise MedadaptError(f"pretext weights {self.weights!r}: must be {WEIGHTS_FILE} or {PRETEXT_FILE}")
        if self.network.num_classes != self.network.input_channels:
            raise MedadaptError(f"pretext network: {self.network.num_classes} output channel(s) for "
                                f"{self.network.input_channels} input channel(s); a reconstruction has one output "
                                "per input channel")

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "mask": self.mask.to_dict(), "network": self.network.to_dict(),
                "weights": self.weights, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PretextRecord":
        try:
            return cls(objective=str(raw["objective"]), mask=MaskConfig.from_dict(raw["mask"]),
                       network=NetworkSpec.from_dict(raw["network"]), weights=str(raw["weights"]),
                       provenance=dict(raw.get("provenance") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedadaptError(f"pretext record malformed ({exc!r}); re-create the model folder") from None


def build_pretext_network(spec: NetworkSpec) -> nn.Module:
    """The pretext network of ``spec``: one output (no deep supervision), freshly initialised."""
    network = build_network(spec, deep_supervision=False)
    set_deep_supervision(network, False)
    return network


def encoder_state_keys(network: nn.Module) -> set[str]:
    """The state-dict keys of ``network`` that belong to its encoder (``model_parts(network).encoder``), found by
    tensor identity, so aliases (nnU-Net's decoder keeps a reference to the encoder: ``decoder.encoder.*``) count."""
    encoder = model_parts(network).encoder
    if encoder is None:
        raise MedadaptError(f"{type(network).__name__}: no encoder to share with a pretext pathway")
    own = {id(t) for t in list(encoder.parameters()) + list(encoder.buffers())}
    keys = set()
    for name, tensor in list(network.named_parameters(remove_duplicate=False)) + \
            list(network.named_buffers(remove_duplicate=False)):
        if id(tensor) in own:
            keys.add(name)
    return keys


class PretextModel:
    """A foundation's pretext network, ready to score images: ``network`` (eval mode), ``mask`` (its
    :class:`MaskConfig`), ``spec`` and ``patch_size`` (the patch it was trained on)."""

    def __init__(self, network: nn.Module, mask: MaskConfig, spec: NetworkSpec, objective: str = "mae",
                 path: Path | None = None):
        self.network = network.eval()
        self.mask = mask
        self.spec = spec
        self.objective = objective
        self.path = path

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.spec.patch_size)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: "str | torch.device") -> "PretextModel":
        self.network.to(device)
        return self

    @torch.no_grad()
    def sample_losses(self, images: torch.Tensor, rng_or_generator: "np.random.Generator | torch.Generator"
                      ) -> torch.Tensor:
        """The reconstruction loss of each image of ``images`` [B, C, Z, Y, X] (preprocessed as the folder's plan
        preprocesses) under one random masking drawn from ``rng_or_generator``: float32 [B], on the images'
        device. The network runs on its own device (:meth:`to`), without gradients, in eval mode."""
        if not torch.is_tensor(images) or images.ndim != 5:
            raise MedadaptError(f"sample_losses: images must be a tensor [B, C, Z, Y, X], got "
                                f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if images.shape[1] != self.spec.input_channels:
            raise MedadaptError(f"sample_losses: images have {images.shape[1]} channel(s), the pretext network of "
                                f"{self.path} takes {self.spec.input_channels}")
        self.network.eval()
        x = images.to(self.device, torch.float32)
        mask = random_block_mask(x.shape, self.mask, rng_or_generator).to(x.device)
        pred = self.network(apply_mask(x, mask))
        pred = pred[0] if isinstance(pred, (list, tuple)) else pred
        return mae_loss(pred.float(), x, mask, reduction="none").to(images.device)


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedadaptError(f"{path}: missing; the model folder's {what} is incomplete") from None


def load_pretext(folder: "str | Path | ModelFolder") -> PretextModel:
    """The pretext network of a model folder (``plans.json``'s ``pretext`` record), in eval mode on the CPU.

    A folder without one is a :class:`MedadaptError` naming the folder and the fix (``medadapt
    pretrain-ssl-head`` adds a reconstruction pathway to a supervised foundation)."""
    if not isinstance(folder, ModelFolder):
        folder = load_model_folder(folder)
    plans = (folder.path / "plans.json") if folder.path is not None else "model folder"
    if folder.pretext is None:
        raise MedadaptError(f"{folder.path}: has no self-supervised pretext network (no pretext record in "
                            "plans.json); add one with 'medadapt pretrain-ssl-head --model "
                            f"{folder.path} --data DATASET --out NEW_FOLDER', or pretrain with --objective mae")
    if folder.path is None:
        raise ValueError("load_pretext: the ModelFolder has no path to load weights from")
    try:
        record = PretextRecord.from_dict(folder.pretext)
    except MedadaptError as exc:
        raise MedadaptError(f"{plans}: {exc}") from None
    network = build_pretext_network(record.network)
    if record.weights == WEIGHTS_FILE:
        state = _load_state(folder.path / WEIGHTS_FILE, "weights")
    else:
        own = _load_state(folder.path / PRETEXT_FILE, "pretext pathway")
        encoder = encoder_state_keys(network)
        shared = sorted(encoder & set(own))
        if shared:
            raise MedadaptError(f"{folder.path / PRETEXT_FILE}: holds encoder tensors ({shared[0]}); the pretext "
                                f"pathway's encoder is the foundation's, in {WEIGHTS_FILE}; re-create it with "
                                "'medadapt pretrain-ssl-head'")
        foundation = _load_state(folder.path / WEIGHTS_FILE, "weights")
        state = {**{k: foundation[k] for k in encoder if k in foundation}, **own}
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise MedadaptError(f"{folder.path / record.weights}: weights do not fit the pretext network in "
                            f"{plans} ({detail[:240]})") from None
    return PretextModel(network, record.mask, record.network, record.objective, folder.path)
