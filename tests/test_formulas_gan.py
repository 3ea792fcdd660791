"""Exact values of the StyleGAN2-ADA formulas (Karras et al. 2020, and the stylegan2-ada-pytorch reference).

Each expectation is computed here, in float64, from the formula: the non-saturating logistic losses, R1
(gamma / 2 times the squared gradient norm, through the augmentation), path-length regularization and its
running mean, the ADA p step, modulation / demodulation (plain and up-sampling conv), minibatch std,
equalized-lr gains and truncation. The losses run on stub networks small enough that every term is a few
lines of torch: a quadratic generator and discriminator, an affine augmentation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from labelfactory.stylegan2.augment import AdaController, AugmentPipe
from labelfactory.stylegan2.loss import StyleGAN2Loss
from labelfactory.stylegan2.networks import (
    Conv2dLayer,
    Discriminator,
    DiscriminatorBlock,
    FullyConnected,
    Generator,
    MappingNetwork,
    MinibatchStd,
    SynthesisLayer,
    SynthesisNetwork,
    ToRGB,
    _channels,
    modulated_conv2d,
    normalize_2nd_moment,
)
from labelfactory.stylegan2.resample import downsample2d, upsample2d

pytestmark = pytest.mark.usefixtures("one_thread")

FIR = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0  # [1, 3, 3, 1] normalized; the 2D filter is its outer product


def lrelu(x):
    return np.where(x > 0, x, 0.2 * x) * math.sqrt(2)


def conv_np(x: np.ndarray, w: np.ndarray, pad: int, stride: int = 1) -> np.ndarray:
    """Cross-correlation (as torch's conv2d) with zero padding: x (I, H, W), w (O, I, k, k) -> (O, H', W')."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    H, W = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    out = np.zeros((w.shape[0], H, W))
    for i in range(H):
        for j in range(W):
            out[:, i, j] = np.einsum("oikl,ikl->o", w, xp[:, i * stride : i * stride + k, j * stride : j * stride + k])
    return out


def fir_np(x: np.ndarray, pad: int, gain: float = 1.0) -> np.ndarray:
    """The [1,3,3,1] filter per channel (times gain), `pad` zeros each side: (C, H, W) -> (C, H + 2 pad - 3, ...)."""
    f = np.outer(FIR, FIR) * gain
    return np.stack([conv_np(c[None], f[None, None], pad)[0] for c in x])


# ---------------- modulation / demodulation (Eq. 1-3) and the up-sampling conv
def ref_modconv(x, w, s, up=False, demodulate=True):
    """w'_oik = s_i w_oik; y = conv(x, w') (up: stride-2 transposed conv, then the filter at gain 4, pad 1);
    demodulated: y_o / sqrt(sum_ik w'_oik^2 + 1e-8)."""
    out = []
    for n in range(len(x)):
        wn = w * s[n][None, :, None, None]
        if up:
            _, H, W = x[n].shape
            k = w.shape[-1]
            t = np.zeros((w.shape[0], 2 * H + k - 2, 2 * W + k - 2))
            for i in range(H):
                for j in range(W):  # transposed conv: each input pixel stamps its weighted kernel, stride 2
                    t[:, 2 * i : 2 * i + k, 2 * j : 2 * j + k] += np.einsum("oikl,i->okl", wn, x[n][:, i, j])
            y = fir_np(t, pad=1, gain=4.0)
        else:
            y = conv_np(x[n], wn, pad=w.shape[-1] // 2)
        if demodulate:
            y = y / np.sqrt((wn**2).sum(axis=(1, 2, 3)) + 1e-8)[:, None, None]
        out.append(y)
    return np.stack(out)


@pytest.mark.parametrize("up, demodulate, k", [(False, True, 3), (False, False, 1), (True, True, 3), (False, True, 1)])
def test_modulated_conv_is_the_modulated_weight_conv_with_the_demodulation_coefficient(up, demodulate, k):
    rng = np.random.default_rng(0)
    x, w, s = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, k, k)) * 3, rng.uniform(0.2, 2.0, size=(2, 3))
    got = modulated_conv2d(*(torch.from_numpy(v) for v in (x, w, s)), up=up, demodulate=demodulate).numpy()
    want = ref_modconv(x, w, s, up, demodulate)
    assert got.shape == want.shape == (2, 2, 8 if up else 4, 8 if up else 4)
    assert np.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_demodulation_coefficient_for_one_output_channel_by_hand():
    """One 1x1 conv, one input pixel: y = s w x / sqrt((s w)^2 + 1e-8) = x sign(s w) up to the epsilon."""
    x, w, s = (
        torch.tensor([[[[2.0]]]], dtype=torch.float64),
        torch.tensor([[[[0.5]]]], dtype=torch.float64),
        torch.tensor([[3.0]], dtype=torch.float64),
    )
    assert modulated_conv2d(x, w, s).item() == pytest.approx(3.0 / math.sqrt(2.25 + 1e-8), rel=1e-12)
    assert modulated_conv2d(x, w, s, demodulate=False).item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "up, noise_mode, clamp", [(False, "const", None), (True, "none", None), (False, "random", 0.5)]
)
def test_synthesis_layer_is_modconv_plus_noise_plus_bias_then_lrelu_and_clamp(up, noise_mode, clamp):
    """style = A(w) (equalized lr, bias 1); y = lrelu(modconv(x, weight, style) + noise * strength + b) sqrt 2."""
    torch.manual_seed(3)
    layer = SynthesisLayer(3, 2, 4, resolution=8 if up else 4, up=up, conv_clamp=clamp).double()
    with torch.no_grad():
        layer.noise_strength.fill_(0.7)
        layer.bias.normal_()
    x, w = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(4)
    got = layer(x, w, noise_mode).detach().numpy()
    style = w.numpy() @ (layer.affine.weight.detach().numpy() / 2.0).T + layer.affine.bias.detach().numpy()
    assert np.allclose(layer.affine.bias.detach().numpy(), 1.0) and layer.noise_const.shape == (layer.resolution,) * 2
    y = ref_modconv(x.numpy(), layer.weight.detach().numpy(), style, up=up)
    torch.manual_seed(4)
    noise = {
        "const": layer.noise_const.numpy(),
        "none": 0.0,
        "random": torch.randn(2, 1, 4, 4, dtype=torch.float64).numpy(),
    }
    y = lrelu(y + noise[noise_mode] * 0.7 + layer.bias.detach().numpy()[:, None, None])
    want = np.clip(y, -clamp, clamp) if clamp else y
    assert np.allclose(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="noise_mode"):
        layer(x, w, "fixed")


@pytest.mark.parametrize("clamp", [None, 0.3])
def test_torgb_is_an_undemodulated_1x1_modconv_with_gain_one_over_sqrt_fan_in_then_clamp(clamp):
    torch.manual_seed(5)
    rgb = ToRGB(4, 1, 3, conv_clamp=clamp).double()
    with torch.no_grad():
        rgb.bias.normal_()
    x, w = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    style = (w.numpy() @ (rgb.affine.weight.detach().numpy() / math.sqrt(3)).T + 1.0) / 2.0  # 1 / sqrt(4 channels)
    y = ref_modconv(x.numpy(), rgb.weight.detach().numpy(), style, demodulate=False) + rgb.bias.item()
    assert np.abs(y).max() > 0.3  # so that the clamp bites
    want = np.clip(y, -clamp, clamp) if clamp else y
    assert np.allclose(rgb(x, w).detach().numpy(), want, rtol=1e-9, atol=1e-9)


def test_synthesis_skips_add_each_blocks_rgb_to_the_upsampled_image():
    """img_r = up(img_{r/2}) + toRGB_r(x_r), the 4x4 block starting from its learned constant; ws[i] per layer."""
    torch.manual_seed(6)
    net = SynthesisNetwork(w_dim=4, img_resolution=8, img_channels=1, channel_base=32, channel_max=4)
    ws = torch.randn(2, net.num_ws, 4)
    b4, b8 = net.blocks
    with torch.no_grad():
        for conv in (*b4.convs, *b8.convs):
            conv.noise_strength.fill_(0.5)  # so that the noise mode matters
        x4 = b4.convs[0](b4.const[None].repeat(2, 1, 1, 1), ws[:, 0], "const")
        img = b4.torgb(x4, ws[:, 1])
        x8 = b8.convs[1](b8.convs[0](x4, ws[:, 1], "const"), ws[:, 2], "const")
        want = upsample2d(img) + b8.torgb(x8, ws[:, 3])
        got, feats = net(ws, noise_mode="const", return_features=True)
    assert net.num_ws == 4 and torch.allclose(got, want, atol=1e-6)
    assert [f.shape[1:] for f in feats] == [(4, 4, 4), (4, 8, 8), (4, 8, 8)] and torch.allclose(feats[2], x8, atol=1e-6)
    assert [_channels(r, 32, 4) for r in (4, 8, 16)] == [4, 4, 2]  # min(channel_base / r, channel_max)
    for bad in (4, 12):
        with pytest.raises(ValueError, match="power of two"):
            SynthesisNetwork(4, bad, 1, 32, 4)


# ---------------- equalized learning rate, mapping, truncation
@pytest.mark.parametrize("lr_mul, activation", [(1.0, "linear"), (0.01, "lrelu")])
def test_fully_connected_scales_weights_by_lr_over_sqrt_fan_in(lr_mul, activation):
    torch.manual_seed(0)
    fc = FullyConnected(64, 256, bias_init=0.5, lr_multiplier=lr_mul, activation=activation).double()
    assert fc.weight.std().item() == pytest.approx(1 / lr_mul, rel=0.05)  # stored N(0, 1 / lr^2)
    with torch.no_grad():
        fc.bias.normal_()
    x = np.random.default_rng(1).normal(size=(3, 64))
    y = x @ (fc.weight.detach().numpy() * lr_mul / 8.0).T + fc.bias.detach().numpy() * lr_mul
    want = lrelu(y) if activation == "lrelu" else y
    assert np.allclose(fc(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(FullyConnected(2, 3, bias_init=0.5).bias, torch.full((3,), 0.5))


@pytest.mark.parametrize(
    "k, down, activation, gain, clamp",
    [
        (3, False, "lrelu", 1.0, None),
        (3, True, "lrelu", math.sqrt(0.5), 0.3),
        (1, True, "linear", math.sqrt(0.5), None),
        (1, False, "linear", 2.0, None),
    ],
)
def test_conv_layer_gain_bias_activation_clamp_and_fir_downsampling(k, down, activation, gain, clamp):
    torch.manual_seed(1)
    layer = Conv2dLayer(3, 2, k, activation=activation, down=down, conv_clamp=clamp).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)) * 4  # large enough for both clamp bounds to bind
    w = layer.weight.detach().numpy() / math.sqrt(3 * k * k)
    if down and k == 1:
        y = conv_np(fir_np(x[0], pad=1)[:, ::2, ::2], w, pad=0)
    elif down:
        y = conv_np(fir_np(x[0], pad=2), w, pad=0, stride=2)
    else:
        y = conv_np(x[0], w, pad=k // 2)
    y = y + layer.bias.detach().numpy()[:, None, None]
    y = lrelu(y) * gain if activation == "lrelu" else y * gain
    if clamp:
        y = np.clip(y, -clamp * gain, clamp * gain)
    got = layer(torch.from_numpy(x), gain=gain).detach().numpy()[0]
    # rtol 1e-6: a strided FIR filters in float32 whatever the input's dtype (gan.resample)
    assert got.shape == ((2, 4, 4) if down else (2, 8, 8)) and np.allclose(got, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clamp", [None, 0.2])
def test_discriminator_block_is_residual_with_sqrt_half_gains(clamp):
    """fromRGB 1x1 -> (3x3 conv, FIR-down 3x3 conv) + FIR-down 1x1 linear skip, no bias; each branch times sqrt 1/2;
    conv_clamp bounds the convs (at +-clamp * their gain), never the skip."""
    torch.manual_seed(2)
    block = DiscriminatorBlock(0, 2, 3, img_channels=1, resolution=8, conv_clamp=clamp)
    with torch.no_grad():
        for conv in (block.fromrgb, block.conv0, block.conv1):
            conv.bias.normal_()
    img = np.random.default_rng(5).normal(size=(1, 8, 8))
    wt = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    g = math.sqrt(0.5)
    c = (lambda v, gain=1.0: np.clip(v, -clamp * gain, clamp * gain)) if clamp else (lambda v, gain=1.0: v)
    x = c(lrelu(conv_np(img, wt["fromrgb.weight"], pad=0) + wt["fromrgb.bias"][:, None, None]))  # 1 channel: gain 1
    y = c(lrelu(conv_np(x, wt["conv0.weight"] / math.sqrt(2 * 9), pad=1) + wt["conv0.bias"][:, None, None]))
    y = c(
        g
        * lrelu(
            conv_np(fir_np(y, pad=2), wt["conv1.weight"] / math.sqrt(2 * 9), pad=0, stride=2)
            + wt["conv1.bias"][:, None, None]
        ),
        g,
    )
    skip = conv_np(fir_np(x, pad=1)[:, ::2, ::2], wt["skip.weight"] / math.sqrt(2), pad=0)
    with torch.no_grad():
        got = block(None, torch.from_numpy(img)[None].float())[0].double().numpy()
    assert got.shape == (3, 4, 4) and np.allclose(got, y + g * skip, rtol=1e-5, atol=1e-5)
    assert "skip.bias" not in wt


def test_mapping_network_is_lrelu_fully_connected_layers_on_the_normalized_z():
    torch.manual_seed(7)
    m = MappingNetwork(6, 5, num_ws=3, num_layers=2)  # lr multiplier 0.01
    z = np.random.default_rng(6).normal(size=(4, 6))
    x = z / np.sqrt((z**2).mean(1, keepdims=True) + 1e-8)
    for layer in m.layers:
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        x = lrelu(x @ (w * 0.01 / math.sqrt(w.shape[1])).T + b * 0.01)
    ws = m(torch.from_numpy(z).float()).detach().double().numpy()
    assert ws.shape == (4, 3, 5) and np.allclose(ws, x[:, None].repeat(3, 1), rtol=1e-4, atol=1e-6)


def test_each_synthesis_layer_reads_its_own_w():
    """ws[:, i] drives conv layer i; each block's toRGB reads the w after its convs (the next block's first)."""
    torch.manual_seed(8)
    net = SynthesisNetwork(w_dim=4, img_resolution=16, img_channels=1, channel_base=64, channel_max=4)
    ws = torch.randn(1, net.num_ws, 4)
    with torch.no_grad():
        img, feats = net(ws, return_features=True)
        for i in range(net.num_ws):
            moved = ws.clone()
            moved[:, i] += 1.0
            img2, feats2 = net(moved, return_features=True)
            changed = [not torch.allclose(a, b) for a, b in zip(feats, feats2, strict=True)]
            assert changed == [j >= i for j in range(5)], i  # conv i and everything after it
            assert not torch.allclose(img, img2), i  # toRGBs read ws 1, 3, 5


def test_generator_passes_its_noise_mode_and_the_discriminator_epilogue_clamps():
    torch.manual_seed(9)
    G = Generator(z_dim=4, w_dim=4, img_resolution=8, channel_base=16, channel_max=2, mapping_layers=1)
    with torch.no_grad():
        for conv in (c for b in G.synthesis.blocks for c in b.convs):
            conv.noise_strength.fill_(0.5)
        z = torch.randn(2, 4)
        assert torch.equal(G(z), G(z, noise_mode="const")) and not torch.allclose(G(z), G(z, noise_mode="none"))
    D = Discriminator(img_resolution=8, channel_base=8, channel_max=4, conv_clamp=0.05)  # 2 channels at 4x4
    with torch.no_grad():
        D.conv.bias.fill_(1.0)  # unclamped, its outputs would pass 1
    seen = []
    D.conv.register_forward_hook(lambda mod, inp, out: seen.append(out))
    assert D(torch.randn(2, 1, 8, 8) * 10).shape == (2, 1) and D.c4 == 2
    assert seen[0].shape == (2, 2, 4, 4) and seen[0].abs().max().item() <= 0.05 + 1e-6


@pytest.mark.parametrize(
    "n, want", [(0, [False] * 3), (1, [False, False, True]), (2, [False, True, True]), (3, [False, True, True])]
)
def test_bf16_blocks_are_the_n_highest_resolutions_never_below_8(n, want):
    G = SynthesisNetwork(w_dim=4, img_resolution=16, img_channels=1, channel_base=64, channel_max=4, num_bf16_res=n)
    D = Discriminator(img_resolution=16, channel_base=64, channel_max=4, num_bf16_res=n)
    assert [b.use_bf16 for b in G.blocks] == want  # 4, 8, 16
    assert [b.use_bf16 for b in D.blocks] == want[1:][::-1]  # D's blocks read 16, then 8


def test_normalize_2nd_moment_and_w_avg_tracking_and_truncation():
    z = np.random.default_rng(3).normal(size=(4, 8)) * 3
    got = normalize_2nd_moment(torch.from_numpy(z)).numpy()
    assert np.allclose(got, z / np.sqrt((z**2).mean(1, keepdims=True) + 1e-8), rtol=1e-12)
    torch.manual_seed(3)
    m = MappingNetwork(8, 5, num_ws=4, num_layers=2, w_avg_beta=0.9)
    avg0 = torch.randn(5)
    m.w_avg.copy_(avg0)
    zt = torch.from_numpy(z).float()
    ws = m(zt, update_w_avg=True)
    w = ws[:, 0].detach().double().numpy()
    assert np.allclose(m.w_avg.double().numpy(), w.mean(0) + 0.9 * (avg0.double().numpy() - w.mean(0)), atol=1e-6)
    avg = m.w_avg.double().numpy()
    assert torch.equal(m(zt), ws) and np.array_equal(m.w_avg.double().numpy(), avg)  # no update unless asked
    t = m(zt, truncation_psi=0.7).detach().double().numpy()
    assert np.allclose(
        t, (avg + 0.7 * (w - avg))[:, None].repeat(4, 1), atol=1e-6
    )  # w_avg + psi (w - w_avg), every layer


# ---------------- minibatch standard deviation
@pytest.mark.parametrize("n, group", [(4, 2), (6, 3), (4, 4), (2, 4), (8, 4)])
def test_minibatch_std_per_group_averaged_over_channels_and_pixels(n, group):
    """Population std over each group's samples, + 1e-8 under the root, averaged over C, H, W: one extra channel."""
    x = np.random.default_rng(4).normal(size=(n, 4, 2, 3))
    got = MinibatchStd(group)(torch.from_numpy(x)).numpy()
    g = min(group, n)
    want = np.zeros(n)
    for i in range(n):
        members = [
            j for j in range(n) if j % (n // g) == i % (n // g)
        ]  # sample j is member j // (n/g) of group j % (n/g)
        want[i] = np.sqrt(x[members].var(axis=0) + 1e-8).mean()
    assert got.shape == (n, 5, 2, 3) and np.array_equal(got[:, :4], x)
    assert np.allclose(got[:, 4], want[:, None, None], rtol=1e-6)
    with pytest.raises(ValueError):
        MinibatchStd(2)(torch.zeros(3, 1, 2, 2))


# ---------------- the losses, on stub networks
class Mapping(nn.Module):
    def __init__(self, A: torch.Tensor, num_ws: int):
        super().__init__()
        self.A, self.num_ws, self.updates = nn.Parameter(A), num_ws, []

    def forward(self, z, update_w_avg=False):
        self.updates.append(update_w_avg)
        return (z @ self.A)[:, None].repeat(1, self.num_ws, 1)


class Synthesis(nn.Module):
    def __init__(self, B: torch.Tensor, res: int):
        super().__init__()
        self.B, self.res, self.bf16 = nn.Parameter(B), res, []

    def forward(self, ws, noise_mode="const", bf16=False):
        self.bf16.append(bf16)
        return (ws.flatten(1) @ self.B).square().reshape(-1, 1, self.res, self.res)


class StubG(nn.Module):
    """ws = z A (every layer), image = (flat(ws) B)^2: smooth and non-linear, so every gradient is non-trivial."""

    def __init__(self, A, B, num_ws=3, res=2):
        super().__init__()
        self.mapping, self.synthesis = Mapping(A, num_ws), Synthesis(B, res)


class StubD(nn.Module):
    """D(x) = sum_j c_j x_j^2 + d . x per image: gradient 2 c x + d."""

    def __init__(self, c, d):
        super().__init__()
        self.c, self.d, self.bf16 = nn.Parameter(c), nn.Parameter(d), []

    def forward(self, x, bf16=False):
        self.bf16.append(bf16)
        x = x.flatten(1)
        return ((self.c * x.square()).sum(1) + x @ self.d)[:, None]


def affine_augment(x):
    return 2 * x + 0.5


def _nets(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(3, 2, generator=g) * 0.5, torch.randn(6, 4, generator=g) * 0.5
    c, d = torch.randn(4, generator=g) * 0.3, torch.randn(4, generator=g)
    return StubG(A, B), StubD(c, d), [t.double() for t in (A, B, c, d)]


def ref_G(z, A, B):
    ws = (z @ A)[:, None].repeat(1, 3, 1)
    return (ws.flatten(1) @ B).square().reshape(-1, 1, 2, 2), ws


def ref_D(x, c, d):
    x = x.flatten(1)
    return (c * x.square()).sum(1) + x @ d


def _grads(loss, params):
    return [g.numpy() for g in torch.autograd.grad(loss, params)]


def _close(got, want, rtol=1e-4):
    for a, b in zip(got, want, strict=True):
        assert np.allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_generator_loss_is_softplus_of_minus_fake_logits():
    G, D, ref = _nets()
    loss = StyleGAN2Loss(G, D, affine_augment, style_mixing_prob=0.0)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    D.requires_grad_(False)
    out = loss.accumulate_gradients("Gmain", torch.zeros(4, 1, 2, 2), z, gain=3.0)
    A, B, c, d = (t.requires_grad_() for t in ref)
    want = F.softplus(-ref_D(affine_augment(ref_G(z.double(), A, B)[0]), c, d)).mean()  # -log sigmoid(D(G(z)))
    assert out["Loss/G/loss"] == pytest.approx(want.item(), rel=1e-5)
    _close([G.mapping.A.grad, G.synthesis.B.grad], _grads(want * 3.0, [A, B]))


def test_discriminator_loss_is_softplus_of_fake_plus_softplus_of_minus_real():
    G, D, ref = _nets()
    loss = StyleGAN2Loss(G, D, affine_augment, style_mixing_prob=0.0)
    g = torch.Generator().manual_seed(2)
    z, real = torch.randn(4, 3, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    G.requires_grad_(False)
    out = loss.accumulate_gradients("Dmain", real, z)  # gain 1 unless given
    A, B, c, d = ref
    c, d = c.requires_grad_(), d.requires_grad_()
    fake_logits = ref_D(affine_augment(ref_G(z.double(), A, B)[0]), c, d)
    real_logits = ref_D(affine_augment(real.double()), c, d)
    want = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    assert out["Loss/D/loss"] == pytest.approx(want.item(), rel=1e-5)
    assert out["Loss/scores/fake"] == pytest.approx(fake_logits.mean().item(), rel=1e-5)
    assert out["Loss/scores/real"] == pytest.approx(real_logits.mean().item(), rel=1e-5)
    assert np.allclose(out["real_logits"].numpy()[:, 0], real_logits.detach().numpy(), rtol=1e-5)
    _close([D.c.grad, D.d.grad], _grads(want, [c, d]))


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_bf16_runs_only_in_the_main_phases(mixed_precision):
    """With mixed precision G's and D's bf16 blocks run in the main phases; the regularizers stay float32."""
    G, D, _ = _nets()
    kw = {"mixed_precision": True} if mixed_precision else {}  # off by default
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0.0, pl_weight=1.0, **kw)
    for phase, G_calls, D_calls in (("Gmain", 1, 1), ("Greg", 1, 0), ("Dmain", 1, 2), ("Dreg", 0, 1)):
        G.synthesis.bf16.clear()
        D.bf16.clear()
        loss.accumulate_gradients(phase, torch.randn(2, 1, 2, 2), torch.randn(2, 3))
        main = phase.endswith("main") and mixed_precision
        assert G.synthesis.bf16 == [main] * G_calls and D.bf16 == [main] * D_calls, phase


@pytest.mark.parametrize("gamma, gain", [(1.0, 1.0), (10.0, 16.0)])
def test_r1_is_half_gamma_times_squared_gradient_norm_through_the_augmentation(gamma, gain):
    G, D, ref = _nets()
    loss = StyleGAN2Loss(G, D, affine_augment, r1_gamma=gamma, style_mixing_prob=0.0)
    real = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    out = loss.accumulate_gradients("Dreg", real, torch.zeros(3, 3), gain=gain)
    _, _, c, d = ref
    c, d = c.requires_grad_(), d.requires_grad_()
    x = real.double().flatten(1)
    grad_x = 2 * (2 * c * affine_augment(x) + d)  # d D(aug(x)) / dx: the augmentation's slope 2 times D's gradient
    penalty = grad_x.square().sum(1)
    assert out["Loss/r1_penalty"] == pytest.approx(penalty.mean().item(), rel=1e-5)
    _close([D.c.grad, D.d.grad], _grads((penalty * gamma / 2).mean() * gain, [c, d]))


@pytest.mark.parametrize("batch, shrink", [(4, 2), (2, 4)])
def test_path_length_penalty_and_its_running_mean(batch, shrink):
    """a <- a + decay (mean |J^T y| - a); penalty (|J^T y| - a)^2 with a held constant; y ~ N(0, I) / sqrt(H W);
    |J^T y| = sqrt(mean over layers of the squared norm over w); on the first max(N / pl_batch_shrink, 1) latents."""
    G, D, ref = _nets()
    loss = StyleGAN2Loss(
        G, D, affine_augment, style_mixing_prob=0.0, pl_weight=2.0, pl_decay=0.1, pl_batch_shrink=shrink
    )
    z = torch.randn(batch, 3, generator=torch.Generator().manual_seed(4))
    n = max(batch // shrink, 1)
    D.requires_grad_(False)
    A, B, _, _ = (t.requires_grad_() for t in ref)
    mean = 0.0
    for step in range(2):
        G.zero_grad(set_to_none=True)
        torch.manual_seed(10 + step)
        out = loss.accumulate_gradients("Greg", torch.zeros(batch, 1, 2, 2), z, gain=4.0)
        torch.manual_seed(10 + step)
        noise = torch.randn(n, 1, 2, 2).double() / 2.0  # the phase's first random draw; sqrt(H W) = 2
        img, ws = ref_G(z[:n].double(), A, B)
        (jy,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
        lengths = jy.square().sum(2).mean(1).sqrt()
        mean = mean + 0.1 * (lengths.mean().item() - mean)
        penalty = (lengths - mean).square()
        assert float(loss.pl_mean) == pytest.approx(mean, rel=1e-5)
        assert out["Loss/pl_penalty"] == pytest.approx(penalty.mean().item(), rel=1e-4)
        _close([G.mapping.A.grad, G.synthesis.B.grad], _grads((penalty * 2.0).mean() * 4.0, [A, B]), rtol=1e-3)
    assert StyleGAN2Loss(G, D, pl_weight=0.0).accumulate_gradients("Greg", torch.zeros(4, 1, 2, 2), z) == {}


def test_style_mixing_switches_to_a_second_latent_at_a_random_cutoff():
    """With probability p the layers from a cutoff in [1, num_ws) take a second latent's w, else none do."""
    G, D, _ = _nets()
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    own_layers = []
    for _ in range(60):
        _, ws = StyleGAN2Loss(G, D, style_mixing_prob=0.5).run_G(z)
        own = torch.isclose(ws, G.mapping(z)).all(dim=2)  # (N, num_ws): layer taken from z's own w
        k = int(own[0].sum())
        assert torch.equal(own, (torch.arange(3) < k)[None].expand(64, 3))  # a prefix, one cutoff per batch
        own_layers.append(k)
    assert set(own_layers) == {1, 2, 3} and 0.3 < own_layers.count(3) / 60 < 0.7  # 3: not mixed
    _, ws = StyleGAN2Loss(G, D, style_mixing_prob=0.0).run_G(z)
    assert torch.equal(ws, G.mapping(z))
    with pytest.raises(ValueError, match="unknown phase"):
        StyleGAN2Loss(G, D).accumulate_gradients("Gboth", torch.zeros(1, 1, 2, 2), z[:1])


def test_w_avg_follows_the_main_phases_only():
    """The main phases' latents move w_avg; path length's and the style-mixing second latents do not."""
    G, D, _ = _nets()
    loss = StyleGAN2Loss(G, D, style_mixing_prob=1.0, pl_weight=1.0)
    z = torch.randn(2, 3)
    for phase, want in (("Gmain", [True, False]), ("Greg", [False, False]), ("Dmain", [True, False])):
        G.mapping.updates.clear()
        loss.accumulate_gradients(phase, torch.zeros(2, 1, 2, 2), z)
        assert G.mapping.updates == want, phase


def test_loss_and_ada_defaults_are_the_papers():
    """gamma = 1 (DatasetGAN-medical); the rest stylegan2-ada-pytorch's: mixing 0.9, path length on N/2 with decay
    0.01 (off unless configured), ADA target 0.6 every 4 minibatches over 500 kimg, bgc pipeline at unit strength."""
    G, D, _ = _nets()
    loss = StyleGAN2Loss(G, D)
    assert (loss.r1_gamma, loss.style_mixing_prob, loss.pl_weight, loss.pl_batch_shrink, loss.pl_decay) == (
        1.0,
        0.9,
        0.0,
        2,
        0.01,
    )
    ada = AdaController(AugmentPipe())
    assert (ada.target, ada.interval, ada.ada_kimg) == (0.6, 4, 500.0) and float(ada.pipe.p) == 0.0
    assert math.isnan(ada.rt)  # no r_t before the first interval
    assert MinibatchStd().group_size == 4 and Discriminator(img_resolution=8, channel_base=32).mbstd.group_size == 4
    G = Generator(img_resolution=8, channel_base=16, channel_max=2)
    assert (G.z_dim, G.w_dim, len(G.mapping.layers), G.mapping.w_avg_beta) == (512, 512, 8, 0.995)
    assert G.mapping.layers[0].weight_gain == pytest.approx(0.01 / math.sqrt(512))  # mapping lr multiplier 0.01
    pipe = AugmentPipe()
    strengths = (
        pipe.xflip,
        pipe.rotate90,
        pipe.xint,
        pipe.scale,
        pipe.rotate,
        pipe.aniso,
        pipe.xfrac,
        pipe.brightness,
        pipe.contrast,
    )
    assert strengths == (1.0,) * 9 and pipe.rotate_max == 1.0


# ---------------- ADA: p += sign(r_t - target) * (images in the interval) / (ada_kimg * 1000), clamped to [0, 1]
@pytest.mark.parametrize(
    "positives, start, want",
    [
        (10, 0.5, 0.5 + 0.015),
        (8, 0.5, 0.5),
        (2, 0.5, 0.5 - 0.015),  # r_t = 1, 0.6 (= target: no move), -0.6
        (2, 0.01, 0.0),
        (10, 0.99, 1.0),  # clamped
    ],
)
def test_ada_p_step_sign_size_and_clamp(positives, start, want):
    pipe = AugmentPipe(p=start)
    ada = AdaController(pipe, target=0.6, interval=3, ada_kimg=2.0)  # 3 minibatches of 10 images: step 30 / 2000
    logits = torch.tensor([1.0] * positives + [-1.0] * (10 - positives))[:, None]
    for i in range(3):
        ada.accumulate(logits)
        changed = ada.step(10)
        assert changed == (i == 2)
        if i < 2:
            assert float(pipe.p) == pytest.approx(start)
    assert float(pipe.p) == pytest.approx(want, abs=1e-7)
    assert ada.rt == pytest.approx((2 * positives - 10) / 10)
    assert (ada.sign_sum, ada.count, ada.steps) == (0.0, 0, 3)  # each interval starts afresh; minibatches counted


def test_ada_rt_counts_signs_over_ranks_and_ignores_zero_logits_in_the_sum():
    pipe = AugmentPipe(p=0.2)
    ada = AdaController(pipe, target=0.6, interval=1, ada_kimg=1.0)
    ada.accumulate(torch.tensor([[2.0], [0.0], [-3.0], [5.0]]))  # signs 1, 0, -1, 1: r_t = 1/4 locally
    ada.step(8, reduce=lambda s: s * torch.tensor([3.0, 2.0], dtype=torch.float64))  # stand-in for a sum over ranks
    assert ada.rt == pytest.approx(3 / 8)
    assert float(pipe.p) == pytest.approx(0.2 - 8 / 1000)
    assert not AdaController(pipe, interval=1).step(4)  # nothing accumulated: p stays


# ---------------- ADA's augmentations
def _only(name: str, p: float, strength: float = 1.0, **kw) -> AugmentPipe:
    names = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac", "brightness", "contrast")
    return AugmentPipe(p=p, **{k: strength * (k == name) for k in names}, **kw)


@pytest.mark.parametrize(
    "name, hit", [("xflip", 0.5), ("rotate90", 0.75), ("scale", 1.0), ("rotate", 1.0), ("aniso", 1.0), ("xfrac", 1.0)]
)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_each_geometric_transform_is_applied_with_probability_p(name, hit, strength):
    """P(applied) = p times the transform's strength (rotation: pre or post, each 1 - sqrt(1 - p s));
    `hit`: the chance a drawn value is not the identity."""
    torch.manual_seed(6)
    M = _only(name, 0.4, strength).geometry(20000, 32, "cpu")
    moved = (M - torch.eye(3)).abs().amax(dim=(1, 2)) > 1e-6
    assert moved.float().mean().item() == pytest.approx(0.4 * strength * hit, abs=0.02)
    assert torch.equal(_only(name, 0.0).geometry(100, 32, "cpu"), torch.eye(3).expand(100, 3, 3))  # p = 0: identity


def test_rotation_angle_is_uniform_over_the_circle():
    """Each of the two rotations draws its angle uniformly in [-pi, pi] rotate_max: with both always applied,
    the sum is uniform on the circle; at rotate_max 1/2 it is triangular on [-pi, pi] (mean |angle| pi / 3)."""
    torch.manual_seed(11)
    for rotate_max, mean_abs in ((1.0, math.pi / 2), (0.5, math.pi / 3)):
        r = _only("rotate", 1.0, rotate_max=rotate_max).geometry(20000, 32, "cpu")
        angle = torch.atan2(r[:, 1, 0], r[:, 0, 0])
        assert angle.abs().mean().item() == pytest.approx(mean_abs, abs=0.03)
        assert (angle > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        if rotate_max == 1.0:
            quarter = torch.histc(angle, bins=4, min=-math.pi, max=math.pi) / len(angle)
            assert quarter.tolist() == pytest.approx([0.25] * 4, abs=0.02)


def test_integer_translation_warps_the_upsampled_image_with_reflection():
    """x -> FIR down(pad(warp(FIR up(pad x)))), the warp a shift by whole image pixels reflected at the border
    (numpy's 'reflect': about the edge pixels), as ADA pads by reflection before it warps."""
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    pipe = _only("xint", 1.0, xint_max=0.25)
    torch.manual_seed(12)
    got = pipe(x)
    torch.manual_seed(12)
    t = pipe.geometry(8, 16, "cpu")[:, :2, 2].long().numpy()  # the same draws: the shifts, in the 2x frame
    up = upsample2d(F.pad(x, [1] * 4, mode="reflect"))[:, :, 2:-2, 2:-2].numpy()
    idx = np.arange(16)
    for n in range(8):
        rows, cols = np.abs(idx - t[n, 1]), np.abs(idx - t[n, 0])
        rows, cols = np.where(rows > 15, 30 - rows, rows), np.where(cols > 15, 30 - cols, cols)
        warped = up[n][:, rows][:, :, cols]
        want = downsample2d(F.pad(torch.from_numpy(warped)[None], [1] * 4, mode="reflect"), pad=0)[0].numpy()
        assert np.allclose(got[n].numpy(), want, atol=1e-6), n
    assert np.abs(t).max() > 0
    assert torch.equal(_only("xint", 0.0).geometry(100, 16, "cpu"), torch.eye(3).expand(100, 3, 3))  # p = 0: no shift
    with pytest.raises(ValueError, match="square"):
        pipe(torch.zeros(1, 1, 8, 4))


def test_geometric_value_laws():
    torch.manual_seed(7)
    n, size = 20000, 32
    s = _only("scale", 1.0).geometry(n, size, "cpu")
    assert torch.allclose(s[:, 0, 0], s[:, 1, 1]) and s[:, 0, 0].log2().std().item() == pytest.approx(0.2, rel=0.05)
    a = _only("aniso", 1.0).geometry(n, size, "cpu")
    assert torch.allclose(a[:, 0, 0] * a[:, 1, 1], torch.ones(n)) and a[:, 0, 0].log2().std().item() == pytest.approx(
        0.2, rel=0.05
    )
    t = _only("xfrac", 1.0).geometry(n, size, "cpu")[:, :2, 2] / size
    assert t.std(dim=0).tolist() == pytest.approx([0.125, 0.125], rel=0.05)
    r = _only("rotate", 1.0).geometry(n, size, "cpu")
    angle = torch.atan2(r[:, 1, 0], r[:, 0, 0])
    assert torch.allclose(r[:, 0, 0], r[:, 1, 1], atol=1e-6) and angle.abs().max().item() > 0.99 * math.pi
    f = _only("xflip", 1.0).geometry(n, size, "cpu")
    assert set(f[:, 0, 0].tolist()) == {-1.0, 1.0} and (f[:, 1, 1] == 1).all()
    q = _only("rotate90", 1.0).geometry(n, size, "cpu")
    quarter_turns = torch.atan2(q[:, 1, 0], q[:, 0, 0]).mul(2 / math.pi).round().remainder(4)
    assert torch.allclose(q[:, :2, :2], q[:, :2, :2].round(), atol=1e-6) and set(quarter_turns.tolist()) == {
        0.0,
        1.0,
        2.0,
        3.0,
    }


def test_integer_translation_moves_whole_pixels_of_the_image_at_most_xint_max():
    """The warp runs on the 2x-upsampled image (`size` = 2 S): a whole pixel of the image is 2 there."""
    torch.manual_seed(8)
    size = 32
    t = _only("xint", 1.0).geometry(20000, size, "cpu")[:, :2, 2]
    assert torch.equal(t, 2 * torch.round(t / 2))  # whole pixels at the image's own resolution
    assert t.abs().max().item() <= 0.125 * size and t.abs().max().item() >= 0.125 * size - 2
    assert set(t[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}  # +-2 image pixels (0.125 of S = 16): steps of 2 here


def test_geometric_transforms_compose_in_adas_order():
    """ADA applies x-flip, 90-degree rotation, integer translation, then isotropic scaling (as its reference):
    the translation is drawn before the scaling, so the matrix is S @ T and its offset is s * t."""
    torch.manual_seed(9)
    pipe = AugmentPipe(
        p=1.0, xflip=0, rotate90=0, xint=1, scale=1, rotate=0, aniso=0, xfrac=0, brightness=0, contrast=0
    )
    M = pipe.geometry(2000, 32, "cpu")
    t = M[:, :2, 2] / M[:, 0, 0:1]  # the translation before scaling: whole pixels
    assert torch.allclose(t, 2 * torch.round(t / 2), atol=1e-4)


def test_brightness_then_contrast_per_sample():
    """x -> (x + b) c, b ~ N(0, 0.2), log2 c ~ N(0, 0.5), one (b, c) per sample."""
    torch.manual_seed(10)
    x = torch.rand(4000, 1, 2, 2) * 2 - 1
    x[:, 0, 0, :] = torch.tensor([-0.5, 0.5])  # two known pixels a unit apart: c and b read off directly
    pipe = AugmentPipe(p=1.0, xflip=0, rotate90=0, xint=0, scale=0, rotate=0, aniso=0, xfrac=0)
    y = pipe(x).double().flatten(1)
    xd = x.double().flatten(1)
    c = (y[:, 1] - y[:, 0]) / (xd[:, 1] - xd[:, 0])
    b = y[:, 0] / c - xd[:, 0]
    assert torch.allclose(y, (xd + b[:, None]) * c[:, None], atol=1e-4)  # affine per sample, brightness first
    assert c.log2().std().item() == pytest.approx(0.5, rel=0.05) and b.std().item() == pytest.approx(0.2, rel=0.05)
    half = AugmentPipe(p=0.5, xflip=0, rotate90=0, xint=0, scale=0, rotate=0, aniso=0, xfrac=0, contrast=0)(x)
    assert ((half - x).abs().amax(dim=(1, 2, 3)) > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
