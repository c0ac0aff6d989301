"""The training engine, shared by pretraining and every fine-tuning strategy.

What it trains with is data (:class:`TrainingConfig`, resolved from a recipe, :mod:`medadapt.engine.recipe`):
the optimiser, the learning-rate schedule (updated once per epoch), the loss, the gradient-norm clipping and
the budget, an "epoch" being a fixed number of iterations over randomly sampled patches. Its defaults are
nnU-Net's (SGD, Nesterov momentum 0.99, weight decay 3e-5, poly decay with power 0.9, Dice + CE with deep
supervision, clipping at 12). The engine knows nothing about specific strategies or papers: it calls the
:class:`~medadapt.engine.strategy.TrainingStrategy` interface (``parameters``, ``attach``, ``train_step``), and every loss is a
loss term ``term(model, batch, outputs) -> scalar tensor``: the recipe's (in the form of the model's output
activation), plus any extra ones (knowledge distillation, transductive terms on unlabelled volumes, ...). The
training step belongs to the strategy (default: forward, every loss term, backward, clip, step), so a method
that routes losses to different parameters needs no engine of its own.

A checkpoint is written atomically after every epoch. Each batch draws its randomness from (seed, epoch,
iteration) alone (:mod:`medadapt.engine.batches`), whether it is drawn here or in background workers
(:class:`EngineOptions`: ``workers``), so a run resumed after being killed continues exactly as the
uninterrupted run would have, whatever the number of workers.

How the steps run is the :class:`EngineOptions`, not the recipe: mixed precision (``precision``: autocast and
a gradient scaler, :mod:`medadapt.engine.precision`; the resolved precision is part of the training settings,
so a run resumes in the precision it started in), background batches (``workers``) and ``torch.compile``
(``compile``: the forward module is compiled; the strategies' hooks live on the optimiser, so they are
untouched).

Under ``torchrun`` the model is wrapped in DistributedDataParallel: each rank samples its own patches (its
randomness is drawn from (seed, epoch, iteration, rank)), gradients are averaged over ranks in the backward pass, and
everything after that — clipping, the strategy's selection (DGST picks from the all-reduced gradient), the
optimizer step — sees the same numbers on every rank, so all ranks keep identical weights. Rank 0 writes the
checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medadapt.engine import distributed as dist_utils
from medadapt.engine.batches import batch_stream, check_workers
from medadapt.engine.losses import ACTIVATIONS, build_loss
from medadapt.engine.precision import PRECISIONS, MixedPrecision, resolve_precision
from medadapt.engine.recipe import OPTIMIZERS, SCHEDULES, build_optimizer, lr_factor
from medadapt.errors import MedadaptError
from medadapt.engine.strategy import LossTerm, StepContext, TrainingStrategy
from medadapt.utils import seeds
from medadapt.utils.atomic import atomic_torch_save

CHECKPOINT = "checkpoint_latest.pt"


def _default_optimizer() -> dict:
    return {"name": "sgd", **copy.deepcopy(OPTIMIZERS["sgd"][1])}


def _default_schedule() -> dict:
    return {"name": "poly", **copy.deepcopy(SCHEDULES["poly"])}


@dataclasses.dataclass
class TrainingConfig:
    """One run's resolved training settings (recorded in ``run.json`` and every checkpoint)."""

    epochs: int
    iterations_per_epoch: int
    initial_lr: float
    seed: int = 0
    grad_clip: float | None = 12.0
    optimizer: dict = dataclasses.field(default_factory=_default_optimizer)
    schedule: dict = dataclasses.field(default_factory=_default_schedule)
    loss: dict = dataclasses.field(default_factory=lambda: {"name": "dice_ce", "batch_dice": True})
    recipe: str | None = None  # the recipe these settings were resolved from, for the record
    #: the model's output activation, which gives the loss its form (medadapt.engine.losses)
    activation: str = "softmax"
    #: fp32, fp16 or bf16 (medadapt.engine.precision); "auto" is resolved by EngineOptions.configure
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise MedadaptError(f"--epochs {self.epochs}: must be at least 1")
        if self.iterations_per_epoch < 1:
            raise MedadaptError(f"--iterations-per-epoch {self.iterations_per_epoch}: must be at least 1")
        if not self.initial_lr > 0:
            raise MedadaptError(f"--lr {self.initial_lr}: must be positive")
        if self.activation not in ACTIVATIONS:
            raise MedadaptError(f"output activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.precision not in PRECISIONS:
            raise MedadaptError(f"--precision {self.precision!r}: unknown; choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_recipe(cls, recipe, method: str, seed: int = 0, activation: str = "softmax") -> "TrainingConfig":
        """The settings a :class:`~medadapt.engine.recipe.Recipe` gives ``method`` (its learning rate) on a
        model with the given output ``activation``."""
        return cls(epochs=recipe.epochs, iterations_per_epoch=recipe.iterations_per_epoch,
                   initial_lr=recipe.lr_for(method), seed=seed, grad_clip=recipe.grad_clip,
                   optimizer=copy.deepcopy(recipe.optimizer), schedule=copy.deepcopy(recipe.schedule),
                   loss=copy.deepcopy(recipe.loss), recipe=recipe.name, activation=activation)

    def lr_at(self, epoch: int) -> float:
        return self.initial_lr * lr_factor(self.schedule, epoch, self.epochs)

    def to_dict(self) -> dict:
        """The settings as data; ``precision`` only when it is not fp32, so that the records (run identities,
        checkpoints) of fp32 runs are those written before mixed precision existed."""
        data = dataclasses.asdict(self)
        if data["precision"] == "fp32":
            del data["precision"]
        return data


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the steps (``--precision``, ``--workers``, ``--compile``); see the module docstring.

    ``precision``: auto (fp16 + GradScaler on CUDA, fp32 on the CPU), fp32, fp16 or bf16. ``workers``: processes
    that draw batches in the background (0: the training process draws them). ``compile``: False, True (torch's
    default backend, inductor) or a ``torch.compile`` backend name."""

    precision: str = "auto"
    workers: int = 0
    compile: bool | str = False

    def __post_init__(self) -> None:
        resolve_precision(self.precision, "cpu")  # validates the name
        check_workers(self.workers)

    def configure(self, config: TrainingConfig, device: str | torch.device | None = None) -> TrainingConfig:
        """``config`` with this precision, resolved for ``device`` (default: this process's device)."""
        device = device if device is not None else dist_utils.default_device()
        return dataclasses.replace(config, precision=resolve_precision(self.precision, device))


class Trainer:
    """Train ``model`` with ``strategy`` on batches from ``sampler`` (an object with ``sample(rng)``)."""

    def __init__(self, model: nn.Module, strategy: TrainingStrategy, sampler, config: TrainingConfig,
                 checkpoint_dir: str | Path, loss: LossTerm | None = None,
                 loss_terms: Sequence[LossTerm] = (), progress: bool = True, description: str = "train",
                 device: str | torch.device | None = None, engine: EngineOptions | None = None,
                 scaler=None, epoch_hooks: Sequence = (), stop_when=None):
        self.device = torch.device(device) if device is not None else dist_utils.default_device()
        # the precision is config.precision (EngineOptions.configure put it there); the engine options give the
        # workers and the compilation
        self.engine = engine or EngineOptions()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training: fixed patch sizes, tuned kernels
        self.model = model.to(self.device)  # in place: strategies keep their references to the parameters
        # what forward/backward runs through: the model itself, or its DDP wrapper under torchrun
        self.train_model = model
        if dist_utils.is_distributed():
            # find_unused_parameters: nnU-Net's lowest deep-supervision output has loss weight 0
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.calibration_model = self.train_model  # SGST's one-time pass: fp32, not compiled
        if self.engine.compile:
            backend = self.engine.compile if isinstance(self.engine.compile, str) else "inductor"
            self.train_model = torch.compile(self.train_model, backend=backend)
        if config.precision == "auto":
            config = dataclasses.replace(config, precision=resolve_precision("auto", self.device))
        #: autocast and loss scaling (``scaler``: a GradScaler to use instead of the precision's default)
        self.precision = MixedPrecision(config.precision, self.device, scaler=scaler)
        self.strategy = strategy
        self.sampler = sampler
        self.config = config
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT
        self.loss = loss or build_loss(config.loss, config.activation)  # a loss term: (model, batch, outputs) -> tensor
        self.loss_terms = list(loss_terms)
        #: objects with ``on_epoch_end(optimizer, epoch, epochs) -> {name: value} | None``, called after each
        #: epoch's iterations and before its checkpoint (e.g. FSEFT's transductive step, which its authors' code
        #: takes once per epoch); what they return is appended to the history as ``[epoch, value]``
        self.epoch_hooks = list(epoch_hooks)
        #: ``stop_when(history) -> bool``, asked after each epoch: True ends the run there (a stage trained "until
        #: convergence" up to its budget, the ceiling); the epoch is recorded as ``history["stopped_at"]`` and
        #: checkpointed, so a resumed run that had stopped stays stopped
        self.stop_when = stop_when
        self.progress = progress
        self.description = description
        self.optimizer = build_optimizer(config.optimizer, strategy.parameters(model), config.initial_lr)
        strategy.attach(self.optimizer)
        self.history: dict[str, list] = {"epoch_loss": [], "iteration_loss": [], "lr": [],
                                         "iteration_seconds": [], "sampling_seconds": [], "skipped_steps": []}
        self.start_epoch = 0

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save(self, epoch_done: int) -> None:
        if not dist_utils.is_main():
            dist_utils.barrier()
            return
        atomic_torch_save(self.checkpoint_path, {
            "epoch_done": epoch_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "precision": self.precision.state_dict(),
            "history": self.history,
            "config": self.config.to_dict(),
        })
        dist_utils.barrier()

    def _load(self) -> None:
        from medadapt.utils import checkpoints

        ckpt = checkpoints.load(self.checkpoint_path, "training checkpoint")
        if ckpt["config"] != self.config.to_dict():
            raise MedadaptError(
                f"{self.checkpoint_path}: was written with other training settings "
                f"({ckpt['config']}); resume with the same options or use a new --out folder")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.strategy.load_state_dict(ckpt["strategy"])
        if "precision" in ckpt:
            self.precision.load_state_dict(ckpt["precision"])
        self.history = ckpt["history"]
        self.history.setdefault("skipped_steps", [])
        self.start_epoch = ckpt["epoch_done"]

    # -- training ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, until: int | None = None) -> dict[str, list]:
        """Train to the end of the budget (``until``: to that epoch only, checkpointed there, e.g. the epochs
        several runs share before they part)."""
        if self.checkpoint_path.exists():
            if not resume:
                raise MedadaptError(
                    f"{self.checkpoint_path.parent}: holds an unfinished or finished run; pass --resume to "
                    "continue it or choose another --out folder")
            self._load()
        elif self.strategy.needs_calibration:
            self._calibrate()
        cfg = self.config
        stop = cfg.epochs if until is None else max(self.start_epoch, min(int(until), cfg.epochs))
        if self.history.get("stopped_at") is not None:
            stop = self.start_epoch  # it stopped before its budget: nothing left to train
        self.model.train()
        total = (stop - self.start_epoch) * cfg.iterations_per_epoch
        bar = tqdm(total=total, desc=self.description, disable=not (self.progress and dist_utils.is_main()),
                   unit="it", leave=False,
                   dynamic_ncols=True)
        ipe = cfg.iterations_per_epoch
        batches = batch_stream(self.sampler, cfg.seed, ipe, self.start_epoch * ipe, stop * ipe,
                               workers=self.engine.workers,
                               rank=dist_utils.rank() if dist_utils.is_distributed() else None,
                               pin_memory=self.device.type == "cuda")
        try:
            for epoch in range(self.start_epoch, stop):
                self._run_epoch(epoch, bar, batches)
                done = self.stop_when is not None and epoch + 1 < cfg.epochs and bool(self.stop_when(self.history))
                if done:
                    self.history["stopped_at"] = epoch + 1
                self._save(epoch + 1)
                if done:
                    break
        finally:
            bar.close()
            del batches  # stops the workers
        return self.history

    def _calibrate(self) -> None:
        """The strategy's one-time look at the training data (SGST), defined once for both training loops by
        :func:`medadapt.data.sampling.calibration_plan`: one unaugmented patch per training case, centred on a
        foreground voxel picked by the calibration's own seeded stream (training randomness is untouched; every
        rank computes the same batches), in batches of the training batch size, in train mode, fp32."""
        from medadapt.data.sampling import calibration_batches

        self.model.train()
        if getattr(self.sampler, "cases", None) is not None:
            batches = calibration_batches(self.sampler, self.config.seed)
        else:  # a sampler that does not expose its cases (test stand-ins): one batch of its own, own stream
            batches = [self.sampler.sample(seeds.numpy_rng(self.config.seed, "calibration"))]

        def loss_fn(model, batch):
            batch = self._to_device(batch)
            return self.loss(model, batch, model(batch["image"]))

        self.strategy.calibrate(self.calibration_model, loss_fn, batches)

    def _stream(self, key: int) -> list[int]:
        """Seed sequence of the ``epoch`` stream at ``key``, plus the rank when several processes train."""
        return seeds.sequence(self.config.seed, "epoch", key,
                              *([dist_utils.rank()] if dist_utils.is_distributed() else []))

    def _run_epoch(self, epoch: int, bar, batches) -> None:
        cfg = self.config
        # torch's own generator (dropout, strategies that draw in their step) restarts from the epoch stream
        rng = np.random.default_rng(self._stream(epoch))
        torch.manual_seed(int(rng.integers(2 ** 62)))
        lr = cfg.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for _ in range(cfg.iterations_per_epoch):
            t0 = time.perf_counter()
            batch = next(batches)  # drawn here (workers=0) or waited for (background workers)
            batch["epoch"], batch["epochs"] = epoch, cfg.epochs  # for loss terms with a schedule of their own
            t1 = time.perf_counter()
            loss = dist_utils.mean_over_ranks(self.train_step(batch))
            t2 = time.perf_counter()
            losses.append(loss)
            self.history["iteration_loss"].append(loss)
            self.history["iteration_seconds"].append(t2 - t1)
            self.history["sampling_seconds"].append(t1 - t0)
            if self.precision.last_step_skipped:
                self.history["skipped_steps"].append(len(self.history["iteration_loss"]) - 1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
        self.history["epoch_loss"].append(float(np.mean(losses)))
        self.history["lr"].append(lr)
        for hook in self.epoch_hooks:
            for key, value in (hook.on_epoch_end(self.optimizer, epoch, cfg.epochs) or {}).items():
                self.history.setdefault(key, []).append([epoch, value])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch: dict) -> float:
        """One iteration, as the strategy takes it (by default forward, loss, backward, clip, step; see
        :meth:`medadapt.engine.strategy.TrainingStrategy.train_step`). Returns the loss value."""
        ctx = StepContext(model=self.model, forward=self.train_model, optimizer=self.optimizer, loss=self.loss,
                          loss_terms=self.loss_terms, grad_clip=self.config.grad_clip, precision=self.precision)
        loss = self.strategy.train_step(ctx, self._to_device(batch))
        self.precision.update()
        value = float(loss)  # the iteration's one host synchronisation
        if not math.isfinite(value) and self.precision.scaler is None:
            # with a gradient scaler a non-finite loss is a skipped step (its gradients are not finite), as in
            # nnU-Net's and torch.amp's loops; without one it would have put NaNs into the weights
            raise FloatingPointError(f"non-finite loss {value} (learning rate too high?)")
        return value

    def summary(self) -> dict[str, float]:
        it = self.history["iteration_seconds"]
        return {
            "median_iteration_seconds": statistics.median(it) if it else float("nan"),
            "median_sampling_seconds": statistics.median(self.history["sampling_seconds"]) if it else float("nan"),
            # the share of the loop's time spent drawing or waiting for batches
            "data_wait_share": (sum(self.history["sampling_seconds"]) / (sum(self.history["sampling_seconds"])
                                                                          + sum(it))) if it else float("nan"),
            "final_epoch_loss": self.history["epoch_loss"][-1] if self.history["epoch_loss"] else float("nan"),
        }
