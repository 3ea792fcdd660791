"""torch.distributed glue for `torchrun` launches: one process per GPU (NCCL) or per CPU worker (gloo).

Single-process runs need no launcher: every helper degrades to rank 0 of a world of 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (in place when distributed); returns `t`."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place when distributed); returns `t`."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) copied into `module` on every rank; no-op in one process."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)


@contextmanager
def process_group_cleanup():
    """Destroy the process group on exit (also on error) so torchrun workers end cleanly."""
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
