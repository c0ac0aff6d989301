"""nnU-Net v2 trained models (a model folder or the zip ``nnUNetv2_export_model_to_zip`` writes) as medadapt
model folders.

An nnU-Net trained model folder holds ``dataset.json``, ``plans.json`` and ``fold_<f>/checkpoint_final.pth``
(or ``checkpoint_best.pth``). :func:`load_nnunet_model` reads it with nnunetv2's own ``PlansManager`` (it
resolves configuration inheritance and old plans formats) and maps it onto medadapt's model folder:

* network: the configuration's ``architecture`` block is already medadapt's :class:`NetworkSpec` format
  (PlainConvUNet, ResidualEncoderUNet/ResEnc presets, any dynamic-network-architectures class);
* preprocessing: the plans themselves travel in ``preprocessing["nnunet"]``, and every case goes through
  nnunetv2's own preprocessor and export code (:mod:`medadapt.nnunet.preprocessing`): transpose, crop to
  nonzero, the configuration's normalization with the stored foreground intensity properties, its resampling
  functions, patch size. Refused with one line: region-based labels or an ignore label (medadapt's training
  loss takes plain label maps), 2D configurations, readers that reorient (NibabelIOWithReorient);
* a fine-tuned model is exported back (:mod:`medadapt.nnunet.export`) with the foundation's own plans.

Nothing is written for a folder; a zip is extracted once into ``$MEDADAPT_CACHE/nnunet-models/``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.model_folder import ModelFolder
from medadapt.models.network import NetworkSpec, build_network

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
_NORMALIZATION = {"CTNormalization": "CT", "ZScoreNormalization": "ZScore", "NoNormalization": "none"}


# ------------------------------------------------------------------------------------------------- detection
def _is_trained_folder(path: Path) -> bool:
    if not ((path / "plans.json").is_file() and (path / "dataset.json").is_file()):
        return False
    return any(f.is_dir() and any((f / c).is_file() for c in CHECKPOINTS) for f in path.glob("fold_*"))


def is_nnunet_model(path: str | Path) -> bool:
    """A zip file, or a folder holding an nnU-Net trained model (no nnunetv2 import needed)."""
    path = Path(path)
    if path.is_file():
        return zipfile.is_zipfile(path)
    if not path.is_dir():
        return False
    if (path / "plans.json").is_file():
        try:
            return "configurations" in json.loads((path / "plans.json").read_text())
        except (ValueError, OSError):
            return False
    return bool(_trained_folders(path))


def _trained_folders(root: Path) -> list[Path]:
    """Trained model folders at or below ``root`` (a results/DatasetXXX folder may hold several)."""
    if _is_trained_folder(root):
        return [root]
    return sorted(p.parent for p in root.rglob("plans.json") if _is_trained_folder(p.parent))


def _extract_zip(zip_path: Path) -> Path:
    from medadapt.workflows.common import cache_root

    digest = hashlib.sha1(zip_path.read_bytes()).hexdigest()[:12]
    target = cache_root() / "nnunet-models" / f"{zip_path.stem}-{digest}"
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():  # no absolute paths or '..' out of the target
            if name.startswith("/") or ".." in Path(name).parts:
                raise MedadaptError(f"{zip_path}: holds the unsafe path {name!r}; not an nnU-Net model zip")
        zf.extractall(tmp)
    tmp.rename(target)  # atomic: a half-extracted zip is never taken for a model
    return target


def resolve_model_dir(path: str | Path, configuration: str | None = None) -> Path:
    """The trained model folder inside ``path`` (a folder, a results/DatasetXXX folder or a zip)."""
    path = Path(path)
    root = _extract_zip(path) if path.is_file() else path
    found = _trained_folders(root)
    if not found and (root / "plans.json").is_file() and (root / "dataset.json").is_file():
        _checkpoint_file(root, None)  # names the missing fold/checkpoint
    if configuration is not None:
        found = [f for f in found if f.name.endswith(f"__{configuration}")] or found
    if not found:
        raise MedadaptError(f"{path}: no nnU-Net trained model in it (dataset.json, plans.json and "
                            "fold_*/checkpoint_final.pth); pass the trainer output folder or its exported zip")
    if len(found) > 1:
        fullres = [f for f in found if f.name.endswith("__3d_fullres")]
        if len(fullres) == 1:
            return fullres[0]
        raise MedadaptError(f"{path}: holds several trained models ({', '.join(f.name for f in found)}); "
                            "pass the one to use")
    return found[0]


# ------------------------------------------------------------------------------------------------- loading
def _checkpoint_file(model_dir: Path, fold: str | int | None) -> Path:
    folds = [fold] if fold is not None else sorted(
        (p.name[len("fold_"):] for p in model_dir.glob("fold_*") if p.is_dir()),
        key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    for f in folds:
        for name in CHECKPOINTS:
            if (model_dir / f"fold_{f}" / name).is_file():
                return model_dir / f"fold_{f}" / name
    raise MedadaptError(f"{model_dir}: no fold_{fold if fold is not None else '*'}/checkpoint_final.pth or "
                        "checkpoint_best.pth; train the model to the end or pass another fold")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint (weights, plans, a torch.device) without running code from it: its metadata is
    numpy data that the allow-list of :mod:`medadapt.utils.checkpoints` admits; anything else needs
    ``--trust-model`` (nnU-Net itself loads with ``weights_only=False``)."""
    from medadapt.utils import checkpoints

    return checkpoints.load(path, "nnU-Net checkpoint")


def clean_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, as nnU-Net's loaders do."""
    out = {}
    for k, v in weights.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


class NNUNetModelFolder(ModelFolder):
    """A medadapt :class:`ModelFolder` view of an nnU-Net trained model; weights come from its checkpoint."""

    checkpoint: Path | None = None

    def build_network(self, deep_supervision: bool = True) -> nn.Module:
        try:
            return build_network(self.network, deep_supervision=deep_supervision)
        except MedadaptError:
            raise
        except Exception as exc:  # noqa: BLE001 - any constructor failure means the plans are unusable
            raise MedadaptError(f"{self.path / 'plans.json'}: cannot build its network "
                                f"{self.network.network_class_name} ({type(exc).__name__}: {exc})") from None

    def load_network(self, deep_supervision: bool = True) -> nn.Module:
        weights = clean_state_dict(load_checkpoint(self.checkpoint)["network_weights"])
        net = self.build_network(deep_supervision)
        check_weights_fit(net.state_dict(), weights, self.checkpoint, self.path)
        net.load_state_dict(weights)
        return net


def check_weights_fit(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], checkpoint: Path,
                      model_dir: Path | None) -> None:
    """One line naming the first mismatch between the network of plans.json/dataset.json and the checkpoint."""
    where = model_dir if model_dir is not None else checkpoint.parent
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        first = f"{missing[0]} is not in the checkpoint" if missing else f"the checkpoint has {unexpected[0]}"
        raise MedadaptError(f"{checkpoint}: its weights are not the architecture in {where / 'plans.json'} "
                            f"({first}); plans.json and the checkpoint must come from the same training")
    for k, v in own.items():
        got = tuple(weights[k].shape)
        if got == tuple(v.shape):
            continue
        if k == next(iter(own)) and len(got) > 1 and got[1] != v.shape[1]:
            raise MedadaptError(f"{where / 'dataset.json'}: lists {v.shape[1]} input channel(s) but the checkpoint "
                                f"{checkpoint} takes {got[1]}; channel_names must be the ones it was trained on")
        if ".seg_layers." in k:
            raise MedadaptError(f"{where / 'dataset.json'}: its labels give {v.shape[0]} output classes but the "
                                f"checkpoint {checkpoint} predicts {got[0]}; labels must be the ones it was trained on")
        raise MedadaptError(f"{checkpoint}: {k} has shape {list(got)} but the architecture in "
                            f"{where / 'plans.json'} needs {list(v.shape)}; plans.json and the checkpoint must "
                            "come from the same training")


def _map_preprocessing(plans: dict, configuration: str, config, where: Path) -> dict[str, Any]:
    """medadapt's preprocessing dict for the configuration: the nnU-Net plans ride along under ``"nnunet"``
    (cases then go through nnunetv2's own preprocessor, :mod:`medadapt.nnunet.preprocessing`); spacing,
    schemes and intensity statistics are repeated in medadapt's fields for display and the methods table."""
    from medadapt.data.preprocessing import PreprocessingPlan
    from medadapt.nnunet.preprocessing import SUPPORTED_READERS

    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in SUPPORTED_READERS:
        raise MedadaptError(f"{where / 'plans.json'}: image_reader_writer {reader} is not supported (medadapt "
                            f"reads NIfTI files as {' and '.join(SUPPORTED_READERS)} do); predict with nnU-Net")
    schemes = [_NORMALIZATION.get(name, "none") for name in config.normalization_schemes]
    props = plans.get("foreground_intensity_properties_per_channel", {})
    intensity = [props.get(str(c)) if s == "CT" else None for c, s in enumerate(schemes)]
    if any(s == "CT" and p is None for s, p in zip(schemes, intensity)):
        raise MedadaptError(f"{where / 'plans.json'}: CT normalization without "
                            "foreground_intensity_properties_per_channel; re-run nnUNetv2_plan_and_preprocess")
    plan = PreprocessingPlan(target_spacing=tuple(config.spacing), normalization=schemes,
                             intensity_properties=[None] * len(schemes), orientation=None).to_dict()
    plan["intensity_properties"] = [None if p is None else {k: float(p[k]) for k in
                                    ("mean", "std", "percentile_00_5", "percentile_99_5", "min", "max", "median")}
                                    for p in intensity]
    PreprocessingPlan.from_dict(plan)  # validates the statistics
    # the source plans ride along: nnU-Net's preprocessor reads them, and export writes the fine-tuned model
    # back with them
    plan["nnunet"] = {"plans": plans, "configuration": configuration}
    return plan


def load_nnunet_model(path: str | Path, configuration: str | None = None,
                      fold: str | int | None = None) -> NNUNetModelFolder:
    """The nnU-Net trained model at ``path`` (folder or zip) as a medadapt model folder."""
    from medadapt.nnunet.env import import_nnunet

    plans_handler = import_nnunet("nnunetv2.utilities.plans_handling.plans_handler")
    source = Path(path)
    model_dir = resolve_model_dir(source, configuration)
    checkpoint = _checkpoint_file(model_dir, fold)
    ckpt = load_checkpoint(checkpoint)
    try:
        plans = json.loads((model_dir / "plans.json").read_text())
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
    except ValueError as exc:
        raise MedadaptError(f"{model_dir}: plans.json or dataset.json is not valid JSON ({exc})") from None
    name = configuration or ckpt.get("init_args", {}).get("configuration") or model_dir.name.rpartition("__")[2]
    from medadapt.nnunet.env import quiet

    with quiet():
        manager = plans_handler.PlansManager(copy.deepcopy(plans))
        if name not in manager.available_configurations:
            raise MedadaptError(f"{model_dir / 'plans.json'}: has no configuration {name!r}; choose one of "
                                f"{', '.join(manager.available_configurations)}")
        config = manager.get_configuration(name)
        labels_mgr = manager.get_label_manager(dataset_json)
    if labels_mgr.has_regions or labels_mgr.has_ignore_label:
        raise MedadaptError(f"{model_dir / 'dataset.json'}: region-based labels and ignore labels are not "
                            "supported by medadapt; use a model trained on plain label maps")
    if len(config.patch_size) != 3:
        raise MedadaptError(f"{model_dir}: configuration {name} is 2D; medadapt fine-tunes 3D networks "
                            "(use 3d_fullres)")
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    spec = NetworkSpec(
        network_class_name=config.network_arch_class_name,
        arch_kwargs=copy.deepcopy(config.network_arch_init_kwargs),
        input_channels=len(channel_names),
        num_classes=labels_mgr.num_segmentation_heads,
        patch_size=tuple(int(v) for v in config.patch_size),
        batch_size=int(config.batch_size),
        kw_requires_import=tuple(config.network_arch_init_kwargs_req_import),
    )
    folder = NNUNetModelFolder(
        network=spec,
        preprocessing=_map_preprocessing(plans, name, config, model_dir),
        labels={str(k): int(v) for k, v in dataset_json["labels"].items()},
        channel_names={str(k): str(v) for k, v in channel_names.items()},
        file_ending=dataset_json.get("file_ending", ".nii.gz"),
        recipe="dgst-paper",  # an nnU-Net model is fine-tuned as the DGST paper fine-tunes nnU-Net models
        provenance={"kind": "nnunet", "source": str(source.resolve()), "checkpoint": str(checkpoint),
                    "configuration": name, "trainer": ckpt.get("trainer_name"),
                    "plans_name": manager.plans_name, "dataset_name": manager.dataset_name},
        path=model_dir,
    )
    folder.preprocessing["nnunet"]["inference_allowed_mirroring_axes"] = ckpt.get("inference_allowed_mirroring_axes")
    folder.checkpoint = checkpoint
    return folder
