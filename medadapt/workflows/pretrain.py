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
from typing import Any

from medadapt.data.cache import preprocess_dataset
from medadapt.data.partial import SAMPLING, annotation_records, build_template, sampling_weights, template_cases
from medadapt.data.preprocessing import plan_from_datasets
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
from medadapt.workflows.training import prepare_network, prepare_strategy, recipe_sampler, training_config


#: what a foundation is pretrained for: segmentation (the datasets' labels) or masked-volume reconstruction
OBJECTIVES = ("supervised", "mae")
#: the layout of a pretraining's identity record (training/identity.json), supervised or mae
PRETRAIN_FORMAT = "medadapt-pretrain/2"  # 2: PretrainSettings (data paths; mae runs too)
SEGMENTATION_LOSSES = ("dice_ce", "dice")


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides a pretraining's result, resolved from the recipe (its contents), the preset
    (patch, batch) and the flags by :func:`resolve_pretrain`; :func:`pretrain` runs it, and the run's identity
    (``training/identity.json``) is this whole object as data (:meth:`to_dict`) with the datasets."""

    data: tuple[str, ...]        #: the nnU-Net raw datasets (absolute)
    objective: str
    preset: str
    activation: str | None       #: softmax or sigmoid (supervised); None for mae (no segmentation output)
    sampling: str
    seed: int
    recipe: Recipe
    training: TrainingConfig
    patch_size: tuple[int, ...]
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"data": list(self.data), "objective": self.objective, "preset": self.preset,
                "activation": self.activation, "sampling": self.sampling, "seed": self.seed,
                "training": self.training.to_dict(), "recipe": self.recipe.to_dict(),
                "patch_size": list(self.patch_size), "batch_size": self.batch_size}


@dataclasses.dataclass(frozen=True)
class PretrainRequest:
    """A pretraining as asked for (the command line's flags, a grid's foundation, the Python API), before
    :func:`resolve_pretrain` checks and resolves it: a new ``preset_name`` network trained on every case of
    ``data`` (one dataset or several).

    ``objective``: ``supervised`` (segmentation of the datasets' labels) or ``mae`` (masked-volume
    reconstruction, the labels unused: :func:`medadapt.workflows.ssl.pretrain_mae`).
    ``activation``: ``softmax`` or ``sigmoid``; default softmax for one fully labelled dataset, sigmoid when
    the datasets' labels differ or cases annotate different classes (which softmax cannot learn from).
    ``sampling``: ``cases`` or ``datasets`` (module docstring). The training settings come from ``recipe``
    (default: the preset's pretraining recipe, e.g. ``cpu-pretrain`` for the CPU presets, ``nnunet``
    otherwise; ``cpu-mae-pretrain``, ... for mae), with ``epochs``, ``iterations_per_epoch`` and ``lr``
    overriding it where given."""

    data: "str | Path | Sequence[str | Path]"
    preset_name: str = "cpu-small"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    lr: float | None = None
    seed: int = 0
    recipe: "str | Path | Recipe | None" = None
    activation: str | None = None
    sampling: str = "cases"
    objective: str = "supervised"


def resolve_pretrain(request: PretrainRequest, engine: EngineOptions | None = None) -> PretrainSettings:
    """The settings of the pretraining ``request`` asks for, checked and resolved (one line per mistake, nothing
    written). ``engine``: its precision, resolved for this process's device, is part of the settings."""
    r = request
    data, preset_name, epochs, iterations_per_epoch, lr, seed = (r.data, r.preset_name, r.epochs,
                                                                 r.iterations_per_epoch, r.lr, r.seed)
    recipe, activation, sampling, objective = r.recipe, r.activation, r.sampling, r.objective
    engine = engine or EngineOptions()
    if objective not in OBJECTIVES:
        raise MedadaptError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    datasets = load_datasets(data)
    recipes = preset_recipes(preset_name)
    if objective == "mae":
        if activation is not None:
            raise MedadaptError("--activation: a masked-reconstruction foundation has no segmentation output; "
                                "leave --activation out with --objective mae")
        from medadapt.workflows.ssl import mae_spec, resolve_mae_recipe

        resolved = resolve_mae_recipe(recipe, recipes["mae"], epochs, iterations_per_epoch, lr)
        spec = mae_spec(preset_name, datasets, resolved, sampling)
        config = training_config(resolved, FullFineTuning.name, seed, "softmax", engine)
    else:
        if activation is not None and activation not in ACTIVATIONS:
            raise MedadaptError(f"--activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        template = build_template(datasets)
        if sampling not in SAMPLING:
            raise MedadaptError(f"--sampling {sampling!r}: unknown; choose one of {', '.join(SAMPLING)}")
        partial = (any(per_case for _, per_case in (annotation_records(ds) for ds in datasets))
                   or any(set(ds.labels) != set(template.labels) for ds in datasets))
        if activation is None:
            activation = "sigmoid" if partial else "softmax"
        if partial and activation == "softmax":
            raise MedadaptError("--activation softmax: these datasets are partially labelled (their label sets "
                                "differ or annotated_classes.json gives per-case records), and a softmax output "
                                "would count every unannotated structure as background; use --activation sigmoid")
        resolved = load_recipe(recipe or recipes["pretrain"]).with_overrides(
            epochs=epochs, iterations_per_epoch=iterations_per_epoch, lr=lr)
        if resolved.loss["name"] not in SEGMENTATION_LOSSES:
            raise MedadaptError(f"--recipe {resolved.name}: trains with loss {resolved.loss['name']}, which is not "
                                "a segmentation loss; use it with --objective mae, or a recipe such as "
                                f"{recipes['pretrain']} for supervised pretraining")
        spec = preset(preset_name, input_channels=datasets[0].num_channels, num_classes=2)
        config = training_config(resolved, FullFineTuning.name, seed, activation, engine)
    return PretrainSettings(
        data=tuple(str(ds.root.resolve()) for ds in datasets), objective=objective, preset=preset_name,
        activation=activation, sampling=sampling, seed=seed, recipe=resolved, training=config,
        patch_size=tuple(resolved.patch_size or spec.patch_size), batch_size=resolved.batch_size or spec.batch_size)


def pretrain_identity(settings: PretrainSettings, datasets) -> dict[str, Any]:
    """What makes a pretraining this one (medadapt.workflows.identity): the settings and the datasets' cases."""
    data = settings.to_dict()
    return {"format": PRETRAIN_FORMAT, **data, "seeds": seeds.SCHEME,
            "datasets": [{"path": str(ds.root.resolve()), "name": ds.name, "labels": ds.labels,
                          "cases": stable_hash(ds.case_ids, 16)} for ds in datasets],
            "settings_digest": settings_digest(data)}


def _plan_and_cases(datasets, template, records, progress: bool):
    """The plan of ``datasets`` and their preprocessed cases (mapped onto ``template``'s classes where given);
    under torchrun rank 0 fills the preprocessing cache and the others then read it."""
    with distributed.main_first():
        plan = plan_from_datasets([(ds, ds.case_ids) for ds in datasets], progress=progress)
        cases = []
        for ds in datasets:
            cached = preprocess_dataset(ds, ds.case_ids, plan, dataset_cache_dir(ds.root), progress=progress)
            cases.extend(template_cases(ds, cached, template, records[ds.name][0]) if template else cached)
    return plan, cases


def _template_record(template, datasets, records) -> dict:
    """The model folder's record of the class template: each dataset and the classes it annotates."""
    template.datasets = [
        {"name": ds.name, "path": str(ds.root), "labels": ds.labels, "cases": len(ds.case_ids),
         "annotates": [c for c in template.classes if any(c in r for r in records[ds.name][0].values())],
         "per_case_records": records[ds.name][1]}
        for ds in datasets]
    return template.to_dict()


def _provenance(s: PretrainSettings, datasets, records) -> dict:
    """What the pretrained model folder says it came from (the run's own numbers are added by the caller)."""
    first = datasets[0]
    return {"kind": "pretrain", "dataset": str(first.root), "dataset_name": first.name,
            "datasets": [{"path": str(ds.root), "name": ds.name} for ds in datasets],
            "cases": first.case_ids if len(datasets) == 1 else {ds.name: ds.case_ids for ds in datasets},
            "annotations": {ds.name: records[ds.name][0] for ds in datasets if records[ds.name][1]},
            "sampling": s.sampling if len(datasets) > 1 else "cases",
            "preset": s.preset, "training": s.training.to_dict(), "recipe": s.recipe.to_dict(),
            "seeds": seeds.record(s.seed)}


@locks_folder("out")
def pretrain(settings: PretrainSettings, out: str | Path, *, resume: bool = False, progress: bool = True,
             engine: EngineOptions | None = None) -> ModelFolder:
    """Run the pretraining ``settings`` describe (:func:`resolve_pretrain`); writes a model folder to ``out``.
    The model folder recommends the preset's fine-tuning recipe to whoever fine-tunes it. ``resume``: continue
    a pretraining of the same settings in ``out``. ``engine``: how the steps run (background workers,
    ``torch.compile``; the precision is the settings')."""
    out = Path(out)
    engine = engine or EngineOptions()
    s = settings
    datasets = load_datasets(list(s.data))
    distributed.init_from_env()
    progress = progress and distributed.is_main()
    identity = pretrain_identity(s, datasets)
    if distributed.is_main():
        check_identity(out / "training", identity)
    if s.objective == "mae":
        from medadapt.workflows.ssl import pretrain_mae

        return pretrain_mae(s, datasets, out, identity, resume=resume, progress=progress, engine=engine)
    preset_name, activation, sampling, seed, resolved, config = (s.preset, s.activation, s.sampling, s.seed,
                                                                 s.recipe, s.training)
    template = build_template(datasets)
    records = {ds.name: annotation_records(ds) for ds in datasets}
    recipes = preset_recipes(preset_name)
    use_template = len(datasets) > 1 or activation == "sigmoid"  # else nnU-Net's case: the dataset's own labels
    labels = template.labels if use_template else datasets[0].labels
    plan, cases = _plan_and_cases(datasets, template if use_template else None, records, progress)
    spec = dataclasses.replace(preset(preset_name, input_channels=datasets[0].num_channels,
                                      num_classes=output_channels(labels, activation)),
                               patch_size=tuple(s.patch_size), batch_size=s.batch_size)
    strategy = FullFineTuning()
    network = prepare_strategy(strategy, prepare_network(seeded_network(spec, seed), resolved, seed), seed)
    weights = sampling_weights(cases, sampling) if len(datasets) > 1 else None
    sampler = recipe_sampler(resolved, cases, spec.patch_size, spec.batch_size, case_weights=weights)
    if distributed.is_main():  # every input is checked: from here on the folder is this run's
        record_identity(out / "training", identity)
    trainer = Trainer(network, strategy, sampler, config, out / "training", progress=progress,
                      description="pretrain", engine=engine)
    history = trainer.fit(resume=resume)
    first = datasets[0]
    folder = ModelFolder(
        network=spec, preprocessing=plan.to_dict(), labels=labels, channel_names=first.channel_names,
        file_ending=first.file_ending, recipe=recipes["finetune"], activation=activation,
        template=_template_record(template, datasets, records) if use_template else None,
        provenance={**_provenance(s, datasets, records), "parameters": total_parameter_count(network),
                    **trainer.summary(), "environment": environment()},
    )
    if distributed.is_main():
        save_model_folder(out, network, folder)
        atomic_write_json(out / "training" / "history.json", history)
    distributed.barrier()
    return folder
