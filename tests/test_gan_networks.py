"""StyleGAN2 networks: shapes and taps, demodulation, determinism, the published generator file."""

import pytest
import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.gan.checkpoint import load_generator, publish_generator
from labelfactory.gan.latents import z_from_seed
from labelfactory.gan.networks import Discriminator, Generator, modulated_conv2d

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
    path = publish_generator(G, kwargs, tmp_path / "stylegan2.pt", config={"resolution": 16}, data={"images": ["a"]}, kimg=1.5)
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
