"""Mixed precision for training steps: autocast, and a gradient scaler where the format needs one.

``--precision`` takes ``auto`` (nnU-Net's choice: fp16 autocast with a ``GradScaler`` on CUDA, fp32 on the
CPU), ``fp32``, ``fp16`` (autocast to float16 + ``GradScaler``) or ``bf16`` (autocast to bfloat16; its
exponent range is fp32's, so no scaler, as is usual). A run records the resolved name (never ``auto``) in its
training settings, so a run is resumed in the precision it was started in.

A training step uses :class:`MixedPrecision` the way ``torch.amp``'s recipe does, in four calls, so that every
strategy stays exact:

* :meth:`~MixedPrecision.autocast` around the forward pass and the loss;
* :meth:`~MixedPrecision.backward` (or :meth:`~MixedPrecision.grad` for ``autograd.grad``) on the scaled loss;
* :meth:`~MixedPrecision.step`: unscale the gradients in place, clip them (so clipping sees the true norm),
  then ``optimizer.step()`` -- unless the gradients hold an inf/NaN, in which case the scaler skips the step.
  The optimizer's step pre/post hooks (the sparse strategies' selection and masks) therefore always see
  unscaled gradients, and a skipped step runs no hook at all: weights, masks, optimizer state and a
  strategy's own state (DRST's generator, SGST's selection) are left exactly as they were;
* :meth:`~MixedPrecision.update` once per iteration, after every optimizer of the step (the engine calls it),
  which lowers the scale after a skipped step and raises it after a run of good ones.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import torch

from medadapt.errors import MedadaptError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: str | torch.device) -> str:
    """The concrete precision ``name`` means on ``device``: ``auto`` is fp16 on CUDA (as nnU-Net) and fp32
    elsewhere."""
    if name not in PRECISIONS:
        raise MedadaptError(f"--precision {name!r}: unknown; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return name


class MixedPrecision:
    """Autocast and loss scaling for one training run on ``device`` (see the module docstring).

    ``scaler``: a ``torch.amp.GradScaler`` (or an object with its interface) to use instead of the default,
    which is a GradScaler for fp16 and none otherwise (tests pass one to exercise skipped steps under bf16).
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu", scaler: Any = None):
        device = torch.device(device)
        self.precision = resolve_precision(precision, device)
        self.device_type = device.type
        self.dtype = _DTYPES[self.precision]
        if scaler is None and self.precision == "fp16":
            scaler = torch.amp.GradScaler(self.device_type)
        self.scaler = scaler
        self._stepped = False
        #: whether the last :meth:`step` call left the optimizer unstepped (inf/NaN gradients)
        self.last_step_skipped = False

    def autocast(self):
        """The context for the forward pass and the loss (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs) -> tuple:
        """``torch.autograd.grad`` of the (scaled) loss: assign the result to ``.grad`` and call :meth:`step`,
        which unscales it."""
        return torch.autograd.grad(self.scale(loss), inputs, **kwargs)

    def step(self, optimizer: torch.optim.Optimizer, clip_parameters: Iterable[torch.Tensor] | None = None,
             grad_clip: float | None = None) -> None:
        """Unscale ``optimizer``'s gradients, clip ``clip_parameters`` to norm ``grad_clip`` (if given), step;
        :attr:`last_step_skipped` says whether the scaler skipped the step (inf/NaN gradients)."""
        self._stepped = True
        if self.scaler is None:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(clip_parameters), grad_clip)
            optimizer.step()
            self.last_step_skipped = False
            return
        self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(clip_parameters), grad_clip)
        stepped = [False]

        def mark(*_):
            stepped[0] = True

        handle = optimizer.register_step_post_hook(mark)
        try:
            self.scaler.step(optimizer)
        finally:
            handle.remove()
        self.last_step_skipped = not stepped[0]

    def update(self) -> None:
        """Once per iteration, after the step's optimizers: adjust the loss scale."""
        if self.scaler is not None and self._stepped:
            self.scaler.update()
        self._stepped = False

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
