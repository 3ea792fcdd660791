"""StyleGAN2 networks: shapes and taps, the up-sampling conv's exact math, shape checks, bf16 blocks,
determinism, the published generator file and its layout."""

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from labelfactory.checkpoints import save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.latents import z_from_seed
from labelfactory.stylegan2.networks import Discriminator, Generator, MinibatchStd, SynthesisNetwork, modulated_conv2d

SMALL = dict(z_dim=32, w_dim=32, channel_base=512, channel_max=32, mapping_layers=2)


@pytest.mark.parametrize("res", [16, 32, 64])
def test_shapes_and_taps(res):
    G = Generator(img_resolution=res, **SMALL)
    D = Discriminator(img_resolution=res, channel_base=512, channel_max=32)
    z = torch.randn(4, 32)
    ws = G.mapping(z)
    assert ws.shape == (4, G.num_ws, 32) and G.num_ws == 2 * res.bit_length() - 4
    img, feats = G.synthesis(ws, return_features=True)
    assert img.shape == (4, 1, res, res)
    assert [f.shape[1] for f in feats] == G.tap_channels
    assert [f.shape[-1] for f in feats] == G.tap_resolutions == sorted(G.tap_resolutions)
    assert G.tap_resolutions[-1] == res and G.tap_resolutions[0] == 4
    assert D(img).shape == (4, 1)


def test_demodulation_keeps_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    weight = torch.randn(64, 64, 3, 3) * 5.0
    styles = torch.rand(8, 64) * 3 + 0.1
    y = modulated_conv2d(x, weight, styles, demodulate=True)
    assert y.std().item() == pytest.approx(1.0, abs=0.1)
    assert modulated_conv2d(x, weight, styles, demodulate=False).std().item() > 10


def test_same_seed_same_image_and_truncation():
    torch.manual_seed(0)
    G = Generator(img_resolution=16, **SMALL).eval()
    z = z_from_seed(123, 32)
    assert torch.equal(z, z_from_seed(123, 32)) and not torch.equal(z, z_from_seed(124, 32))
    assert torch.equal(G(z), G(z_from_seed(123, 32)))
    G.mapping.w_avg.copy_(torch.randn(32))
    ws = G.mapping(z, truncation_psi=0.0)
    assert torch.allclose(ws, G.mapping.w_avg.expand_as(ws))


def test_publish_and_load_generator(tmp_path):
    kwargs = dict(img_resolution=16, **SMALL)
    G = Generator(**kwargs)
    path = publish_generator(
        G, kwargs, tmp_path / "stylegan2.pt", config={"resolution": 16}, data={"images": ["a"]}, kimg=1.5
    )
    G2 = load_generator(path)
    assert not G2.training and not any(p.requires_grad for p in G2.parameters())
    assert G2.checkpoint_info["kimg"] == 1.5 and "time" in G2.checkpoint_info["provenance"]
    z = z_from_seed(1, 32)
    assert torch.equal(G.eval()(z), G2(z))
    with pytest.raises(LabelFactoryError, match="train stylegan2 first") as e:
        load_generator(tmp_path / "missing.pt")
    assert e.value.status == 409
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(LabelFactoryError, match="train stylegan2 first") as e:
        load_generator(tmp_path / "bad.pt")
    assert e.value.status == 409


def _up_conv_naive(x: np.ndarray, weight: np.ndarray, styles: np.ndarray) -> np.ndarray:
    """The 2x-up modulated conv written out: modulate, insert zeros (H -> 2H - 1), full 2D convolution with the
    kernel (correlation with the flipped kernel, H -> 2H + 1), then the [1, 3, 3, 1] filter times 4 with 1 zero
    each side (-> 2H), then demodulate. Loops over samples and channels, float64."""
    n, i_ch, h, _ = x.shape
    o_ch = weight.shape[0]
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    fir = np.outer(taps, taps) / taps.sum() ** 2 * 4
    out = np.zeros((n, o_ch, 2 * h, 2 * h))
    for b in range(n):
        for o in range(o_ch):
            acc = np.zeros((2 * h + 1, 2 * h + 1))
            for i in range(i_ch):
                z = np.zeros((2 * h - 1, 2 * h - 1))
                z[::2, ::2] = x[b, i] * styles[b, i]
                acc += correlate2d(z, weight[o, i, ::-1, ::-1], mode="full")
            out[b, o] = correlate2d(np.pad(acc, 1), fir, mode="valid")
            out[b, o] /= np.sqrt(((weight[o] * styles[b][:, None, None]) ** 2).sum() + 1e-8)
    return out


def test_up_conv_is_zero_insertion_full_convolution_and_filter():
    g = torch.Generator().manual_seed(0)
    x, weight, styles = (
        torch.randn(2, 3, 5, 5, generator=g),
        torch.randn(4, 3, 3, 3, generator=g),
        torch.rand(2, 3, generator=g) + 0.5,
    )
    y = modulated_conv2d(x.double(), weight.double(), styles.double(), up=True)
    want = _up_conv_naive(x.double().numpy(), weight.double().numpy(), styles.double().numpy())
    assert y.shape == (2, 4, 10, 10)
    np.testing.assert_allclose(y.numpy(), want, rtol=0, atol=1e-12)  # borders included: every pixel compared
    # a kernel that is not point-symmetric tells the convolution from a correlation (the layout-1 mistake)
    flipped = _up_conv_naive(x.double().numpy(), weight.flip(-1, -2).double().numpy(), styles.double().numpy())
    assert np.abs(y.numpy() - flipped).max() > 0.1


def _old_layout_file(tmp_path, kwargs):
    """A generator file as written before layout 2: no 'layout' entry."""
    state = Generator(**kwargs).state_dict()
    payload = {
        "kind": "stylegan2",
        "config": {},
        "data": {},
        "kimg": 1.0,
        "generator": {"kwargs": kwargs, "state_dict": state},
    }
    return save_checkpoint(payload, tmp_path / "stylegan2.pt")


def test_generator_of_an_earlier_layout_is_refused_with_409(tmp_path):
    path = _old_layout_file(tmp_path, dict(img_resolution=16, **SMALL))
    with pytest.raises(
        LabelFactoryError, match="trained with an earlier generator layout .*import or retrain stylegan2"
    ) as e:
        load_generator(path)
    assert e.value.status == 409


def test_shapes_are_checked_at_block_boundaries():
    G = Generator(img_resolution=16, **SMALL)
    with pytest.raises(ValueError, match=r"z must be \(N, 32\), got \(2, 31\)"):
        G(torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"ws must be \(N, 6, 32\)"):
        G.synthesis(torch.randn(2, 5, 32))
    block = G.synthesis.blocks[1]
    with pytest.raises(ValueError, match=r"x into the 8\^2 block must be \(2, 32, 4, 4\), got \(2, 32, 5, 5\)"):
        block(torch.randn(2, 32, 5, 5), None, torch.randn(2, 3, 32), "const", None)
    D = Discriminator(img_resolution=16, channel_base=512, channel_max=32)
    with pytest.raises(ValueError, match=r"the discriminator's image must be \(N, 1, 16, 16\), got \(2, 1, 8, 8\)"):
        D(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x into the 8\^2 D block"):
        D.blocks[1](torch.randn(2, 32, 16, 16), None)


def test_minibatch_std_refuses_a_batch_its_group_does_not_divide():
    mbstd = MinibatchStd(group_size=4)
    x = torch.randn(6, 3, 4, 4)
    with pytest.raises(ValueError, match="a batch of 6 does not split into groups of 4"):
        mbstd(x)
    y = mbstd(x[:4])  # one group of 4: the std channel is each pixel's std over the batch, averaged
    assert torch.allclose(y[:, 3], x[:4].std(dim=0, unbiased=False).mean().expand(4, 4, 4), atol=1e-5)
    assert torch.allclose(
        mbstd(x[:3])[:, 3], x[:3].std(dim=0, unbiased=False).mean().expand(3, 4, 4), atol=1e-5
    )  # smaller: one group


def test_bf16_blocks_run_in_bfloat16_close_to_float32_and_clamp():
    torch.manual_seed(0)
    G = Generator(img_resolution=32, num_bf16_res=2, conv_clamp=256.0, **SMALL)
    z = torch.randn(4, 32)
    img32, feats32 = G.synthesis(G.mapping(z), return_features=True)
    img16, feats16 = G.synthesis(G.mapping(z), return_features=True, bf16=True)
    assert [f.dtype for f in feats32] == [torch.float32] * 7
    assert [f.dtype for f in feats16] == [torch.float32] * 3 + [torch.bfloat16] * 4  # 16^2 and 32^2 blocks
    assert img16.dtype == torch.float32 and G.mapping(z).dtype == torch.float32
    rel = (img16 - img32).norm() / img32.norm()
    assert 1e-4 < rel < 5e-2  # bf16 rounding (8-bit mantissa), not another network
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, num_bf16_res=2, conv_clamp=256.0)
    d32, d16 = D(img32), D(img32, bf16=True)
    assert d16.dtype == torch.float32 and torch.allclose(d16, d32, rtol=0.05, atol=0.05) and not torch.equal(d16, d32)
    layer = SynthesisNetwork(32, 8, 1, 512, 32, conv_clamp=0.5).blocks[0].convs[0]
    assert layer(torch.randn(2, 32, 4, 4) * 100, torch.randn(2, 32)).abs().max() == 0.5
