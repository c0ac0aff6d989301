"""Joint multi-task training as a strategy: one shared network, a head set per task, each batch from one task.

The model is a :class:`medadapt.models.multihead.TaskHeads`; every batch carries the index of the task it
was drawn from (``batch["task"]``, :class:`medadapt.data.sampling.TaskMixSampler`), and the step activates that
task's heads before the usual forward / loss / backward / step. The shared encoder and decoder learn from every
task; a task's heads only from its own batches (the others get no gradient, so optimisers that skip parameters
without one, as torch's do, leave them as they are). MedSeqFT's "all tasks at once" reference.
"""
from __future__ import annotations

from typing import Any

import torch

from medadapt.tuning.base import StepContext, Strategy, default_train_step


class JointTraining(Strategy):
    name = "joint"
    summary = "every parameter, all tasks at once: shared network, one head per task"
    options = ()

    def train_step(self, ctx: StepContext, batch: dict) -> torch.Tensor:
        task = batch["task"]
        ctx.model.activate(int(task.item() if torch.is_tensor(task) else task))
        return default_train_step(ctx, batch)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}
