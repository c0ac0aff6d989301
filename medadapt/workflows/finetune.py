"""Few-shot fine-tuning of a foundation model folder on an nnU-Net raw dataset, then test-split evaluation.

Protocol (DGST paper, Sec. 3.1): the dataset is split once into a fixed 80% train / 20% test part (seeded by
``split_seed``, recorded); K training cases are drawn from the train part with ``seed`` (nested: the 3-shot
cases are among the 5-shot cases); the model is fine-tuned and evaluated with its final checkpoint on the
whole test part.

Head policy: the paper fine-tunes through nnU-Net (``nnUNetv2_train -pretrained_weights``), whose
``load_pretrained_weights`` transfers every weight except the segmentation layers, so every method starts from
a new, randomly initialised head. That is the default here (``head="fresh"``: the heads initialised as
nnU-Net initialises them, He-normal with negative slope 1e-2, zero bias, seeded by ``seed``);
``head="keep"`` keeps the foundation's head outputs of the dataset's classes, selected by name (the dataset's
labels must be classes of the foundation; a subset is fine). A sigmoid foundation (partially labelled) gives a
sigmoid fine-tuned model, trained with the recipe's loss in its sigmoid form.

A run folder belongs to one run: its identity (the whole resolved :class:`FinetuneSettings`: method and
options, shots, seeds, head policy, the recipe's contents, the training settings, patch, batch, sampling,
post-processing; the dataset and the foundation's weights) is written to ``identity.json`` before training,
and a re-run or ``--resume`` into the folder with any of these different stops with one line naming the
difference (medadapt.workflows.identity). A folder in use by another process is refused
(medadapt.utils.lock).

:func:`zero_shot` evaluates the foundation model itself, with its own heads, on the same test split (the
"no fine-tuning" reference row; FSEFT's "Generalization").

Output folder::

    <out>/identity.json            what makes this run this run (written before training, checked on resume)
    <out>/run.json                 everything needed to reproduce and read the run (written last)
    <out>/model/                   the fine-tuned model folder (plans.json + weights.pt)
    <out>/delta.pt                 the same model as a delta against the foundation (medadapt.tuning.delta)
    <out>/training/                checkpoint_latest.pt (for --resume) and history.json (loss curve)
    <out>/predictions/<case>.nii.gz
    <out>/metrics_per_case.csv, <out>/summary.json
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medadapt.data.dataset import RawDataset
from medadapt.data.io import read_label
from medadapt.data.cache import preprocess_dataset
from medadapt.data.splits import Split, draw_shots
from medadapt.engine import EngineOptions, Trainer, TrainingConfig, distributed
from medadapt.engine.recipe import Recipe
from medadapt.errors import MedadaptError
from medadapt.inference import Predictor
from medadapt.inference.predictor import DEFAULT_OVERLAP, POSTPROCESSING
from medadapt.metrics import case_metrics, summarize
from medadapt.metrics.evaluate import write_metrics
from medadapt.models import ModelFolder, load_model_folder, save_model_folder
from medadapt.models.model_folder import output_channels
from medadapt.models.network import build_network
from medadapt.tuning import get_method, make_strategy, methods
from medadapt.tuning.delta import make_delta, save_delta
from medadapt.tuning.transductive import Transductive, case_spacing
from medadapt.utils import seeds
from medadapt.utils.atomic import atomic_path, atomic_write_json
from medadapt.utils.hashing import stable_hash
from medadapt.utils.lock import locks_folder
from medadapt.workflows.common import (dataset_cache_dir, environment, model_fingerprint, total_parameter_count,
                                       trainable_parameter_count)
from medadapt.workflows.identity import check_identity, record_identity, settings_digest
from medadapt.workflows.training import (prepare_network, prepare_strategy, recipe_sampler, resolve_recipe,
                                         training_config)

DEFAULT_RECIPE = "dgst-paper"  # for a model folder that recommends none
#: the layout of a run's identity record; bump it when what identity.json holds changes
RUN_FORMAT = "medadapt-run/4"  # 3: the whole resolved settings; 4: with the model and data paths (the object)
HEAD_POLICIES = ("fresh", "keep", "match")
#: --pretext-decoder: auto, or one of medadapt.tuning.base.DECODER_POLICIES
PRETEXT_DECODER_CHOICES = ("auto", "new", "pretrained")


def pretext_decoder(folder: ModelFolder) -> bool:
    """Whether ``folder``'s decoder was trained on a pretext task: a self-supervised foundation (``medadapt
    pretrain --objective mae``), whose network is the pretext network itself (medadapt.ssl.pretext)."""
    from medadapt.ssl.pretext import WEIGHTS_FILE

    return (folder.pretext or {}).get("weights") == WEIGHTS_FILE


def decoder_policy(folder: ModelFolder, requested: str = "auto") -> str:
    """The decoder policy of a method that freezes part of the network (medadapt.tuning.base.DECODER_POLICIES):
    ``auto`` gives ``new`` when the decoder was trained on a pretext task (:func:`pretext_decoder`: MedSeqFT's
    reading, docs/methods.md) and ``pretrained`` otherwise."""
    if requested not in PRETEXT_DECODER_CHOICES:
        raise MedadaptError(f"--pretext-decoder {requested!r}: choose one of {', '.join(PRETEXT_DECODER_CHOICES)}")
    if requested != "auto":
        return requested
    return "new" if pretext_decoder(folder) else "pretrained"


def load_foundation(folder: ModelFolder, dataset: RawDataset, seed: int, head: str = "fresh",
                    foundation: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The foundation network for ``dataset``: every foundation weight, heads per ``head``.

    ``fresh`` (default; nnU-Net's ``load_pretrained_weights``): every weight except the segmentation heads,
    which are new, sized for the dataset's classes (in the model's output activation) and initialised as
    nnU-Net initialises a network (seeded by ``seed``). ``keep``: the foundation's heads for the dataset's
    classes, selected by name: every foreground label of the dataset must be a class of the foundation (a
    subset is fine: a sigmoid model keeps those classes' outputs, a softmax model the background output and
    theirs). ``match``: a fresh head whose outputs for the classes the foundation knows (by name; and a softmax
    model's background) start from the foundation's ("zero-shot initialisation", as FSEFT's released code
    initialises the classifier of every method but scratch); the others are new. ``foundation``: the folder's
    state dict if the caller has loaded it already.
    """
    if head not in HEAD_POLICIES:
        raise MedadaptError(f"--head {head!r}: unknown; choose one of {', '.join(HEAD_POLICIES)}")
    if head != "fresh":
        folder.require_segmentation_head(f"--head {head}", "fine-tune it with --head fresh")
    if dataset.num_channels != folder.network.input_channels:
        raise MedadaptError(
            f"{dataset.root / 'dataset.json'}: has {dataset.num_channels} input channel(s) but the model in "
            f"{folder.path} expects {folder.network.input_channels}; use a dataset with the same channels")
    if head == "keep" and dataset.labels == folder.labels:
        return folder.load_network()
    rows = _kept_rows(folder, dataset) if head == "keep" else None
    matched: dict[int, int] = {}  # match: dataset output channel -> foundation output channel
    if head == "match":
        known = {n: v for n, v in dataset.labels.items() if n in folder.labels}
        offset = 1 if folder.activation == "sigmoid" else 0
        matched = {v - offset: folder.labels[n] - offset for n, v in known.items() if v - offset >= 0}
    spec = folder.network.with_classes(output_channels(dataset.labels, folder.activation))
    with seeds.torch_stream(seed, "head"):  # its heads: a new network's initialisation (nnU-Net's He; MONAI's)
        network = build_network(spec)
    for ext in folder.extensions:  # a fine-tuned model with adapters as the starting point
        from medadapt.models.model_folder import apply_extension

        apply_extension(network, ext)
    heads = head_parameter_names(network)
    if foundation is None:
        foundation = folder.load_network().state_dict()
    own = network.state_dict()
    take = weights_without_heads(folder, foundation, network)
    if rows is not None:  # the foundation's head outputs for the dataset's classes, in the dataset's order
        index = torch.tensor(rows)
        take.update({k: foundation[k].index_select(0, index) for k in heads})
    if matched:
        for k in heads:
            fresh = own[k].clone()
            for mine, theirs in matched.items():
                fresh[mine] = foundation[k][theirs]
            take[k] = fresh
    network.load_state_dict(take, strict=False)
    return network


def _kept_rows(folder: ModelFolder, dataset: RawDataset) -> list[int]:
    """``--head keep``: the foundation's head outputs for the dataset's classes (every one must be the model's)."""
    missing = [n for n, v in dataset.labels.items() if v != 0 and n not in folder.foreground]
    if missing:
        raise MedadaptError(
            f"--head keep: labels {missing} of {dataset.root / 'dataset.json'} are not classes of the model "
            f"in {folder.path} ({', '.join(folder.foreground)}), so no head of it predicts them; use --head fresh")
    return kept_head_rows(folder, dataset.labels)


def weights_without_heads(folder: ModelFolder, foundation: dict[str, torch.Tensor],
                          network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``foundation`` (``folder``'s state dict) that ``network`` has outside its heads; one line
    if some non-head tensor of ``network`` is missing or shaped differently (an inconsistent model folder)."""
    heads = head_parameter_names(network)
    own = network.state_dict()
    take = {k: v for k, v in foundation.items() if k not in heads and k in own}
    misfit = [k for k in own if k not in heads and (k not in take or take[k].shape != own[k].shape)]
    if misfit:
        raise MedadaptError(f"{folder.path}: the foundation's weights do not fit its own network without the "
                            f"heads (first: {misfit[0]}); the model folder is inconsistent")
    return take


def kept_head_rows(folder: ModelFolder, labels: dict[str, int]) -> list[int]:
    """The foundation's output channels that predict ``labels`` (a dataset's, by name), in the order of the
    dataset's outputs: softmax, background then labels by id; sigmoid, foreground labels by id."""
    by_id = sorted((v, n) for n, v in labels.items())
    if folder.activation == "sigmoid":
        return [folder.labels[n] - 1 for v, n in by_id if v != 0]
    return [0] + [folder.labels[n] for v, n in by_id if v != 0]


def head_parameter_names(network: torch.nn.Module) -> set[str]:
    """State-dict keys of the segmentation heads, found from the structure (``model_parts``), not by name."""
    from medadapt.models.parts import model_parts

    heads = {id(m) for m in model_parts(network).heads}
    names = set()
    for mod_name, module in network.named_modules():
        if id(module) in heads:
            names.update(f"{mod_name}.{k}" for k in module.state_dict())
    return names


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a fine-tuning run's result, resolved from the recipe (its contents), the model
    folder (patch, batch) and the flags by :func:`resolve_finetune`; :func:`finetune` runs it, and the run's
    identity is this whole object as data (:meth:`to_dict`, :func:`run_identity`)."""

    model: str                   #: the foundation's model folder (absolute)
    data: str                    #: the nnU-Net raw dataset (absolute)
    method: str
    method_options: dict         #: the method's options as given (its definition's: gamma, rank, ...; no None)
    decoder: str                 #: the decoder policy of a method that freezes part of the network
    shots: int
    seed: int
    split_seed: int
    head: str
    recipe: Recipe               #: resolved: the method's settings, the command line's budget, the cases
    training: TrainingConfig     #: budget, lr, optimiser, schedule, loss, precision
    patch_size: tuple[int, ...]
    batch_size: int
    postprocess: str
    transductive: Transductive | None = None
    feature_cache: bool = False
    #: the train/test split when it is not the fixed random one of ``split_seed`` (a file, none, a fold)
    split: Split | None = None
    #: the sliding window's tile overlap when predicting the test cases (nnU-Net's 0.5 by default)
    overlap: float = DEFAULT_OVERLAP

    @property
    def the_split(self) -> Split:
        """The run's split: :attr:`split`, else the fixed random split of :attr:`split_seed`."""
        return self.split if self.split is not None else Split.random(self.split_seed)

    def strategy(self):
        """A new strategy object of these settings (every run part that prepares a network gets its own)."""
        return make_strategy(self.method, decoder=self.decoder, seed=self.seed, **self.method_options)

    def to_dict(self) -> dict[str, Any]:
        """The settings as data: the strategy's record, the recipe's and the training settings' contents."""
        return {"model": self.model, "data": self.data, "method": self.strategy().config(), "shots": self.shots,
                "seed": self.seed, "split_seed": self.split_seed, "head": self.head,
                "training": self.training.to_dict(), "recipe": self.recipe.to_dict(),
                "patch_size": list(self.patch_size), "batch_size": self.batch_size,
                "patches_per_case": self.recipe.patches_per_case, "augmentation": self.recipe.augmentation,
                "head_init": self.recipe.head_init, "deep_supervision": self.recipe.deep_supervision,
                "postprocess": self.postprocess,
                "transductive": self.transductive.record() if self.transductive is not None else None,
                "feature_cache": self.feature_cache,
                # the default split is named by split_seed alone (identities of earlier runs unchanged)
                **({"split": self.split.record()} if self.split is not None else {}),
                # so is the default overlap
                **({"overlap": self.overlap} if self.overlap != DEFAULT_OVERLAP else {})}


@dataclasses.dataclass(frozen=True)
class FinetuneRequest:
    """A fine-tuning run as asked for (the command line's flags, a grid cell, the Python API), before it is
    checked and resolved into :class:`FinetuneSettings` by :func:`resolve_finetune`.

    ``model`` is the foundation's model folder, ``data`` the nnU-Net raw dataset, ``shots`` the number of
    training cases (``"all"``: every case of the train split, the "all samples" rows, recorded as their
    number). ``method_options`` are the method's options (its definition's, e.g. ``gamma`` for dgst,
    ``rank``/``alpha`` for lora), each checked; ``head`` is the head policy (``fresh``, ``keep`` or ``match``,
    see the module docstring). The training settings come from ``recipe`` (a built-in name, a file or a Recipe;
    default: the one the model folder recommends, else ``dgst-paper``), with ``epochs``,
    ``iterations_per_epoch`` and ``lr`` overriding it where given. ``postprocess`` (``none`` or ``lcc``) is
    applied to the test predictions (medadapt.inference.predictor). ``transductive``: FSEFT's transductive
    inference on the test volumes (:class:`Transductive`); a method that does not train (``generalization``)
    evaluates the foundation's own outputs for the dataset's classes. ``feature_cache``: train on cached
    features (methods that train the head alone). ``pretext_decoder``: what a method that freezes part of the
    network does with a decoder trained on a pretext task (:func:`decoder_policy`; ``auto``: ``new`` for a
    self-supervised foundation, else ``pretrained``). ``split``: how the dataset divides into training and test
    cases (medadapt.data.splits.Split: a file, none, a cross-validation fold); default the fixed random split
    of ``split_seed``. ``overlap``: the sliding window's tile overlap when predicting the test cases (nnU-Net's
    0.5; MONAI's default is 0.25)."""

    model: str | Path
    data: str | Path
    method: str
    shots: "int | str"
    seed: int = 0
    split_seed: int = 0
    recipe: "str | Path | Recipe | None" = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    lr: float | None = None
    method_options: dict[str, Any] | None = None
    head: str = "fresh"
    postprocess: str = "none"
    transductive: "Transductive | None" = None
    feature_cache: bool = False
    pretext_decoder: str = "auto"
    split: Split | None = None
    overlap: float = DEFAULT_OVERLAP


def resolve_finetune(request: FinetuneRequest, engine: EngineOptions | None = None) -> FinetuneSettings:
    """The settings of the fine-tuning run ``request`` asks for, checked and resolved (one line per mistake,
    nothing written). ``engine``: its precision, resolved for this process's device, is part of the
    settings."""
    r = request
    engine = engine or EngineOptions()
    split_seed, split = r.split_seed, r.split
    if split is not None and split.kind == "random":  # the default split is named by its seed alone
        split_seed, split = split.seed, None
    if r.head not in HEAD_POLICIES:
        raise MedadaptError(f"--head {r.head!r}: unknown; choose one of {', '.join(HEAD_POLICIES)}")
    options = {k: v for k, v in sorted((r.method_options or {}).items()) if v is not None}
    strategy = make_strategy(r.method, seed=r.seed, **options)  # validates --method and its options before any work
    head = _check_options(r, strategy)
    folder = load_model_folder(r.model)
    policy = decoder_policy(folder, r.pretext_decoder)
    _check_foundation(r, folder, strategy, head)
    dataset = RawDataset.load(r.data)
    shots = _shots_of(r, strategy, folder, dataset, split if split is not None else Split.random(split_seed))
    resolved = resolve_recipe(r.recipe or folder.recipe or DEFAULT_RECIPE, r.method, epochs=r.epochs,
                              iterations_per_epoch=r.iterations_per_epoch, cases=shots)
    config = training_config(resolved, r.method, r.seed, folder.activation, engine, r.lr)
    return FinetuneSettings(
        model=str(Path(r.model).resolve()), data=str(Path(dataset.root).resolve()), method=r.method,
        method_options=options, decoder=policy, shots=shots, seed=r.seed, split_seed=split_seed,
        head=head, recipe=resolved, training=config,
        patch_size=tuple(resolved.patch_size or folder.network.patch_size),
        batch_size=resolved.batch_size or folder.network.batch_size, postprocess=r.postprocess,
        transductive=r.transductive, feature_cache=bool(r.feature_cache), split=split, overlap=float(r.overlap))


def _check_options(r: FinetuneRequest, strategy) -> str:
    """The run's options against its method (one line each); returns the head policy (``keep`` for a method
    that trains nothing: the foundation's own outputs, by name)."""
    head = r.head
    if not strategy.trains:
        if r.transductive is not None:
            raise MedadaptError(f"--transductive: --method {r.method} trains nothing; use a method that trains")
        head = "keep"
    if r.transductive is not None:
        r.transductive.check()
    if r.feature_cache and not strategy.trains:  # (what a training method trains is checked on the network)
        cacheable = [name for name, d in methods().items() if d.cacheable]
        raise MedadaptError(f"--feature-cache: --method {r.method} trains nothing; use {' or '.join(cacheable)}")
    if r.postprocess not in POSTPROCESSING:
        raise MedadaptError(f"--postprocess {r.postprocess!r}: unknown; choose one of {', '.join(POSTPROCESSING)}")
    check_overlap(r.overlap)
    return head


def _check_foundation(r: FinetuneRequest, folder: ModelFolder, strategy, head: str) -> None:
    """What the method and the head policy need of the foundation: a pretext head, a segmentation head."""
    if get_method(r.method).needs_pretext_head and not folder.pretext:
        raise MedadaptError(f"--method {r.method}: needs a foundation with a pretext head, and {folder.path} has "
                            "none; use a self-supervised foundation (medadapt pretrain --objective mae)")
    if head != "fresh":  # a self-supervised foundation has no segmentation head to keep or evaluate
        if strategy.trains:
            folder.require_segmentation_head(f"--head {head}", "fine-tune it with --head fresh")
        folder.require_segmentation_head(f"--method {r.method}", "fine-tune it with a method that trains")


def _shots_of(r: FinetuneRequest, strategy, folder: ModelFolder, dataset: RawDataset, the_split: Split) -> int:
    """The training cases a run draws (``all``: the whole train split), checked against the split and the data."""
    if not strategy.trains:
        missing = [n for n, v in dataset.labels.items() if v != 0 and n not in folder.foreground]
        if missing:
            raise MedadaptError(f"--method {r.method}: the foundation in {folder.path} does not know {missing} (its "
                                f"classes: {', '.join(folder.foreground)}); fine-tune with a method that trains")
    train_ids, test_ids = the_split.apply(dataset.case_ids)
    shots = len(train_ids) if r.shots == "all" else r.shots
    if not train_ids and strategy.trains:
        raise MedadaptError(f"--split: {the_split.describe()} leaves no training case in {dataset.root}; choose "
                            "another split")
    if strategy.trains and isinstance(shots, int) and shots > len(train_ids):
        raise MedadaptError(f"--shots {shots}: {the_split.describe()} leaves {len(train_ids)} training case(s) in "
                            f"{dataset.root}; use --shots {len(train_ids)} or fewer (or all), --split none to train "
                            "on every case, or --folds to cross-validate them")
    if r.transductive is not None and not test_ids:
        raise MedadaptError(f"--transductive: {the_split.describe()} has no test volumes to constrain; use a split "
                            "with a test part")
    if not strategy.trains and not test_ids:
        raise MedadaptError(f"--method {r.method}: trains nothing and {the_split.describe()} evaluates nothing; use "
                            "a split with a test part")
    return shots


def run_identity(settings: dict[str, Any], dataset: RawDataset, folder: ModelFolder,
                 foundation: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What makes a run this run (medadapt.workflows.identity): the resolved ``settings`` (a
    :class:`FinetuneSettings` as data), the dataset and the foundation's weights (``foundation``: the folder's
    loaded state dict), and the settings' digest."""
    return {"format": RUN_FORMAT,  # the inputs first: a run on another dataset or foundation is named as such
            "dataset": {"path": str(Path(dataset.root).resolve()), "name": dataset.name,
                        "labels": dataset.labels, "cases": stable_hash(dataset.case_ids, 16)},
            "foundation": {"path": str(Path(folder.path).resolve()) if folder.path else None,
                           "weights": model_fingerprint(folder, foundation)},
            **settings, "seeds": seeds.SCHEME, "settings_digest": settings_digest(settings)}


@locks_folder("out")
def finetune(settings: FinetuneSettings, out: str | Path, *, resume: bool = False, progress: bool = True,
             engine: EngineOptions | None = None, share_ti_prefix: bool = True) -> dict[str, Any]:
    """Run the fine-tuning ``settings`` describe (:func:`resolve_finetune`) into ``out``: fine-tune, predict
    and evaluate the test split; returns the run's record (also ``out/run.json``). ``resume``: continue or reuse
    a run of the same settings in ``out``. ``engine``: how the steps run (background workers,
    ``torch.compile``; the precision is the settings'). ``share_ti_prefix``: per-query transductive inference
    trains the epochs before its constraint once for all queries (exact, :meth:`FinetuneRun.shared_prefix`);
    False trains every query from the start, the reference that exactness is checked against."""
    out = Path(out)
    run_file = out / "run.json"
    if run_file.is_file() and not resume:
        raise MedadaptError(f"{out}: holds a finished run; pass --resume to reuse it or choose another --out")
    distributed.init_from_env()
    run = FinetuneRun(settings, out, progress and distributed.is_main(), engine or EngineOptions())
    if distributed.is_main():
        check_identity(out, run.identity)
    if run_file.is_file():
        return json.loads(run_file.read_text())
    run.prepare_inputs()
    if distributed.is_main():  # every input is checked: from here on the folder is this run's
        record_identity(out, run.identity)
    prefix = run.shared_prefix(resume) if share_ti_prefix else None
    trained = [run.train_group(ids, where, resume, prefix, first=i == 0) for i, (ids, where) in enumerate(run.groups())]
    if not distributed.is_main():
        distributed.barrier()
        return {}
    record = run.record(trained[0]["notes"], trained[-1])
    atomic_write_json(run_file, record)
    distributed.barrier()
    return record


class FinetuneRun:
    """A fine-tuning run in progress (:func:`finetune`): its settings, the foundation and dataset, the training
    cases, and the parts every group of test volumes trains with (one group: the whole test split; per-query
    transductive inference: one group per query volume)."""

    def __init__(self, settings: FinetuneSettings, out: Path, progress: bool, engine: EngineOptions):
        s = self.settings = settings
        self.out, self.progress, self.engine = out, progress, engine
        self.folder = load_model_folder(s.model)
        self.strategy = s.strategy()
        self.dataset = RawDataset.load(s.data)
        self.foundation = self.folder.load_network().state_dict()  # loaded once: identity, head transfer, delta
        self.identity = run_identity(s.to_dict(), self.dataset, self.folder, self.foundation)
        self.cache = dataset_cache_dir(self.dataset.root)
        # the tuned network's architecture: the recipe's patch and batch replace the network's (the tuned model
        # then predicts with that patch)
        spec = self.folder.network.with_classes(output_channels(self.dataset.labels, self.folder.activation))
        self.spec = dataclasses.replace(spec, patch_size=tuple(s.patch_size), batch_size=s.batch_size)
        self.train_ids, self.test_ids = s.the_split.apply(self.dataset.case_ids)
        self.shot_ids = draw_shots(self.train_ids, s.shots, s.seed)
        self.cases, self.network, self.priors, self.queries = [], None, None, {}

    def foundation_network(self) -> torch.nn.Module:
        """The foundation with heads for the dataset (the head policy), prepared as the recipe says."""
        s = self.settings
        return prepare_network(load_foundation(self.folder, self.dataset, s.seed, s.head, self.foundation),
                               s.recipe, s.seed, fresh_head=s.head == "fresh")

    def prepare_inputs(self) -> None:
        """Check every case the run touches before anything is written (a bad test case must not surface only
        after training, next to half the predictions), preprocess the training cases (and the query volumes of
        transductive inference), and check that the method suits TI or cached features."""
        s, dataset, plan = self.settings, self.dataset, self.folder.plan()
        for cid in tqdm(self.test_ids, desc="check test cases", disable=not self.progress, unit="case", leave=False):
            dataset.load_case(cid)
        with distributed.main_first():  # rank 0 fills the preprocessing cache, the others then read it
            self.cases = preprocess_dataset(dataset, self.shot_ids, plan, self.cache, progress=self.progress)
        self.network = self.foundation_network()
        if s.transductive is not None:
            if not self.test_ids:
                raise MedadaptError(f"--transductive: {dataset.root} has no test volumes to constrain; use a "
                                    "dataset with at least 5 cases")
            with distributed.main_first():
                queries = preprocess_dataset(dataset, self.test_ids, plan, self.cache, progress=self.progress)
            self.queries = dict(zip(self.test_ids, queries))
            self.priors = s.transductive.priors(self.cases, dataset.labels, query_spacing=case_spacing(queries[0]))
            with torch.random.fork_rng(devices=[]):  # the method must train the classifier head only: check first
                from medadapt.tuning.transductive import transductive_tail

                transductive_tail(s.strategy().prepare(copy.deepcopy(self.network)))
        if s.feature_cache:  # the method must train nothing below the last feature map: check before any output
            from medadapt.tuning.features import trainable_tail

            with torch.random.fork_rng(devices=[]):
                trainable_tail(s.strategy().prepare(copy.deepcopy(self.network)))
        self.sampler = recipe_sampler(s.recipe, self.cases, self.spec.patch_size, self.spec.batch_size)

    def groups(self) -> list[tuple[list[str], Path]]:
        """(test ids, folder) of each model this run trains: one for every test volume (batch mode, inductive
        runs), or one per query volume (per-query TI)."""
        t = self.settings.transductive
        if t is not None and t.mode == "query":
            return [([q], self.out / "queries" / q) for q in self.test_ids]
        return [(self.test_ids, self.out)]

    def prepared(self) -> torch.nn.Module:
        """The network a group trains, prepared by the strategy: the foundation network (a fresh one for every
        query of the per-query mode)."""
        t = self.settings.transductive
        net = self.network if t is None or t.mode == "batch" else self.foundation_network()
        return prepare_strategy(self.strategy, net, self.settings.seed)

    def trainer(self, net: torch.nn.Module, where: Path, ti, label: str) -> Trainer:
        """The trainer of ``net`` into ``where``: the TI term ``ti`` per step or per epoch; with cached features,
        the head alone on patches of each support volume's cached features."""
        s, spec = self.settings, self.spec
        step = s.transductive.step if s.transductive is not None else None
        trained, batches = net, self.sampler
        if s.feature_cache:
            from medadapt.tuning.features import feature_cases, trainable_tail

            trained = trainable_tail(net)
            fcases = feature_cases(net, trained, self.cases, spec.patch_size, self.cache,
                                   model_fingerprint(self.folder, self.foundation), progress=self.progress)
            batches = recipe_sampler(s.recipe, fcases, spec.patch_size, spec.batch_size, augmentation=None)
        return Trainer(trained, self.strategy, batches, s.training, where / "training", progress=self.progress,
                       loss_terms=[ti] if ti is not None and step == "every" else [],
                       epoch_hooks=[ti] if ti is not None and step == "epoch" else [],
                       description=f"finetune {s.method} {s.shots}-shot{label}", engine=self.engine)

    def shared_prefix(self, resume: bool) -> Trainer | None:
        """Per-query TI: every query's adapter starts from the same weights and sees the same batches, and the
        constraint is off before its epochs, so those epochs are trained once (``prefix/``) and each query
        continues from that checkpoint: exactly what training each from the start gives, in fewer steps.
        Returns the prefix's trainer (None where nothing is shared)."""
        s, t = self.settings, self.settings.transductive
        if not (self.strategy.trains and t is not None and t.mode == "query") or distributed.is_distributed():
            return None
        shared = s.training.epochs - int(round(t.active_fraction * s.training.epochs))
        if shared <= 0:
            return None
        prefix = self.trainer(self.prepared(), self.out / "prefix", None, " (shared epochs)")
        prefix.fit(resume=resume, until=shared)
        return prefix

    def train_group(self, ids: list[str], where: Path, resume: bool, prefix: Trainer | None,
                    first: bool = True) -> dict[str, Any]:
        """Train the model of the test volumes ``ids`` into ``where`` (from ``prefix``'s checkpoint when the
        per-query TI shares its first epochs); rank 0 then saves it (model folder, delta) and predicts ``ids``.
        Returns what the run's record needs of it (the ``first`` group: how the method met the network)."""
        s, strategy = self.settings, self.strategy
        net = self.prepared()
        notes = strategy.notes(net) if first else None  # how the method met this network (the same for all)
        if first and notes.get("say") and self.progress:
            tqdm.write(f"note: {notes['say']}")
        done = {"notes": notes, "where": where, "trainable": trainable_parameter_count(net),
                "updated_per_step": strategy.updated_per_step(net),
                "timing": {"median_iteration_seconds": None, "median_sampling_seconds": None,
                           "data_wait_share": None, "final_epoch_loss": None}}
        if strategy.trains:
            ti = s.transductive.term(net, [self.queries[q] for q in ids], self.priors, self.spec.patch_size,
                                     self.folder.activation) if s.transductive else None
            trainer = self.trainer(net, where, ti, f" {ids[0]}" if where != self.out else "")
            starts_shared = prefix is not None and not trainer.checkpoint_path.exists()
            if starts_shared:
                trainer.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(trainer.checkpoint_path, suffix=".pt") as tmp:
                    shutil.copyfile(prefix.checkpoint_path, tmp)
            history = trainer.fit(resume=resume or starts_shared)
            done["timing"] = trainer.summary()
            if distributed.is_main():
                atomic_write_json(where / "training" / "history.json", history)
        if distributed.is_main():  # rank 0 writes the model, predicts and evaluates
            done["total"] = self.save_group(net, ids, where)
        return done

    def save_group(self, net: torch.nn.Module, ids: list[str], where: Path) -> int:
        """Write a group's trained ``net`` to ``where`` (the delta against the foundation, the model folder) and
        its predictions of ``ids``; returns the final network's parameter count."""
        s, strategy, folder, dataset = self.settings, self.strategy, self.folder, self.dataset
        delta = make_delta(self.foundation, net.state_dict(),
                           meta={"strategy": strategy.config(), "num_classes": self.spec.num_classes,
                                 "foundation": str(folder.path), "head": s.head})
        save_delta(where / "delta.pt", delta)
        final = strategy.finalize(net)
        tuned = ModelFolder(
            network=self.spec, preprocessing=folder.preprocessing, labels=dataset.labels,
            channel_names=dataset.channel_names, file_ending=dataset.file_ending,
            provenance={"kind": "finetune", "foundation": str(folder.path), "strategy": strategy.config(),
                        "head": s.head, **({"query": ids[0]} if where != self.out else {})},
            extensions=strategy.architecture(final),
            recipe=folder.recipe, activation=folder.activation,
            thresholds={n: t for n, t in folder.thresholds.items() if n in dataset.labels},
        )
        save_model_folder(where / "model", final, tuned)
        if ids:  # --split none: a final model, nothing to predict
            predict_cases(tuned, final, dataset, ids, self.out / "predictions", self.progress, s.postprocess,
                          s.overlap)
        return total_parameter_count(final)

    def record(self, notes: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
        """The run's record (``run.json``): the test split evaluated, with what made the run and the last
        group's parameters, timing and sizes."""
        s, dataset, where = self.settings, self.dataset, last["where"]
        sizes = {"delta_bytes": (where / "delta.pt").stat().st_size,
                 "checkpoint_bytes": (where / "model" / "weights.pt").stat().st_size}
        summary = evaluate_cases(dataset, self.test_ids, self.out, self.progress) if self.test_ids else None
        return {
            "method": self.strategy.config(),
            **({"method_notes": {k: v for k, v in notes.items() if k != "say"}} if notes else {}),
            "shots": s.shots, "seed": s.seed, "split_seed": s.split_seed, "seeds": seeds.record(s.seed, s.split_seed),
            "foundation": s.model, "dataset": str(dataset.root), "dataset_name": dataset.name,
            "split": {"train": self.train_ids, "test": self.test_ids,
                      **({"how": s.split.record()} if s.split is not None else {})},
            "shot_cases": self.shot_ids, "head": s.head, "postprocess": s.postprocess,
            "transductive": s.transductive.record() if s.transductive is not None else None,
            "identity": self.identity, "training": s.training.to_dict(), "recipe": s.recipe.to_dict(),
            "parameters": {"trainable": last["trainable"], "updated_per_step": last["updated_per_step"],
                           "total": last["total"]},
            "timing": last["timing"], "sizes": sizes, "metrics": summary, "environment": environment(),
        }


def check_overlap(overlap: float) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise MedadaptError(f"--overlap {overlap!r}: the sliding window's tile overlap must be in [0, 1) (nnU-Net "
                            "0.5, MONAI 0.25)")


def predict_cases(folder: ModelFolder, network: torch.nn.Module, dataset: RawDataset, ids: list[str],
                  pred_dir: Path, progress: bool, postprocess: str = "none", overlap: float = DEFAULT_OVERLAP) -> None:
    """Predict ``ids`` of ``dataset`` into ``pred_dir`` (the dataset's classes, by name, with its ids)."""
    foreground = {k: v for k, v in dataset.labels.items() if v != 0}
    predictor = Predictor(folder, network=network, postprocess=postprocess, classes=foreground, overlap=overlap)
    predictor.predict_files([(cid, dataset.image_paths(cid)) for cid in ids], pred_dir, progress=progress)


def evaluate_cases(dataset: RawDataset, ids: list[str], out: Path, progress: bool) -> dict[str, Any]:
    """Evaluate ``out/predictions`` of ``ids`` (``metrics_per_case.csv``, ``summary.json``); returns the summary."""
    foreground = {k: v for k, v in dataset.labels.items() if v != 0}
    rows = []
    for cid in tqdm(ids, desc="evaluate", disable=not progress, unit="case", leave=False):
        gt = read_label(dataset.label_path(cid))
        pred = read_label(out / "predictions" / f"{cid}{dataset.file_ending}")
        rows.extend(case_metrics(pred.array, gt.array, gt.spacing, foreground, tolerance_mm=1.0, case=cid))
    summary = summarize(rows, tolerance_mm=1.0)
    write_metrics(rows, summary, out)
    return summary


def predict_and_evaluate(folder: ModelFolder, network: torch.nn.Module, dataset: RawDataset, test_ids: list[str],
                         out: Path, progress: bool, postprocess: str = "none",
                         overlap: float = DEFAULT_OVERLAP) -> dict[str, Any]:
    """Predict the test cases into ``out/predictions`` and evaluate them; returns the summary."""
    predict_cases(folder, network, dataset, test_ids, out / "predictions", progress, postprocess, overlap)
    return evaluate_cases(dataset, test_ids, out, progress)


@locks_folder("out")
def zero_shot(model: str | Path, data: str | Path, out: str | Path, split_seed: int = 0, resume: bool = False,
              progress: bool = True, postprocess: str = "none", all_cases: bool = False,
              split: Split | None = None, overlap: float = DEFAULT_OVERLAP) -> dict[str, Any]:
    """The foundation model, with its own heads and no fine-tuning, on ``data``'s test split (``all_cases``:
    on every case of ``data``, a held-out cohort; ``split``: another split's test part, as in
    :func:`resolve_finetune`).

    The reference row "Foundation, no fine-tuning" of the benchmark tables (FSEFT's "Generalization"). Every
    foreground label of the dataset must be a class of the model, matched by name: a partially labelled model
    is evaluated on the classes the dataset labels. Writes ``run.json`` like :func:`finetune`."""
    out = Path(out)
    run_file = out / "run.json"
    if run_file.is_file() and not resume:
        raise MedadaptError(f"{out}: holds a finished run; pass --resume to reuse it or choose another --out")
    if postprocess not in POSTPROCESSING:
        raise MedadaptError(f"--postprocess {postprocess!r}: unknown; choose one of {', '.join(POSTPROCESSING)}")
    check_overlap(overlap)
    folder = load_model_folder(model)
    folder.require_segmentation_head("zero-shot", "fine-tune it first (medadapt finetune --head fresh)")
    dataset = RawDataset.load(data)
    missing = [n for n, v in dataset.labels.items() if v != 0 and n not in folder.foreground]
    if missing:
        raise MedadaptError(f"{dataset.root / 'dataset.json'}: labels {missing} are not classes of the model "
                            f"({', '.join(folder.foreground)}), so the model's own heads cannot be evaluated on "
                            "it zero-shot; fine-tune instead")
    split_seed, split, the_split = _zero_shot_split(split, split_seed, all_cases, dataset)
    network = folder.load_network()
    identity = run_identity({"method": {"name": "zero-shot"}, "shots": 0, "seed": 0, "split_seed": split_seed,
                             "head": "keep", "postprocess": postprocess, "cases": "all" if all_cases else "test",
                             **({"split": split.record()} if split is not None else {}),
                             **({"overlap": overlap} if overlap != DEFAULT_OVERLAP else {})},
                            dataset, folder, network.state_dict())
    check_identity(out, identity)
    if run_file.is_file():
        return json.loads(run_file.read_text())
    if all_cases:
        train_ids, test_ids = [], list(dataset.case_ids)
    else:
        train_ids, test_ids = the_split.apply(dataset.case_ids)
    for cid in tqdm(test_ids, desc="check test cases", disable=not progress, unit="case", leave=False):
        dataset.load_case(cid)
    record_identity(out, identity)
    summary = predict_and_evaluate(folder, network, dataset, test_ids, out, progress, postprocess, overlap)
    record = {
        "method": {"name": "zero-shot"}, "shots": 0, "seed": None, "split_seed": split_seed,
        "postprocess": postprocess,
        "foundation": str(Path(model).resolve()), "dataset": str(dataset.root), "dataset_name": dataset.name,
        "split": {"train": train_ids, "test": test_ids, **({"how": split.record()} if split is not None else {})},
        "shot_cases": [], "head": "keep", "identity": identity, "training": None,
        "parameters": {"trainable": 0, "updated_per_step": 0, "total": total_parameter_count(network)},
        "timing": dict.fromkeys(("median_iteration_seconds", "median_sampling_seconds", "data_wait_share",
                                 "final_epoch_loss")),
        "sizes": {}, "metrics": summary, "environment": environment(),
    }
    atomic_write_json(run_file, record)
    return record


def _zero_shot_split(split: Split | None, split_seed: int, all_cases: bool, dataset: RawDataset
                     ) -> tuple[int, Split | None, Split]:
    """(split seed, the split as recorded, the split applied) of a zero-shot run, checked (one line each)."""
    if split is not None and split.kind == "random":  # the default split is named by its seed alone
        split_seed, split = split.seed, None
    if split is not None and all_cases:
        raise MedadaptError("--all-cases: evaluates every case, so --split has nothing to choose; give one of them")
    if split is not None and not split.evaluates:
        raise MedadaptError("--split none: zero-shot trains nothing and would evaluate nothing; use --all-cases to "
                            "evaluate every case")
    the_split = split if split is not None else Split.random(split_seed)
    if not all_cases:
        the_split.apply(dataset.case_ids)  # a file naming other cases: one line before any work
    return split_seed, split, the_split
