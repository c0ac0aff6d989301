"""Write a medadapt model as an nnU-Net v2 trained model folder (and zip) that nnU-Net predicts with unchanged.

Layout (what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads)::

    <out>/dataset.json                   channel_names, labels, file_ending
    <out>/plans.json                     the foundation's nnU-Net plans (or plans built from medadapt's plan),
                                         one configuration, its architecture = the fine-tuned network's
    <out>/fold_<f>/checkpoint_final.pth  network_weights, init_args (plans, configuration, fold, dataset_json),
                                         trainer_name 'nnUNetTrainer', inference_allowed_mirroring_axes

The zip holds the same files under ``<DatasetXXX_Name>/nnUNetTrainer__<plans>__<configuration>/``, the layout
``nnUNetv2_export_model_to_zip`` writes and ``nnUNetv2_install_pretrained_model_from_zip`` installs.

LoRA models are already merged when medadapt writes a model folder. Adapters are residual bottlenecks with a
nonlinearity: they cannot be folded into nnU-Net's plain architecture, so a model with adapters is refused. So
is a network nnU-Net does not build (one not from ``dynamic_network_architectures``, e.g. SwinUNETR) and a
preprocessing scheme nnU-Net does not have (MONAI's ScaleIntensityRange).

Sigmoid models (one independent output per class; medadapt's partially labelled foundations and what is
fine-tuned from them) are refused too. nnU-Net applies a sigmoid only in its region-based configuration, and
its ``LabelManager`` treats a dataset as region-based only when some region joins several label values
(``len(region) > 1``); a sigmoid model's classes are one label value each, which nnU-Net reads as a softmax
dataset with a background output. Writing each class as a duplicated region (``[k, k]``) would pass that test
by accident of its implementation, so medadapt does not do it.

Files are written atomically, plans.json last: a folder with plans.json is complete.
"""
from __future__ import annotations

import copy
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from medadapt.errors import MedadaptError
from medadapt.models.model_folder import ModelFolder, load_model_folder
from medadapt.utils.atomic import atomic_path, atomic_torch_save, atomic_write_json

TRAINER = "nnUNetTrainer"  # the predictor builds the network with this class's build_network_architecture
_SCHEME_NAMES = {"CT": "CTNormalization", "ZScore": "ZScoreNormalization", "none": "NoNormalization"}
_DATASET_NAME = re.compile(r"^Dataset\d{3}_\w+$")
NNUNET_NETWORK_PACKAGE = "dynamic_network_architectures."  # where nnU-Net's networks (PlainConvUNet, ResEnc) live


def _resampling(order: int, is_seg: bool) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}


def _architecture(folder: ModelFolder) -> dict[str, Any]:
    spec = folder.network.to_dict()
    return {"network_class_name": spec["network_class_name"], "arch_kwargs": spec["arch_kwargs"],
            "_kw_requires_import": spec["_kw_requires_import"]}


def build_plans(folder: ModelFolder, dataset_name: str) -> tuple[dict[str, Any], str]:
    """nnU-Net plans for ``folder``: the nnU-Net foundation's own plans when it came from one, else built
    from medadapt's preprocessing plan. Returns (plans, configuration name)."""
    pre = folder.preprocessing
    source = pre.get("nnunet")
    if source is not None:
        from medadapt.nnunet.env import import_nnunet, quiet

        handler = import_nnunet("nnunetv2.utilities.plans_handling.plans_handler")
        name = source["configuration"]
        plans = copy.deepcopy(source["plans"])
        with quiet():  # resolved: the written configuration does not depend on others through inherits_from
            resolved = copy.deepcopy(handler.PlansManager(copy.deepcopy(plans)).get_configuration(name).configuration)
        resolved.pop("inherits_from", None)
        plans["configurations"] = {name: resolved}
    else:
        name = "3d_fullres"
        props = {str(c): (p if p is not None else {}) for c, p in enumerate(pre["intensity_properties"])}
        spacing = [float(s) for s in pre["target_spacing"]]
        plans = {
            "dataset_name": dataset_name,
            "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": spacing,
            "original_median_shape_after_transp": list(folder.network.patch_size),
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {name: {
                "data_identifier": f"nnUNetPlans_{name}",
                "preprocessor_name": "DefaultPreprocessor",
                "spacing": spacing,
                "normalization_schemes": [_SCHEME_NAMES[s] for s in pre["normalization"]],
                "use_mask_for_norm": [False] * len(pre["normalization"]),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": _resampling(3, False),
                "resampling_fn_seg_kwargs": _resampling(1, True),
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": _resampling(1, False),
                "batch_dice": False,
            }},
            "experiment_planner_used": "medadapt",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": props,
        }
    config = plans["configurations"][name]
    config["architecture"] = _architecture(folder)  # the fine-tuned network (its head may be new)
    config["patch_size"] = list(folder.network.patch_size)
    config["batch_size"] = int(folder.network.batch_size)
    config.setdefault("median_image_size_in_voxels", list(folder.network.patch_size))
    plans["dataset_name"] = dataset_name
    return plans, name


def _default_dataset_name(folder: ModelFolder, source: dict | None) -> str:
    """The fine-tuning dataset's folder name (``<run>/run.json`` next to ``<run>/model``) when it is an nnU-Net
    dataset name, else the nnU-Net foundation's, else Dataset999_medadapt."""
    import json

    run_file = folder.path.parent / "run.json" if folder.path is not None else None
    if run_file is not None and run_file.is_file():
        try:
            name = Path(str(json.loads(run_file.read_text()).get("dataset", ""))).name
        except ValueError:
            name = ""
        if _DATASET_NAME.match(name):
            return name
    name = str(source["plans"].get("dataset_name", "")) if source else ""
    return name if _DATASET_NAME.match(name) else "Dataset999_medadapt"


def export_model(model: str | Path | ModelFolder, out: str | Path, zip_path: str | Path | None = None,
                 fold: int | str = 0, dataset_name: str | None = None) -> Path:
    """Export ``model`` (a medadapt model folder, e.g. ``<finetune run>/model``) to ``out`` as an nnU-Net v2
    trained model folder; with ``zip_path`` also as the zip nnU-Net installs. Returns ``out``."""
    fold = int(fold) if str(fold).isdigit() else str(fold)
    if not isinstance(fold, int) and fold != "all":
        raise MedadaptError(f"--fold {fold!r}: must be a number or 'all' (nnU-Net's fold_<FOLD> folder)")
    if not isinstance(model, ModelFolder) and not Path(model).exists():
        raise MedadaptError(f"{model}: no such model folder; pass <finetune run>/model or another model folder")
    folder = model if isinstance(model, ModelFolder) else load_model_folder(model)
    where = folder.path or Path(str(model))
    folder.require_segmentation_head("export-nnunet", "export a model fine-tuned from it")
    network_class = folder.network.network_class_name
    if not network_class.startswith(NNUNET_NETWORK_PACKAGE):
        raise MedadaptError(f"{where}: its network is {network_class}, not an nnU-Net network "
                            f"({NNUNET_NETWORK_PACKAGE}*), so nnU-Net cannot build or predict with it; use "
                            "medadapt predict with the model folder instead")
    if folder.extensions:
        raise MedadaptError(f"{where}: the model holds adapters ({folder.extensions}), which cannot be folded "
                            "into nnU-Net's plain network; export a model fine-tuned with another method "
                            "(LoRA is merged and exports fine)")
    if folder.activation != "softmax":
        raise MedadaptError(f"{where}: a {folder.activation} model (one independent output per class) has no nnU-Net "
                            "form: nnU-Net's region-based configuration needs regions of several labels; predict "
                            "with 'medadapt predict', or export a softmax model")
    unknown = sorted({s for s in folder.preprocessing.get("normalization", []) if s not in _SCHEME_NAMES})
    if unknown and folder.preprocessing.get("nnunet") is None:
        raise MedadaptError(f"{where}: its preprocessing normalises with {', '.join(unknown)}, which nnU-Net does "
                            f"not have ({', '.join(_SCHEME_NAMES)}); use medadapt predict with the model folder")
    source = folder.preprocessing.get("nnunet")
    if dataset_name is None:
        dataset_name = _default_dataset_name(folder, source)
    if not _DATASET_NAME.match(dataset_name):
        raise MedadaptError(f"--dataset-name {dataset_name!r}: nnU-Net needs the form DatasetXXX_Name "
                            "(three digits), e.g. Dataset501_LymphNodes")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MedadaptError(f"{out}: exists and is not empty; choose a new output folder")

    plans, configuration = build_plans(folder, dataset_name)
    dataset_json = {"channel_names": dict(folder.channel_names), "labels": dict(folder.labels),
                    "numTraining": 0, "file_ending": folder.file_ending,
                    "name": dataset_name.split("_", 1)[1],
                    "description": "exported by medadapt", "medadapt": folder.provenance}
    network = folder.load_network(deep_supervision=False)
    mirror_axes = tuple(source.get("inference_allowed_mirroring_axes") or (0, 1, 2)) if source else (0, 1, 2)
    checkpoint = {
        "network_weights": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": TRAINER,
        "inference_allowed_mirroring_axes": mirror_axes,
        "medadapt": {"source": str(where), "provenance": folder.provenance},
    }
    atomic_torch_save(out / f"fold_{fold}" / "checkpoint_final.pth", checkpoint)
    atomic_write_json(out / "dataset.json", dataset_json)
    atomic_write_json(out / "plans.json", plans)
    if zip_path is not None:
        write_zip(out, zip_path, f"{dataset_name}/{TRAINER}__{plans['plans_name']}__{configuration}")
    return out


def write_zip(model_dir: Path, zip_path: str | Path, prefix: str) -> Path:
    """Zip a trained model folder under ``prefix`` (nnUNetv2_export_model_to_zip's layout), atomically."""
    zip_path = Path(zip_path)
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
                zf.write(f, f"{prefix}/{f.relative_to(model_dir).as_posix()}")
    return zip_path
