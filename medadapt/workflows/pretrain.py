"""Pretrain a foundation model on whole nnU-Net raw datasets (every case is a training case).

One dataset with its labels gives a softmax model (nnU-Net's). Several datasets, or cases that annotate
different classes (``annotated_classes.json``), give a partially labelled foundation model (FSEFT Eq. 1): one
label template (the union of the datasets' label names, :mod:`medadapt.data.partial`), one sigmoid output per
class, and a loss over each case's annotated classes only. Cases are drawn uniformly over all cases
(``sampling="cases"``, nnU-Net's rule on the concatenated datasets) or uniformly over datasets, then over the
dataset's cases (``sampling="datasets"``, which keeps a small dataset from being drowned); foreground
oversampling centres patches on the classes the case annotates.

A pretraining run's identity (``training/identity.json``: every resolved setting, the recipe's contents,
patch, batch, sampling, and the datasets) is checked on every re-run or ``--resume`` into its folder
(medadapt.workflows.identity).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from medadapt.data.augmentation import Augmentation
from medadapt.data.cache import preprocess_dataset
from medadapt.data.partial import annotation_records, build_template, sampling_weights, template_cases
from medadapt.data.preprocessing import plan_from_datasets
from medadapt.data.sampling import PatchSampler
from medadapt.engine import EngineOptions, Trainer, TrainingConfig, distributed
from medadapt.engine.recipe import Recipe, load_recipe
from medadapt.errors import MedadaptError
from medadapt.models import ModelFolder, preset, save_model_folder
from medadapt.models.model_folder import ACTIVATIONS, output_channels
from medadapt.models.network import preset_recipes, seeded_network
from medadapt.tuning import FullFineTuning
from medadapt.utils import seeds
from medadapt.utils.atomic import atomic_write_json
from medadapt.utils.hashing import stable_hash
from medadapt.utils.lock import locks_folder
from medadapt.workflows.common import dataset_cache_dir, environment, load_datasets, total_parameter_count
from medadapt.workflows.identity import check_identity, record_identity, settings_digest


#: what a foundation is pretrained for: segmentation (the datasets' labels) or masked-volume reconstruction
OBJECTIVES = ("supervised", "mae")
#: the layout of a supervised pretraining's identity record (training/identity.json)
PRETRAIN_FORMAT = "medadapt-pretrain/1"
SEGMENTATION_LOSSES = ("dice_ce", "dice")


@locks_folder("out")
def pretrain(data: "str | Path | Sequence[str | Path]", out: str | Path, preset_name: str = "cpu-small",
             epochs: int | None = None, iterations_per_epoch: int | None = None, lr: float | None = None,
             seed: int = 0, resume: bool = False, progress: bool = True,
             recipe: "str | Path | Recipe | None" = None, activation: str | None = None,
             sampling: str = "cases", objective: str = "supervised",
             engine: EngineOptions | None = None) -> ModelFolder:
    """Train a new network on every case of ``data`` (one dataset or several); writes a model folder to ``out``.

    ``objective``: ``supervised`` (segmentation of the datasets' labels; below) or ``mae`` (masked-volume
    reconstruction, the labels unused: :func:`medadapt.workflows.ssl.pretrain_mae`).

    ``activation``: ``softmax`` or ``sigmoid``; default softmax for one fully labelled dataset, sigmoid when
    the datasets' labels differ or cases annotate different classes (which softmax cannot learn from).
    ``sampling``: ``cases`` or ``datasets`` (module docstring). The training settings come from ``recipe``
    (default: the preset's pretraining recipe, e.g. ``cpu-pretrain`` for the CPU presets, ``nnunet``
    otherwise), with ``epochs``, ``iterations_per_epoch`` and ``lr`` overriding it where given. The model
    folder recommends the preset's fine-tuning recipe to whoever fine-tunes it."""
    if objective not in OBJECTIVES:
        raise MedadaptError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if objective == "mae":
        if activation is not None:
            raise MedadaptError("--activation: a masked-reconstruction foundation has no segmentation output; "
                                "leave --activation out with --objective mae")
        from medadapt.workflows.ssl import pretrain_mae

        return pretrain_mae(data, out, preset_name=preset_name, epochs=epochs,
                            iterations_per_epoch=iterations_per_epoch, lr=lr, seed=seed, resume=resume,
                            progress=progress, recipe=recipe, sampling=sampling, engine=engine)
    out = Path(out)
    if activation is not None and activation not in ACTIVATIONS:
        raise MedadaptError(f"--activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    datasets = load_datasets(data)
    template = build_template(datasets)
    records = {ds.name: annotation_records(ds) for ds in datasets}
    partial = (any(per_case for _, per_case in records.values())
               or any(set(ds.labels) != set(template.labels) for ds in datasets))
    if activation is None:
        activation = "sigmoid" if partial else "softmax"
    if partial and activation == "softmax":
        raise MedadaptError("--activation softmax: these datasets are partially labelled (their label sets differ "
                            "or annotated_classes.json gives per-case records), and a softmax output would count "
                            "every unannotated structure as background; use --activation sigmoid")
    recipes = preset_recipes(preset_name)
    resolved = load_recipe(recipe or recipes["pretrain"]).with_overrides(
        epochs=epochs, iterations_per_epoch=iterations_per_epoch, lr=lr)
    if resolved.loss["name"] not in SEGMENTATION_LOSSES:
        raise MedadaptError(f"--recipe {resolved.name}: trains with loss {resolved.loss['name']}, which is not a "
                            "segmentation loss; use it with --objective mae, or a recipe such as "
                            f"{recipes['pretrain']} for supervised pretraining")
    distributed.init_from_env()
    progress = progress and distributed.is_main()
    use_template = len(datasets) > 1 or activation == "sigmoid"  # else nnU-Net's case: the dataset's own labels
    labels = template.labels if use_template else datasets[0].labels
    with distributed.main_first():  # rank 0 fills the preprocessing cache, the others then read it
        plan = plan_from_datasets([(ds, ds.case_ids) for ds in datasets], progress=progress)
        cases = []
        for ds in datasets:
            cached = preprocess_dataset(ds, ds.case_ids, plan, dataset_cache_dir(ds.root), progress=progress)
            cases.extend(template_cases(ds, cached, template, records[ds.name][0]) if use_template else cached)
    spec = preset(preset_name, input_channels=datasets[0].num_channels,
                  num_classes=output_channels(labels, activation))
    spec = dataclasses.replace(spec, patch_size=tuple(resolved.patch_size or spec.patch_size),
                               batch_size=resolved.batch_size or spec.batch_size)
    network = seeded_network(spec, seed)
    strategy = FullFineTuning()
    network = strategy.prepare(network)
    weights = sampling_weights(cases, sampling) if len(datasets) > 1 else None
    sampler = PatchSampler(cases, spec.patch_size, spec.batch_size, oversample_foreground=0.33,
                           augmentation=Augmentation(spec.patch_size), case_weights=weights,
                           patches_per_case=resolved.patches_per_case)
    engine = engine or EngineOptions()
    config = engine.configure(TrainingConfig.from_recipe(resolved, strategy.name, seed, activation=activation))
    # the run's identity: every resolved setting (the recipe's contents, patch, batch, sampling) and the data
    settings = {"objective": objective, "preset": preset_name, "activation": activation, "sampling": sampling,
                "seed": seed, "training": config.to_dict(), "recipe": resolved.to_dict(),
                "patch_size": list(spec.patch_size), "batch_size": spec.batch_size}
    identity = {"format": PRETRAIN_FORMAT, **settings, "seeds": seeds.SCHEME,
                "datasets": [{"path": str(ds.root.resolve()), "name": ds.name, "labels": ds.labels,
                              "cases": stable_hash(ds.case_ids, 16)} for ds in datasets],
                "settings_digest": settings_digest(settings)}
    if distributed.is_main():
        check_identity(out / "training", identity)
        record_identity(out / "training", identity)
    trainer = Trainer(network, strategy, sampler, config, out / "training", progress=progress,
                      description="pretrain", engine=engine)
    history = trainer.fit(resume=resume)
    template_record = None
    if use_template:
        template.datasets = [
            {"name": ds.name, "path": str(ds.root), "labels": ds.labels, "cases": len(ds.case_ids),
             "annotates": [c for c in template.classes if any(c in r for r in records[ds.name][0].values())],
             "per_case_records": records[ds.name][1]}
            for ds in datasets]
        template_record = template.to_dict()
    first = datasets[0]
    folder = ModelFolder(
        network=spec, preprocessing=plan.to_dict(), labels=labels, channel_names=first.channel_names,
        file_ending=first.file_ending, recipe=recipes["finetune"], activation=activation, template=template_record,
        provenance={"kind": "pretrain", "dataset": str(first.root), "dataset_name": first.name,
                    "datasets": [{"path": str(ds.root), "name": ds.name} for ds in datasets],
                    "cases": first.case_ids if len(datasets) == 1 else {ds.name: ds.case_ids for ds in datasets},
                    "annotations": {ds.name: records[ds.name][0] for ds in datasets if records[ds.name][1]},
                    "sampling": sampling if len(datasets) > 1 else "cases",
                    "preset": preset_name, "training": config.to_dict(), "recipe": resolved.to_dict(),
                    "seeds": seeds.record(seed), "parameters": total_parameter_count(network), **trainer.summary(),
                    "environment": environment()},
    )
    if distributed.is_main():
        save_model_folder(out, network, folder)
        atomic_write_json(out / "training" / "history.json", history)
    distributed.barrier()
    return folder
