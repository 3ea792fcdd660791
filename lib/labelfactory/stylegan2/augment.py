"""Adaptive discriminator augmentation (Karras et al. 2020, "Training GANs with limited data").

`AugmentPipe` applies ADA's 'bgc' pipeline to every image the discriminator sees, each transform
independently per sample with probability p: x-flip, 90-degree rotation, integer translation,
isotropic scaling, arbitrary rotation (twice, p_rot = 1 - sqrt(1 - p)), anisotropic scaling,
fractional translation, then brightness and contrast. ADA's colour-only transforms (luma flip, hue,
saturation) have no meaning for 1-channel CT and are skipped.
All geometric transforms are composed into one matrix and applied as one warp (kornia's
`warp_affine`, reflection padding) on a 2x FIR-upsampled image, then FIR-downsampled, as ADA does
to keep the warp from aliasing. kornia's own random augmentations are not used: they draw from
uniform ranges and warp once per transform, where ADA needs its log-normal/normal laws composed
into a single warp. Everything is differentiable, twice (R1 goes through it).

`AdaController` tunes p: every `interval` minibatches, r_t = E[sign(D(real))] moves p by
sign(r_t - target) * (images seen in the interval) / (ada_kimg * 1000).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from labelfactory.stylegan2.resample import downsample2d, upsample2d


def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).repeat(n, 1, 1)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(len(sx), sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(len(tx), tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    m = _eye(len(theta), theta.device)
    c, s = theta.cos(), theta.sin()
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


class AugmentPipe(nn.Module):
    """(N, C, S, S) images in [-1, 1] -> augmented images, same shape; `p` is a buffer (saved, synced)."""

    def __init__(
        self,
        p: float = 0.0,
        xflip=1.0,
        rotate90=1.0,
        xint=1.0,
        scale=1.0,
        rotate=1.0,
        aniso=1.0,
        xfrac=1.0,
        brightness=1.0,
        contrast=1.0,
        xint_max=0.125,
        scale_std=0.2,
        rotate_max=1.0,
        aniso_std=0.2,
        xfrac_std=0.125,
        brightness_std=0.2,
        contrast_std=0.5,
    ):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso, self.xfrac = (
            xflip,
            rotate90,
            xint,
            scale,
            rotate,
            aniso,
            xfrac,
        )
        self.brightness, self.contrast = brightness, contrast
        self.xint_max, self.scale_std, self.rotate_max, self.aniso_std, self.xfrac_std = (
            xint_max,
            scale_std,
            rotate_max,
            aniso_std,
            xfrac_std,
        )
        self.brightness_std, self.contrast_std = brightness_std, contrast_std

    def _gate(self, values: torch.Tensor, identity: float, prob: torch.Tensor | float) -> torch.Tensor:
        """Keep each sample's value with probability `prob`, else the identity value."""
        keep = torch.rand(values.shape[0], device=values.device) < prob
        while keep.ndim < values.ndim:
            keep = keep[..., None]
        return torch.where(keep, values, torch.full_like(values, identity))

    def geometry(self, n: int, size: int, device) -> torch.Tensor:
        """(n, 3, 3) forward transforms in pixel units, centred on the image, for an image `size` wide (the 2x-upsampled
        one). Composed in ADA's order, each left-multiplied: x-flip applies first, fractional translation last."""
        p = self.p.to(device)
        G = _eye(n, device)
        rand = lambda *shape: torch.rand(n, *shape, device=device)  # noqa: E731
        randn = lambda *shape: torch.randn(n, *shape, device=device)  # noqa: E731
        if self.xflip:
            i = self._gate(torch.floor(rand() * 2), 0, p * self.xflip)
            G = _scale(1 - 2 * i, torch.ones_like(i)) @ G
        if self.rotate90:
            i = self._gate(torch.floor(rand() * 4), 0, p * self.rotate90)
            G = _rotate(-math.pi / 2 * i) @ G
        if self.xint:
            t = self._gate((rand(2) * 2 - 1) * self.xint_max, 0, p * self.xint)
            t = 2 * torch.round(t * size / 2)  # whole pixels of the image: 2 of the upsampled one
            G = _translate(t[:, 0], t[:, 1]) @ G
        if self.scale:
            s = self._gate(torch.exp2(randn() * self.scale_std), 1, p * self.scale)
            G = _scale(s, s) @ G
        p_rot = 1 - torch.sqrt((1 - self.rotate * p).clamp(min=0))
        if self.rotate:
            G = _rotate(-self._gate((rand() * 2 - 1) * math.pi * self.rotate_max, 0, p_rot)) @ G
        if self.aniso:
            s = self._gate(torch.exp2(randn() * self.aniso_std), 1, p * self.aniso)
            G = _scale(s, 1 / s) @ G
        if self.rotate:
            G = _rotate(-self._gate((rand() * 2 - 1) * math.pi * self.rotate_max, 0, p_rot)) @ G
        if self.xfrac:
            t = self._gate(randn(2) * self.xfrac_std, 0, p * self.xfrac)
            G = _translate(t[:, 0] * size, t[:, 1] * size) @ G
        return G

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if float(self.p) <= 0:
            return images
        n, _, h, w = images.shape
        if h != w:
            raise ValueError(f"AugmentPipe expects square images, got {h}x{w}")
        x = images
        if any((self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso, self.xfrac)):
            up = upsample2d(F.pad(x, [1] * 4, mode="reflect"))[:, :, 2:-2, 2:-2]  # (N, C, 2S, 2S)
            size = up.shape[-1]
            c = (size - 1) / 2  # kornia's pixel grid (align_corners=True): centre of the image
            M = (
                _translate(*torch.full((2, n), c, device=x.device))
                @ self.geometry(n, size, x.device)
                @ _translate(*torch.full((2, n), -c, device=x.device))
            )
            warped = warp_affine(
                up, M[:, :2].to(up.dtype), (size, size), mode="bilinear", padding_mode="reflection", align_corners=True
            )
            x = downsample2d(F.pad(warped, [1] * 4, mode="reflect"), pad=0)
        p = self.p.to(x.device)
        if self.brightness:
            b = self._gate(torch.randn(n, device=x.device) * self.brightness_std, 0, p * self.brightness)
            x = x + b[:, None, None, None].to(x.dtype)
        if self.contrast:
            c = self._gate(torch.exp2(torch.randn(n, device=x.device) * self.contrast_std), 1, p * self.contrast)
            x = x * c[:, None, None, None].to(x.dtype)
        return x


class AdaController:
    """Accumulates sign(D(real)) and moves `pipe.p` every `interval` minibatches toward r_t == target."""

    def __init__(self, pipe: AugmentPipe, target: float = 0.6, interval: int = 4, ada_kimg: float = 500.0):
        self.pipe, self.target, self.interval, self.ada_kimg = pipe, target, interval, ada_kimg
        self.sign_sum, self.count, self.steps = 0.0, 0, 0
        self.rt = float("nan")

    def accumulate(self, real_logits: torch.Tensor) -> None:
        self.sign_sum += real_logits.detach().sign().sum().item()
        self.count += real_logits.numel()

    def step(self, batch_size: int, reduce=None) -> bool:
        """Call once per minibatch (batch_size = images over all ranks); returns True when p changed.

        `reduce(tensor) -> tensor` sums the (sign sum, count) pair over ranks when training is distributed.
        """
        self.steps += 1
        if self.steps % self.interval:
            return False
        stats = torch.tensor([self.sign_sum, float(self.count)], dtype=torch.float64)
        if reduce is not None:
            stats = reduce(stats)
        self.sign_sum, self.count = 0.0, 0
        if stats[1] == 0:
            return False
        self.rt = float(stats[0] / stats[1])
        adjust = float(self.rt > self.target) - float(self.rt < self.target)
        adjust *= batch_size * self.interval / (self.ada_kimg * 1000)
        self.pipe.p.copy_(torch.tensor(min(max(float(self.pipe.p) + adjust, 0.0), 1.0)))
        return True
