"""Self-supervised foundations: masked-volume reconstruction pretraining, and a reconstruction pathway for a
supervised foundation (docs/ssl.md).

:func:`pretrain_mae` (``medadapt pretrain --objective mae``) trains a new network as nnssl's ``BaseMAETrainer``
does (:mod:`medadapt.ssl.mae`): random patches of every case (no foreground oversampling: the labels are not
used), nnssl's spatial augmentation and mirroring, 75 % of the patch's blocks set to 0, the network's output
(one channel per input channel, no deep supervision) scored by the MSE over the masked voxels. The model folder's
``weights.pt`` is that network, its ``pretext`` record says so (``weights: weights.pt``); it has no segmentation
head, so ``medadapt finetune --head fresh`` (the default) fine-tunes it and ``--head keep`` / ``match``, zero-shot
evaluation and prediction refuse it in one line.

:func:`pretrain_ssl_head` (``medadapt pretrain-ssl-head``) gives a supervised foundation the pretext network that
scoring cases by the self-supervised loss needs. For a U-Net the reconstruction cannot come from the encoder
alone at full resolution without a decoder, and the segmentation decoder's weights are the foundation's: so the
pretext network is the foundation's architecture with a *copy* of its decoder (initialised from the
foundation's decoder, then trained) and a new 1x1x1 reconstruction head (one output per input channel), on the
foundation's encoder, frozen (no gradient, eval mode, bit-identical afterwards). The output folder is the
foundation's (same ``weights.pt``, same ``plans.json`` plus the ``pretext`` record) and ``pretext.pt``, which
holds the decoder copy and head only; the encoder is read from ``weights.pt``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medadapt.data.cache import preprocess_dataset
from medadapt.data.partial import SAMPLING
from medadapt.data.preprocessing import plan_from_datasets
from medadapt.engine import EngineOptions, Trainer, TrainingConfig, distributed
from medadapt.engine.recipe import Recipe, load_recipe
from medadapt.errors import MedadaptError
from medadapt.models import ModelFolder, load_model_folder, preset, save_model_folder
from medadapt.models.network import PRESETS, preset_recipes, seeded_network, set_deep_supervision
from medadapt.models.parts import model_parts
from medadapt.ssl.mae import MaskedSampler, mae_augmentation, mask_config_from_loss
from medadapt.ssl.pretext import PRETEXT_FILE, WEIGHTS_FILE, PretextRecord, encoder_state_keys
from medadapt.tuning import FullFineTuning
from medadapt.tuning.base import StepContext, default_train_step
from medadapt.tuning.subset import DecoderOnly
from medadapt.utils import seeds
from medadapt.utils.atomic import atomic_torch_save, atomic_write_json
from medadapt.workflows.identity import record_identity
from medadapt.workflows.training import recipe_sampler
from medadapt.workflows.common import (dataset_cache_dir, environment, load_datasets, model_fingerprint,
                                       total_parameter_count, trainable_parameter_count)

#: where pretrain-ssl-head keeps its checkpoint, identity and loss curve inside the output model folder
HEAD_TRAINING = "pretext-training"
#: the masked-reconstruction recipe of a folder whose preset is unknown (imported or nnU-Net models)
DEFAULT_MAE_RECIPE = "mae-nnssl"


def dataset_weights(groups: Sequence[int], sampling: str) -> np.ndarray | None:
    """Probability of drawing each case when the cases of several datasets (``groups``: cases per dataset, in
    order) are pooled: None (the sampler's uniform draw over cases) for ``cases``; ``datasets``: uniform over the
    datasets, then over the dataset's cases."""
    if sampling not in SAMPLING:
        raise MedadaptError(f"--sampling {sampling!r}: unknown; choose one of {', '.join(SAMPLING)}")
    if sampling == "cases" or len(groups) < 2:
        return None
    w = np.concatenate([np.full(n, 1.0 / (len(groups) * n)) for n in groups])
    return w / w.sum()


def resolve_mae_recipe(recipe, default: str, epochs, iterations_per_epoch, lr) -> Recipe:
    """The masked-reconstruction recipe with the command line's budget; one line for a segmentation recipe."""
    resolved = load_recipe(recipe or default).with_overrides(epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                                                              lr=lr)
    mask_config_from_loss(resolved.loss, f"--recipe {resolved.name}")  # a segmentation recipe fails here
    return resolved


def _patch_spec(spec, resolved: Recipe):
    return dataclasses.replace(spec, patch_size=tuple(resolved.patch_size or spec.patch_size),
                               batch_size=resolved.batch_size or spec.batch_size)


def _sampler(cases, groups: Sequence[int], spec, resolved: Recipe, sampling: str) -> MaskedSampler:
    """Random patches anywhere in the volumes (no foreground oversampling: labels play no part), nnssl's
    augmentation, then the recipe's masking."""
    patches = recipe_sampler(resolved, cases, spec.patch_size, spec.batch_size, unbiased=True,
                             augmentation=mae_augmentation(spec.patch_size),
                             case_weights=dataset_weights(groups, sampling))
    return MaskedSampler(patches, mask_config_from_loss(resolved.loss))


def _datasets_record(datasets) -> list[dict]:
    return [{"path": str(ds.root), "name": ds.name, "cases": len(ds.case_ids)} for ds in datasets]


def mae_spec(preset_name: str, datasets, resolved: Recipe, sampling: str):
    """The reconstruction network of ``preset_name`` for ``datasets`` (one output per input channel) with the
    recipe's patch and batch; checks ``sampling`` and that the recipe's masking fits the patch."""
    dataset_weights([len(ds.case_ids) for ds in datasets], sampling)  # validates --sampling before any work
    channels = datasets[0].num_channels
    spec = _patch_spec(preset(preset_name, input_channels=channels, num_classes=channels), resolved)
    mask_config_from_loss(resolved.loss).masked_blocks(spec.patch_size)
    return spec


def pretrain_mae(settings, datasets, out: str | Path, identity: dict, resume: bool = False, progress: bool = True,
                 engine: EngineOptions | None = None) -> ModelFolder:
    """Train a new network by masked-volume reconstruction on every case of ``datasets`` (labels unused) as
    ``settings`` (a :class:`medadapt.workflows.pretrain.PretrainSettings` of objective ``mae``) describe; writes
    a model folder to ``out`` (module docstring) and ``identity`` to its ``training/`` once every input is
    checked. The training settings and the masking come from the settings' recipe (its loss is ``mae``)."""
    out = Path(out)
    preset_name, seed, resolved, sampling, config = (settings.preset, settings.seed, settings.recipe,
                                                     settings.sampling, settings.training)
    recipes = preset_recipes(preset_name)
    spec = mae_spec(preset_name, datasets, resolved, sampling)
    mask = mask_config_from_loss(resolved.loss)
    with distributed.main_first():  # rank 0 fills the preprocessing cache, the others then read it
        plan = plan_from_datasets([(ds, ds.case_ids) for ds in datasets], progress=progress)
        cases = [c for ds in datasets
                 for c in preprocess_dataset(ds, ds.case_ids, plan, dataset_cache_dir(ds.root), progress=progress)]
    if distributed.is_main():  # every input is checked: from here on the folder is this run's
        record_identity(out / "training", identity)
    network = seeded_network(spec, seed)
    set_deep_supervision(network, False)  # the reconstruction is the full-resolution output alone
    strategy = FullFineTuning()
    network = strategy.prepare(network)
    sampler = _sampler(cases, [len(ds.case_ids) for ds in datasets], spec, resolved, sampling)
    engine = engine or EngineOptions()
    trainer = Trainer(network, strategy, sampler, config, out / "training", progress=progress,
                      description="pretrain mae", engine=engine)
    history = trainer.fit(resume=resume)
    first = datasets[0]
    record = PretextRecord(objective="mae", mask=mask, network=spec, weights=WEIGHTS_FILE,
                           provenance={"kind": "pretrain", "recipe": resolved.name, "seed": seed})
    folder = ModelFolder(
        network=spec, preprocessing=plan.to_dict(), labels={"background": 0}, channel_names=first.channel_names,
        file_ending=first.file_ending, recipe=recipes["finetune"], pretext=record.to_dict(),
        provenance={"kind": "pretrain", "objective": "mae", "dataset": str(first.root), "dataset_name": first.name,
                    "datasets": [{"path": str(ds.root), "name": ds.name} for ds in datasets],
                    "cases": first.case_ids if len(datasets) == 1 else {ds.name: ds.case_ids for ds in datasets},
                    "sampling": sampling if len(datasets) > 1 else "cases", "preset": preset_name,
                    "training": config.to_dict(), "recipe": resolved.to_dict(), "seeds": seeds.record(seed),
                    "parameters": total_parameter_count(network), **trainer.summary(),
                    "environment": environment()},
    )
    if distributed.is_main():
        save_model_folder(out, network, folder)
        atomic_write_json(out / "training" / "history.json", history)
    distributed.barrier()
    return folder


class FrozenEncoder(DecoderOnly):
    """Trains the decoder and the heads; the encoder is frozen (no gradient, left out of the optimiser) and kept
    in eval mode, so that not even normalisation statistics move."""

    name = "frozen-encoder"
    summary = "the decoder and heads on a frozen encoder (eval mode)"

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        model_parts(ctx.model).encoder.eval()
        return default_train_step(ctx, batch)


def pretext_network_from(folder: ModelFolder, foundation: dict[str, torch.Tensor], spec, seed: int) -> nn.Module:
    """The pretext network of a supervised foundation: ``spec``'s architecture (the foundation's, one output per
    input channel, no deep supervision) with every foundation weight but the heads (encoder, and decoder as the
    copy to train) and new heads, initialised as a new network of its kind (seeded by ``seed``)."""
    from medadapt.workflows.finetune import weights_without_heads

    network = seeded_network(spec, seed, purpose="head")  # only its heads keep these initial weights
    set_deep_supervision(network, False)
    network.load_state_dict(weights_without_heads(folder, foundation, network), strict=False)
    return network


@dataclasses.dataclass(frozen=True)
class SslHeadRequest:
    """A pretext pathway as asked for (:func:`pretrain_ssl_head`): masked-volume reconstruction added to the
    supervised foundation ``model``, trained on the cases of ``data`` (labels unused) with the foundation's
    encoder frozen. The settings come from ``recipe`` (default: the masked-reconstruction recipe of the preset
    the foundation was pretrained with, else ``mae-nnssl``; its loss must be ``mae``), with ``epochs``,
    ``iterations_per_epoch`` and ``lr`` overriding it where given; ``sampling`` as for pretraining."""

    model: str | Path
    data: "str | Path | Sequence[str | Path]"
    recipe: "str | Path | Recipe | None" = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    lr: float | None = None
    seed: int = 0
    sampling: str = "cases"


def _finished_or_refused(folder: ModelFolder, out: Path, resume: bool) -> ModelFolder | None:
    """The finished pretext folder in ``out`` (``resume``), None where there is none yet; a foundation that
    cannot take a pretext pathway, or an ``out`` that cannot hold one, refused in one line."""
    if folder.path is not None and out.resolve() == Path(folder.path).resolve():
        raise MedadaptError(f"--out {out}: is the foundation's own folder; write the foundation with its pretext "
                            "pathway to a new folder")
    if folder.pretext is not None:
        raise MedadaptError(f"{folder.path}: already has a pretext network ({folder.pretext.get('objective')}, in "
                            f"{folder.pretext.get('weights')}); use it as it is (medadapt.ssl.load_pretext)")
    if folder.extensions:
        raise MedadaptError(f"{folder.path}: the model holds {[e.get('type') for e in folder.extensions]} layers "
                            "beyond its plain network; give a foundation with a plain network")
    if not (out / "plans.json").is_file():
        return None
    if not resume:
        raise MedadaptError(f"{out}: holds a finished model folder; pass --resume to reuse it or choose another "
                            "--out")
    done = load_model_folder(out)
    if done.pretext is None or done.pretext.get("weights") != PRETEXT_FILE:
        raise MedadaptError(f"{out}: holds a model folder without a pretext pathway; choose another --out")
    return done


def _head_datasets(r: SslHeadRequest, folder: ModelFolder) -> list:
    """The request's datasets, each with the foundation's input channels (one line otherwise)."""
    datasets = load_datasets(r.data)
    dataset_weights([len(ds.case_ids) for ds in datasets], r.sampling)
    channels = folder.network.input_channels
    for ds in datasets:
        if ds.num_channels != channels:
            raise MedadaptError(f"{ds.root / 'dataset.json'}: has {ds.num_channels} input channel(s) but the model "
                                f"in {folder.path} expects {channels}; use datasets with the model's channels")
    return datasets


def pretrain_ssl_head(request: SslHeadRequest, out: str | Path, *, resume: bool = False, progress: bool = True,
                      engine: EngineOptions | None = None) -> ModelFolder:
    """Train the pretext pathway ``request`` asks for; writes the foundation's model folder plus ``pretext.pt``
    to ``out`` (module docstring). ``resume`` continues a killed run in ``out`` (or returns the finished
    folder)."""
    from medadapt.workflows.identity import check_identity, record_identity

    r, out = request, Path(out)
    folder = load_model_folder(r.model)
    done = _finished_or_refused(folder, out, resume)
    if done is not None:
        return done
    datasets = _head_datasets(r, folder)
    known = folder.provenance.get("preset")
    default = preset_recipes(known)["mae"] if known in PRESETS else DEFAULT_MAE_RECIPE
    resolved = resolve_mae_recipe(r.recipe, default, r.epochs, r.iterations_per_epoch, r.lr)
    mask = mask_config_from_loss(resolved.loss)
    spec = _patch_spec(folder.network.with_classes(folder.network.input_channels), resolved)
    mask.masked_blocks(spec.patch_size)
    distributed.init_from_env()
    progress = progress and distributed.is_main()
    foundation_network = folder.load_network()
    foundation = foundation_network.state_dict()
    strategy = FrozenEncoder()
    engine = engine or EngineOptions()
    config = engine.configure(TrainingConfig.from_recipe(resolved, strategy.name, r.seed))
    identity = {"foundation": {"path": str(Path(folder.path).resolve()) if folder.path else None,
                               "weights": model_fingerprint(folder, foundation)},
                "datasets": [{"path": str(ds.root.resolve()), "name": ds.name, "cases": ds.case_ids}
                             for ds in datasets],
                "sampling": r.sampling, "seed": r.seed, "seeds": seeds.SCHEME, "training": config.to_dict()}
    if distributed.is_main():
        check_identity(out / HEAD_TRAINING, identity)
    plan = folder.plan()  # the foundation's preprocessing: the pretext network sees the data as the foundation does
    with distributed.main_first():
        cases = [c for ds in datasets
                 for c in preprocess_dataset(ds, ds.case_ids, plan, dataset_cache_dir(ds.root), progress=progress)]
    network = strategy.prepare(pretext_network_from(folder, foundation, spec, r.seed))
    encoder = encoder_state_keys(network)
    sampler = _sampler(cases, [len(ds.case_ids) for ds in datasets], spec, resolved, r.sampling)
    if distributed.is_main():
        record_identity(out / HEAD_TRAINING, identity)
    trainer = Trainer(network, strategy, sampler, config, out / HEAD_TRAINING, progress=progress,
                      description="pretrain-ssl-head", engine=engine)
    history = trainer.fit(resume=resume)
    final = strategy.finalize(network)
    state = {k: v.detach().cpu() for k, v in final.state_dict().items()}
    moved = [k for k in sorted(encoder) if not torch.equal(state[k], foundation[k])]
    if moved:  # cannot happen with the encoder frozen; a pathway on another encoder would score nonsense
        raise RuntimeError(f"pretrain-ssl-head: the frozen encoder changed ({moved[0]})")
    record = PretextRecord(
        objective="mae", mask=mask, network=spec, weights=PRETEXT_FILE,
        provenance={"kind": "pretrain-ssl-head", "foundation": str(folder.path),
                    "foundation_weights": identity["foundation"]["weights"],
                    "datasets": _datasets_record(datasets), "sampling": r.sampling, "seed": r.seed,
                    "recipe": resolved.to_dict(), "training": config.to_dict(),
                    "trained_parameters": trainable_parameter_count(final), **trainer.summary(),
                    "environment": environment()})
    return _write_head_folder(folder, record, foundation_network, state, encoder, out, history)


def _write_head_folder(folder, record, foundation_network, state, encoder, out: Path, history) -> ModelFolder:
    """The foundation's model folder with the pretext pathway: ``pretext.pt`` (the pathway's own tensors),
    the foundation's weights, plans last (rank 0 writes)."""
    fields = {f.name: getattr(folder, f.name) for f in dataclasses.fields(ModelFolder)}
    head_folder = ModelFolder(**{**fields, "pretext": record.to_dict(), "path": None})
    if distributed.is_main():
        atomic_torch_save(out / PRETEXT_FILE, {k: v for k, v in state.items() if k not in encoder})
        save_model_folder(out, foundation_network, head_folder)  # weights.pt: the foundation's tensors; plans last
        atomic_write_json(out / HEAD_TRAINING / "history.json", history)
    distributed.barrier()
    return head_folder
