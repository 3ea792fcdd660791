"""One rank of tests/test_multigpu.py's Mean Teacher check, in a module of its own: a spawned rank imports only this
(not the test module's server and task imports)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from labelfactory.segmentation.mean_teacher import MeanTeacher


def teacher_on_rank(rank: int, port: int, out: str) -> None:
    """One gloo rank of two: a student with this rank's own BatchNorm statistics, one teacher update, both saved."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        teacher = MeanTeacher(student, 1.0, 0.9, 4)
        student.train()(torch.randn(8, 3) + rank)  # this rank's share of a batch: its own running statistics
        teacher.update(student, 1)
        torch.save({"teacher": teacher.model.state_dict(), "student": student.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
