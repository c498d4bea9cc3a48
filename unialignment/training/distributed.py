"""Distributed setup in one place: which process this is, its device, and the process group.

The launchers (torchrun, the deepspeed launcher) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain `python scripts/train.py` is a world of one. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: float = 120) -> DistributedContext:
    """Join (or, alone, create) the process group; every rank calls this once, first. `timeout_minutes` bounds how
    long a collective waits for a rank: long enough for rank 0 to index a large dataset while the others wait at
    the barrier (`scripts/index_data.py` builds the indexes before the job, so it need not)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, device)


def all_reduce_sum(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum scalars over ranks in one collective, so rank 0 logs global values rather than its own. Values may be
    Python numbers or 0-d device tensors; either way they are read once, together, at the end."""
    if not values:
        return {}
    names = sorted(values)
    tensor = torch.stack([torch.as_tensor(values[name], dtype=torch.float64, device=device) for name in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return dict(zip(names, tensor.tolist(), strict=True))
