"""The baseline: a slice classifier trained on the same image-level labels, explained with Grad-CAM.

A MONAI 2D ResNet (basic blocks, one per stage, one logit: abnormal; `widths` per stage, so it can
be sized like one ClamNet UNet++) on the same organ crops; no stride in its stem and no max-pool,
so its last block ('layer4') keeps 1/8 of the input's side for Grad-CAM (MONAI's `GradCAM`).
Grad-CAM is min-max normalised per slice, so it alone would light up something in every slice;
the map is multiplied by the classifier's probability of 'abnormal' so slices it calls normal stay
dark. Then gated to the organ, exactly like ClamNet's output.
`class_activation_maps` is plain CAM (Zhou et al., CVPR 2016) of the same classifier: layer4's features weighted
by the final layer's weights, the logit's own decomposition over positions; ClamNet's `cam` target seeds from it
(on slices where only a small region tells the labels apart, Grad-CAM's gradient weights can point away from it).
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
from labelfactory.devices import module_device, resolve_device

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


def train_classifier(
    slices: WeakSlices, config: CamConfig, device: str | torch.device = "cpu"
) -> tuple[nn.Module, list[float]]:
    """BCE on image-level labels, batches half abnormal half normal, on `device` (draws on the CPU). Returns
    (classifier in eval mode, on `device`; loss per step)."""
    device = resolve_device(device)
    torch.manual_seed(config.seed)
    model = build_classifier(config.widths).to(device)
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
        logits = model(slices.x[idx].to(device))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, slices.abnormal[idx].float().to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.detach().item())
        if step % 25 == 0 or step == config.steps - 1:
            logger.info(f"cam classifier step {step + 1}/{config.steps} loss {history[-1]:.4f}")
    return model.eval(), history


def cam_maps(model: nn.Module, x: torch.Tensor, organ: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(K, 1, S, S) crops and organ masks (CPU) -> (K, S, S) Grad-CAM x P(abnormal) (CPU), in [0, 1], 0 outside the
    organ; run on the model's device."""
    cam = GradCAM(nn_module=model, target_layers="layer4")
    device = module_device(model)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device)
        with torch.no_grad():
            prob = torch.sigmoid(model(xb)[:, 0])
        out.append((cam(xb, class_idx=0)[:, 0].detach() * prob.view(-1, 1, 1)).cpu())
    maps = torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])
    return maps * organ[:, 0]


@torch.no_grad()
def class_activation_maps(model: nn.Module, x: torch.Tensor, organ: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(K, 1, S, S) crops and organ masks (CPU) -> (K, S, S) CAM (CPU): sum_k w_k A_k of 'abnormal' at layer4,
    upsampled bilinearly, negative values 0, each slice divided by its maximum, 0 outside the organ; run on the
    model's device."""
    device = module_device(model)
    feats: list[torch.Tensor] = []
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: feats.append(out))
    try:
        for i in range(0, len(x), batch):
            model(x[i : i + batch].to(device))
    finally:
        hook.remove()
    if not feats:
        return torch.zeros(0, *x.shape[-2:])
    cam = torch.einsum("bkhw,k->bhw", torch.cat(feats), model.fc.weight[0])[:, None]
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].clamp_min(0).cpu()
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam * organ[:, 0]
