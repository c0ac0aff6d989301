"""Sequential fine-tuning over a stream of tasks (MedSeqFT, Ye et al., Sec. III), and its parallel baselines.

``seqft(resolve_seqft(stream, model, method), out)`` runs every task of a stream
(:mod:`medadapt.sequential.stream`) in order.
Each task t gets its own model folder (encoder, decoder, a fresh head for its labels) and its test-split
metrics. Which model is "task t's" (decided from the paper's Table III, where every variant's first task equals
FFT's although MedSeqFT's task 1 is "FFT, then LoRA-based KD and merge"): the task is scored with the model its
fine-tuning gives, M_{t-mid} (``model/``); the refined model M_t after the LoRA-based KD and merge
(``refined/model/``) is what the stream carries on — the next task's starting point and, after the last task,
the refined foundation for unseen tasks (Table VI) — and is scored too, for the record. Methods:

* a **parallel** baseline: any ``finetune`` method (``full`` = the paper's FFT, ``scratch`` = TFS,
  ``linear-probe`` = head fine-tuning, ``lora``, ``adapter``, ...): each task is fine-tuned from M_0 alone,
  exactly as ``medadapt finetune`` does it (``tasks/<NN>-<name>/`` is that command's run folder).
* ``seq-ft``: vanilla sequential fine-tuning: task t starts from M_{t-1}'s encoder and decoder with a fresh
  head, full fine-tuning. Its two ablation switches (MedSeqFT's Table III):

  - ``buffer`` (``none``, ``random``, ``mds``): after each task, K of its training cases join a buffer
    (:mod:`medadapt.sequential.buffer`); from task 2 on, fine-tuning is the *KD-based FFT*
    (:class:`medadapt.tuning.distill.KDFineTuning`): the encoder is also distilled towards the frozen
    E_{t-1} on buffer samples. The buffer is what this distillation runs on, so "Seq. FT + MDS" and
    "Seq. FT + Random" are this stage with that buffer;
  - ``retention`` (``none``, ``lora-kd``): after fine-tuning, the *LoRA-based KD* and *reparameterisation*:
    a copy of E_{t-1} with rank-r LoRA on every conv / Linear layer of its encoder learns to reproduce the
    fine-tuned encoder E_{t-mid} on the task's data, and the merged encoder with M_{t-mid}'s decoder and head
    is M_t. "Seq. FT + K&G RFT" without a buffer is this stage alone (its KD-based FFT has no buffer to run on).
* ``medseqft``: ``seq-ft`` with ``buffer=mds`` and ``retention=lora-kd`` (task 1: full fine-tuning, LoRA-based
  KD and merge, as Sec. III-B says).
* ``joint``: every task at once (shared network, one head per task), the reference that sees all data.

Run folder (a killed run resumes at the task in progress; finished tasks are never recomputed; a run folder
is never reused for other settings, but a stream that *extends* the recorded one continues it)::

    <out>/seqft.json                    identity: stream, method and options, foundation, recipes, seeds
    <out>/buffer.json                   the buffer so far: every case's task, id and MDS score; R, K, the rule
    <out>/tasks/<NN>-<name>/
        stage1/training/                KD-based FFT (or full fine-tuning): checkpoint + history.json
        model/                          the task's model M_{t-mid}: evaluated as the task's result
        stage2/training/                LoRA-based KD
        refined/model/                  M_t = merged encoder + M_{t-mid}'s decoder and head (plain architecture):
                                        the next task's starting point; refined/summary.json its own scores
        mds.json                        this task's cases' pretext scores, per masking too, and where the buffer settled (buffer mds)
        predictions/, metrics_per_case.csv, summary.json
        task.json                       written last: the task is finished
    <out>/results.csv, <out>/results.md Dice, NSD, HD95 per task; time per stage
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from medadapt.data.cache import preprocess_dataset
from medadapt.data.dataset import RawDataset
from medadapt.data.splits import Split, draw_shots
from medadapt.engine import EngineOptions, Trainer, TrainingConfig
from medadapt.engine.recipe import Recipe, load_recipe
from medadapt.errors import MedadaptError
from medadapt.inference.predictor import DEFAULT_OVERLAP, POSTPROCESSING
from medadapt.models import ModelFolder, load_model_folder, save_model_folder
from medadapt.models.model_folder import output_channels
from medadapt.models.parts import model_parts
from medadapt.sequential.buffer import (SELECTIONS, BufferEntry, buffer_record, buffer_stability,
                                        check_buffer_size, lowest, random_pick, settled_repeats)
from medadapt.sequential.mds_store import stored_mds_losses
from medadapt.sequential.stream import Stream, StreamTask, load_stream
from medadapt.tuning import FullFineTuning, make_strategy, method_names
from medadapt.tuning.distill import (EncoderLoRADistillation, FeatureDistillation, KDFineTuning, copy_encoder_norms,
                                     frozen_copy)
from medadapt.utils.atomic import atomic_write_json, atomic_write_text
from medadapt.utils import seeds
from medadapt.utils.hashing import stable_hash
from medadapt.utils.lock import locks_folder
from medadapt.workflows.common import cache_root, dataset_cache_dir, environment, model_fingerprint
from medadapt.workflows.finetune import (DEFAULT_RECIPE, check_overlap, decoder_policy, load_foundation,
                                         predict_and_evaluate)
from medadapt.workflows.identity import first_difference, settings_digest, without_locations
from medadapt.workflows.training import (for_cases, prepare_network, prepare_strategy, recipe_sampler,
                                         resolve_recipe, training_config)

FORMAT = "medadapt-seqft/3"  # 2: the recipes' contents, patch and batch, the settings' digest; 3: SeqftSettings
SEQUENTIAL = {"seq-ft": ("none", "none"), "medseqft": ("mds", "lora-kd")}
RETENTIONS = ("none", "lora-kd")
#: joint multi-task training on every task at once (task-specific heads): the upper reference
JOINT = "joint"
#: LoRA-based KD budget relative to fine-tuning with --kd-until budget: MedSeqFT (VoCo, CT) distils for 5,000
#: iterations at lr 3e-5 after 25,000 at 3e-4
KD_BUDGET_FRACTION = 0.2
#: the derived LoRA-based KD recipe's lr as a fraction of the fine-tuning's. Decided (issue 43's study,
#: docs/methods.md): the fine-tuning's own lr. The paper's ratio is a tenth (3e-5 after 3e-4); here the
#: fine-tuning's lr is already ten times the paper's so that a 25x shorter budget trains, and at a tenth of it the
#: refinement does not get near E_{t-mid} within its budget (task 1 of the study: the refined model keeps 3% of
#: M_{t-mid}'s Dice; at the fine-tuning's lr 53% at rank 2, 98% at rank 8). --kd-lr-fraction 0.1: the ratio.
KD_LR_FRACTION = 1.0
#: the paper's ratio (3e-5 after 3e-4): --kd-until budget's lr (the paper's ratios together)
KD_PAPER_LR_FRACTION = 0.1
#: the ceiling of --kd-until levelled / ceiling (the stage's epochs): this fraction of the fine-tuning epochs (the
#: paper's stages take 1/5 (VoCo CT), 4/5 (VoCo MRI) and 1/2 (UniMiSS+) of its fine-tuning iterations)
KD_CEILING_FRACTION = 1.0
KD_UNTIL = ("levelled", "budget", "ceiling")
#: Decided (issue 43's study): the LoRA-based KD runs its whole schedule at a constant lr (ceiling), as the paper
#: runs a fixed schedule "to ensure training convergence"; levelled (stop once L_refine has levelled off, by
#: medadapt.engine.convergence) stopped it at 10-31 of 40 epochs while the refined model still lost the task.
KD_UNTIL_DEFAULT = "ceiling"
#: Decided (issue 43's study): the KD-based FFT is one optimiser on L_seg + λ·L_kd (λ = 1), the KD a soft
#: constraint as the text calls it. Each loss with its own optimiser (``separate``, the earlier default) made it a
#: hard one: Adam normalises the KD gradient, so its step is lr-sized however small L_kd is, and the encoder stayed
#: at E_{t-1} (L_refine at tasks 2-3 started at 0.001-0.008; task 3 reached 21.0 Dice against 41.8 joint).
KD_FFT_DEFAULT = "joint"


@dataclasses.dataclass(frozen=True)
class SeqSettings:
    """A sequential method's settings (validated by :func:`resolve_method`)."""

    method: str
    buffer: str = "none"
    retention: str = "none"
    buffer_size: int = 4
    mds_repeats: int = 16
    kd_rank: int = 2
    kd_until: str = KD_UNTIL_DEFAULT
    kd_norm: str = "keep"          #: the LoRA-based KD's encoder norm parameters (distill.KD_NORMS)
    kd_fft: str = "separate"       #: the KD-based FFT's reading of "independently" (distill.KD_FFT_MODES)
    kd_weight: float = 1.0         #: λ of L_seg + λ·L_kd (kd_fft joint)

    @property
    def sequential(self) -> bool:
        return self.method in SEQUENTIAL

    def record(self) -> dict[str, Any]:
        if not self.sequential:
            return {"method": self.method}
        out: dict[str, Any] = {"method": self.method, "buffer": self.buffer, "retention": self.retention}
        if self.buffer != "none":
            out["buffer_size"] = self.buffer_size
        if self.buffer == "mds":
            out["mds_repeats"] = self.mds_repeats
        if self.retention == "lora-kd":
            out["kd_rank"] = self.kd_rank
            out["kd_until"] = self.kd_until
            if self.kd_norm != "keep":  # the new readings are named only where chosen (earlier runs unchanged)
                out["kd_norm"] = self.kd_norm
        if self.buffer != "none" and self.kd_fft != "separate":
            out["kd_fft"] = self.kd_fft
            if self.kd_fft == "joint":
                out["kd_weight"] = self.kd_weight
        return out


def resolve_method(method: str, buffer: str | None = None, retention: str | None = None, buffer_size: int = 4,
                   mds_repeats: int = 16, kd_rank: int = 2, kd_until: str = KD_UNTIL_DEFAULT, kd_norm: str = "keep",
                   kd_fft: str | None = None, kd_weight: float = 1.0) -> SeqSettings:
    """Check ``method`` and its switches: one line per mistake. ``kd_fft`` None: :data:`KD_FFT_DEFAULT` where there
    is a KD-based FFT (a buffer)."""
    parallel = method_names(training_only=True)
    if method not in SEQUENTIAL and method not in parallel and method != JOINT:
        raise MedadaptError(f"--method {method!r}: choose seq-ft, medseqft, joint or a parallel fine-tuning method "
                            f"({', '.join(parallel)})")
    if method not in SEQUENTIAL:
        if buffer not in (None, "none") or retention not in (None, "none"):
            raise MedadaptError(f"--buffer/--retention: only for the sequential methods (seq-ft, medseqft), not "
                                f"--method {method}")
        _refuse_kd_readings(f"--method {method}", kd_norm, kd_fft, kd_weight, norm=False, fft=False)
        return SeqSettings(method=method)
    default_buffer, default_retention = SEQUENTIAL[method]
    if method == "medseqft" and (buffer not in (None, "mds") or retention not in (None, "lora-kd")):
        raise MedadaptError("--buffer/--retention: medseqft is seq-ft with --buffer mds --retention lora-kd; for "
                            "another combination use --method seq-ft with the switches")
    buffer = buffer or default_buffer
    retention = retention or default_retention
    if buffer not in SELECTIONS:
        raise MedadaptError(f"--buffer {buffer!r}: choose one of {', '.join(SELECTIONS)}")
    if retention not in RETENTIONS:
        raise MedadaptError(f"--retention {retention!r}: choose one of {', '.join(RETENTIONS)}")
    if buffer != "none" and (isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1):
        raise MedadaptError(f"--buffer-size {buffer_size!r}: must be a positive integer")
    if buffer == "mds" and (isinstance(mds_repeats, bool) or not isinstance(mds_repeats, int) or mds_repeats < 1):
        raise MedadaptError(f"--mds-repeats {mds_repeats!r}: must be a positive integer")
    if retention == "lora-kd":
        EncoderLoRADistillation(rank=kd_rank, norm=kd_norm)  # validates the rank and the norm reading
        if kd_until not in KD_UNTIL:
            raise MedadaptError(f"--kd-until {kd_until!r}: choose one of {', '.join(KD_UNTIL)}")
    _refuse_kd_readings(f"--method {method} --buffer {buffer} --retention {retention}", kd_norm, kd_fft, kd_weight,
                        norm=retention == "lora-kd", fft=buffer != "none")
    if buffer != "none":
        kd_fft = KD_FFT_DEFAULT if kd_fft is None else kd_fft
        KDFineTuning(None, None, mode=kd_fft, weight=kd_weight)  # validates the reading and λ
    return SeqSettings(method=method, buffer=buffer, retention=retention, buffer_size=buffer_size,
                       mds_repeats=mds_repeats, kd_rank=kd_rank, kd_until=kd_until, kd_norm=kd_norm,
                       kd_fft=kd_fft or "separate", kd_weight=float(kd_weight))


def _refuse_kd_readings(what: str, kd_norm: str, kd_fft: str | None, kd_weight: float, norm: bool,
                        fft: bool) -> None:
    """A reading given to a method that has no such stage: one line naming the method and the option
    (``kd_fft`` None: not given)."""
    if kd_norm != "keep" and not norm:
        raise MedadaptError(f"--kd-norm {kd_norm}: {what} has no LoRA-based KD (it needs --retention lora-kd)")
    if kd_fft not in (None, "separate") and not fft:
        raise MedadaptError(f"--kd-fft {kd_fft}: {what} has no KD-based FFT (it needs a --buffer)")
    if kd_weight != 1.0 and not (fft and (kd_fft or KD_FFT_DEFAULT) == "joint"):
        raise MedadaptError(f"--kd-weight {kd_weight}: λ weighs the distillation loss of --kd-fft joint only; "
                            f"{what}{'' if fft else ' has no KD-based FFT'}")


def kd_recipe_from(recipe: Recipe, until: str = "budget", max_epochs: int | None = None,
                   lr_fraction: float | None = None) -> Recipe:
    """The LoRA-based KD recipe derived from the fine-tuning recipe (module constants), with ``lr_fraction`` of
    its learning rate (default: :data:`KD_LR_FRACTION`; with ``until="budget"``, the paper's ratios together, a
    tenth) and its optimiser, batch and patch.

    ``until="budget"``: the paper's budget ratio, a fifth of the epochs (and of any warm-up) on the recipe's
    schedule. ``until="levelled"``: a constant learning rate (a stage whose length is decided while it runs
    cannot follow a schedule over its length) and ``max_epochs`` (default: the fine-tuning epochs times
    :data:`KD_CEILING_FRACTION`) as the ceiling; the stage stops when L_refine has levelled off.
    ``until="ceiling"``: the same recipe, run to its ceiling (no early stop: the refinement's full schedule)."""
    if until not in KD_UNTIL:
        raise MedadaptError(f"--kd-until {until!r}: choose one of {', '.join(KD_UNTIL)}")
    if lr_fraction is None:
        lr_fraction = KD_PAPER_LR_FRACTION if until == "budget" else KD_LR_FRACTION
    check_kd_lr_fraction(lr_fraction)
    if until in ("levelled", "ceiling"):
        if max_epochs is not None:
            check_kd_ceiling(max_epochs)
            ceiling = max_epochs
        else:
            ceiling = max(1, round(recipe.epochs * KD_CEILING_FRACTION))
            check_kd_ceiling(ceiling, "the fine-tuning epochs (the default ceiling)")
        return recipe.with_overrides(name=f"{recipe.name}-lora-kd", epochs=ceiling, lr=recipe.lr * lr_fraction,
                                     method_lr={}, schedule={"name": "constant"})
    if max_epochs is not None:
        raise MedadaptError("--kd-max-epochs: only with --kd-until levelled or ceiling (the budget is the paper's "
                            "ratio)")
    epochs = max(1, round(recipe.epochs * KD_BUDGET_FRACTION))
    schedule = dict(recipe.schedule)
    if schedule.get("warmup_epochs"):  # the warm-up shrinks with the budget (and leaves at least one epoch)
        schedule["warmup_epochs"] = min(epochs - 1, round(schedule["warmup_epochs"] * KD_BUDGET_FRACTION))
    return recipe.with_overrides(name=f"{recipe.name}-lora-kd", epochs=epochs, lr=recipe.lr * lr_fraction,
                                 method_lr={}, schedule=schedule)


def check_kd_lr_fraction(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 10:
        raise MedadaptError(f"--kd-lr-fraction {value!r}: the LoRA-based KD's lr as a fraction of the fine-tuning's "
                            "must be in (0, 10] (the paper's ratio 0.1, the fine-tuning's own 1)")


def check_kd_ceiling(epochs: int, source: str = "--kd-max-epochs") -> None:
    """The LoRA-based KD stage's ceiling must leave the convergence check enough epochs to decide."""
    from medadapt.engine.convergence import MIN_POINTS

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < MIN_POINTS:
        raise MedadaptError(f"{source} is {epochs!r}: the LoRA-based KD's ceiling must be at least {MIN_POINTS} epochs, "
                            f"what the convergence check of L_refine needs; give --kd-max-epochs {MIN_POINTS} or "
                            "more (or --kd-until budget)")


def kd_levelled(history: dict) -> bool:
    """Whether L_refine's curve (the stage's epoch losses) has levelled off: the engine's stop rule for
    ``--kd-until levelled`` (medadapt.engine.convergence, constant lr: the epochs axis)."""
    from medadapt.engine.convergence import levelled_off

    return levelled_off(history.get("epoch_loss") or [])["levelled_off"] is True


def refinement_record(history: dict, config: TrainingConfig) -> dict[str, Any]:
    """The LoRA-based KD stage as the task record keeps it: L_refine's curve (epoch means), the epochs and
    iterations it took, its ceiling, whether it stopped because the curve levelled off, and the verdict of
    medadapt.engine.convergence on the whole curve."""
    from medadapt.engine.convergence import levelled_off
    from medadapt.engine.recipe import lr_factor

    curve = [float(v) for v in history.get("epoch_loss", [])]
    lr = [lr_factor(config.schedule, e, config.epochs) for e in range(len(curve))]
    verdict = levelled_off(curve, lr=None if config.schedule.get("name") == "constant" else lr)
    return {"curve": curve, "epochs": len(curve), "iterations": len(history.get("iteration_loss", [])),
            "ceiling_epochs": config.epochs, "stopped_at": history.get("stopped_at"),
            "levelled_off": verdict["levelled_off"], "convergence": verdict}


def task_folder(out: Path, index: int, task: StreamTask) -> Path:
    return out / "tasks" / f"{index:02d}-{task.name}"


def carried_model(where: Path) -> Path:
    """The model a sequential task hands on (the next task's starting point, the stream's final model): the
    refined M_t (``refined/model``) after LoRA-based KD and merge, else the task's model itself."""
    refined = where / "refined" / "model"
    return refined if (refined / "plans.json").is_file() else where / "model"


def check_stream_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a run folder made for other settings; a stream that extends the recorded one is accepted; where
    the inputs lie does not count (:func:`medadapt.workflows.identity.without_locations`: the tasks' data
    folders, the foundation's folder)."""
    path = out / "seqft.json"
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    if stored.get("format") != identity["format"]:
        raise MedadaptError(f"{out}: holds a sequential run recorded as {stored.get('format') or 'an older format'} "
                            f"by an older medadapt (this one writes {identity['format']}); use a new --out folder")
    stored = without_locations(stored)
    current = without_locations(json.loads(json.dumps(identity)))
    old_tasks, new_tasks = stored.get("tasks", []), current.get("tasks", [])
    if len(new_tasks) < len(old_tasks) and new_tasks == old_tasks[:len(new_tasks)]:
        raise MedadaptError(f"{out}: holds a run over {len(old_tasks)} tasks and this stream has {len(new_tasks)}; "
                            "give the whole stream (a stream may only be extended) or use a new --out folder")
    if new_tasks[:len(old_tasks)] != old_tasks:
        i = next(i for i, (a, b) in enumerate(zip(old_tasks, new_tasks + [None] * len(old_tasks))) if a != b)
        raise MedadaptError(f"{out}: was run on a stream whose task {i + 1} is {json.dumps(old_tasks[i])}; this "
                            "stream differs there (a stream may only be extended by new tasks at its end); use "
                            "a new --out folder")
    diff = first_difference({k: v for k, v in stored.items() if k != "tasks"},
                            {k: v for k, v in current.items() if k != "tasks"})
    if diff is not None:
        key, old, new = diff
        raise MedadaptError(f"{out}: holds a run with {key} = {json.dumps(old)}, this one has {json.dumps(new)}; "
                            "use a new --out folder or the run's own settings")


@dataclasses.dataclass(frozen=True)
class SeqftSettings:
    """Everything that decides a sequential run's result, resolved from the recipes (their contents), the
    foundation's folder (patch, batch) and the flags by :func:`resolve_seqft`; :func:`seqft` runs it, and the
    run's identity (``seqft.json``) is this whole object as data (:meth:`to_dict`) with the stream's tasks."""

    stream: Stream
    model: str                   #: the foundation M_0's model folder (absolute)
    sequence: SeqSettings        #: the method and its switches
    method_options: dict         #: a parallel method's strategy options (no None)
    decoder: str | None          #: a parallel method's decoder policy, where it is not ``pretrained``
    pretext_decoder: str         #: as given (the parallel runs resolve it per task)
    shots: "int | str"
    seed: int
    split_seed: int
    recipe: Recipe               #: the fine-tuning recipe with the command line's budget
    kd_recipe: Recipe | None     #: the LoRA-based KD stage's (retention lora-kd)
    training: TrainingConfig
    kd_training: TrainingConfig | None
    patch_size: tuple[int, ...]
    batch_size: int
    postprocess: str
    #: the command line's budget and learning rate as given (epochs, iterations_per_epoch, lr): a parallel
    #: method's runs apply them after their method's own recipe settings, as ``medadapt finetune`` does
    overrides: dict = dataclasses.field(default_factory=dict)
    #: the sliding window's tile overlap when the test cases are predicted (nnU-Net's 0.5 by default)
    overlap: float = DEFAULT_OVERLAP

    @property
    def method(self) -> str:
        return self.sequence.method

    def to_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.name, "model": self.model, **self.sequence.record(),
                "method_options": self.method_options, **({"decoder": self.decoder} if self.decoder else {}),
                "shots": self.shots, "seed": self.seed, "split_seed": self.split_seed, "postprocess": self.postprocess, "training": self.training.to_dict(),
                "kd_training": self.kd_training.to_dict() if self.kd_training else None,
                "recipe": self.recipe.to_dict(), "kd_recipe": self.kd_recipe.to_dict() if self.kd_recipe else None,
                "patch_size": list(self.patch_size), "batch_size": self.batch_size, "overrides": self.overrides,
                # recorded where it is not the default (runs made before the option keep their identity)
                **({"overlap": self.overlap} if self.overlap != DEFAULT_OVERLAP else {})}


@dataclasses.dataclass(frozen=True)
class SeqftRequest:
    """A sequential run as asked for (the command line's flags, a grid row, the Python API), before it is
    checked against every task and resolved into :class:`SeqftSettings` by :func:`resolve_seqft`: ``stream``
    (a stream file or a Stream) from the foundation ``model`` with ``method`` (module docstring) and its
    switches, the shots and seeds, the fine-tuning ``recipe`` and the command line's budget, the LoRA-based KD's
    recipe or ceiling, a parallel method's options and decoder policy, the test predictions' post-processing."""

    stream: "str | Path | Stream"
    model: str | Path
    method: str = "medseqft"
    buffer: str | None = None
    retention: str | None = None
    buffer_size: int = 4
    mds_repeats: int = 16
    kd_rank: int = 2
    kd_until: str = KD_UNTIL_DEFAULT
    kd_max_epochs: int | None = None
    kd_lr_fraction: float | None = None  #: None: KD_LR_FRACTION (with a derived KD recipe only)
    kd_norm: str = "keep"
    kd_fft: str | None = None  #: None: KD_FFT_DEFAULT where there is a KD-based FFT
    kd_weight: float = 1.0
    shots: "int | str" = "all"
    seed: int = 0
    split_seed: int = 0
    recipe: "str | Path | Recipe | None" = None
    kd_recipe: "str | Path | Recipe | None" = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    lr: float | None = None
    method_options: dict[str, Any] | None = None
    postprocess: str = "none"
    pretext_decoder: str = "auto"
    overlap: float = DEFAULT_OVERLAP


def resolve_seqft(request: SeqftRequest, engine: EngineOptions | None = None) -> SeqftSettings:
    """The settings of the sequential run ``request`` asks for, checked against every task and resolved (one
    line per mistake, nothing written). ``engine``: its precision, resolved for this process's device, is part
    of the settings."""
    r = request
    engine = engine or EngineOptions()
    sequence = resolve_method(r.method, r.buffer, r.retention, r.buffer_size, r.mds_repeats, r.kd_rank, r.kd_until,
                              r.kd_norm, r.kd_fft, r.kd_weight)
    if r.postprocess not in POSTPROCESSING:
        raise MedadaptError(f"--postprocess {r.postprocess!r}: unknown; choose one of {', '.join(POSTPROCESSING)}")
    check_overlap(r.overlap)
    stream = r.stream if isinstance(r.stream, Stream) else load_stream(r.stream)
    folder0 = load_model_folder(r.model)
    if sequence.retention == "lora-kd":  # the rank must fit every encoder layer (checked before any training)
        EncoderLoRADistillation(rank=sequence.kd_rank).check_fits(folder0.build_network(), str(folder0.path))
    options = {} if sequence.sequential else \
        {k: v for k, v in sorted((r.method_options or {}).items()) if v is not None}
    decoder = None  # a parallel method that freezes part of the network: its decoder policy (recorded)
    if not sequence.sequential and r.method != JOINT:
        policy = decoder_policy(folder0, r.pretext_decoder)
        if make_strategy(r.method, decoder=policy, seed=r.seed, **options).decoder != "pretrained":
            decoder = policy
    # the sequential stages and joint training fine-tune every weight: the recipe as full fine-tuning trains
    # (its methods entry, then the command line's budget); a parallel method's runs resolve their own (finetune)
    trains_all = sequence.sequential or r.method == JOINT
    chosen = r.recipe or folder0.recipe or DEFAULT_RECIPE
    budget = {"epochs": r.epochs, "iterations_per_epoch": r.iterations_per_epoch}
    resolved = resolve_recipe(chosen, FullFineTuning.name, **budget) if trains_all else \
        load_recipe(chosen).with_overrides(**budget)
    # an epoch of "cases" is resolved per task (for_cases); the settings record the first task's (below)
    config = training_config(resolved.for_cases(1), FullFineTuning.name if trains_all else r.method, r.seed,
                             folder0.activation, engine)
    if r.method == JOINT:  # the budget of the parallel runs together: n tasks x the recipe's epochs
        config = dataclasses.replace(config, epochs=config.epochs * len(stream.tasks))
    if r.lr is not None:
        config = dataclasses.replace(config, initial_lr=r.lr)
    kd_resolved, kd_config = _kd_stage(r, sequence, resolved, folder0, engine)
    if sequence.buffer == "mds":
        from medadapt.ssl import load_pretext

        load_pretext(folder0)  # one line if the foundation has no pretext head
    settings = SeqftSettings(
        stream=stream, model=str(Path(folder0.path or r.model).resolve()), sequence=sequence, method_options=options,
        decoder=decoder, pretext_decoder=r.pretext_decoder, shots=r.shots, seed=r.seed, split_seed=r.split_seed,
        recipe=resolved, kd_recipe=kd_resolved, training=config, kd_training=kd_config,
        patch_size=tuple(resolved.patch_size or folder0.network.patch_size),
        batch_size=resolved.batch_size or folder0.network.batch_size, postprocess=r.postprocess,
        overrides={k: v for k, v in (*budget.items(), ("lr", r.lr)) if v is not None}, overlap=float(r.overlap))
    _, splits = task_splits(settings, folder0)  # every task is checked before anything is written
    first = round(sum(len(ids) for ids, _ in splits) / len(splits)) if r.method == JOINT else len(splits[0][0])
    return dataclasses.replace(settings, training=for_cases(config, resolved, first),
                               kd_training=for_cases(kd_config, kd_resolved, first) if kd_config else None)


def _kd_stage(r: SeqftRequest, sequence: SeqSettings, resolved: Recipe, folder0: ModelFolder,
              engine: EngineOptions) -> tuple[Recipe | None, TrainingConfig | None]:
    """The LoRA-based KD stage's recipe and training (retention lora-kd; otherwise its options are refused)."""
    if sequence.retention != "lora-kd":
        if r.kd_recipe is not None or r.kd_max_epochs is not None or r.kd_lr_fraction is not None:
            raise MedadaptError("--kd-recipe/--kd-max-epochs/--kd-lr-fraction: only with --retention lora-kd (or "
                                "--method medseqft)")
        return None, None
    if r.kd_recipe is not None:
        if r.kd_lr_fraction is not None:
            raise MedadaptError("--kd-lr-fraction: not with --kd-recipe (its lr is the recipe's)")
        kd_resolved = load_recipe(r.kd_recipe).with_overrides(epochs=r.kd_max_epochs)
        if sequence.kd_until == "levelled":
            check_kd_ceiling(kd_resolved.epochs, "--kd-max-epochs" if r.kd_max_epochs else "--kd-recipe's epochs")
    else:
        kd_resolved = kd_recipe_from(resolved, sequence.kd_until, r.kd_max_epochs, r.kd_lr_fraction)
    kd_config = dataclasses.replace(training_config(kd_resolved.for_cases(1), "lora-kd", r.seed, folder0.activation,
                                                    engine), loss={"name": "encoder-feature-mse"})
    return kd_resolved, kd_config


def task_splits(settings: SeqftSettings, folder0: ModelFolder) -> tuple[list[RawDataset], list[tuple[list, list]]]:
    """Each task's dataset and its (shot ids, test ids), checked against the foundation and the settings."""
    datasets, splits = [], []
    for task in settings.stream.tasks:
        ds = task.dataset()
        if ds.num_channels != folder0.network.input_channels:
            raise MedadaptError(f"{task.data / 'dataset.json'}: has {ds.num_channels} input channel(s), the model "
                                f"in {folder0.path} expects {folder0.network.input_channels}")
        split = task.split if task.split is not None else Split.random(settings.split_seed)
        train_ids, test_ids = split.apply(ds.case_ids)
        if not train_ids or not test_ids:
            raise MedadaptError(f"{task.data}: {len(ds.case_ids)} case(s) give no train/test split; a task needs "
                                "at least 2 cases (5 or more for a meaningful test split)")
        shots = settings.shots
        k = len(train_ids) if shots == "all" else int(shots)
        if k > len(train_ids) or k < 1:
            raise MedadaptError(f"--shots {shots}: task {task.name!r} has {len(train_ids)} training case(s); use "
                                f"--shots {len(train_ids)} or fewer (or all)")
        shot_ids = draw_shots(train_ids, k, settings.seed)
        if settings.sequence.buffer != "none":
            check_buffer_size(settings.sequence.buffer_size, len(shot_ids), task.name)
        datasets.append(ds)
        splits.append((shot_ids, test_ids))
    return datasets, splits


@dataclasses.dataclass(frozen=True)
class StreamRun:
    """What every task of a sequential run shares: its settings and folder, the foundation M_0, the tasks'
    datasets, the pretext network that scores buffer candidates (``buffer mds``), and how it runs."""

    settings: SeqftSettings
    out: Path
    folder0: ModelFolder
    datasets: list
    pretext: Any
    progress: bool
    engine: EngineOptions

    def cases(self, ds: RawDataset, ids) -> list:
        """Cases ``ids`` of ``ds``, preprocessed as M_0 sees data (cached)."""
        return preprocess_dataset(ds, ids, self.folder0.plan(), dataset_cache_dir(ds.root), progress=self.progress)

    def spec(self, ds: RawDataset):
        """A task network's architecture: M_0's with a head for ``ds``'s labels, the recipe's patch and batch."""
        spec = self.folder0.network.with_classes(output_channels(ds.labels, self.folder0.activation))
        return dataclasses.replace(spec, patch_size=tuple(self.settings.patch_size),
                                   batch_size=self.settings.batch_size)

    def folder(self, spec, ds: RawDataset, provenance: dict[str, Any]) -> ModelFolder:
        """A task's model folder: M_0's preprocessing, ``ds``'s labels, ``provenance``."""
        f0 = self.folder0
        return ModelFolder(network=spec, preprocessing=f0.preprocessing, labels=ds.labels,
                           channel_names=ds.channel_names, file_ending=ds.file_ending,
                           provenance={**provenance, "foundation": str(f0.path)}, recipe=f0.recipe,
                           activation=f0.activation,
                           thresholds={n: t for n, t in f0.thresholds.items() if n in ds.labels})


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Task ``index`` (from 1) of a stream: its dataset, shot and test cases, and its folder."""

    index: int
    task: StreamTask
    dataset: RawDataset
    shot_ids: list
    test_ids: list
    where: Path


def stream_identity(settings: SeqftSettings, datasets, folder0: ModelFolder,
                    foundation: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A sequential run's identity (``seqft.json``): the stream's tasks, the settings as data, M_0's weights."""
    data = settings.to_dict()
    return {"format": FORMAT,
            "tasks": [{"name": t.name, "data": str(t.data), "labels": ds.labels,
                       "cases": stable_hash(ds.case_ids, 16)} for t, ds in zip(settings.stream.tasks, datasets)],
            **data, "seeds": seeds.SCHEME,
            "foundation": {"path": settings.model, "weights": model_fingerprint(folder0, foundation)},
            "settings_digest": settings_digest(data)}


@locks_folder("out")
def seqft(settings: SeqftSettings, out: str | Path, *, resume: bool = False, progress: bool = True,
          engine: EngineOptions | None = None) -> dict[str, Any]:
    """Run the sequential run ``settings`` describe (:func:`resolve_seqft`) into ``out`` (module docstring);
    returns the run's results record (also ``out/results.json``). ``resume``: continue a run of the same
    settings (or of a stream this one extends). ``engine``: how every training step runs (background workers,
    ``torch.compile``; the precision is the settings')."""
    out, s = Path(out), settings
    folder0 = load_model_folder(s.model)
    pretext = None
    if s.sequence.buffer == "mds":
        from medadapt.ssl import load_pretext

        pretext = load_pretext(folder0)
    datasets, splits = task_splits(s, folder0)
    identity = stream_identity(s, datasets, folder0, folder0.load_network().state_dict())
    if (out / "seqft.json").is_file() and not resume:
        raise MedadaptError(f"{out}: holds a sequential run; pass --resume to continue it or choose another --out")
    check_stream_identity(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "seqft.json", identity)
    run = StreamRun(s, out, folder0, datasets, pretext, progress, engine or EngineOptions())
    tasks = [TaskData(i, t, ds, shot_ids, test_ids, task_folder(out, i, t))
             for i, (t, ds, (shot_ids, test_ids)) in enumerate(zip(s.stream.tasks, datasets, splits), 1)]
    results = _joint(run, tasks) if s.method == JOINT else _stream(run, tasks)
    summary = {"stream": s.stream.record(), "identity": identity, "tasks": results,
               "seeds": seeds.record(s.seed, s.split_seed), "environment": environment()}
    if s.sequence.sequential:
        summary["transfer"] = _after_stream(run, tasks, results)
    _write_results(out, summary)
    return summary


def _stream(run: StreamRun, tasks: list[TaskData]) -> list[dict[str, Any]]:
    """Every task in order: a sequential method's (each from the model the one before carries on) or a parallel
    method's (each a ``finetune`` run from M_0)."""
    s = run.settings
    seq = s.sequence
    results = []
    entries: list[BufferEntry] = []
    previous: ModelFolder = run.folder0
    for t in tasks:
        if seq.sequential:
            record = _sequential_task(run, t, previous, entries)
            previous = load_model_folder(carried_model(t.where))
            entries = [BufferEntry(**e) for e in record["buffer_after"]]
            atomic_write_json(run.out / "buffer.json", buffer_record(
                entries, seq.buffer, seq.buffer_size, seq.mds_repeats if seq.buffer == "mds" else None, s.seed))
        else:
            from medadapt.workflows.finetune import FinetuneRequest, finetune, resolve_finetune

            finished = finetune(resolve_finetune(FinetuneRequest(
                s.model, t.task.data, s.method, len(t.shot_ids), seed=s.seed, split_seed=s.split_seed,
                method_options=s.method_options, head="fresh", recipe=s.recipe, postprocess=s.postprocess,
                pretext_decoder=s.pretext_decoder, overlap=s.overlap, **s.overrides), run.engine),
                t.where, resume=True, progress=run.progress, engine=run.engine)
            record = {"task": t.task.name, "index": t.index, "metrics": finished["metrics"],
                      "seconds": {"finetune": train_seconds(t.where / "training" / "history.json")}}
        results.append(record)
    return results


def _after_stream(run: StreamRun, tasks: list[TaskData], results) -> dict[str, Any]:
    """Forgetting and the encoder's change after the whole stream (:mod:`medadapt.sequential.transfer`)."""
    from medadapt.sequential.transfer import backward_transfer, encoder_change, with_encoder, write_encoder_change

    out, n = run.out, len(tasks)
    final = load_model_folder(carried_model(tasks[-1].where)).load_network()
    write_encoder_change(encoder_change(run.folder0.load_network(), final), out / "encoder_change",
                         f"{run.settings.stream.name}: encoder change M0 -> M{n}")
    rows = []
    for t in tasks[:-1]:
        where = out / "transfer" / f"after-{n:02d}" / f"{t.index:02d}-{t.task.name}"
        summary_file = where / "summary.json"
        if summary_file.is_file():
            metrics = json.loads(summary_file.read_text())
        else:
            folder_j = load_model_folder(t.where / "model")
            net = with_encoder(folder_j.load_network(), final)
            metrics = predict_and_evaluate(folder_j, net, t.dataset, t.test_ids, where, run.progress,
                                           run.settings.postprocess, run.settings.overlap)
        just_after = _pct(results[t.index - 1]["metrics"]["foreground_mean"].get("dsc"))
        after = _pct(metrics["foreground_mean"].get("dsc"))
        rows.append({"task": t.task.name, "index": t.index, "dsc_just_after": just_after, "dsc_after_stream": after,
                     "change": None if just_after is None or after is None else after - just_after})
    record = {"after_task": n, "tasks": rows,
              "bwt": backward_transfer([r["dsc_just_after"] for r in rows], [r["dsc_after_stream"] for r in rows]),
              "encoder_change": str(out / "encoder_change.csv")}
    atomic_write_json(out / "transfer.json", record)
    return record


def _joint(run: StreamRun, tasks: list[TaskData]) -> list[dict[str, Any]]:
    """Joint multi-task training: M_0's encoder and decoder shared, a fresh head per task, each batch from one
    task drawn uniformly; then every task's network (shared weights + its head) is saved and evaluated. An
    epoch of ``cases`` is one of the tasks' mean number of training cases (:func:`resolve_seqft`)."""
    from medadapt.data.sampling import TaskMixSampler
    from medadapt.models.multihead import TaskHeads
    from medadapt.tuning.multitask import JointTraining

    s, out = run.settings, run.out
    nets, samplers, specs = [], [], []
    for t in tasks:
        spec = run.spec(t.dataset)
        specs.append(spec)
        nets.append(prepare_network(load_foundation(run.folder0, t.dataset, s.seed, head="fresh"), s.recipe, s.seed))
        samplers.append(recipe_sampler(s.recipe, run.cases(t.dataset, t.shot_ids), spec.patch_size, spec.batch_size))
    model = TaskHeads(nets[0], [model_parts(n).heads for n in nets])
    strategy = JointTraining()
    if not all((t.where / "task.json").is_file() for t in tasks):
        # (an epoch of cases: resolve_seqft resolved it for the tasks' mean number of cases)
        trainer = Trainer(prepare_strategy(strategy, model, s.seed), strategy, TaskMixSampler(samplers), s.training,
                          out / "joint" / "training", progress=run.progress, description="joint training",
                          engine=run.engine)
        atomic_write_json(out / "joint" / "training" / "history.json", trainer.fit(resume=True))
    seconds = train_seconds(out / "joint" / "training" / "history.json")
    results = []
    for t, spec in zip(tasks, specs):
        if (t.where / "task.json").is_file():
            results.append(json.loads((t.where / "task.json").read_text()))
            continue
        net = model.task_network(t.index - 1)
        tuned = run.folder(spec, t.dataset, {"kind": "seqft-joint", "task": t.task.name, "index": t.index})
        save_model_folder(t.where / "model", net, tuned)
        metrics = predict_and_evaluate(tuned, net, t.dataset, t.test_ids, t.where, run.progress, s.postprocess,
                                       s.overlap)
        record = {"task": t.task.name, "index": t.index, "metrics": metrics, "seconds": {"joint": seconds},
                  "shot_cases": t.shot_ids, "test_cases": t.test_ids}
        atomic_write_json(t.where / "task.json", record)
        results.append(record)
    return results


def train_seconds(history_file: Path) -> float | None:
    """Training time of a stage: the sum of its iterations' compute and sampling time (survives resumption)."""
    if not history_file.is_file():
        return None
    h = json.loads(history_file.read_text())
    return float(sum(h.get("iteration_seconds", [])) + sum(h.get("sampling_seconds", [])))


def _sequential_task(run: StreamRun, t: TaskData, previous: ModelFolder,
                     entries: list[BufferEntry]) -> dict[str, Any]:
    """Task ``t`` of a sequential method, from ``previous`` (M_{t-1}) with the buffer ``entries``: fine-tuning
    (:func:`_fine_tune_stage`), the task's scores, LoRA-based KD and merge (:func:`_refine_stage`), the buffer's
    growth; ``task.json`` written last. A finished task is read back (and its buffer selected if it ended a
    shorter stream that this one continues)."""
    s = run.settings
    done = t.where / "task.json"
    last = t.index == len(s.stream.tasks)
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("buffer_pending") and not last:  # the stream this task ended goes on
            record = _complete_buffer(run, t, record)
        return record
    cases = run.cases(t.dataset, t.shot_ids)
    spec = run.spec(t.dataset)
    sampler = recipe_sampler(s.recipe, cases, spec.patch_size, spec.batch_size)
    tuned, mid = _fine_tune_stage(run, t, previous, entries, spec, sampler)
    seconds: dict[str, float | None] = {"stage1": train_seconds(t.where / "stage1" / "training" / "history.json")}
    metrics = predict_and_evaluate(tuned, mid, t.dataset, t.test_ids, t.where, run.progress, s.postprocess, s.overlap)
    refined_metrics = kd_record = None
    if s.sequence.retention == "lora-kd":
        refined_metrics, kd_record, seconds["stage2"] = _refine_stage(run, t, previous, spec, sampler, mid)
    # the buffer grows by this task's K cases; after the stream's last task no task is left for it to serve, so
    # it is selected only when a longer stream continues this run (_complete_buffer)
    new_entries, mds_summary = list(entries), None
    if s.sequence.buffer != "none" and not last:
        new_entries, mds_summary, seconds["buffer"] = _grow_buffer(run, t, cases, entries)
    record = {"task": t.task.name, "index": t.index, "metrics": metrics, "refined_metrics": refined_metrics,
              **({"refinement": kd_record} if kd_record is not None else {}),
              **({"mds": mds_summary} if mds_summary is not None else {}),
              "carried_model": str(carried_model(t.where).relative_to(t.where)), "seconds": seconds,
              "buffer_after": [dataclasses.asdict(e) for e in new_entries], "shot_cases": t.shot_ids,
              **({"buffer_pending": True} if s.sequence.buffer != "none" and last else {}),
              "test_cases": t.test_ids}
    atomic_write_json(done, record)
    return record


def _fine_tune_stage(run: StreamRun, t: TaskData, previous: ModelFolder, entries: list[BufferEntry], spec,
                     sampler) -> tuple[ModelFolder, torch.nn.Module]:
    """Stage 1: KD-based FFT on the buffer (plain full fine-tuning without one) from M_{t-1} with a fresh head,
    built from the recipe as ``finetune`` builds its training. The result, M_{t-mid}, is the task's model,
    written before stage 2 so a killed run does not train it again."""
    model_dir = t.where / "model"
    if (model_dir / "plans.json").is_file():
        tuned = load_model_folder(model_dir)
        return tuned, tuned.load_network()
    s = run.settings
    net = prepare_network(load_foundation(previous, t.dataset, s.seed, head="fresh"), s.recipe, s.seed)
    buffer_sampler = None
    if s.sequence.buffer != "none" and entries:  # the buffer's cases, task by task, crops anywhere
        by_task = {task.name: d for task, d in zip(s.stream.tasks, run.datasets)}
        buffered = [c for name in dict.fromkeys(e.task for e in entries)
                    for c in run.cases(by_task[name], [e.case for e in entries if e.task == name])]
        buffer_sampler = recipe_sampler(s.recipe, buffered, spec.patch_size, spec.batch_size, unbiased=True)
    strategy = (KDFineTuning(frozen_copy(net), buffer_sampler, seed=s.seed, mode=s.sequence.kd_fft,
                             weight=s.sequence.kd_weight) if buffer_sampler is not None else FullFineTuning())
    net = prepare_strategy(strategy, net, s.seed)
    trainer = Trainer(net, strategy, sampler, for_cases(s.training, s.recipe, len(t.shot_ids)),
                      t.where / "stage1" / "training", progress=run.progress, engine=run.engine,
                      description=f"task {t.index} {t.task.name}: {'KD-based FFT' if buffer_sampler else 'fine-tune'}")
    atomic_write_json(t.where / "stage1" / "training" / "history.json", trainer.fit(resume=True))
    mid = strategy.finalize(net)
    tuned = run.folder(spec, t.dataset, {"kind": "seqft-task-model", "task": t.task.name, "index": t.index,
                                         "strategy": strategy.config(), **s.sequence.record()})
    save_model_folder(model_dir, mid, tuned)
    return tuned, mid


def _refine_stage(run: StreamRun, t: TaskData, previous: ModelFolder, spec, sampler, mid: torch.nn.Module):
    """Stages 2-3: LoRA-based KD of E_{t-mid} into a copy of E_{t-1} on the task's batches, then the merge: M_t,
    the refined model the next task starts from (the merged encoder + M_{t-mid}'s decoder and head), saved and
    scored. Returns (its scores, the stage's record, its seconds)."""
    s = run.settings
    kd = EncoderLoRADistillation(rank=s.sequence.kd_rank, norm=s.sequence.kd_norm)
    student = prepare_strategy(kd, load_foundation(previous, t.dataset, s.seed, head="fresh"), s.seed)
    if s.sequence.kd_norm == "copy":  # the student starts with E_{t-mid}'s norm parameters (a resume restores them)
        copy_encoder_norms(mid, student)
    kd_config = for_cases(s.kd_training, s.kd_recipe, len(t.shot_ids))
    trainer = Trainer(student, kd, sampler, kd_config, t.where / "stage2" / "training", progress=run.progress,
                      loss=FeatureDistillation(frozen_copy(mid)),
                      description=f"task {t.index} {t.task.name}: LoRA-based KD", engine=run.engine,
                      stop_when=kd_levelled if s.sequence.kd_until == "levelled" else None)
    kd_history = trainer.fit(resume=True)
    atomic_write_json(t.where / "stage2" / "training" / "history.json", kd_history)
    merged = kd.finalize(student)
    refined = copy.deepcopy(mid)
    model_parts(refined).encoder.load_state_dict(model_parts(merged).encoder.state_dict())
    refined_folder = run.folder(spec, t.dataset, {"kind": "seqft-refined", "task": t.task.name, "index": t.index,
                                                  **s.sequence.record()})
    save_model_folder(t.where / "refined" / "model", refined, refined_folder)
    metrics = predict_and_evaluate(refined_folder, refined, t.dataset, t.test_ids, t.where / "refined",
                                   run.progress, s.postprocess, s.overlap)
    return metrics, refinement_record(kd_history, kd_config), train_seconds(
        t.where / "stage2" / "training" / "history.json")


def _grow_buffer(run: StreamRun, t: TaskData, cases, entries: list[BufferEntry]):
    """The buffer after task ``t``: ``entries`` plus K of its training cases (MDS: the lowest mean pretext loss
    over R maskings, recorded in ``mds.json``; random: a seeded draw). Returns (entries, MDS summary, seconds)."""
    settings, seed, name = run.settings.sequence, run.settings.seed, t.task.name
    t0 = time.perf_counter()
    mds_summary, scoring = None, 0.0
    if settings.buffer == "mds":
        # scored once per (M_0, cases, R, seed): another run of the same stream reuses them and counts their
        # seconds (``scoring``); the selection's own time is measured from here
        losses, scoring = stored_mds_losses(run.pretext, cases, name, run.pretext.patch_size, settings.mds_repeats,
                                            seed, cache_root() / "mds", progress=run.progress)
        t0 = time.perf_counter()
        scores = {c: float(v.mean()) for c, v in losses.items()}
        picked = lowest(scores, settings.buffer_size)
        # the buffer of the first r maskings for r = 1, 2, 4, ..., R: where this run's buffer settled
        stability = buffer_stability(losses, settings.buffer_size)
        mds_summary = {"repeats": settings.mds_repeats, "picked": picked,
                       "settled_repeats": settled_repeats(stability),
                       "stability": [{k: r[k] for k in ("repeats", "shared_with_final", "spearman_with_final",
                                                        "settled")} for r in stability]}
        atomic_write_json(t.where / "mds.json", {"repeats": settings.mds_repeats, "scores": scores,
                                                 "picked": picked, "stability": stability,
                                                 "settled_repeats": mds_summary["settled_repeats"],
                                                 "losses": {c: v.tolist() for c, v in losses.items()}})
        new = [BufferEntry(name, c, scores[c]) for c in picked]
    else:
        new = [BufferEntry(name, c, None) for c in random_pick(t.shot_ids, settings.buffer_size, seed, t.index)]
    return list(entries) + new, mds_summary, scoring + time.perf_counter() - t0


def _complete_buffer(run: StreamRun, t: TaskData, record: dict[str, Any]) -> dict[str, Any]:
    """A task that ended a shorter stream left its buffer unselected (``buffer_pending``); a stream that goes on
    selects it now, exactly as it would have been then, and records it in the task's ``task.json``."""
    entries = [BufferEntry(**e) for e in record["buffer_after"]]
    entries, mds_summary, seconds = _grow_buffer(run, t, run.cases(t.dataset, t.shot_ids), entries)
    record = {k: v for k, v in record.items() if k != "buffer_pending"}
    record.update(buffer_after=[dataclasses.asdict(e) for e in entries], seconds={**record["seconds"],
                                                                                   "buffer": seconds},
                  **({"mds": mds_summary} if mds_summary is not None else {}))
    atomic_write_json(t.where / "task.json", record)
    return record


def _write_results(out: Path, summary: dict[str, Any]) -> None:
    rows = []
    for r in summary["tasks"]:
        m = r["metrics"]
        fm = m.get("foreground_mean", {})
        refined = (r.get("refined_metrics") or {}).get("foreground_mean", {})
        rows.append({"index": r["index"], "task": r["task"],
                     "dsc": _pct(fm.get("dsc")), "nsd": _pct(fm.get("nsd")), "hd95": fm.get("hd95"),
                     **({"dsc_refined": _pct(refined.get("dsc"))} if refined else {}),
                     **{f"seconds_{k}": v for k, v in (r.get("seconds") or {}).items()}})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    csv = [",".join(keys)] + [",".join("" if row.get(k) is None else
                                       (f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]))
                                       for k in keys) for row in rows]
    atomic_write_text(out / "results.csv", "\n".join(csv) + "\n")
    has_refined = any("dsc_refined" in row for row in rows)
    md = ["| # | task | Dice (%) | NSD@1mm (%) | HD95 (mm) |" + (" refined M_t Dice (%) |" if has_refined else ""),
          "|---|---|---|---|---|" + ("---|" if has_refined else "")]
    for row in rows:
        md.append(f"| {row['index']} | {row['task']} | {_fmt(row['dsc'])} | {_fmt(row['nsd'])} | "
                  f"{_fmt(row['hd95'])} |" + (f" {_fmt(row.get('dsc_refined'))} |" if has_refined else ""))
    dsc = [r["dsc"] for r in rows if r["dsc"] is not None]
    if dsc:
        md.append(f"| | **average** | {_fmt(sum(dsc) / len(dsc))} | | |" + (" |" if has_refined else ""))
    transfer = summary.get("transfer")
    if transfer and transfer["tasks"]:
        md += ["", f"Forgetting: each earlier task's decoder and head on the final encoder (after task "
                   f"{transfer['after_task']})", "", "| # | task | Dice just after (%) | Dice after the stream (%) | change |",
               "|---|---|---|---|---|"]
        md += [f"| {r['index']} | {r['task']} | {_fmt(r['dsc_just_after'])} | {_fmt(r['dsc_after_stream'])} | "
               f"{_fmt(r['change'])} |" for r in transfer["tasks"]]
        md.append(f"\nBackward transfer (BWT, mean change): {_fmt(transfer['bwt'])} Dice points")
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    atomic_write_json(out / "results.json", summary)


def _pct(v):
    return None if v is None else 100.0 * float(v)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"
