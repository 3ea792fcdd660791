"""StyleGAN2 generator (mapping + synthesis, skip toRGB) and residual discriminator, 1-channel images.

Follows Karras et al. 2020 ("Analyzing and improving the image quality of StyleGAN") and the
stylegan2-ada-pytorch configuration: equalized learning rate, mapping lr multiplier 0.01,
modulated/demodulated 3x3 convolutions, per-layer noise with learned strength, [1,3,3,1] FIR
resampling, minibatch standard deviation in the discriminator epilogue. Every block checks the
shape it is given (as the reference's `misc.assert_shape`). Mixed precision as the reference's
fp16, in bfloat16: the `num_bf16_res` highest-resolution blocks of G and D run in bf16 when a
forward is called with `bf16=True` (the training loop's main phases), with weights, styles,
demodulation and the mapping network in float32; `conv_clamp` bounds their conv outputs.
Written by hand: no maintained library ships a StyleGAN2 whose feature taps we can expose.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from labelfactory.stylegan2.resample import downsample2d, filter2d, upsample2d

LRELU_GAIN = math.sqrt(2.0)
# 2: the reference's up-sampling conv (transposed conv, then filter); 1 (before): filter, then conv at 2x. Incompatible.
GENERATOR_LAYOUT = 2


def assert_shape(x: torch.Tensor, shape: list[int | None], what: str) -> None:
    """Raise ValueError naming `what` unless x has `shape` (None: any size)."""
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=True)):
        want = ", ".join("N" if s is None else str(s) for s in shape)
        raise ValueError(f"{what} must be ({want}), got {tuple(x.shape)}")


def _block_dtype(use_bf16: bool, bf16: bool) -> torch.dtype:
    return torch.bfloat16 if use_bf16 and bf16 else torch.float32


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of (N, C) to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: weight ~ N(0, 1/lr_mul^2), scaled at run time by lr_mul/sqrt(in)."""

    def __init__(
        self,
        in_features: int,  # input width
        out_features: int,  # output width
        bias_init: float = 0.0,  # initial value of every bias
        lr_multiplier: float = 1.0,  # learning-rate multiplier (equalized lr)
        activation: str = "linear",  # "linear" or "lrelu" (leaky ReLU 0.2, gain sqrt 2)
    ):
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
    """z (N, z_dim) -> ws (N, num_ws, w_dim), always float32; tracks `w_avg` (EMA of w) while training."""

    def __init__(
        self,
        z_dim: int,  # latent z width
        w_dim: int,  # intermediate latent w width
        num_ws: int,  # copies of w to output (one per synthesis layer and toRGB)
        num_layers: int = 8,  # fully connected layers
        lr_multiplier: float = 0.01,  # learning-rate multiplier of every layer
        w_avg_beta: float = 0.995,  # decay of the running mean of w (truncation's centre)
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[
                FullyConnected(a, b, lr_multiplier=lr_multiplier, activation="lrelu")
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        """`truncation_psi` < 1 pulls every w toward `w_avg`; `update_w_avg` moves w_avg toward this batch's mean."""
        assert_shape(z, [None, self.z_dim], "z")
        w = self.layers(normalize_2nd_moment(z.float()))
        if update_w_avg:
            self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            w = self.w_avg.lerp(w, truncation_psi)
        return w[:, None].repeat(1, self.num_ws, 1)


def modulated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: bool = False, demodulate: bool = True
) -> torch.Tensor:
    """x (N, I, H, W), weight (O, I, k, k), styles (N, I) -> (N, O, H', W'), H' = 2H with `up`; x's dtype.

    Computed as scale-input / shared conv / scale-output (the "non-fused" form of the paper's
    Eq. 1-3): numerically the same as modulating the weight per sample, and one dense conv.
    With `up`, the reference's order: a stride-2 transposed conv at the low resolution (a 1/4 of
    the work of a conv after upsampling), then the [1, 3, 3, 1] filter (gain 4, 1 pixel each side).
    Weight, styles and demodulation coefficients stay float32 and are cast to x's dtype at use.
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

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        w_dim: int,  # width of the w that drives the affine style
        resolution: int,  # output resolution (the input is half of it with `up`)
        up: bool = False,  # 2x upsampling conv
        conv_clamp: float | None = None,  # clamp the output to +-conv_clamp; None: no clamp
    ):
        super().__init__()
        self.in_channels, self.resolution, self.up, self.conv_clamp = in_channels, resolution, up, conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))  # no equalized-lr gain: demodulated
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', not {noise_mode!r}")
        x = F.leaky_relu(x + self.bias[None, :, None, None].to(x.dtype), 0.2) * LRELU_GAIN
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp else x


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation -> (N, img_channels, res, res)."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # image channels
        w_dim: int,  # width of the w that drives the affine style
        conv_clamp: float | None = None,  # clamp the output to +-conv_clamp (the reference's); None: no clamp
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False) + self.bias[None, :, None, None].to(x.dtype)
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp else x


class SynthesisBlock(nn.Module):
    """One resolution: (const at 4x4 | 2x-up conv) + conv, and a skip toRGB added to the upsampled image."""

    def __init__(
        self,
        in_channels: int,  # feature maps from the block below; 0: the 4x4 block (learned constant input)
        out_channels: int,  # feature maps of this block
        w_dim: int,  # width of w
        resolution: int,  # this block's resolution
        img_channels: int,  # image channels
        conv_clamp: float | None = None,  # clamp of each conv layer's output; None: no clamp
        use_bf16: bool = False,  # run in bfloat16 when the forward asks for bf16
    ):
        super().__init__()
        self.in_channels, self.resolution, self.use_bf16 = in_channels, resolution, use_bf16
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.convs = nn.ModuleList(
                [SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)]
            )
        else:
            self.convs = nn.ModuleList(
                [
                    SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp),
                    SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp),
                ]
            )
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp)
        self.num_conv = len(self.convs)

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str, features: list | None, bf16: bool = False):
        """x (N, in, res/2, res/2) or None at 4x4, img (N, C, res/2, res/2) float32 or None, ws (N, num_conv+1, w_dim).

        Returns x (N, out, res, res) in the block's dtype and img (N, C, res, res) float32.
        """
        assert_shape(ws, [None, self.num_conv + 1, None], f"ws of the {self.resolution}^2 block")
        dtype = _block_dtype(self.use_bf16, bf16)
        if x is None:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1).to(dtype)
        else:
            assert_shape(
                x,
                [ws.shape[0], self.in_channels, self.resolution // 2, self.resolution // 2],
                f"x into the {self.resolution}^2 block",
            )
            x = x.to(dtype)
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
    """ws (N, num_ws, w_dim) -> image (N, img_channels, R, R) float32; optionally every conv layer's output."""

    def __init__(
        self,
        w_dim: int,  # width of w
        img_resolution: int,  # output resolution R, a power of two >= 8
        img_channels: int,  # image channels
        channel_base: int,  # feature maps at resolution r: min(channel_base / r, channel_max)
        channel_max: int,  # the most feature maps of any block
        conv_clamp: float | None = None,  # clamp of every conv layer's output (the reference's); None: no clamp
        num_bf16_res: int = 0,  # the blocks of the N highest resolutions run in bfloat16 when forward(bf16=True)
    ):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        bf16_from = 2 ** max(log2 + 1 - num_bf16_res, 3) if num_bf16_res > 0 else img_resolution * 2
        self.blocks = nn.ModuleList()
        for res in self.block_resolutions:
            cin = 0 if res == 4 else _channels(res // 2, channel_base, channel_max)
            cout = _channels(res, channel_base, channel_max)
            self.blocks.append(
                SynthesisBlock(cin, cout, w_dim, res, img_channels, conv_clamp, use_bf16=res >= bf16_from)
            )
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1
        self.tap_channels = [c.weight.shape[0] for b in self.blocks for c in b.convs]
        self.tap_resolutions = [c.resolution for b in self.blocks for c in b.convs]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = False, bf16: bool = False):
        """Features (with `return_features`) come in each block's dtype: float32 unless `bf16`."""
        assert_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        features = [] if return_features else None
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], noise_mode, features, bf16)
            w_idx += block.num_conv
        return (img, features) if return_features else img


class Generator(nn.Module):
    """StyleGAN2 generator: G(z) = synthesis(mapping(z)). Images (N, img_channels, R, R), about [-1, 1]."""

    def __init__(
        self,
        z_dim: int = 512,  # latent z width
        w_dim: int = 512,  # intermediate latent w width
        img_resolution: int = 256,  # output resolution R, a power of two >= 8
        img_channels: int = 1,  # image channels
        channel_base: int = 16384,  # feature maps at resolution r: min(channel_base / r, channel_max)
        channel_max: int = 512,  # the most feature maps of any block
        mapping_layers: int = 8,  # fully connected layers of the mapping network
        mapping_lr_multiplier: float = 0.01,  # learning-rate multiplier of the mapping network
        conv_clamp: float | None = None,  # clamp of every synthesis conv's output; None: no clamp
        num_bf16_res: int = 0,  # synthesis blocks of the N highest resolutions run in bf16 when asked (training)
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.img_resolution, self.img_channels = z_dim, w_dim, img_resolution, img_channels
        self.synthesis = SynthesisNetwork(
            w_dim, img_resolution, img_channels, channel_base, channel_max, conv_clamp, num_bf16_res
        )
        self.num_ws = self.synthesis.num_ws
        self.tap_channels = list(self.synthesis.tap_channels)
        self.tap_resolutions = list(self.synthesis.tap_resolutions)
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const", return_features: bool = False
    ):
        """z (N, z_dim) -> image (N, img_channels, R, R) float32 (and the taps with `return_features`)."""
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode=noise_mode, return_features=return_features)


class Conv2dLayer(nn.Module):
    """Equalized-lr conv with optional FIR 2x downsampling before a stride-2 conv, bias and lrelu; x's dtype."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # square kernel width (1 or 3)
        bias: bool = True,  # add a learned bias
        activation: str = "lrelu",  # "lrelu" (leaky ReLU 0.2, gain sqrt 2) or "linear"
        down: bool = False,  # 2x downsampling (FIR filter, then stride 2)
        conv_clamp: float | None = None,  # clamp the output to +-conv_clamp * gain; None: no clamp
    ):
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

    def __init__(
        self,
        in_channels: int,  # feature maps from the block above; 0: the top block (fromRGB on the image)
        mid_channels: int,  # feature maps at this block's resolution
        out_channels: int,  # feature maps at half of it
        img_channels: int,  # image channels
        resolution: int,  # this block's input resolution
        conv_clamp: float | None = None,  # clamp of each conv layer's output; None: no clamp
        use_bf16: bool = False,  # run in bfloat16 when the forward asks for bf16
    ):
        super().__init__()
        self.in_channels, self.img_channels, self.resolution, self.use_bf16 = (
            in_channels,
            img_channels,
            resolution,
            use_bf16,
        )
        self.fromrgb = Conv2dLayer(img_channels, mid_channels, 1, conv_clamp=conv_clamp) if in_channels == 0 else None
        self.conv0 = Conv2dLayer(mid_channels, mid_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(mid_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(mid_channels, out_channels, 1, bias=False, activation="linear", down=True)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """x (N, in, res, res) (None at the top, which reads img (N, C, res, res)) -> (N, out, res/2, res/2)."""
        dtype = _block_dtype(self.use_bf16, bf16)
        if self.fromrgb is not None:
            assert_shape(img, [None, self.img_channels, self.resolution, self.resolution], "the discriminator's image")
            x = self.fromrgb(img.to(dtype))
        else:
            assert_shape(
                x, [None, self.in_channels, self.resolution, self.resolution], f"x into the {self.resolution}^2 D block"
            )
            x = x.to(dtype)
        y = self.skip(x, gain=math.sqrt(0.5))
        return self.conv1(self.conv0(x), gain=math.sqrt(0.5)) + y


class MinibatchStd(nn.Module):
    """Append the std over groups of `group_size` samples (averaged over C, H, W) as one extra channel.

    A batch smaller than the group is one group; a larger batch must be a multiple of the group size.
    """

    def __init__(self, group_size: int = 4):  # samples per group
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"minibatch std: a batch of {n} does not split into groups of {g} (use a multiple of {g})")
        y = x.reshape(g, -1, 1, c, h, w).float()
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w).to(x.dtype)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator: (N, img_channels, R, R) -> logits (N, 1) float32."""

    def __init__(
        self,
        img_resolution: int = 256,  # input resolution R, a power of two >= 8
        img_channels: int = 1,  # image channels
        channel_base: int = 16384,  # feature maps at resolution r: min(channel_base / r, channel_max)
        channel_max: int = 512,  # the most feature maps of any block
        mbstd_group_size: int = 4,  # samples per minibatch-std group; the batch must be a multiple (or smaller)
        conv_clamp: float | None = None,  # clamp of every conv layer's output; None: no clamp
        num_bf16_res: int = 0,  # blocks of the N highest resolutions run in bf16 when forward(bf16=True)
    ):
        super().__init__()
        log2 = _check_resolution(img_resolution)
        self.img_resolution, self.img_channels = img_resolution, img_channels
        ch = lambda r: _channels(r, channel_base, channel_max)  # noqa: E731
        bf16_from = 2 ** max(log2 + 1 - num_bf16_res, 3) if num_bf16_res > 0 else img_resolution * 2
        self.blocks = nn.ModuleList(
            [
                DiscriminatorBlock(
                    0 if res == img_resolution else ch(res),
                    ch(res),
                    ch(res // 2),
                    img_channels,
                    res,
                    conv_clamp,
                    use_bf16=res >= bf16_from,
                )
                for res in (2**i for i in range(log2, 2, -1))
            ]
        )
        c4 = ch(4)
        self.c4 = c4
        self.mbstd = MinibatchStd(mbstd_group_size)
        self.conv = Conv2dLayer(c4 + 1, c4, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(c4 * 16, c4, activation="lrelu")
        self.out = FullyConnected(c4, 1)

    def forward(self, img: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """`bf16`: the blocks of the `num_bf16_res` highest resolutions in bfloat16; the 4x4 epilogue float32."""
        x = None
        for block in self.blocks:
            x = block(x, img, bf16)
        assert_shape(x, [img.shape[0], self.c4, 4, 4], "x into the discriminator's epilogue")
        x = self.conv(self.mbstd(x.float()))
        return self.out(self.fc(x.flatten(1)))
