"""Encoder knowledge distillation as strategies: MedSeqFT's K&G RFT (Ye et al., Sec. III-D).

Two training stages of a sequential fine-tuning step are strategies here, so the engine runs them like any
method and names neither:

* :class:`KDFineTuning` ("KD-based FFT"): full fine-tuning on the task's data with the recipe's segmentation
  loss, plus an MSE distillation loss between the trainable encoder's outputs and a frozen teacher encoder's
  (the previous task's, E_{t-1}) on *buffer* samples (earlier tasks' cases). The paper: "both losses are
  computed independently to avoid optimization conflicts, with each updating only its corresponding
  parameters". Implemented exactly so, and recorded in docs/methods.md:

  - the segmentation loss updates every trainable parameter (encoder, decoder, head) through the engine's
    optimiser, with the recipe's clipping;
  - the distillation loss updates the encoder only, through an optimiser of its own (same class and learning
    rate as the engine's, following its schedule; no weight decay, so the encoder is not decayed twice per
    step), with the same clipping applied to the distillation gradient alone;
  - both gradients are taken at the same weights (the distillation gradient first, by ``autograd.grad``,
    which leaves ``.grad`` untouched), then the two steps are applied one after the other. Adam-type
    optimisers thus normalise each loss's gradient by its own moments: neither loss's scale drowns the other,
    which is what "independently" buys over summing the two losses.

* :class:`EncoderLoRADistillation` ("LoRA-based KD" and "Reparameterization"): a copy of E_{t-1} gets LoRA
  (rank 2 in the paper, W' = W + BA, i.e. alpha = rank) on every convolution and Linear layer of its encoder;
  everything else is frozen; the LoRA factors are trained to reproduce a frozen teacher encoder's (E_{t-mid},
  the KD-FFT result) outputs on the task's data (MSE, L_refine); :meth:`finalize` merges them into the weights
  (the plain architecture back). Its training step runs the two encoders only (no decoder forward).

**Readings kept as options** (issue 43's study; docs/methods.md, MedSeqFT's table):

* ``KDFineTuning(mode=...)``: ``separate`` (the default above); ``joint``, one optimiser on L_seg + λ·L_kd (the
  reading where "independently" means only that the losses are computed on different batches); ``capped``, the
  separate steps with the distillation step scaled down, per iteration, to at most the length of the
  segmentation step on the encoder (Adam normalises each loss's gradient, so a separate KD step is lr-sized
  however small L_kd is: capped, it can follow the task but not outweigh it).
* ``EncoderLoRADistillation(norm=...)``: ``keep`` (the default: only the LoRA factors train; the merged encoder
  keeps E_{t-1}'s norm γ/β); ``train``, the encoder's norm affine parameters train with the factors (a conv's
  weight cannot reproduce a change of the following InstanceNorm's γ/β: the norm removes any per-channel scale
  and shift of its input); ``copy``, the student takes E_{t-mid}'s norm parameters before the distillation.

The encoders' "outputs" are every feature map the encoder hands the decoder
(:func:`medadapt.models.parts.encoder_features`); the distillation loss is the mean over those maps of each
map's mean squared error (each scale counts equally, whatever its voxel count).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.lora import inject_lora, lora_parameters
from medadapt.models.parts import encoder_features, encoder_parameters, is_norm, model_parts
from medadapt.tuning.base import StepContext, Strategy, default_train_step
from medadapt.tuning.lowrank import LoRA
from medadapt.utils import seeds


def feature_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the feature maps of each map's mean squared error."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student feature maps against {len(teacher)} teacher maps")
    # in fp32 whatever the autocast: squared differences of fp16 features can overflow
    return torch.stack([torch.mean((s.float() - t.detach().float()) ** 2) for s, t in zip(student, teacher)]).mean()


#: the readings of "both losses are computed independently ... each updating only its corresponding parameters"
KD_FFT_MODES = ("separate", "joint", "capped")
#: what the LoRA-based KD does with the encoder's normalisation parameters
KD_NORMS = ("keep", "train", "copy")


def encoder_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters (γ, β) of the encoder's normalisation layers, in module order."""
    return [p for m in model_parts(model).encoder.modules() if is_norm(m) for p in m.parameters(recurse=False)]


def copy_encoder_norms(source: nn.Module, target: nn.Module) -> None:
    """``target``'s encoder norm parameters := ``source``'s (the same architecture)."""
    with torch.no_grad():
        for dst, src in zip(encoder_norm_parameters(target), encoder_norm_parameters(source), strict=True):
            dst.copy_(src)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no trainable parameter (a teacher)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class FeatureDistillation:
    """Loss term ``(model, batch, outputs)``: MSE between ``model``'s encoder outputs on ``batch["image"]``
    and the frozen ``teacher``'s (a network with the same encoder architecture). ``outputs`` are not used: the
    term runs the student's encoder itself."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def __call__(self, model: nn.Module, batch: dict, outputs: Any = None) -> torch.Tensor:
        image = batch["image"]
        with torch.no_grad():
            target = encoder_features(self.teacher, image)
        return feature_mse(encoder_features(model, image), target)


class KDFineTuning(Strategy):
    """Full fine-tuning with encoder distillation towards ``teacher`` on batches from ``buffer`` (a sampler
    with ``sample(rng)``; None or empty: plain full fine-tuning), each loss stepping its own parameters (module
    docstring). ``seed`` seeds the buffer's batch draws: iteration i of a run draws from (seed, i), so a resumed
    run sees the same buffer batches."""

    name = "kd-fft"
    summary = "full fine-tuning + encoder distillation on buffer samples (MedSeqFT's KD-based FFT)"
    options = ()

    def __init__(self, teacher: nn.Module, buffer=None, seed: int = 0, mode: str = "separate",
                 weight: float = 1.0):
        if mode not in KD_FFT_MODES:
            raise MedadaptError(f"--kd-fft {mode!r}: choose one of {', '.join(KD_FFT_MODES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise MedadaptError(f"--kd-weight {weight!r}: must be a positive number (λ of L_seg + λ·L_kd)")
        self.teacher = teacher
        self.buffer = buffer
        self.seed = int(seed)
        self.mode = mode
        self.weight = float(weight)
        self.step = 0
        self.kd_optimizer: torch.optim.Optimizer | None = None
        self._kd_state: dict | None = None
        self.last_kd_loss: torch.Tensor | None = None  #: the latest step's distillation loss (detached), for inspection
        self._params: tuple[int, list[nn.Parameter]] | None = None  # (id of the model, its trainable encoder params)
        self._teacher_on: torch.device | None = None  # the device the teacher was last moved to

    def _encoder_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's trainable encoder parameters, listed once per model (a step asks three times; which
        parameters train does not change during training)."""
        if self._params is None or self._params[0] != id(model):
            self._params = (id(model), [p for p in encoder_parameters(model) if p.requires_grad])
        return self._params[1]

    def _teacher(self, device) -> nn.Module:
        """The teacher on ``device``, moved there once (``Module.to`` walks every parameter even when they are
        already there: a few percent of a step on a small network)."""
        device = torch.device(device)
        if self._teacher_on != device:
            self.teacher.to(device)
            self._teacher_on = device
        return self.teacher

    def _make_kd_optimizer(self, ctx: StepContext) -> torch.optim.Optimizer:
        # the defaults the optimiser's constructor takes (torch's AdamW records decoupled_weight_decay, which its
        # constructor does not accept)
        accepted = inspect.signature(type(ctx.optimizer).__init__).parameters
        defaults = {k: v for k, v in ctx.optimizer.defaults.items() if k in accepted}
        if "weight_decay" in defaults:
            defaults["weight_decay"] = 0.0
        opt = type(ctx.optimizer)(self._encoder_params(ctx.model), **defaults)
        if self._kd_state is not None:
            opt.load_state_dict(self._kd_state)
            self._kd_state = None
        return opt

    def _buffer_kd(self, ctx: StepContext, device) -> torch.Tensor:
        """This iteration's distillation loss on a buffer batch (drawn from (seed, step))."""
        rng = seeds.numpy_rng(self.seed, "kd-buffer", self.step)
        image = self.buffer.sample(rng)["image"].to(device, non_blocking=True)
        return FeatureDistillation(self._teacher(device))(ctx.model, {"image": image})

    def _joint_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        """One optimiser on L_seg + λ·L_kd (the engine's step with the distillation as an extra loss term)."""
        weight = self.weight

        def kd_term(model, _batch, _outputs):
            kd = self._buffer_kd(ctx, batch["image"].device)
            self.last_kd_loss = kd.detach()
            return weight * kd

        loss = default_train_step(dataclasses.replace(ctx, loss_terms=[*ctx.loss_terms, kd_term]), batch)
        self.step += 1
        return loss

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        device = batch["image"].device
        if self.buffer is not None and self.mode == "joint":
            return self._joint_step(ctx, batch)
        kd_grads = None
        amp = ctx.precision
        if self.buffer is not None:
            enc = self._encoder_params(ctx.model)
            with amp.autocast():
                kd = self._buffer_kd(ctx, device)
            kd_grads = amp.grad(kd, enc, allow_unused=True)  # of the scaled loss; amp.step unscales them
            self.last_kd_loss = kd.detach()
        capped = kd_grads is not None and self.mode == "capped"
        if capped:
            before = [p.detach().clone() for p in self._encoder_params(ctx.model)]
        # the segmentation loss: every trainable parameter, the engine's optimiser (the default step)
        loss = default_train_step(ctx, batch)
        if capped:
            after_seg = [p.detach().clone() for p in self._encoder_params(ctx.model)]
        # the distillation loss: the encoder only, its own optimiser, the gradient taken before the step above
        if kd_grads is not None:
            if self.kd_optimizer is None:
                self.kd_optimizer = self._make_kd_optimizer(ctx)
            for group in self.kd_optimizer.param_groups:
                group["lr"] = ctx.optimizer.param_groups[0]["lr"]
            for p, g in zip(self._encoder_params(ctx.model), kd_grads):
                p.grad = None if g is None else g.detach()
            # unscale, clip the distillation gradient alone, step (or skip on inf/NaN, independently of the
            # segmentation step: each optimiser's gradients are checked on their own)
            amp.step(self.kd_optimizer, self._encoder_params(ctx.model), ctx.grad_clip)
            self.kd_optimizer.zero_grad(set_to_none=True)
            if capped:
                self._cap(self._encoder_params(ctx.model), before, after_seg)
        self.step += 1
        return loss

    @staticmethod
    @torch.no_grad()
    def _cap(params: list[nn.Parameter], before: list[torch.Tensor], after_seg: list[torch.Tensor]) -> None:
        """Scale the distillation step (params - after_seg) down to at most the segmentation step's length
        (after_seg - before), over the encoder's parameters together."""
        seg = torch.sqrt(sum(((a - b).float() ** 2).sum() for a, b in zip(after_seg, before)))
        kd = torch.sqrt(sum(((p - a).float() ** 2).sum() for p, a in zip(params, after_seg)))
        if kd > seg:
            scale = (seg / kd).item()
            for p, a in zip(params, after_seg):
                p.copy_(a + (p - a) * scale)

    def config(self) -> dict[str, Any]:
        out = {"name": self.name, "buffer": self.buffer is not None}
        if self.mode != "separate":  # the default is named as it always was
            out["mode"] = self.mode
            if self.mode == "joint":
                out["weight"] = self.weight
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step,
                "kd_optimizer": self.kd_optimizer.state_dict() if self.kd_optimizer is not None else self._kd_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self._kd_state = state.get("kd_optimizer")
        self.kd_optimizer = None


class EncoderLoRADistillation(LoRA):
    """LoRA factors on every conv / Linear layer of the encoder, everything else frozen, trained by the loss
    term the engine is given (a :class:`FeatureDistillation` towards the fine-tuned encoder); merged by
    :meth:`finalize` (as :class:`~medadapt.tuning.lowrank.LoRA`). ``rank`` 2 and ``alpha = rank`` (scale 1:
    W' = W + BA, MedSeqFT's Eq. 1) by default."""

    name = "lora-kd"
    summary = "encoder LoRA (rank r) distilled from a fine-tuned encoder, then merged (MedSeqFT's LoRA-based KD)"
    rank_option = "--kd-rank"

    def __init__(self, rank: int = 2, alpha: float | None = None, norm: str = "keep"):
        if norm not in KD_NORMS:
            raise MedadaptError(f"--kd-norm {norm!r}: choose one of {', '.join(KD_NORMS)}")
        super().__init__(rank=rank, alpha=alpha)
        self.norm = norm

    def check_fits(self, model: nn.Module, where: str = "the foundation") -> None:
        """One line if a layer of ``model``'s encoder is too small for the rank (W is d x k: rank at most
        min(d, k)); :func:`inject_lora` would silently lower it there, and the paper's rank is a setting."""
        from medadapt.models.lora import lora_targets

        for name, module in lora_targets(model_parts(model).encoder):
            rows, cols = module.weight.shape[0], module.weight[0].numel()
            if self.config_.rank > min(rows, cols):
                raise MedadaptError(f"{self.rank_option} {self.config_.rank}: layer {name} of {where}'s encoder has "
                                    f"a {rows} x {cols} weight, so its rank is at most {min(rows, cols)}; use "
                                    f"{self.rank_option} {min(rows, cols)} or less")

    def config(self) -> dict[str, Any]:
        out = super().config()
        if self.norm != "keep":  # the default is named as it always was
            out["norm"] = self.norm
        return out

    def prepare(self, model: nn.Module) -> nn.Module:
        inject_lora(model_parts(model).encoder, self.config_)
        keep = {id(p) for p in lora_parameters(model)}
        if self.norm == "train":  # the encoder's norm γ/β train with the factors (kept as they are by the merge)
            keep |= {id(p) for p in encoder_norm_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        return model

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        """The engine's loss term on the encoders alone (no decoder forward), backward, clip, step."""
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.precision.autocast():
            loss = ctx.loss(ctx.model, batch, None)
        ctx.precision.backward(loss)
        # the clipped parameters are listed only when there is clipping (the listing walks every parameter)
        ctx.precision.step(ctx.optimizer, self.parameters(ctx.model) if ctx.grad_clip is not None else (),
                           ctx.grad_clip)
        return loss.detach()
