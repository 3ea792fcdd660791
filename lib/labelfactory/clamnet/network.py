"""The ClamNet pair: two identical 2D UNet++ (MONAI `BasicUNetPlusPlus`, 5 levels) trained side by side.

Each network maps (B, 1, S, S) slices in [-1, 1] to (B, 2, S, S) logits: channel 0 'no marker',
channel 1 'marker'. MONAI's forward always returns a list of heads (one, or four with deep
supervision, shallowest first); `MarkerUNet` keeps that list while training (every head gets the
loss) and returns only the chosen head at inference. `head` picks the UNet++ depth (1-4), the
pruning the UNet++ paper describes; the deepest head is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNetPlusPlus
from torch import nn

MARKER = 1  # output channel holding the marker probability


class MarkerUNet(nn.Module):
    """One UNet++: training -> list of (B, 2, S, S) logits per head; eval -> the `head`-th logits only."""

    def __init__(
        self, features: Sequence[int] = (32, 32, 64, 128, 256, 32), deep_supervision: bool = False, head: int = 4
    ):
        super().__init__()
        if not 1 <= head <= 4 or (not deep_supervision and head != 4):
            raise ValueError(f"head must be 1-4 with deep supervision (4 without), got {head}")
        self.net = BasicUNetPlusPlus(
            spatial_dims=2, in_channels=1, out_channels=2, features=tuple(features), deep_supervision=deep_supervision
        )
        self.deep_supervision = deep_supervision
        self.head = head

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        heads = self.net(x)
        if self.training:
            return heads
        return heads[self.head - 1] if self.deep_supervision else heads[-1]


class ClamNetPair(nn.Module):
    """Two identical UNet++ (`a`, `b`), independently initialised; inference averages their marker maps."""

    def __init__(
        self, features: Sequence[int] = (32, 32, 64, 128, 256, 32), deep_supervision: bool = False, head: int = 4
    ):
        super().__init__()
        self.a = MarkerUNet(features, deep_supervision, head)
        self.b = MarkerUNet(features, deep_supervision, head)

    @torch.no_grad()
    def marker_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) slices -> (B, S, S) marker probability in [0, 1], mean of both networks."""
        was = self.training
        self.eval()
        p = 0.5 * (self.a(x).softmax(1)[:, MARKER] + self.b(x).softmax(1)[:, MARKER])
        self.train(was)
        return p
