"""The factorized ensemble against the naive DatasetGAN form (upsample every tap, concatenate, MLP)."""

import math

import pytest
import torch
import torch.nn.functional as F

from labelfactory.datasetgan.ensemble import EnsembleConfig, PixelEnsemble, majority_vote
from labelfactory.datasetgan.taps import TapLayout, generate_with_taps, sample_taps, ws_from_seeds
from labelfactory.datasetgan.uncertainty import image_score, js_divergence
from labelfactory.stylegan2.networks import Generator

SMALL = dict(z_dim=32, w_dim=32, channel_base=1024, channel_max=64, mapping_layers=2)


def naive_logits(ens: PixelEnsemble, taps: list[torch.Tensor]) -> torch.Tensor:
    """Reference: upsample every tap to image size, concatenate, run each member's MLP (eval BN) per pixel."""
    R = ens.config.image_resolution
    feats = torch.cat([F.interpolate(t, size=(R, R), mode="bilinear", align_corners=False) for t in taps], dim=1)
    B, C = feats.shape[:2]
    x = feats.permute(0, 2, 3, 1).reshape(-1, C).double()
    M, (H1, H2) = ens.config.members, ens.config.hidden
    out = []
    for m in range(M):

        def bn(h, bn_mod, H, m=m):
            sl = slice(m * H, (m + 1) * H)
            return F.batch_norm(
                h,
                bn_mod.running_mean[sl].double(),
                bn_mod.running_var[sl].double(),
                bn_mod.weight[sl].double(),
                bn_mod.bias[sl].double(),
                False,
                0.0,
                bn_mod.eps,
            )

        h = bn(torch.relu(x @ ens.w1[m].double() + ens.b1[m].double()), ens.bn1, H1)
        h = bn(torch.relu(h @ ens.w2[m].double() + ens.b2[m].double()), ens.bn2, H2)
        out.append(h @ ens.w3[m].double() + ens.b3[m].double())
    return torch.stack(out, 1).reshape(B, R, R, M, -1).permute(0, 3, 4, 1, 2)


def randomized_bn(ens: PixelEnsemble) -> PixelEnsemble:
    """Give BatchNorm non-trivial running stats and affine params so folding is really exercised."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in (ens.bn1, ens.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        for b in (ens.b1, ens.b2, ens.b3):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return ens.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    G = Generator(img_resolution=32, **SMALL).eval()
    ws = ws_from_seeds(G, [1, 2], truncation_psi=0.7)
    _, taps = generate_with_taps(G, ws)
    layout = TapLayout.of(G)
    cfg = EnsembleConfig(layout.channels, layout.resolutions, 32, num_classes=5, members=4, hidden=(16, 8))
    return G, taps, randomized_bn(PixelEnsemble(cfg))


def test_layout_groups_taps_by_resolution(setup):
    G, taps, _ = setup
    layout = TapLayout.of(G)
    groups = layout.groups()
    assert list(groups) == [4, 8, 16, 32]
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(taps)))
    assert all(layout.resolutions[i] == r for r, idx in groups.items() for i in idx)


def test_factorized_matches_naive(setup):
    _, taps, ens = setup
    ref = naive_logits(ens, taps)
    got = ens.factorized()(taps)
    assert got.shape == ref.shape == (2, 4, 5, 32, 32)
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() < 1e-4 * max(1.0, scale)
    agree = (majority_vote(got) == majority_vote(ref.float())).float().mean().item()
    assert agree >= 0.999


def test_training_form_equals_inference_form_at_sampled_pixels(setup):
    _, taps, ens = setup
    rows, cols = torch.tensor([0, 5, 31, 17, 31]), torch.tensor([0, 30, 31, 3, 0])
    x = sample_taps([t[1:2] for t in taps], rows, cols, 32)  # image 1 only
    assert x.shape == (5, sum(t.shape[1] for t in taps))
    pix = ens(x[None].expand(ens.config.members, -1, -1))  # (M, P, K)
    full = ens.factorized()(taps)[1][:, :, rows, cols]  # (M, K, P)
    assert torch.allclose(pix.transpose(1, 2), full, atol=1e-4, rtol=1e-4)


def test_members_initialised_differently(setup):
    _, _, ens = setup
    assert not torch.allclose(ens.w1[0], ens.w1[1])
    again = PixelEnsemble(ens.config)
    assert torch.equal(again.w1, PixelEnsemble(ens.config).w1)


def test_majority_vote_and_ties():
    logits = torch.zeros(1, 3, 4, 1, 2)
    logits[0, 0, 2, 0, 0] = logits[0, 1, 2, 0, 0] = logits[0, 2, 1, 0, 0] = 1  # 2 votes for class 2
    logits[0, 0, 3, 0, 1] = logits[0, 1, 1, 0, 1] = logits[0, 2, 2, 0, 1] = 1  # three-way tie -> lowest
    assert majority_vote(logits).tolist() == [[[2, 1]]]


def test_uncertainty_zero_when_members_agree_and_max_when_they_disagree():
    agree = torch.randn(1, 1, 3, 4, 4).expand(2, 5, 3, 4, 4)
    assert js_divergence(agree).abs().max().item() < 1e-6
    disagree = torch.full((1, 2, 2, 1, 1), -50.0)
    disagree[0, 0, 0] = disagree[0, 1, 1] = 50.0  # two confident members, opposite classes
    assert js_divergence(disagree).item() == pytest.approx(math.log(2), abs=1e-5)


def test_image_score_is_mean_of_top_tenth():
    js = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    assert image_score(js).item() == pytest.approx(sum(range(90, 100)) / 10)
    assert image_score(js, top_fraction=0.5).item() == pytest.approx(sum(range(50, 100)) / 50)


def test_factorized_bands_need_not_divide_the_image(setup):
    _, taps, ens = setup
    ref = naive_logits(ens, taps)
    for rows in (1, 5, 32, 100):
        f = ens.factorized()
        f.band_rows = rows
        assert (f(taps).double() - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize(
    "channels, resolutions, R", [((3, 5), (8, 8), 8), ((2, 3, 4, 2), (1, 3, 3, 9), 9), ((4, 3), (4, 12), 12)]
)
def test_factorized_matches_naive_on_other_layouts(channels, resolutions, R):
    """All taps at image size (bias path), odd scales (a 1-tap phase), a 1-pixel tap, scale 3 next to 9."""
    g = torch.Generator().manual_seed(3)
    taps = [torch.randn(2, c, r, r, generator=g) for c, r in zip(channels, resolutions, strict=True)]
    ens = randomized_bn(
        PixelEnsemble(EnsembleConfig(channels, resolutions, R, num_classes=3, members=3, hidden=(6, 4)))
    )
    ref = naive_logits(ens, taps)
    got = ens.factorized()(taps)
    assert got.shape == ref.shape == (2, 3, 3, R, R)
    assert (got.double() - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("rows", [32, 5, 1])
def test_fused_vote_and_uncertainty_equal_those_from_full_logits(setup, rows):
    """vote_and_uncertainty works band by band without the full logits; same vote, same JS as on forward()."""
    _, taps, ens = setup
    f = ens.factorized()
    f.band_rows = rows
    logits = f(taps)
    mask, js = f.vote_and_uncertainty(taps)
    assert mask.dtype == torch.int64 and mask.shape == js.shape == (2, 32, 32)
    assert torch.equal(mask, majority_vote(logits))
    assert (js - js_divergence(logits)).abs().max().item() < 1e-6
    assert js.max().item() > 1e-3  # the members really disagree somewhere, so the JS check means something


def test_fused_path_on_all_full_size_taps():
    """No coarse taps: the first-layer bias is added per band."""
    g = torch.Generator().manual_seed(4)
    taps = [torch.randn(1, c, 8, 8, generator=g) for c in (3, 5)]
    f = randomized_bn(
        PixelEnsemble(EnsembleConfig((3, 5), (8, 8), 8, num_classes=3, members=3, hidden=(6, 4)))
    ).factorized()
    f.band_rows = 3
    logits = f(taps)
    mask, js = f.vote_and_uncertainty(taps)
    assert torch.equal(mask, majority_vote(logits))
    assert (js - js_divergence(logits)).abs().max().item() < 1e-6


def test_both_forms_refuse_features_of_another_shape(setup):
    _, taps, ens = setup
    C = ens.config.layout.total_channels
    with pytest.raises(ValueError, match=r"pixel features \(M, P, sum C_i\) must be"):
        ens(torch.zeros(ens.config.members, 5, C + 1))
    with pytest.raises(ValueError, match="do not match the layout"):
        ens.factorized()(taps[:-1])
