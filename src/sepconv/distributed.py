"""Data-parallel training under ``torchrun``: process-group setup, reductions, and who writes files.

``torchrun --nproc_per_node=N`` starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous address in their environment; :func:`init_distributed` reads them and joins the
group (``gloo`` on CPU, ``nccl`` on CUDA). Without torchrun (or with one process) nothing is started
and every helper here is a no-op, so the same training code runs both ways.

>>> info = init_distributed("cpu")  # not under torchrun: a single process
>>> info.world_size, info.is_main, all_reduce_sums([2.0, 3.0])
(1, True, [2.0, 3.0])
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_sums", "broadcast_buffers", "init_distributed", "is_distributed", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global ``rank`` of ``world_size``, and its ``local_rank`` on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (``gloo`` on CPU, ``nccl`` on CUDA).

    Returns ``DistInfo()`` (rank 0 of 1) when not launched by torchrun with ``WORLD_SIZE`` > 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sums(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum each value over all processes (float64); the values themselves when not distributed."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics), so all replicas hold one state.

    DistributedDataParallel keeps the parameters equal; buffers are only synced at the start of each
    forward pass, so after the last step of an epoch each replica holds its own running statistics.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
