"""Network specifications in nnU-Net v2's plans format, and presets.

A network is described exactly as nnU-Net v2's ``plans.json`` describes one: ``network_class_name`` plus
``arch_kwargs``, with class-valued arguments (conv_op, norm_op, ...) written as dotted import paths and listed
in ``_kw_requires_import``. The same spec therefore builds medadapt's CPU presets and a real nnU-Net
configuration. Any class that takes ``(input_channels, num_classes, deep_supervision, **arch_kwargs)`` can be
named; medadapt's own :class:`medadapt.models.swin.SwinUNETR` (MONAI's SwinUNETR) is one.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medadapt.errors import MedadaptError

_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


@dataclass
class NetworkSpec:
    """What to build: nnU-Net plans' ``architecture`` block plus channel/class counts and the patch size."""

    network_class_name: str
    arch_kwargs: dict[str, Any]
    input_channels: int
    num_classes: int
    patch_size: tuple[int, int, int]
    batch_size: int = 2
    kw_requires_import: tuple[str, ...] = field(default=_REQUIRES_IMPORT)

    def to_dict(self) -> dict:
        return {
            "network_class_name": self.network_class_name,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
            "_kw_requires_import": list(self.kw_requires_import),
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        return cls(
            network_class_name=d["network_class_name"],
            arch_kwargs=copy.deepcopy(d["arch_kwargs"]),
            input_channels=int(d["input_channels"]),
            num_classes=int(d["num_classes"]),
            patch_size=tuple(int(v) for v in d["patch_size"]),
            batch_size=int(d.get("batch_size", 2)),
            kw_requires_import=tuple(d.get("_kw_requires_import", _REQUIRES_IMPORT)),
        )

    def with_classes(self, num_classes: int) -> "NetworkSpec":
        new = copy.deepcopy(self)
        new.num_classes = num_classes
        return new


def _locate(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise MedadaptError(f"network spec names '{dotted}', which cannot be imported; check the plans file") from None


def has_own_initialization(net: nn.Module) -> bool:
    """Whether the network's class declares its own weight initialisation (a ``medadapt_init_weights()``
    method, e.g. MONAI's SwinUNETR): its constructor applies it, and medadapt never replaces it."""
    return callable(getattr(net, "medadapt_init_weights", None))


def build_network(spec: NetworkSpec, deep_supervision: bool = True) -> nn.Module:
    """Instantiate the network a spec describes, initialised as nnU-Net initialises its networks (He, negative
    slope 1e-2) -- unless the class declares its own initialisation, which its constructor has applied."""
    kwargs = copy.deepcopy(spec.arch_kwargs)
    for key in spec.kw_requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key])
    cls = _locate(spec.network_class_name)
    net = cls(input_channels=spec.input_channels, num_classes=spec.num_classes,
              deep_supervision=deep_supervision, **kwargs)
    if not has_own_initialization(net):
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        net.apply(InitWeights_He(1e-2))
    return net


def initialize_weights(net: nn.Module) -> None:
    """Re-draw every weight of ``net`` as a new network of its kind gets it, in place: the class's own
    ``medadapt_init_weights()`` where it has one, else every layer's ``reset_parameters`` followed by nnU-Net's
    He initialisation (negative slope 1e-2)."""
    if has_own_initialization(net):
        net.medadapt_init_weights()
        return
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    net.apply(InitWeights_He(1e-2))


def set_deep_supervision(net: nn.Module, enabled: bool) -> None:
    """Switch deep supervision on (training) or off (inference) for nnU-Net-style decoders (a network without
    deep supervision, e.g. SwinUNETR, is left as it is)."""
    decoder = getattr(net, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled


def _plain_unet_kwargs(features: list[int], strides: list[int], n_conv: int = 2) -> dict:
    n = len(features)
    return {
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[s, s, s] if isinstance(s, int) else list(s) for s in strides],
        "n_conv_per_stage": [n_conv] * n,
        "n_conv_per_stage_decoder": [n_conv] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


_PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
SWIN_UNETR = "medadapt.models.swin.SwinUNETR"


def _swin_unetr_kwargs(feature_size: int, depths, num_heads, window_size: int) -> dict:
    """MONAI SwinUNETR constructor arguments (the rest at MONAI's defaults, written out so the spec says them)."""
    return {
        "feature_size": feature_size,
        "depths": list(depths),
        "num_heads": list(num_heads),
        "window_size": window_size,
        "patch_size": 2,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "norm_name": "instance",
        "normalize": True,
        "downsample": "merging",
        "use_v2": False,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "dropout_path_rate": 0.0,
        "axis_order": "zyx",
    }


# name -> description, spec without channel/class counts, and the recipes its network is trained with
# (pretraining; the fine-tuning recipe a pretrained model folder recommends; masked-volume reconstruction)
PRESETS: dict[str, dict] = {
    "cpu-small": {
        "description": "PlainConvUNet, 4 stages 8-16-32-64 features, patch 32x64x64, batch 2: "
                       "~0.35 M parameters, ~0.3 s per training iteration on 2 CPU cores",
        "network_class_name": _PLAIN,
        "arch_kwargs": _plain_unet_kwargs([8, 16, 32, 64], [1, 2, 2, 2]),
        "patch_size": (32, 64, 64),
        "batch_size": 2,
        "recipes": {"pretrain": "cpu-pretrain", "finetune": "cpu-finetune", "mae": "cpu-mae-pretrain"},
    },
    "cpu-bench": {
        "description": "cpu-small's network (PlainConvUNet 8-16-32-64) at patch 16x32x32, batch 2: ~0.04 s per "
                       "iteration on one CPU thread; the default benchmark grid's preset (converged cells on 2 cores)",
        "network_class_name": _PLAIN,
        "arch_kwargs": _plain_unet_kwargs([8, 16, 32, 64], [1, 2, 2, 2]),
        "patch_size": (16, 32, 32),
        "batch_size": 2,
        "recipes": {"pretrain": "cpu-pretrain", "finetune": "cpu-finetune", "mae": "cpu-mae-pretrain"},
    },
    "cpu-tiny": {
        "description": "PlainConvUNet, 3 stages 4-8-16 features, patch 16x32x32, batch 2: for tests",
        "network_class_name": _PLAIN,
        "arch_kwargs": _plain_unet_kwargs([4, 8, 16], [1, 2, 2]),
        "patch_size": (16, 32, 32),
        "batch_size": 2,
        "recipes": {"pretrain": "cpu-pretrain", "finetune": "cpu-finetune", "mae": "cpu-mae-pretrain"},
    },
    "cpu-swin": {
        "description": "MONAI SwinUNETR, feature size 12, depths 2-2-2-2, heads 3-6-12-24, window 4, patch "
                       "32x64x64, batch 2: ~3.9 M parameters, ~0.55 s per training iteration on 2 CPU cores; "
                       "trained with AdamW (docs/swinunetr.md)",
        "network_class_name": SWIN_UNETR,
        "arch_kwargs": _swin_unetr_kwargs(12, (2, 2, 2, 2), (3, 6, 12, 24), 4),
        "patch_size": (32, 64, 64),
        "batch_size": 2,
        "recipes": {"pretrain": "cpu-swin-pretrain", "finetune": "cpu-swin-finetune", "mae": "cpu-swin-mae-pretrain"},
    },
    "nnunet-3d-fullres": {
        "description": "nnU-Net v2's default 3d_fullres PlainConvUNet: 6 stages 32-64-128-256-320-320 "
                       "(patch 128x128x128 shown; nnU-Net plans it per dataset). For GPUs",
        "network_class_name": _PLAIN,
        "arch_kwargs": _plain_unet_kwargs([32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2]),
        "patch_size": (128, 128, 128),
        "batch_size": 2,
        "recipes": {"pretrain": "nnunet", "finetune": "dgst-paper", "mae": "mae-nnssl"},
    },
}


def preset(name: str, input_channels: int, num_classes: int) -> NetworkSpec:
    if name not in PRESETS:
        raise MedadaptError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return NetworkSpec(
        network_class_name=p["network_class_name"],
        arch_kwargs=copy.deepcopy(p["arch_kwargs"]),
        input_channels=input_channels,
        num_classes=num_classes,
        patch_size=tuple(p["patch_size"]),
        batch_size=p["batch_size"],
    )


def preset_recipes(name: str) -> dict[str, str]:
    """The recipes a preset's network is trained with: ``{"pretrain": ..., "finetune": ..., "mae": ...}``
    (built-in names; ``mae``: masked-volume reconstruction)."""
    if name not in PRESETS:
        raise MedadaptError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return {"pretrain": "nnunet", "finetune": "dgst-paper", "mae": "mae-nnssl", **PRESETS[name].get("recipes", {})}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def seeded_network(spec: NetworkSpec, seed: int, purpose: str = "network") -> nn.Module:
    """Build with an isolated RNG on the ``purpose`` stream of ``seed`` (:mod:`medadapt.utils.seeds`: a new
    network's weights by default; ``head`` where only its heads are kept), so that initialisation is
    reproducible and apart from every other draw of the run."""
    from medadapt.utils import seeds

    with seeds.torch_stream(seed, purpose):
        return build_network(spec)
