"""The fully supervised ceiling for a weak task: the project's UNet++ (`labelfactory.segmentation`, its own widths,
`networks.UNETPP_FEATURES`) trained on the pixel truth that ClamNet never sees, on the same organ crops, its map
gated to the organ like ClamNet's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from labelfactory.clamnet.data import WeakSlices
from labelfactory.devices import module_device, resolve_device
from labelfactory.segmentation.data import RealSlices
from labelfactory.segmentation.train import SegmentationConfig, train_segmenter

TARGET = {"background": 0, "target": 1}


@dataclass
class CeilingConfig:
    """steps, batch, lr as in ClamNet's budget."""

    steps: int = 300
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0


def train_ceiling(
    slices: WeakSlices, config: CeilingConfig, device: str | torch.device = "auto"
) -> tuple[nn.Module, list[dict[str, float]]]:
    """UNet++ on (slices.x, slices.truth), DiceCE with deep supervision, on `device` (`labelfactory.devices`).
    Returns (network in eval mode, on that device; loss per round)."""
    data = RealSlices(slices.x, slices.truth[:, 0].long(), slices.study)
    cfg = SegmentationConfig(
        network="unetpp",
        size=int(slices.x.shape[-1]),
        steps=config.steps,
        batch_size=config.batch,
        lr=config.lr,
        val_interval=max(1, config.steps // 10),
        seed=config.seed,
        label_names=dict(TARGET),
    )
    result = train_segmenter(data, None, cfg, device=resolve_device(device))
    return result.network, result.history


@torch.no_grad()
def ceiling_maps(network: nn.Module, x: torch.Tensor, organ: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(K, 1, S, S) crops and organ masks (CPU) -> (K, S, S) target probability (CPU), 0 outside the organ; run on
    the network's device."""
    network.eval()
    device = module_device(network)
    out = [network(x[i : i + batch].to(device)).softmax(1)[:, 1].cpu() for i in range(0, len(x), batch)]
    p = torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])
    return p * organ[:, 0]
