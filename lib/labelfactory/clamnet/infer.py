"""ClamNet at inference: organ crops -> both UNet++ -> marker probability, back on the image's grid."""

from __future__ import annotations

import torch

from labelfactory.clamnet.crop import crop_slices, paste_back
from labelfactory.clamnet.network import ClamNetPair
from labelfactory.clamnet.train import ClamNetConfig
from labelfactory.devices import autocast, cuda_speedups, module_device
from labelfactory.io import Image


def predict_crops(
    pair: ClamNetPair, x: torch.Tensor, organ: torch.Tensor, batch: int = 8, precision: str = "auto"
) -> torch.Tensor:
    """(K, 1, S, S) crops and their organ masks (CPU) -> (K, S, S) marker probability (CPU, float32), 0 outside
    the organ; run in batches on the pair's device, `precision` as `labelfactory.devices.autocast`."""
    device = module_device(pair)
    cuda_speedups(device)
    with autocast(device, precision):
        out = [pair.marker_probability(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    p = torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])
    return p * organ[:, 0].cpu()


def predict_image(pair: ClamNetPair, config: ClamNetConfig, image: Image, organ: Image | None) -> tuple[Image, Image]:
    """2D image or volume (slice by slice) -> (marker probability float32, mask uint8), both on `image`'s grid.

    organ: a mask on the same grid (None: whole slices, with a warning, see `crop_slices`).
    """
    crops = crop_slices(image, organ, config.size, config.margin_mm, config.ct_window)
    prob = paste_back(predict_crops(pair, crops.x, crops.organ), crops, image)
    return prob, prob.with_array((prob.array >= config.threshold).astype("uint8"))
