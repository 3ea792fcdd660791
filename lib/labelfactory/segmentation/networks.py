"""The 2D segmenters: UNet++ (default), UNet, FCN, DeepLabV3, all 1-channel in, `n_classes` logits out.

Every network maps (N, 1, H, W) float in [-1, 1] to (N, n_classes, H, W) logits in eval mode.
UNet++ trains with deep supervision: in train mode it returns its four heads, main head first,
which is the order MONAI's DeepSupervisionLoss weights. `UNetPlusPlus` is the project's one UNet++
wrapper (ClamNet's pair is two of them). torchvision models start from random
weights (no download) with their first convolution replaced by a 1-channel one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import BasicUNetPlusPlus, UNet
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

from labelfactory.errors import LabelFactoryError

NETWORKS = ("unetpp", "unet", "fcn", "deeplabv3")

# UNet++ widths: 0.18 s per 256^2 slice on 2 CPU cores (MONAI's default widths: 0.74 s)
UNETPP_FEATURES = (16, 32, 64, 128, 256, 16)
UNET_CHANNELS = (16, 32, 64, 128, 256)


class UNetPlusPlus(nn.Module):
    """MONAI BasicUNetPlusPlus, 2D, one channel in: (N, 1, H, W) -> (N, n_classes, H, W) logits.

    Train mode: a list of heads, deepest (main) first (one head without deep supervision). Eval mode: head
    `head`, 1 (shallowest) to 4 (full depth, the default): the pruning the UNet++ paper describes.
    """

    def __init__(
        self,
        n_classes: int,
        features: Sequence[int] = UNETPP_FEATURES,
        deep_supervision: bool = True,
        head: int = 4,
    ):
        super().__init__()
        if not 1 <= head <= 4 or (not deep_supervision and head != 4):
            raise ValueError(f"head must be 1-4 with deep supervision (4 without), got {head}")
        self.net = BasicUNetPlusPlus(
            spatial_dims=2,
            in_channels=1,
            out_channels=n_classes,
            features=tuple(features),
            deep_supervision=deep_supervision,
        )
        self.deep_supervision, self.head = deep_supervision, head

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        heads = self.net(x)  # [x_0_1, x_0_2, x_0_3, x_0_4] (only x_0_4 without deep supervision)
        if self.training:
            return heads[::-1]
        return heads[self.head - 1] if self.deep_supervision else heads[-1]


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model (dict output) as a plain logits module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def build_network(name: str, n_classes: int) -> nn.Module:
    """A fresh network by name (see NETWORKS); torchvision's on a ResNet-50 backbone."""
    if name == "unetpp":
        return UNetPlusPlus(n_classes)
    if name == "unet":
        strides = (2,) * (len(UNET_CHANNELS) - 1)
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=n_classes,
            channels=UNET_CHANNELS,
            strides=strides,
            num_res_units=2,
        )
    makers = {"fcn": fcn_resnet50, "deeplabv3": deeplabv3_resnet50}
    if name in makers:
        return TorchvisionSegmenter(
            makers[name](weights=None, weights_backbone=None, num_classes=n_classes, aux_loss=False)
        )
    raise LabelFactoryError(f"unknown segmentation network '{name}'; choose one of {', '.join(NETWORKS)}")
