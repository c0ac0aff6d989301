"""Few-shot fine-tuning of a foundation model folder on an nnU-Net raw dataset, then test-split evaluation.

Protocol (DGST paper, Sec. 3.1): the dataset is split once into a fixed 80% train / 20% test part (seeded by
``split_seed``, recorded); K training cases are drawn from the train part with ``seed`` (nested: the 3-shot
cases are among the 5-shot cases); the model is fine-tuned and evaluated with its final checkpoint on the
whole test part.

Output folder::

    <out>/run.json                 everything needed to reproduce and read the run (written last)
    <out>/model/                   the fine-tuned model folder (plans.json + weights.pt)
    <out>/delta.pt                 the same model as a delta against the foundation (medadapt.tuning.delta)
    <out>/training/                checkpoint_latest.pt (for --resume) and history.json (loss curve)
    <out>/predictions/<case>.nii.gz
    <out>/metrics_per_case.csv, <out>/summary.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medadapt.data.augmentation import Augmentation
from medadapt.data.dataset import RawDataset
from medadapt.data.io import read_label
from medadapt.data.cache import preprocess_dataset
from medadapt.data.sampling import PatchSampler
from medadapt.data.splits import draw_shots, train_test_split
from medadapt.engine import Trainer, TrainingConfig, distributed
from medadapt.errors import MedadaptError
from medadapt.inference import Predictor
from medadapt.metrics import case_metrics, summarize
from medadapt.metrics.evaluate import write_metrics
from medadapt.models import ModelFolder, load_model_folder, save_model_folder
from medadapt.models.network import build_network
from medadapt.tuning import make_strategy
from medadapt.tuning.delta import make_delta, save_delta
from medadapt.utils.atomic import atomic_write_json
from medadapt.workflows.common import (dataset_cache_dir, environment, total_parameter_count,
                                       trainable_parameter_count)

FINETUNE_LR = 1e-3  # DGST paper, Sec. 3.1


def load_foundation(folder: ModelFolder, dataset: RawDataset, seed: int) -> tuple[torch.nn.Module, bool]:
    """The foundation network for ``dataset``: its weights, with a new (seeded) head if the labels differ.

    As nnU-Net's pretrained-weight loading does, every weight is transferred except the segmentation
    heads when the target label set is not the foundation model's.
    """
    if dataset.num_channels != folder.network.input_channels:
        raise MedadaptError(
            f"{dataset.root / 'dataset.json'}: has {dataset.num_channels} input channel(s) but the model in "
            f"{folder.path} expects {folder.network.input_channels}; use a dataset with the same channels")
    if dataset.labels == folder.labels:
        return folder.load_network(), False
    spec = folder.network.with_classes(dataset.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(spec)
    foundation = folder.load_network()
    own = network.state_dict()
    transferred = {k: v for k, v in foundation.state_dict().items() if k in own and own[k].shape == v.shape}
    network.load_state_dict(transferred, strict=False)
    return network, True


def finetune(model: str | Path, data: str | Path, out: str | Path, method: str, shots: int, seed: int = 0,
             gamma: int | None = None, split_seed: int = 0, epochs: int = 12, iterations_per_epoch: int = 25,
             lr: float | None = None, resume: bool = False, progress: bool = True,
             method_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``shots`` cases of ``data`` with ``method``; evaluate on the test split.

    ``method_options`` go to the strategy (e.g. ``rank``/``alpha`` for lora, ``reduction`` for adapter).
    """
    out = Path(out)
    run_file = out / "run.json"
    if run_file.is_file():
        if resume:
            return json.loads(run_file.read_text())
        raise MedadaptError(f"{out}: holds a finished run; pass --resume to reuse it or choose another --out")
    # validates --method and its options before any work
    strategy = make_strategy(method, gamma=gamma, seed=seed, **(method_options or {}))
    distributed.init_from_env()
    progress = progress and distributed.is_main()
    folder = load_model_folder(model)
    dataset = RawDataset.load(data)
    train_ids, test_ids = train_test_split(dataset.case_ids, test_fraction=0.2, seed=split_seed)
    shot_ids = draw_shots(train_ids, shots, seed)

    # Every case this run touches is checked before anything is written: a bad test case must not surface
    # only after training, next to half the predictions.
    for cid in tqdm(test_ids, desc="check test cases", disable=not progress, unit="case", leave=False):
        dataset.load_case(cid)
    plan = folder.plan()
    cache = dataset_cache_dir(dataset.root)
    with distributed.main_first():  # rank 0 fills the preprocessing cache, the others then read it
        cases = preprocess_dataset(dataset, shot_ids, plan, cache, progress=progress)
    network, new_head = load_foundation(folder, dataset, seed)
    torch.manual_seed(seed)  # strategies that initialise weights (scratch, adapters, LoRA) draw from here
    network = strategy.prepare(network)
    spec = folder.network.with_classes(dataset.num_classes)
    sampler = PatchSampler(cases, spec.patch_size, spec.batch_size, oversample_foreground=0.33,
                           augmentation=Augmentation(spec.patch_size))
    config = TrainingConfig(epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                            initial_lr=lr or strategy.default_lr or FINETUNE_LR, seed=seed)
    trainer = Trainer(network, strategy, sampler, config, out / "training", progress=progress,
                      description=f"finetune {method} {shots}-shot")
    trainable = trainable_parameter_count(network)
    updated_per_step = strategy.updated_per_step(network)
    history = trainer.fit(resume=resume)
    if not distributed.is_main():  # rank 0 writes the model, predicts and evaluates
        distributed.barrier()
        return {}
    atomic_write_json(out / "training" / "history.json", history)

    delta = make_delta(folder.load_network().state_dict(), network.state_dict(),
                       meta={"strategy": strategy.config(), "num_classes": dataset.num_classes,
                             "foundation": str(folder.path)})
    save_delta(out / "delta.pt", delta)
    final = strategy.finalize(network)
    tuned = ModelFolder(
        network=spec, preprocessing=folder.preprocessing, labels=dataset.labels,
        channel_names=dataset.channel_names, file_ending=dataset.file_ending,
        provenance={"kind": "finetune", "foundation": str(folder.path), "strategy": strategy.config()},
        extensions=strategy.architecture(final),
    )
    save_model_folder(out / "model", final, tuned)
    sizes = {"delta_bytes": (out / "delta.pt").stat().st_size,
             "checkpoint_bytes": (out / "model" / "weights.pt").stat().st_size}

    predictor = Predictor(tuned, network=final)
    pred_dir = out / "predictions"
    test_cases = [(cid, dataset.image_paths(cid)) for cid in test_ids]
    predictor.predict_files(test_cases, pred_dir, progress=progress)
    foreground = {k: v for k, v in dataset.labels.items() if v != 0}
    rows = []
    for cid in tqdm(test_ids, desc="evaluate", disable=not progress, unit="case", leave=False):
        gt = read_label(dataset.label_path(cid))
        pred = read_label(pred_dir / f"{cid}{dataset.file_ending}")
        rows.extend(case_metrics(pred.array, gt.array, gt.spacing, foreground, tolerance_mm=1.0, case=cid))
    summary = summarize(rows, tolerance_mm=1.0)
    write_metrics(rows, summary, out)

    record = {
        "method": strategy.config(),
        "shots": shots,
        "seed": seed,
        "split_seed": split_seed,
        "foundation": str(Path(model).resolve()),
        "dataset": str(dataset.root),
        "dataset_name": dataset.name,
        "split": {"train": train_ids, "test": test_ids},
        "shot_cases": shot_ids,
        "new_head": new_head,
        "training": config.to_dict(),
        "parameters": {"trainable": trainable, "updated_per_step": updated_per_step,
                       "total": total_parameter_count(final)},
        "timing": trainer.summary(),
        "sizes": sizes,
        "metrics": summary,
        "environment": environment(),
    }
    atomic_write_json(run_file, record)
    distributed.barrier()
    return record
