"""A model folder holds everything inference needs, like nnU-Net's trained-model folders.

Layout::

    <model>/plans.json   network spec, preprocessing plan (spacing, normalisation with its intensity
                         statistics, orientation), patch size, labels, channel names, the output
                         activation (softmax, or sigmoid with per-class thresholds), the label template of a
                         partially labelled model (which datasets annotate which classes), provenance, and
                         the recipe its author recommends for fine-tuning it
    <model>/weights.pt   the network's state dict (plain architecture: adapters/LoRA are merged first)
    <model>/pretext.pt   optional: a self-supervised pretext pathway added to a supervised foundation (its
                         decoder copy and reconstruction head; medadapt.ssl.pretext)

``plans.json`` may carry a ``pretext`` record (absent or null in older folders): the self-supervised objective
the foundation's pretext network was trained with, its masking, the pretext network's spec and which weights
file holds it: ``weights.pt`` itself for a self-supervised foundation (which then has no segmentation head), or
``pretext.pt`` (:mod:`medadapt.ssl.pretext`).

The weight files are written before ``plans.json`` and all atomically, so a folder with a ``plans.json`` is
complete.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.network import NetworkSpec, build_network
from medadapt.utils.atomic import atomic_torch_save, atomic_write_json

FORMAT = "medadapt-model/1"
ACTIVATIONS = ("softmax", "sigmoid")
DEFAULT_THRESHOLD = 0.5


def output_channels(labels: dict[str, int], activation: str) -> int:
    """The network's output channels for ``labels`` (background included): softmax, one per label; sigmoid,
    one per foreground class."""
    return len(labels) - (1 if activation == "sigmoid" else 0)


@dataclass
class ModelFolder:
    network: NetworkSpec
    preprocessing: dict[str, Any]
    labels: dict[str, int]
    channel_names: dict[str, str]
    file_ending: str = ".nii.gz"
    provenance: dict[str, Any] = field(default_factory=dict)
    #: modules beyond the plain network that the weights include, e.g. ``[{"type": "adapter", "reduction": 4}]``
    extensions: list[dict[str, Any]] = field(default_factory=list)
    #: the training recipe the model's author recommends for fine-tuning it (a built-in name or a recipe
    #: mapping; see medadapt.engine.recipe); None: medadapt finetune's default
    recipe: str | dict[str, Any] | None = None
    #: ``softmax`` (one output per label, argmax; nnU-Net's default) or ``sigmoid`` (one independent output per
    #: foreground class, thresholded; partially labelled models)
    activation: str = "softmax"
    #: sigmoid models: the probability threshold per class name (absent: 0.5)
    thresholds: dict[str, float] = field(default_factory=dict)
    #: partially labelled models: the label template (medadapt.data.partial.LabelTemplate.to_dict())
    template: dict[str, Any] | None = None
    #: the self-supervised pretext record (medadapt.ssl.pretext.PretextRecord.to_dict()); None: none
    pretext: dict[str, Any] | None = None
    path: Path | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise MedadaptError(f"plans.json: output activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.pretext is not None and not isinstance(self.pretext, dict):
            raise MedadaptError(f"plans.json: pretext {self.pretext!r} is not a record")

    @property
    def self_supervised_only(self) -> bool:
        """Whether the network in ``weights.pt`` is a pretext network (a masked-volume reconstruction foundation):
        its outputs reconstruct the input, and it has no segmentation head."""
        return self.pretext is not None and self.pretext.get("weights") == "weights.pt"

    def require_segmentation_head(self, what: str, fix: str) -> None:
        """A :class:`MedadaptError` if the model has no segmentation head (``what`` needs one; ``fix`` says
        what to do instead)."""
        if self.self_supervised_only:
            raise MedadaptError(f"{what}: the model in {self.path} is a self-supervised foundation "
                                f"({self.pretext.get('objective')} pretraining) without a segmentation head; {fix}")

    @property
    def foreground(self) -> dict[str, int]:
        return {k: v for k, v in self.labels.items() if v != 0}

    def threshold(self, name: str) -> float:
        return float(self.thresholds.get(name, DEFAULT_THRESHOLD))

    def plan(self):
        from medadapt.data.preprocessing import PreprocessingPlan

        return PreprocessingPlan.from_dict(self.preprocessing)

    def build_network(self, deep_supervision: bool = True) -> nn.Module:
        """The folder's network (architecture and extensions) without its weights: for checks on its shape."""
        net = build_network(self.network, deep_supervision=deep_supervision)
        for ext in self.extensions:
            apply_extension(net, ext)
        return net

    def load_network(self, deep_supervision: bool = True) -> nn.Module:
        """Build the network and load the folder's weights."""
        net = self.build_network(deep_supervision)
        if self.path is None:
            raise ValueError("ModelFolder has no path to load weights from")
        weights = self.path / "weights.pt"
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise MedadaptError(f"{weights}: missing; the model folder is incomplete, re-run pretrain") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise MedadaptError(f"{weights}: weights do not fit the network in plans.json ({first})") from None
        return net


def save_model_folder(path: str | Path, network: nn.Module, folder: ModelFolder) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path / "weights.pt", {k: v.detach().cpu() for k, v in network.state_dict().items()})
    atomic_write_json(path / "plans.json", {
        "format": FORMAT,
        "network": folder.network.to_dict(),
        "preprocessing": folder.preprocessing,
        "labels": folder.labels,
        "channel_names": folder.channel_names,
        "file_ending": folder.file_ending,
        "provenance": folder.provenance,
        "extensions": folder.extensions,
        "recipe": folder.recipe,
        "activation": folder.activation,
        "thresholds": folder.thresholds,
        "template": folder.template,
        "pretext": folder.pretext,
    })
    folder.path = path
    return path


def load_model_folder(path: str | Path) -> ModelFolder:
    """The model folder at ``path`` (medadapt's, or a format a plugin adds), or the built-in foundation of that
    name (:mod:`medadapt.models.builtin`)."""
    from medadapt.models.builtin import builtin_path, is_builtin_name
    from medadapt.plugins import PROVIDERS, detect_model

    if not Path(path).exists() and is_builtin_name(path):
        path = builtin_path(str(path))
    path = Path(path)

    loader = detect_model(path)  # a format a plugin adds: an nnU-Net v2 trained model folder or its zip
    if loader is not None:
        return loader.load(path)
    plans_file = path / "plans.json"
    if not plans_file.is_file():
        hint = ""
        if path.suffix == ".zip" or any(path.glob("*/fold_*")) or any(path.glob("fold_*")):
            hint = f" (an nnU-Net model needs medadapt's nnU-Net plugin: {PROVIDERS['nnunet']})"
        raise MedadaptError(f"{path}: not a medadapt model folder (no plans.json); pass the folder "
                            "written by 'medadapt pretrain' or 'medadapt finetune' (its model/ subfolder)" + hint)
    import json

    try:
        plans = json.loads(plans_file.read_text())
        if plans.get("format") != FORMAT:
            raise KeyError("format")
        return ModelFolder(
            network=NetworkSpec.from_dict(plans["network"]),
            preprocessing=plans["preprocessing"],
            labels={k: int(v) for k, v in plans["labels"].items()},
            channel_names={str(k): v for k, v in plans["channel_names"].items()},
            file_ending=plans.get("file_ending", ".nii.gz"),
            provenance=plans.get("provenance", {}),
            extensions=list(plans.get("extensions", [])),
            recipe=plans.get("recipe"),
            activation=plans.get("activation", "softmax"),
            thresholds={str(k): float(v) for k, v in (plans.get("thresholds") or {}).items()},
            template=plans.get("template"),
            pretext=plans.get("pretext"),
            path=path,
        )
    except MedadaptError as exc:
        raise MedadaptError(f"{plans_file}: {str(exc).split(': ', 1)[-1]}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MedadaptError(f"{plans_file}: malformed or not {FORMAT} ({exc}); re-create the model folder") from None


def apply_extension(network: nn.Module, extension: dict[str, Any]) -> None:
    """Re-create a module a method left in the network (its weights come with the state dict): the method's
    definition knows how (medadapt.tuning.registry.rebuild_extension)."""
    from medadapt.tuning.registry import rebuild_extension

    rebuild_extension(network, extension)
