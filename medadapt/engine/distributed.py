"""Multi-process training with ``torchrun``: DistributedDataParallel over gloo (CPU) or NCCL (GPU).

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env`
joins the process group when they are there and does nothing otherwise, so the same code runs in one process.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the torchrun process group if launched by torchrun (idempotent). Returns whether distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def default_device() -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block on rank 0 first (e.g. to fill a cache), then on the other ranks."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is a sum over ranks too: every rank's loss depends on the sum, so the
    gradient for a rank's own term is the sum of all ranks' gradients for the total."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over ranks (identity in one process)."""
    return _AllReduceSum.apply(t) if is_distributed() else t


def mean_over_ranks(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()
