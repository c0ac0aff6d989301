"""DistributedDataParallel on 2 CPU processes (gloo): identical ranks, exact DGST masks, = one process."""
import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from medadapt.engine import Trainer, TrainingConfig
from medadapt.models import build_network, preset
from medadapt.tuning import make_strategy

GLOBAL_BATCH, STEPS, GAMMA = 4, 3, 1


class GlobalBatchSlices:
    """Each call: the next global batch of 4 patches (from a counter, not from the rank's rng); a rank gets
    its slice, a single process the whole batch."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.calls = rank, world, 0

    def sample(self, rng):
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        x = torch.randn(GLOBAL_BATCH, 1, 16, 32, 32, generator=g)
        y = (torch.rand(GLOBAL_BATCH, 1, 16, 32, 32, generator=g) > 0.7).long()
        per = GLOBAL_BATCH // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return {"image": x[sl], "label": y[sl]}


def _train(rank: int, world: int, out: str) -> dict:
    torch.manual_seed(0)
    model = build_network(preset("cpu-tiny", 1, 2))
    strategy = make_strategy("dgst", gamma=GAMMA)
    model = strategy.prepare(model)
    cfg = TrainingConfig(epochs=1, iterations_per_epoch=STEPS, initial_lr=1e-2, seed=0)
    Trainer(model, strategy, GlobalBatchSlices(rank, world), cfg, out, progress=False).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from medadapt.engine.distributed import init_from_env

    assert init_from_env()
    state = _train(rank, world, os.path.join(tmp, "ddp"))
    torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:  # every rank holds bit-identical weights
        assert torch.equal(r0[k], r1[k]), k

    single = _train(0, 1, str(tmp_path / "single"))
    torch.manual_seed(0)
    foundation = build_network(preset("cpu-tiny", 1, 2)).state_dict()
    for k, v in single.items():
        assert torch.allclose(r0[k], v, atol=2e-5, rtol=1e-4), (k, float((r0[k] - v).abs().max()))
        if k.endswith("conv.weight") and "seg_layers" not in k:
            # DGST: at most gamma entries per kernel per step moved, the rest bit-identical to the foundation
            changed = (r0[k] != foundation[k]).flatten(1).sum(1)
            assert int(changed.max()) <= GAMMA * STEPS, k
            assert np.array_equal((r0[k] != foundation[k]).numpy(), (v != foundation[k]).numpy()), k
