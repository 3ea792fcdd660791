"""The baseline: a slice classifier trained on the same image-level labels, explained with Grad-CAM.

A MONAI 2D ResNet (basic blocks, one per stage, one logit: abnormal; `widths` per stage, so it can
be sized like one ClamNet UNet++) on the same organ crops; no stride in its stem and no max-pool,
so its last block ('layer4') keeps 1/8 of the input's side for Grad-CAM (MONAI's `GradCAM`).
Grad-CAM is min-max normalised per slice, so it alone would light up something in every slice;
the map is multiplied by the classifier's probability of 'abnormal' so slices it calls normal stay
dark. Then gated to the organ, exactly like ClamNet's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from monai.visualize import GradCAM
from torch import nn

from labelfactory.clamnet.data import WeakSlices

logger = logging.getLogger(__name__)


@dataclass
class CamConfig:
    steps: int = 300
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the four stages (~0.3 M parameters)


def build_classifier(widths: tuple[int, ...] = CamConfig.widths) -> nn.Module:
    return ResNet(
        "basic",
        [1, 1, 1, 1],
        list(widths),
        spatial_dims=2,
        n_input_channels=1,
        num_classes=1,
        conv1_t_stride=1,
        no_max_pool=True,
    )


def train_classifier(slices: WeakSlices, config: CamConfig) -> tuple[nn.Module, list[float]]:
    """BCE on image-level labels, batches half abnormal half normal. Returns (classifier in eval mode, loss per
    step)."""
    torch.manual_seed(config.seed)
    model = build_classifier(config.widths)
    gen = torch.Generator().manual_seed(config.seed)
    pos, neg = torch.nonzero(slices.abnormal).flatten(), torch.nonzero(~slices.abnormal).flatten()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    history = []
    for step in range(config.steps):
        half = config.batch // 2
        idx = torch.cat(
            [
                pos[torch.randint(len(pos), (half,), generator=gen)],
                neg[torch.randint(len(neg), (config.batch - half,), generator=gen)],
            ]
        )
        loss = F.binary_cross_entropy_with_logits(model(slices.x[idx])[:, 0], slices.abnormal[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.detach().item())
        if step % 25 == 0 or step == config.steps - 1:
            logger.info(f"cam classifier step {step + 1}/{config.steps} loss {history[-1]:.4f}")
    return model.eval(), history


def cam_maps(model: nn.Module, x: torch.Tensor, organ: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(K, 1, S, S) crops and organ masks -> (K, S, S) Grad-CAM x P(abnormal), in [0, 1], 0 outside the organ."""
    cam = GradCAM(nn_module=model, target_layers="layer4")
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        with torch.no_grad():
            prob = torch.sigmoid(model(xb)[:, 0])
        out.append(cam(xb, class_idx=0)[:, 0].detach() * prob.view(-1, 1, 1))
    maps = torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])
    return maps * organ[:, 0]
