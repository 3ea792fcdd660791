"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): the semi-supervised baseline that uses unlabelled slices.

The teacher is an exponential moving average of the student's weights; on unlabelled slices the student's softmax
is pulled towards the teacher's (mean squared error), each seeing its own Gaussian input noise, with a weight that
ramps up as exp(-5 (1 - t)^2) over the first quarter of training (the paper's sigmoid ramp-up). The teacher is the
model that is validated and kept; under torchrun it is updated alike on every rank from the DDP-synced student.
Hand-written: MONAI has no Mean Teacher trainer for 2D segmentation.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from labelfactory import distributed

NOISE_STD = 0.1  # input noise of each view, in the [-1, 1] image range


class MeanTeacher:
    """The EMA teacher of `student` and the consistency term of one step."""

    def __init__(self, student: nn.Module, weight: float, decay: float, steps: int):
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight, self.decay, self.rampup = weight, decay, max(1, steps // 4)

    def ramp(self, step: int) -> float:
        """The consistency weight at `step` (0-based)."""
        t = min(1.0, step / self.rampup)
        return self.weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def views(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(student view, teacher view) of unlabelled images (B, 1, S, S): independent Gaussian noise, seeded."""
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((2, *x.shape), generator=g).to(x.device) * NOISE_STD
        return x + noise[0], x + noise[1]

    def consistency(self, student_logits: torch.Tensor, teacher_view: torch.Tensor, step: int) -> torch.Tensor:
        """Ramped MSE between the student's (B, C, S, S) softmax and the teacher's on its view; a scalar."""
        with torch.no_grad():
            target = self.model(teacher_view).float().softmax(1)
        return self.ramp(step) * (student_logits.float().softmax(1) - target).pow(2).mean()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """teacher <- a teacher + (1 - a) student, a = min(1 - 1 / (step + 1), decay); buffers copied. Under DDP the
        student's weights are equal on every rank but its BatchNorm statistics are each rank's own: the teacher takes
        rank 0's (those DDP broadcasts to the student at its next forward), so it is the same on every rank."""
        a = min(1.0 - 1.0 / (step + 1), self.decay)
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)
        distributed.broadcast_buffers(self.model)
