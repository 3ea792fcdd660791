"""The ClamNet pair: two identical 2D UNet++ (MONAI `BasicUNetPlusPlus`, 5 levels) trained side by side.

Each network is the project's UNet++ (`labelfactory.segmentation.networks.UNetPlusPlus`) with two
classes: (B, 1, S, S) slices in [-1, 1] -> (B, 2, S, S) logits, channel 0 'no marker', channel 1
'marker'. Training: the list of heads (every head gets the loss); inference: the chosen `head`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from labelfactory.segmentation.networks import UNetPlusPlus

MARKER = 1  # output channel holding the marker probability


class ClamNetPair(nn.Module):
    """Two identical UNet++ (`a`, `b`), independently initialised; inference averages their marker maps."""

    def __init__(
        self, features: Sequence[int] = (32, 32, 64, 128, 256, 32), deep_supervision: bool = False, head: int = 4
    ):
        super().__init__()
        self.a = UNetPlusPlus(2, features, deep_supervision, head)
        self.b = UNetPlusPlus(2, features, deep_supervision, head)

    @torch.no_grad()
    def marker_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) slices -> (B, S, S) marker probability in [0, 1], mean of both networks."""
        was = self.training
        self.eval()
        p = 0.5 * (self.a(x).softmax(1)[:, MARKER] + self.b(x).softmax(1)[:, MARKER])
        self.train(was)
        return p
