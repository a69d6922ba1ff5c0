"""torch.distributed glue: who am I, which device, sums across ranks, and wrapping for data parallelism."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (a no-op on one process); returns it on its original device."""
        if not self.distributed:
            return tensor
        original = tensor.device
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(original)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed() -> DistEnv:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(dist.get_rank(), world_size, local_rank, device)


def shutdown(env: DistEnv) -> None:
    """Leave the process group cleanly (a barrier first avoids an abort at exit seen under gloo)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
