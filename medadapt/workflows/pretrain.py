"""Pretrain a foundation model on a whole nnU-Net raw dataset (every case is a training case)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from medadapt.data.augmentation import Augmentation
from medadapt.data.dataset import RawDataset
from medadapt.data.cache import preprocess_dataset
from medadapt.data.preprocessing import plan_from_dataset
from medadapt.data.sampling import PatchSampler
from medadapt.engine import Trainer, TrainingConfig, distributed
from medadapt.engine.recipe import Recipe, load_recipe
from medadapt.models import ModelFolder, preset, save_model_folder
from medadapt.models.network import preset_recipes, seeded_network
from medadapt.tuning import FullFineTuning
from medadapt.utils.atomic import atomic_write_json
from medadapt.workflows.common import dataset_cache_dir, environment, total_parameter_count

def pretrain(data: str | Path, out: str | Path, preset_name: str = "cpu-small", epochs: int | None = None,
             iterations_per_epoch: int | None = None, lr: float | None = None, seed: int = 0,
             resume: bool = False, progress: bool = True, recipe: "str | Path | Recipe | None" = None) -> ModelFolder:
    """Train a new network on every case of ``data``; writes a model folder to ``out``.

    The training settings come from ``recipe`` (default: the preset's pretraining recipe, e.g. ``cpu-pretrain``
    for the CPU presets, ``nnunet`` otherwise), with ``epochs``, ``iterations_per_epoch`` and ``lr`` overriding
    it where given. The model folder recommends the preset's fine-tuning recipe to whoever fine-tunes it."""
    out = Path(out)
    distributed.init_from_env()
    progress = progress and distributed.is_main()
    dataset = RawDataset.load(data)
    case_ids = dataset.case_ids
    with distributed.main_first():  # rank 0 fills the preprocessing cache, the others then read it
        plan = plan_from_dataset(dataset, case_ids, progress=progress)
        cases = preprocess_dataset(dataset, case_ids, plan, dataset_cache_dir(dataset.root), progress=progress)
    spec = preset(preset_name, input_channels=dataset.num_channels, num_classes=dataset.num_classes)
    recipes = preset_recipes(preset_name)
    resolved = load_recipe(recipe or recipes["pretrain"]).with_overrides(
        epochs=epochs, iterations_per_epoch=iterations_per_epoch, lr=lr)
    spec = dataclasses.replace(spec, patch_size=tuple(resolved.patch_size or spec.patch_size),
                               batch_size=resolved.batch_size or spec.batch_size)
    network = seeded_network(spec, seed)
    strategy = FullFineTuning()
    network = strategy.prepare(network)
    sampler = PatchSampler(cases, spec.patch_size, spec.batch_size, oversample_foreground=0.33,
                           augmentation=Augmentation(spec.patch_size))
    config = TrainingConfig.from_recipe(resolved, strategy.name, seed)
    trainer = Trainer(network, strategy, sampler, config, out / "training", progress=progress,
                      description="pretrain")
    history = trainer.fit(resume=resume)
    folder = ModelFolder(
        network=spec, preprocessing=plan.to_dict(), labels=dataset.labels, channel_names=dataset.channel_names,
        file_ending=dataset.file_ending, recipe=recipes["finetune"],
        provenance={"kind": "pretrain", "dataset": str(dataset.root), "dataset_name": dataset.name,
                    "cases": case_ids, "preset": preset_name, "training": config.to_dict(),
                    "recipe": resolved.to_dict(),
                    "parameters": total_parameter_count(network), **trainer.summary(),
                    "environment": environment()},
    )
    if distributed.is_main():
        save_model_folder(out, network, folder)
        atomic_write_json(out / "training" / "history.json", history)
    distributed.barrier()
    return folder
