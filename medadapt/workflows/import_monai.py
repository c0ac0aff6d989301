"""``medadapt import-monai``: a MONAI SwinUNETR checkpoint as a medadapt model folder (a foundation model).

What it reads (checked against MONAI's and Project-MONAI/research-contributions' loading code):

* a plain state dict of ``monai.networks.nets.SwinUNETR`` (MONAI bundles' ``models/model.pt``), or one wrapped
  as ``{"state_dict": ...}`` (research-contributions' SwinUNETR/BTCV checkpoints, with ``epoch``/``best_acc``
  beside it) or ``{"model": ...}`` (MONAI's ``CheckpointSaver`` with several objects); keys prefixed ``module.``
  (DataParallel/DistributedDataParallel) or ``backbone.``, and ``swin_vit`` for ``swinViT``, are undone, as the
  research-contributions scripts undo them;
* the self-supervised Swin transformer weights (``model_swinvit.pt``: ``{"state_dict": ...}`` with
  ``module.``-prefixed keys of the Swin transformer alone -- ``module.patch_embed.proj.weight``,
  ``module.layers1.0.blocks.0.mlp.fc1.weight``, ... -- plus the heads of the self-supervised objectives:
  ``rotation_head``, ``contrastive_head``, ``convTrans3d``, ``norm``). These load as MONAI's
  ``SwinUNETR.load_from`` loads them (``fc1``/``fc2`` are MONAI's ``linear1``/``linear2``; the objectives' heads
  are not part of SwinUNETR and are dropped). They hold no decoder, so they need ``--backbone-only``.

What it infers from the tensors: input channels, feature size and token patch size (``patch_embed.proj``),
depths (blocks per stage), heads (relative-position bias tables), window size (the tables' length, (2w-1)^3),
MLP ratio, ``qkv_bias``, ``patch_norm``, ``use_v2`` (its extra conv blocks), the conv blocks' normalisation
(instance, affine instance or batch norm) and the output channels (``out.conv.conv``). What the weights cannot
tell -- ``downsample`` (``merging`` and ``mergingv2`` have the same tensors), ``normalize`` -- is MONAI's default
unless ``arch_kwargs`` says otherwise. A missing, unexpected or misshapen key is refused with one line before
anything is written.

The model folder's preprocessing is MONAI's SwinUNETR pipeline for CT (BTCV: ``Orientationd`` RAS,
``Spacingd`` 1.5 x 1.5 x 2.0 mm, ``ScaleIntensityRanged`` -175..250 -> 0..1, clipped), expressed with medadapt's
``ScaleIntensityRange`` scheme; the network is built with ``axis_order="xyz"`` so that it sees arrays in MONAI's
axis order. Differences that remain (medadapt's resampling and sliding window) are listed in docs/swinunetr.md.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medadapt.data.preprocessing import IntensityRange, PreprocessingPlan
from medadapt.errors import MedadaptError
from medadapt.models.model_folder import ModelFolder, save_model_folder
from medadapt.models.network import SWIN_UNETR, NetworkSpec, build_network
from medadapt.utils import seeds
from medadapt.workflows.common import environment, total_parameter_count

#: the wrappers a MONAI checkpoint's state dict comes in, tried in this order
WRAPPER_KEYS = ("state_dict", "model")
#: key prefixes of a wrapped module that every key of a checkpoint may carry (DataParallel, research code)
WRAPPER_PREFIXES = ("module.", "backbone.")
#: the self-supervised pretraining heads stored in MONAI's model_swinvit.pt next to the Swin transformer
SSL_HEAD_KEYS = ("rotation_head.weight", "rotation_head.bias", "contrastive_head.weight", "contrastive_head.bias",
                 "convTrans3d.weight", "convTrans3d.bias", "norm.weight", "norm.bias")
DEFAULT_RECIPE = "swinunetr-btcv"
#: MONAI's research-contributions SwinUNETR/BTCV pipeline
BTCV_PIXDIM = (1.5, 1.5, 2.0)
BTCV_INTENSITY_RANGE = (-175.0, 250.0)


# ------------------------------------------------------------------------------------------- reading
def _numpy_safe_globals() -> list:
    from medadapt.utils.checkpoints import numpy_safe_globals

    return numpy_safe_globals()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a MONAI checkpoint file: loaded with ``weights_only=True`` (no code runs), unwrapped
    from ``state_dict``/``model`` and from ``module.``/``backbone.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise MedadaptError(f"{path}: no such checkpoint file; pass the .pt/.pth file MONAI wrote")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe is None:
            raise MedadaptError(f"{path}: not a PyTorch checkpoint that torch.load can read; pass the state-dict "
                                "file (.pt/.pth)") from None
        raise MedadaptError(
            f"{path}: holds a Python object ({unsafe.group(1)}) that torch.load(weights_only=True) does not load; "
            "if you trust the file, save its state dict alone: torch.save(torch.load(FILE, weights_only=False)"
            "['state_dict'], 'plain.pt')") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MedadaptError(f"{path}: not a PyTorch checkpoint that torch.load can read ({first}); pass the "
                            "state-dict file (.pt/.pth), not a TorchScript export (.ts)") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise MedadaptError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of tensor names to "
                            f"tensors, possibly under {' or '.join(repr(k) for k in WRAPPER_KEYS)})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise MedadaptError(f"{path}: entry {bad[0]!r} is not a tensor, so this is no state dict (top-level keys: "
                            f"{', '.join(map(str, list(obj)[:6]))}); pass the file MONAI saved the weights in")
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_swinunetr_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Keys of MONAI's SwinUNETR for a checkpoint's state dict: (state, layout, dropped keys).

    ``layout`` is ``"swinunetr"`` (a whole SwinUNETR: ``swinViT.*``, ``encoder1.*``, ...) or ``"swinvit"`` (a Swin
    transformer alone, as in the self-supervised ``model_swinvit.pt``: moved under ``swinViT.``, its pretraining
    heads dropped). MLP keys ``fc1``/``fc2`` become MONAI's ``linear1``/``linear2`` (``SwinUNETR.load_from``'s map).
    """
    state = {("swinViT." + k[len("swin_vit."):] if k.startswith("swin_vit.") else k): v for k, v in state.items()}
    dropped: list[str] = []
    if any(k.startswith("swinViT.") for k in state):
        layout = "swinunetr"
    elif any(k.startswith(("patch_embed.", "layers1.")) for k in state):
        layout = "swinvit"
        dropped = [k for k in state if k in SSL_HEAD_KEYS]
        state = {f"swinViT.{k}": v for k, v in state.items() if k not in SSL_HEAD_KEYS}
    else:
        raise MedadaptError(f"no swinViT.* (SwinUNETR) or patch_embed.*/layers1.* (Swin transformer) keys, so this "
                            f"is not a MONAI SwinUNETR checkpoint (first keys: {', '.join(list(state)[:4])})")
    renamed = {}
    for k, v in state.items():
        if k.startswith("swinViT."):
            k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        renamed[k] = v
    return renamed, layout, dropped


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int, int | None]:
    """SwinUNETR constructor arguments, input channels and output channels (None without a head) that the
    tensors of a SwinUNETR state dict (MONAI's keys) determine."""
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise MedadaptError("no swinViT.patch_embed.proj.weight, so the feature size and input channels cannot be "
                            "read; the checkpoint is not a MONAI SwinUNETR / Swin transformer")
    if embed.ndim != 5:
        raise MedadaptError(f"swinViT.patch_embed.proj.weight has shape {tuple(embed.shape)}: a {embed.ndim - 2}-D "
                            "SwinUNETR; medadapt segments 3-D volumes")
    feature_size, in_channels = int(embed.shape[0]), int(embed.shape[1])
    if len(set(embed.shape[2:])) != 1:
        raise MedadaptError(f"swinViT.patch_embed.proj.weight: anisotropic token patch {tuple(embed.shape[2:])}; "
                            "MONAI's SwinUNETR takes one patch_size for every axis")
    depths, heads = [], []
    window = None
    for stage in range(1, 5):
        root = f"swinViT.layers{stage}.0.blocks."
        blocks = sorted({int(k[len(root):].split(".")[0]) for k in state if k.startswith(root)})
        if not blocks or blocks != list(range(len(blocks))):
            raise MedadaptError(f"stage {stage} of the Swin transformer has blocks {blocks}; expected 0..n-1 under "
                                f"{root}* (is the checkpoint complete?)")
        depths.append(len(blocks))
        table = state.get(f"{root}0.attn.relative_position_bias_table")
        if table is None:
            raise MedadaptError(f"no {root}0.attn.relative_position_bias_table: a SwinUNETR with Hyena blocks or "
                                "another attention is not supported")
        heads.append(int(table.shape[1]))
        side = round(float(table.shape[0]) ** (1 / 3))
        if side ** 3 != table.shape[0] or side % 2 == 0:
            raise MedadaptError(f"{root}0.attn.relative_position_bias_table has {table.shape[0]} rows, not (2w-1)^3 "
                                "for a cubic window w; give window_size in --arch-kwargs")
        stage_window = (side + 1) // 2
        if window not in (None, stage_window):
            raise MedadaptError("the stages' relative-position tables imply different window sizes; not a MONAI "
                                "SwinUNETR")
        window = stage_window
    linear1 = state.get("swinViT.layers1.0.blocks.0.mlp.linear1.weight")
    if linear1 is None:
        raise MedadaptError("no swinViT.layers1.0.blocks.0.mlp.linear1.weight (or mlp.fc1): not a MONAI SwinUNETR")
    norm = "instance"
    if "encoder1.layer.norm1.running_mean" in state:
        norm = "batch"
    elif "encoder1.layer.norm1.weight" in state:
        norm = ["instance", {"affine": True}]
    arch = {
        "feature_size": feature_size,
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "patch_size": int(embed.shape[2]),
        "mlp_ratio": float(linear1.shape[0]) / feature_size,
        "qkv_bias": "swinViT.layers1.0.blocks.0.attn.qkv.bias" in state,
        "patch_norm": "swinViT.patch_embed.norm.weight" in state,
        "use_v2": any(k.startswith("swinViT.layers1c.") for k in state),
        "norm_name": norm,
    }
    head = state.get("out.conv.conv.weight")
    return arch, in_channels, (int(head.shape[0]) if head is not None else None)


def _some(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def check_fit(network: torch.nn.Module, state: dict[str, torch.Tensor], backbone_only: bool) -> None:
    """Refuse, with one line, a state dict with keys the network lacks, keys it misses, or other shapes
    (``backbone_only``: only the ``swinViT.`` part must fit)."""
    own = network.state_dict()
    expected = {k for k in own if k.startswith("swinViT.")} if backbone_only else set(own)
    missing = expected - set(state)
    unexpected = set(state) - expected
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    misshapen = [k for k in sorted(expected & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if misshapen:
        k = misshapen[0]
        problems.append(f"{len(misshapen)} tensor(s) of another shape, first {k}: {tuple(state[k].shape)} in the "
                        f"checkpoint, {tuple(own[k].shape)} in the network")
    if problems:
        raise MedadaptError("the weights do not fit the SwinUNETR they describe: " + "; ".join(problems)
                            + "; give the constructor arguments the weights cannot tell in --arch-kwargs")


# ------------------------------------------------------------------------------------------- the workflow
def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """``--arch-kwargs``: a JSON object of SwinUNETR constructor arguments."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedadaptError(f"--arch-kwargs {text!r}: not JSON ({exc.msg}); write e.g. "
                            "'{\"downsample\": \"mergingv2\"}'") from None
    if not isinstance(value, dict):
        raise MedadaptError(f"--arch-kwargs {text!r}: must be a JSON object of SwinUNETR arguments")
    for key in ("in_channels", "out_channels", "input_channels", "num_classes", "axis_order"):
        if key in value:
            raise MedadaptError(f"--arch-kwargs: {key!r} is not an architecture argument here; channels come from "
                                "the weights and --labels, the axis order is MONAI's")
    return value


def _three(values: Sequence[float], option: str, kind=float) -> tuple:
    values = tuple(values)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise MedadaptError(f"{option} {' '.join(map(str, values))}: give three positive numbers")
    return tuple(kind(v) for v in values)


@dataclasses.dataclass(frozen=True)
class MonaiPipeline:
    """The MONAI transforms a SwinUNETR was trained with (its data pipeline), which the model folder's
    preprocessing reproduces: ``Orientationd(orientation)``, ``Spacingd(pixdim)``,
    ``ScaleIntensityRanged(intensity_range -> output_range, clip)`` and the sliding-window ``roi_size``.
    ``roi_size`` and ``pixdim`` are in MONAI's axis order (x, y, z after ``orientation``), as a MONAI pipeline
    states them. Defaults: MONAI's BTCV tutorial."""

    roi_size: Sequence[int] = (96, 96, 96)
    pixdim: Sequence[float] = BTCV_PIXDIM
    orientation: str = "RAS"
    intensity_range: Sequence[float] = BTCV_INTENSITY_RANGE
    output_range: Sequence[float] = (0.0, 1.0)


def _checkpoint_state(checkpoint: Path, backbone_only: bool) -> tuple[dict, str, list]:
    """``(state in SwinUNETR's keys, layout, dropped keys)`` of ``checkpoint`` (the Swin transformer's alone
    with ``backbone_only``; a backbone-only checkpoint refused without it)."""
    raw = read_checkpoint(checkpoint)
    try:
        state, layout, dropped = to_swinunetr_keys(raw)
    except MedadaptError as exc:
        raise MedadaptError(f"{checkpoint}: {exc}") from None
    if layout == "swinvit" and not backbone_only:
        raise MedadaptError(f"{checkpoint}: holds the Swin transformer alone (the layout of MONAI's self-supervised "
                            "model_swinvit.pt), no decoder or head; pass --backbone-only to start those from "
                            "MONAI's initialisation")
    if backbone_only:
        dropped += [k for k in state if not k.startswith("swinViT.")]
        state = {k: v for k, v in state.items() if k.startswith("swinViT.")}
    return state, layout, dropped


def _swin_network(spec: NetworkSpec, seed: int, overrides: dict, state: dict, checkpoint: Path,
                  backbone_only: bool) -> torch.nn.Module:
    """MONAI's SwinUNETR for ``spec`` (seeded initialisation) holding ``state``; an architecture MONAI rejects
    or weights that do not fit it refused in one line."""
    try:
        with seeds.torch_stream(seed, "network"):
            network = build_network(spec, deep_supervision=False)
    except (TypeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MedadaptError(f"--arch-kwargs {json.dumps(overrides)}: MONAI's SwinUNETR rejects the architecture "
                            f"(read from the weights, with these arguments): {first}") from None
    try:
        check_fit(network, state, backbone_only)
    except MedadaptError as exc:
        raise MedadaptError(f"{checkpoint}: {exc}") from None
    network.load_state_dict(state, strict=not backbone_only)
    return network


def _checked_names(labels: Sequence[str], out_channels: int | None, channel_names: Sequence[str] | None,
                   in_channels: int) -> tuple[list[str], list[str]]:
    """The class names (one per output channel, background first) and channel names, checked against the
    checkpoint's channels."""
    labels = [str(n) for n in labels]
    if out_channels is not None and out_channels != len(labels):
        raise MedadaptError(f"--labels: {len(labels)} name(s) but the checkpoint's head has {out_channels} output "
                            "channels; name every output channel in order, background first")
    channel_names = list(channel_names) if channel_names else ["CT"] * in_channels
    if len(channel_names) != in_channels:
        raise MedadaptError(f"--channel-names: {len(channel_names)} name(s) but the checkpoint takes {in_channels} "
                            "input channel(s); give one name per channel")
    return labels, channel_names


def import_monai(checkpoint: str | Path, out: str | Path, labels: Sequence[str], *,
                 pipeline: MonaiPipeline = MonaiPipeline(), channel_names: Sequence[str] | None = None,
                 backbone_only: bool = False, arch_kwargs: dict[str, Any] | None = None,
                 recipe: str | Path | None = DEFAULT_RECIPE, seed: int = 0,
                 file_ending: str = ".nii.gz") -> ModelFolder:
    """Write the medadapt model folder ``out`` for a MONAI SwinUNETR ``checkpoint``; returns it.

    ``labels``: class names in output-channel order, background first. ``pipeline``: the MONAI transforms the
    checkpoint was trained with (:class:`MonaiPipeline`). ``backbone_only``: load the Swin
    transformer only; the rest starts from MONAI's initialisation, seeded by ``seed``. ``arch_kwargs``: SwinUNETR
    constructor arguments the weights cannot tell (override the inferred ones). Every input is checked before
    ``out`` is created; ``out`` must not exist or be empty.
    """
    from medadapt.engine.recipe import builtin_recipe_names, load_recipe

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedadaptError(f"--out {out}: exists and is not an empty folder; choose a new model folder")
    if len(labels) < 2 or len({str(n) for n in labels}) != len(labels):
        raise MedadaptError(f"--labels {' '.join(map(str, labels))}: give two or more distinct names, one per "
                            "output channel, background first")
    roi, pixdim = _three(pipeline.roi_size, "--roi-size", int), _three(pipeline.pixdim, "--pixdim")
    ranges = IntensityRange(a_min=float(pipeline.intensity_range[0]), a_max=float(pipeline.intensity_range[1]),
                            b_min=float(pipeline.output_range[0]), b_max=float(pipeline.output_range[1]), clip=True)
    if recipe is not None:
        recipe = str(recipe) if str(recipe) in builtin_recipe_names() else load_recipe(recipe).to_dict()
    overrides = dict(arch_kwargs or {})
    state, layout, dropped = _checkpoint_state(checkpoint, backbone_only)
    try:
        arch, in_channels, out_channels = infer_architecture(state)
    except MedadaptError as exc:
        raise MedadaptError(f"{checkpoint}: {exc}") from None
    labels, channel_names = _checked_names(labels, out_channels, channel_names, in_channels)
    plan = PreprocessingPlan(target_spacing=tuple(reversed(pixdim)),  # MONAI's (x, y, z) as medadapt's (z, y, x)
                             normalization=["ScaleIntensityRange"] * in_channels,
                             intensity_properties=[None] * in_channels, orientation=pipeline.orientation,
                             intensity_ranges=[ranges] * in_channels)
    factor = int(arch.get("patch_size", 2)) ** 5
    if any(r % factor for r in roi) or int(np.prod([r // factor for r in roi])) < 2:
        raise MedadaptError(f"--roi-size {' '.join(map(str, roi))}: every size must be a multiple of {factor} and one "
                            f"at least {2 * factor} (SwinUNETR's input constraint)")
    arch.update({"normalize": True, "downsample": "merging", **overrides, "axis_order": "xyz"})  # MONAI's defaults
    spec = NetworkSpec(network_class_name=SWIN_UNETR, arch_kwargs=arch, input_channels=in_channels,
                       num_classes=len(labels), patch_size=tuple(reversed(roi)), batch_size=2)
    network = _swin_network(spec, seed, overrides, state, checkpoint, backbone_only)
    folder = ModelFolder(
        network=spec, preprocessing=plan.to_dict(), labels={name: i for i, name in enumerate(labels)},
        channel_names={str(i): n for i, n in enumerate(channel_names)}, file_ending=file_ending,
        recipe=copy.deepcopy(recipe),
        provenance={"kind": "import-monai", "checkpoint": str(checkpoint.resolve()),
                    "checkpoint_sha1": _file_sha1(checkpoint), "layout": layout, "backbone_only": backbone_only,
                    "loaded_tensors": len(state), "dropped_keys": sorted(dropped),
                    "initialised": (f"MONAI's initialisation, seed {seed}: every tensor outside swinViT"
                                    if backbone_only else None),
                    "monai_pipeline": {"orientation": pipeline.orientation, "pixdim": list(pixdim),
                                       "roi_size": list(roi), "scale_intensity_range": ranges.to_dict()},
                    "parameters": total_parameter_count(network), "environment": environment()},
    )
    save_model_folder(out, network, folder)
    return folder
