"""Exact values of the interpreter's formulas: the ensemble's MLPs and their BatchNorm folding, bilinear
upsampling weights, majority vote, Jensen-Shannon uncertainty and the image score.

Expectations are computed here, in float64 numpy, from the definitions (DatasetGAN: Linear -> ReLU -> BN,
twice, then Linear; JS = H(mean p) - mean H(p)), never by calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelfactory.datasetgan.ensemble import EnsembleConfig, PixelEnsemble, majority_vote, upsample_matrix
from labelfactory.datasetgan.uncertainty import image_score, js_divergence


def _ensemble(channels=(3, 2), resolutions=(2, 4), R=4, K=3, M=2, hidden=(5, 4), seed=0) -> PixelEnsemble:
    ens = PixelEnsemble(
        EnsembleConfig(channels, resolutions, R, num_classes=K, members=M, hidden=hidden, seed=seed)
    ).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for bn in (ens.bn1, ens.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.3)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        for b in (ens.b1, ens.b2, ens.b3):
            b.copy_(torch.randn(b.shape, generator=g))
    return ens.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ref_member(ens: PixelEnsemble, m: int, x: np.ndarray) -> np.ndarray:
    """Member m on pixel rows x (P, C): Linear -> ReLU -> BN(eval) -> Linear -> ReLU -> BN(eval) -> Linear."""

    def bn(h, mod, H):
        sl = slice(m * H, (m + 1) * H)
        mean, var, gamma, beta = (_np(v)[sl] for v in (mod.running_mean, mod.running_var, mod.weight, mod.bias))
        return (h - mean) / np.sqrt(var + mod.eps) * gamma + beta

    H1, H2 = ens.config.hidden
    h = bn(np.maximum(x @ _np(ens.w1[m]) + _np(ens.b1[m]), 0), ens.bn1, H1)
    h = bn(np.maximum(h @ _np(ens.w2[m]) + _np(ens.b2[m]), 0), ens.bn2, H2)
    return h @ _np(ens.w3[m]) + _np(ens.b3[m])


def bilinear(r: int, R: int) -> np.ndarray:
    """(R, r): output i samples source coordinate (i + 0.5) r / R - 0.5, clamped to [0, r - 1], linearly."""
    A = np.zeros((R, r))
    for i in range(R):
        c = min(max((i + 0.5) * r / R - 0.5, 0.0), r - 1)
        lo = int(math.floor(c))
        A[i, lo] += 1 - (c - lo)
        A[i, min(lo + 1, r - 1)] += c - lo
    return A


def up2d(t: np.ndarray, R: int) -> np.ndarray:
    """(C, r, r) -> (C, R, R) bilinear."""
    A = bilinear(t.shape[-1], R)
    return np.einsum("yi,xj,cij->cyx", A, A, t)


def test_pixel_ensemble_is_m_independent_mlps_with_eval_batchnorm():
    ens = _ensemble()
    x = np.random.default_rng(0).normal(size=(2, 7, 5))  # member m sees its own rows x[m]
    got = _np(ens(torch.from_numpy(x)))
    assert got.shape == (2, 7, 3)
    for m in range(2):
        assert np.allclose(got[m], ref_member(ens, m, x[m]), rtol=1e-12, atol=1e-12)


def test_batchnorm_folds_into_the_next_linear_layer():
    """BN(h) @ w + b == h @ (s w) + (t @ w + b), s = gamma / sqrt(var + eps), t = beta - mean s (per member)."""
    ens = _ensemble()
    f = ens.factorized()
    M, (H1, H2) = 2, ens.config.hidden
    for bn, w, b, H, w_f, b_f in ((ens.bn1, ens.w2, ens.b2, H1, f.w2, f.b2), (ens.bn2, ens.w3, ens.b3, H2, f.w3, f.b3)):
        s = (_np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)).reshape(M, H)
        t = _np(bn.bias).reshape(M, H) - _np(bn.running_mean).reshape(M, H) * s
        assert np.allclose(_np(w_f), s[:, :, None] * _np(w), rtol=1e-12, atol=1e-14)
        assert np.allclose(_np(b_f)[:, 0], np.einsum("mh,mho->mo", t, _np(w)) + _np(b), rtol=1e-12, atol=1e-12)


def _taps(seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64),
    ]


@pytest.mark.parametrize("R", [4, 8])  # 8: no tap at the image's own size
def test_factorized_logits_equal_the_naive_mlp_on_upsampled_concatenated_taps(R):
    ens = _ensemble(R=R)
    taps = _taps()
    x = np.concatenate([up2d(_np(t[0]), R) for t in taps]).reshape(5, R * R).T  # (pixels, channels), row-major
    got = _np(ens.factorized().double()(taps))  # (1, M, K, R, R)
    for m in range(2):
        assert np.allclose(got[0, m].reshape(3, R * R).T, ref_member(ens, m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r, R", [(2, 4), (3, 9), (4, 6), (1, 3)])
def test_upsample_matrix_holds_the_bilinear_weights(r, R):
    assert np.allclose(upsample_matrix(r, R).numpy(), bilinear(r, R), atol=1e-6)


def test_members_have_their_own_kaiming_init_and_the_seed_fixes_it():
    """w ~ N(0, 2 / fan_in) per layer (He et al.), a different draw per member, the same for the same seed."""
    ens = PixelEnsemble(EnsembleConfig((48, 16), (4, 8), 8, num_classes=64, members=2, hidden=(256, 128), seed=3))
    for w, fan_in in ((ens.w1, 64), (ens.w2, 256), (ens.w3, 128)):
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
        assert abs(w.mean().item()) < 0.1 * math.sqrt(2 / fan_in)
    assert not torch.allclose(ens.w1[0], ens.w1[1])
    other = PixelEnsemble(EnsembleConfig((48, 16), (4, 8), 8, num_classes=64, members=2, hidden=(256, 128), seed=4))
    same = PixelEnsemble(EnsembleConfig((48, 16), (4, 8), 8, num_classes=64, members=2, hidden=(256, 128), seed=3))
    assert torch.equal(same.w3, ens.w3) and not torch.allclose(other.w1, ens.w1)
    assert all((b == 0).all() for b in (ens.b1, ens.b2, ens.b3))
    cfg = ens.config
    paper = EnsembleConfig((1,), (4,), 4, num_classes=2)
    assert (paper.members, paper.hidden, paper.seed) == (
        10,
        (256, 128),
        0,
    )  # DatasetGAN-medical: n = 10; 256 and 128 units
    assert EnsembleConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["hidden"] == [256, 128]


def test_majority_vote_counts_members_per_pixel_and_breaks_ties_low():
    logits = np.random.default_rng(3).normal(size=(2, 5, 4, 3, 3))
    picks = logits.argmax(2)  # (B, M, H, W)
    counts = np.stack([(picks == k).sum(1) for k in range(4)], 1)
    want = counts.argmax(1)  # numpy's argmax takes the first maximum: the lowest class
    got = majority_vote(torch.from_numpy(logits))
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)
    tie = torch.zeros(1, 2, 3, 1)
    tie[0, 0, 2], tie[0, 1, 1] = 1, 1  # one vote each for classes 2 and 1
    assert majority_vote(tie).tolist() == [[1]]


def ref_js(logits: np.ndarray) -> np.ndarray:
    """(B, M, K, *S) -> (B, *S): H(mean_m p_m) - mean_m H(p_m), nats, with 0 log 0 = 0."""
    z = logits - logits.max(2, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(2, keepdims=True)
    ent = lambda q: -np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(-1)  # noqa: E731  over the last axis
    mean_entropy = ent(np.moveaxis(p, 2, -1)).mean(1)
    return ent(np.moveaxis(p.mean(1), 1, -1)) - mean_entropy


def test_js_divergence_is_entropy_of_the_mean_minus_mean_entropy():
    logits = np.random.default_rng(4).normal(scale=2.0, size=(2, 3, 4, 2, 3))
    got = js_divergence(torch.from_numpy(logits))
    assert got.dtype == torch.float32 and got.shape == (2, 2, 3)
    assert np.allclose(got.numpy(), ref_js(logits), rtol=1e-5, atol=1e-6)
    # two members, each certain of a different one of K = 3 classes, the third never chosen: log 2, finite
    sure = np.full((1, 2, 3, 1, 1), -200.0)
    sure[0, 0, 0], sure[0, 1, 1] = 200.0, 200.0
    assert js_divergence(torch.from_numpy(sure)).item() == pytest.approx(math.log(2), abs=1e-6)
    agree = js_divergence(torch.from_numpy(np.repeat(logits[:, :1], 3, axis=1)))  # members agree: 0, never below
    assert (agree >= 0).all() and agree.max() < 1e-6


@pytest.mark.parametrize("top_fraction, k", [(0.1, 2), (0.25, 5), (0.01, 1), (1.0, 20)])
def test_image_score_is_the_mean_of_the_top_ceil_fraction_pixels(top_fraction, k):
    js = np.random.default_rng(5).uniform(size=(2, 4, 5))
    want = np.sort(js.reshape(2, -1), axis=1)[:, ::-1][:, :k].mean(1)
    assert np.allclose(image_score(torch.from_numpy(js), top_fraction).numpy(), want, rtol=1e-12)
