"""StyleGAN2 generator (mapping + synthesis, skip toRGB) and residual discriminator, 1-channel images.

Follows Karras et al. 2020 ("Analyzing and improving the image quality of StyleGAN") and the
stylegan2-ada-pytorch configuration: equalized learning rate, mapping lr multiplier 0.01,
modulated/demodulated 3x3 convolutions, per-layer noise with learned strength, [1,3,3,1] FIR
resampling, minibatch standard deviation in the discriminator epilogue.
Written by hand: no maintained library ships a StyleGAN2 whose feature taps we can expose.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from labelfactory.gan.resample import downsample2d, filter2d, upsample2d

LRELU_GAIN = math.sqrt(2.0)
# 2: the reference's up-sampling conv (transposed conv, then filter); 1 (before): filter, then conv at 2x. Not compatible.
GENERATOR_LAYOUT = 2


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of (N, C) to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: weight ~ N(0, 1/lr_mul^2), scaled at run time by lr_mul/sqrt(in)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0, activation: str = "linear"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation == "lrelu" else x


class MappingNetwork(nn.Module):
    """z (N, z_dim) -> ws (N, num_ws, w_dim); tracks `w_avg` (EMA of w, beta 0.995) while training."""

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_layers: int = 8, lr_multiplier: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(*[FullyConnected(a, b, lr_multiplier=lr_multiplier, activation="lrelu") for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None, update_w_avg: bool = False) -> torch.Tensor:
        w = self.layers(normalize_2nd_moment(z.float()))
        if update_w_avg:
            self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: bool = False, demodulate: bool = True) -> torch.Tensor:
    """x (N, I, H, W), weight (O, I, k, k), styles (N, I) -> (N, O, H', W'), H' = 2H with `up`.

    Computed as scale-input / shared conv / scale-output (the "non-fused" form of the paper's
    Eq. 1-3): numerically the same as modulating the weight per sample, and one dense conv.
    With `up`, the reference's order: a stride-2 transposed conv at the low resolution (a 1/4 of
    the work of a conv after upsampling), then the [1, 3, 3, 1] filter (gain 4, 1 pixel each side).
    """
    x = x * styles[:, :, None, None].to(x.dtype)
    if up:
        x = filter2d(F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2), pad=1, gain=4.0)
    else:
        x = F.conv2d(x, weight.to(x.dtype), padding=weight.shape[-1] // 2)
    if demodulate:
        dcoefs = ((weight[None] * styles[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        x = x * dcoefs[:, :, None, None].to(x.dtype)
    return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + noise + bias + lrelu; output (N, out, res, res)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))  # no equalized-lr gain: demodulated
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype) * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', not {noise_mode!r}")
        x = F.leaky_relu(x + self.bias[None, :, None, None].to(x.dtype), 0.2) * LRELU_GAIN
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp else x


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation -> (N, img_channels, res, res)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, demodulate=False) + self.bias[None, :, None, None].to(x.dtype)


class SynthesisBlock(nn.Module):
    """One resolution: (const at 4x4 | 2x-up conv) + conv, and a skip toRGB added to the upsampled image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, conv_clamp: float | None):
        super().__init__()
        self.resolution = resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.convs = nn.ModuleList([SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)])
        else:
            self.convs = nn.ModuleList([
                SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp),
                SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp),
            ])
        self.torgb = ToRGB(out_channels, img_channels, w_dim)
        self.num_conv = len(self.convs)

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str, features: list | None):
        """ws: (N, num_conv + 1, w_dim), the last one for toRGB."""
        if x is None:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1).to(ws.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x, ws[:, i], noise_mode)
            if features is not None:
                features.append(x)
        y = self.torgb(x, ws[:, -1]).float()
        img = y if img is None else upsample2d(img) + y
        return x, img


def _channels(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


def _check_resolution(img_resolution: int) -> int:
    log2 = int(np.log2(img_resolution))
    if img_resolution < 8 or 2**log2 != img_resolution:
        raise ValueError(f"img_resolution must be a power of two >= 8, got {img_resolution}")
    return log2


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> image (N, img_channels, R, R); optionally every conv layer's output."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int, channel_max: int, conv_clamp: float | None = None):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        self.blocks = nn.ModuleList()
        for res in self.block_resolutions:
            cin = 0 if res == 4 else _channels(res // 2, channel_base, channel_max)
            self.blocks.append(SynthesisBlock(cin, _channels(res, channel_base, channel_max), w_dim, res, img_channels, conv_clamp))
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1
        self.tap_channels = [c.weight.shape[0] for b in self.blocks for c in b.convs]
        self.tap_resolutions = [c.resolution for b in self.blocks for c in b.convs]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = False):
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        features = [] if return_features else None
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], noise_mode, features)
            w_idx += block.num_conv
        return (img, features) if return_features else img


class Generator(nn.Module):
    """StyleGAN2 generator: G(z) = synthesis(mapping(z)). Images (N, img_channels, R, R), about [-1, 1]."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, img_resolution: int = 256, img_channels: int = 1, channel_base: int = 16384,
                 channel_max: int = 512, mapping_layers: int = 8, mapping_lr_multiplier: float = 0.01, conv_clamp: float | None = None):
        super().__init__()
        self.z_dim, self.w_dim, self.img_resolution, self.img_channels = z_dim, w_dim, img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.tap_channels = list(self.synthesis.tap_channels)
        self.tap_resolutions = list(self.synthesis.tap_resolutions)
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None, noise_mode: str = "const", return_features: bool = False):
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff), noise_mode=noise_mode, return_features=return_features)


class Conv2dLayer(nn.Module):
    """Equalized-lr conv with optional FIR 2x downsampling before a stride-2 conv, bias and lrelu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, activation: str = "lrelu", down: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        k = self.weight.shape[-1]
        if self.down and k == 1:
            x = F.conv2d(downsample2d(x), w)
        elif self.down:
            x = F.conv2d(downsample2d(x, stride=1, pad=k // 2 + 1), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=k // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None].to(x.dtype)
        if self.activation == "lrelu":
            x = F.leaky_relu(x, 0.2) * (LRELU_GAIN * gain)
        elif gain != 1:
            x = x * gain
        return x.clamp(-self.conv_clamp * gain, self.conv_clamp * gain) if self.conv_clamp else x


class DiscriminatorBlock(nn.Module):
    """Residual block: (fromRGB at the top) conv3x3, conv3x3 down2, plus a 1x1 down2 skip; sum * sqrt(0.5)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, img_channels: int, conv_clamp: float | None):
        super().__init__()
        self.fromrgb = Conv2dLayer(img_channels, mid_channels, 1, conv_clamp=conv_clamp) if in_channels == 0 else None
        self.conv0 = Conv2dLayer(mid_channels, mid_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(mid_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(mid_channels, out_channels, 1, bias=False, activation="linear", down=True)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(img)
        y = self.skip(x, gain=math.sqrt(0.5))
        return self.conv1(self.conv0(x), gain=math.sqrt(0.5)) + y


class MinibatchStd(nn.Module):
    """Append the std over groups of `group_size` samples (averaged over C, H, W) as extra channels."""

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if n % min(self.group_size, n) == 0 else 1
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w).float()
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w).to(x.dtype)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator: (N, img_channels, R, R) -> logits (N, 1)."""

    def __init__(self, img_resolution: int = 256, img_channels: int = 1, channel_base: int = 16384, channel_max: int = 512,
                 mbstd_group_size: int = 4, mbstd_num_channels: int = 1, conv_clamp: float | None = None):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.img_resolution, self.img_channels = img_resolution, img_channels
        ch = lambda r: _channels(r, channel_base, channel_max)  # noqa: E731
        self.blocks = nn.ModuleList([
            DiscriminatorBlock(0 if res == img_resolution else ch(res), ch(res), ch(res // 2), img_channels, conv_clamp)
            for res in (2**i for i in range(log2, 2, -1))
        ])
        c4 = ch(4)
        self.mbstd = MinibatchStd(mbstd_group_size, mbstd_num_channels)
        self.conv = Conv2dLayer(c4 + mbstd_num_channels, c4, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(c4 * 16, c4, activation="lrelu")
        self.out = FullyConnected(c4, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = None
        for block in self.blocks:
            x = block(x, img)
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1).float()))
