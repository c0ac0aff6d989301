"""One shared network with a set of segmentation heads per task (joint multi-task training).

:class:`TaskHeads` wraps a network; each of its head slots (``model_parts(network).heads``: one per deep
supervision resolution) is replaced by a parameter-free :class:`HeadSwitch` that runs the *active* task's head.
So the state dict holds the shared encoder and decoder once and every task's heads under ``task_heads.<t>``
(whichever task is active), a checkpoint restores exactly, and :meth:`TaskHeads.task_network` gives task t's
plain network (its own head modules back in the slots, the original state-dict keys).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import ModelParts, model_parts


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise MedadaptError("the segmentation head is not a submodule of the network")


def _set_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


class HeadSwitch(nn.Module):
    """Runs head ``slot`` of the owner's active task; owns no parameters."""

    def __init__(self, owner: "TaskHeads", slot: int):
        super().__init__()
        self._owner = [owner]  # a list: not registered as a submodule (no cycle in the module tree)
        self.slot = slot

    def __deepcopy__(self, memo):
        # copied with its TaskHeads: point at the copy; copied alone (task_network): at the same owner
        return HeadSwitch(memo.get(id(self._owner[0]), self._owner[0]), self.slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        return owner.task_heads[owner.active][self.slot](x)


class TaskHeads(nn.Module):
    """``network`` with one head set per task: ``heads[t]`` are task t's head modules, one per slot, in the
    order of ``model_parts(network).heads``. :meth:`activate` selects the task the forward pass predicts."""

    def __init__(self, network: nn.Module, heads: Sequence[Sequence[nn.Module]]):
        super().__init__()
        slots = model_parts(network).heads
        if any(len(h) != len(slots) for h in heads):
            raise ValueError(f"each task needs {len(slots)} head modules (one per head slot)")
        self.network = network
        self.task_heads = nn.ModuleList([nn.ModuleList(h) for h in heads])
        self.active = 0
        for slot, head in enumerate(slots):
            parent, name = _parent_of(network, head)
            _set_child(parent, name, HeadSwitch(self, slot))

    def activate(self, task: int) -> None:
        if not 0 <= task < len(self.task_heads):
            raise IndexError(f"task {task} of {len(self.task_heads)}")
        self.active = int(task)

    def forward(self, x: torch.Tensor):
        return self.network(x)

    def medadapt_parts(self) -> ModelParts:
        parts = model_parts(self.network)
        return ModelParts(encoder=parts.encoder, decoder=parts.decoder,
                          heads=[h for task in self.task_heads for h in task], last_stage=parts.last_stage,
                          adapter_sites=parts.adapter_sites, extra_biases=parts.extra_biases)

    def task_network(self, task: int) -> nn.Module:
        """Task ``task``'s plain network: a copy of the shared network with that task's heads in its slots."""
        net = copy.deepcopy(self.network)
        switches = [m for m in net.modules() if isinstance(m, HeadSwitch)]
        for switch in switches:
            parent, name = _parent_of(net, switch)
            _set_child(parent, name, copy.deepcopy(self.task_heads[task][switch.slot]))
        return net
