"""The pixel-classifier ensemble (DatasetGAN's style interpreter) in two forms with the same numbers.

Each member is DatasetGAN's MLP on a pixel's concatenated, upsampled tap features x (sum C_i):
Linear(sum C_i, H1) -> ReLU -> BN -> Linear(H1, H2) -> ReLU -> BN -> Linear(H2, K).

- `PixelEnsemble` (trainable): all M members as batched matmuls on pixel feature rows (M, P, C).
- `FactorizedEnsemble` (inference, from `PixelEnsemble.factorized()`): the first layer is linear
  and so is bilinear upsampling, so W.concat(up(L_i)) = sum_r up(sum_{i at r} W_i L_i). Each
  resolution's taps go through one 1x1 conv (a matmul) at their own resolution, the hidden-width
  result is upsampled once per resolution and summed, the bias added once. Eval-mode BatchNorm is
  folded into the next linear layer; all members run as one matmul per layer, on channels-last
  (pixel-major) tensors. The (sum C_i, R, R) feature map is never built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from labelfactory.interpreter.taps import TapLayout


@dataclass(frozen=True)
class EnsembleConfig:
    """Ensemble shape: tap layout, classes K, members M, hidden widths (H1, H2), init seed."""

    tap_channels: tuple[int, ...]
    tap_resolutions: tuple[int, ...]
    image_resolution: int
    num_classes: int
    members: int = 10
    hidden: tuple[int, int] = (256, 128)
    seed: int = 0

    @property
    def layout(self) -> TapLayout:
        return TapLayout(tuple(self.tap_channels), tuple(self.tap_resolutions), self.image_resolution)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)


class PixelEnsemble(nn.Module):
    """M pixel MLPs as batched matmuls. forward(x (M, P, C)) -> logits (M, P, K); member m sees x[m]."""

    def __init__(self, config: EnsembleConfig):
        super().__init__()
        self.config = config
        M, C, (H1, H2), K = config.members, config.layout.total_channels, config.hidden, config.num_classes
        w1, w2, w3 = torch.empty(M, C, H1), torch.empty(M, H1, H2), torch.empty(M, H2, K)
        for m in range(M):  # each member its own Kaiming draw (DatasetGAN: members initialised differently)
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + m)
            w1[m], w2[m], w3[m] = _kaiming((C, H1), C, gen), _kaiming((H1, H2), H1, gen), _kaiming((H2, K), H2, gen)
        self.w1, self.w2, self.w3 = nn.Parameter(w1), nn.Parameter(w2), nn.Parameter(w3)
        self.b1, self.b2, self.b3 = nn.Parameter(torch.zeros(M, H1)), nn.Parameter(torch.zeros(M, H2)), nn.Parameter(torch.zeros(M, K))
        self.bn1, self.bn2 = nn.BatchNorm1d(M * H1), nn.BatchNorm1d(M * H2)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        """BatchNorm over each member's own pixels: h (M, P, H) -> (M, P, H)."""
        M, P, H = h.shape
        return bn(h.transpose(0, 1).reshape(P, M * H)).reshape(P, M, H).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._bn(self.bn1, torch.relu(torch.baddbmm(self.b1[:, None], x, self.w1)))
        h = self._bn(self.bn2, torch.relu(torch.baddbmm(self.b2[:, None], h, self.w2)))
        return torch.baddbmm(self.b3[:, None], h, self.w3)

    @torch.no_grad()
    def factorized(self, coarse_to_fine: bool = False) -> "FactorizedEnsemble":
        """The inference form with eval-mode BatchNorm folded into the next linear layer."""
        M, (H1, H2) = self.config.members, self.config.hidden
        w2, b2 = _fold_bn(self.bn1, self.w2, self.b2, M, H1)
        w3, b3 = _fold_bn(self.bn2, self.w3, self.b3, M, H2)
        return FactorizedEnsemble(self.config.layout, self.w1.detach(), self.b1.detach(), w2, b2, w3, b3, coarse_to_fine)


def _fold_bn(bn: nn.BatchNorm1d, w: torch.Tensor, b: torch.Tensor, M: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = BN(h) @ w + b with running stats == h @ (s * w) + (t @ w + b); returns (w' (M, H, O), b' (M, O))."""
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(M, H)
    t = bn.bias.reshape(M, H) - bn.running_mean.reshape(M, H) * s
    return (s[:, :, None] * w).detach().clone(), (torch.bmm(t[:, None], w)[:, 0] + b).detach().clone()


class FactorizedEnsemble(nn.Module):
    """Folded ensemble over whole images: forward(taps) -> logits (B, M, K, R, R).

    `coarse_to_fine=True` accumulates the running sum upward 2x at a time (fewer full-size
    upsamples, faster) but bilinear upsamples do not compose exactly, so its numbers differ
    slightly from the exact form; measure vote agreement before relying on it.
    """

    def __init__(self, layout: TapLayout, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 w3: torch.Tensor, b3: torch.Tensor, coarse_to_fine: bool = False):
        super().__init__()
        self.layout, self.coarse_to_fine = layout, coarse_to_fine
        M, _, H1 = w1.shape
        self.members, self.hidden1 = M, H1
        offsets = [0]
        for c in layout.channels:
            offsets.append(offsets[-1] + c)
        self.groups = layout.groups()
        for r, idx in self.groups.items():
            rows = torch.cat([w1[:, offsets[i]:offsets[i + 1]] for i in idx], dim=1)  # (M, C_r, H1)
            self.register_buffer(f"w1_r{r}", rows.permute(1, 0, 2).reshape(-1, M * H1).contiguous())  # (C_r, M*H1)
        self.register_buffer("b1", b1.reshape(M * H1).clone())
        self.register_buffer("w2", w2.contiguous())  # (M, H1, H2)
        self.register_buffer("b2", b2[:, None, :].clone())  # (M, 1, H2)
        self.register_buffer("w3", w3.contiguous())  # (M, H2, K)
        self.register_buffer("b3", b3[:, None, :].clone())

    def _project(self, taps: list[torch.Tensor], r: int) -> torch.Tensor:
        """Taps at resolution r -> first-layer contribution (B, M*H1, r, r), channels-last: one matmul for all members."""
        idx = self.groups[r]
        x = taps[idx[0]] if len(idx) == 1 else torch.cat([taps[i] for i in idx], dim=1)
        B, C = x.shape[:2]
        z = torch.matmul(x.reshape(B, C, r * r).transpose(1, 2), getattr(self, f"w1_r{r}"))  # (B, r*r, M*H1)
        return z.reshape(B, r, r, -1).permute(0, 3, 1, 2)

    def hidden(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """First layer pre-activation at image size: (B, M*H1, R, R), channels-last in memory.

        Channels-last because CPU bilinear upsampling vectorises over channels there (about 2x
        faster on M*H1 = 2560 channels) and the per-member layers then read contiguous rows.
        """
        self.layout.check(taps)
        R = self.layout.image_resolution
        res = list(self.groups)
        up = lambda z, r: F.interpolate(z, size=(r, r), mode="bilinear", align_corners=False)  # noqa: E731
        if self.coarse_to_fine:
            acc = self._project(taps, res[0])
            for r in res[1:]:
                acc = up(acc, r).add_(self._project(taps, r))
            if acc.shape[-1] != R:
                acc = up(acc, R)
        else:
            acc = self._project(taps, R) if R in self.groups else None
            for r in (r for r in res if r != R):
                z = up(self._project(taps, r), R)
                acc = z if acc is None else acc.add_(z)
                del z
        return acc.add_(self.b1.reshape(1, -1, 1, 1))

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        h = self.hidden(taps).relu_()
        B, R = h.shape[0], h.shape[-1]
        h = h.permute(0, 2, 3, 1).reshape(B, R * R, self.members, self.hidden1).transpose(1, 2)  # (B, M, P, H1), a view
        h = torch.matmul(h, self.w2).add_(self.b2).relu_()
        logits = torch.matmul(h, self.w3).add_(self.b3)  # (B, M, P, K)
        return logits.transpose(2, 3).reshape(B, self.members, -1, R, R)


def majority_vote(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, M, K, H, W) -> mask (B, H, W) int64: the class most members pick (ties: lowest class)."""
    B, M, K = logits.shape[:3]
    votes = logits.argmax(dim=2).reshape(B, M, -1)
    counts = torch.zeros(B, K, votes.shape[-1], dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.int32))
    return counts.argmax(dim=1).reshape(B, *logits.shape[3:])
