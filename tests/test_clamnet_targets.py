"""ClamNet's target rules (`clamnet.targets`) on hand-made slices where the answer is known: a 'lesion' square only in
abnormal slices, a brighter 'bone' square in every slice. `self` follows the network's own map (so a network that
marks the brightest pixels is told to keep marking the bone); `cam` and `difference` must pick the lesion."""

from __future__ import annotations

import pytest
import torch

from labelfactory.clamnet.cam import CamConfig
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.loss import clamnet_loss, label_targets
from labelfactory.clamnet.network import MARKER
from labelfactory.clamnet.pairs import NEGATIVE, PairSampler
from labelfactory.clamnet.targets import cam_evidence, difference_evidence, evidence
from labelfactory.clamnet.train import ClamNetConfig, load_clamnet, save_clamnet, train_clamnet

pytestmark = pytest.mark.usefixtures("one_thread")
S = 32
FRACTION = 0.05  # of the 32 x 32 organ: 52 pixels, the lesion holds 64


def _bone_and_lesion(n: int = 24, seed: int = 0) -> tuple[WeakSlices, torch.Tensor, torch.Tensor]:
    """n slices of 2 studies (z = 0..n/2-1 each), abnormal in the middle third of each study; noise, a bone square
    (value 1) in every slice, an 8 x 8 lesion (value 0.5) only in abnormal ones, its place jittered. The whole crop is
    organ. Returns (slices, lesion masks (n, S, S), bone mask (S, S))."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    z = torch.arange(n) % half
    abnormal = (z >= half // 3) & (z < 2 * half // 3)
    x = -0.5 + 0.05 * torch.randn(n, 1, S, S, generator=g)
    bone = torch.zeros(S, S, dtype=torch.bool)
    bone[4:12, 4:12] = True
    x[:, 0][:, bone] = 1.0
    lesion = torch.zeros(n, S, S, dtype=torch.bool)
    for i in torch.nonzero(abnormal).flatten().tolist():
        cy, cx = (18 + int(v) for v in torch.randint(0, 5, (2,), generator=g))
        lesion[i, cy : cy + 8, cx : cx + 8] = True
    x[:, 0][lesion] = 0.5
    study = ["p1"] * half + ["p2"] * (n - half)
    slices = WeakSlices(
        x, torch.ones_like(x), lesion[:, None].float(), torch.ones(n, dtype=torch.bool), abnormal,
        torch.ones(n), study, z,
    )  # fmt: skip
    return slices, lesion, bone


def _targets(slices: WeakSlices, score: torch.Tensor) -> torch.Tensor:
    """The marker channel of label_targets for every slice: (N, S, S) bool."""
    return label_targets(slices.abnormal, slices.organ, score, FRACTION)[:, MARKER].bool()


def _share_on(target: torch.Tensor, region: torch.Tensor, rows: torch.Tensor) -> float:
    return float((target[rows] & region[rows]).sum() / target[rows].sum())


def test_self_target_follows_the_networks_own_map_onto_the_bone():
    """A network whose marker is the image's brightness (the shortcut of docs/RESULTS.md section 6) gets the bone as
    its target: nothing in `self` ties the target to the abnormality."""
    slices, lesion, bone = _bone_and_lesion()
    brightness = (slices.x + 1) / 2
    target = _targets(slices, brightness)
    ab = slices.abnormal
    assert _share_on(target, bone.expand_as(lesion), ab) == 1.0
    assert not target[~ab].any()


def test_difference_target_is_the_lesion_not_the_bone():
    slices, lesion, bone = _bone_and_lesion()
    ev = difference_evidence(slices, k=2)
    target = _targets(slices, ev)
    ab = slices.abnormal
    assert _share_on(target, lesion, ab) == 1.0
    assert not (target & bone).any() and not target[~ab].any()
    assert not ev[~ab].any()  # normal slices carry no evidence


def test_difference_evidence_is_zero_outside_the_organ_and_without_normal_neighbours():
    slices, _, _ = _bone_and_lesion()
    slices.organ[:, :, :, : S // 2] = 0
    ev = difference_evidence(slices, k=2)
    assert not ev[..., : S // 2].any() and ev[slices.abnormal].sum() > 0
    only_abnormal = slices.subset(torch.nonzero(slices.abnormal).flatten())
    assert not difference_evidence(only_abnormal).any()


def test_cam_seed_is_the_lesion_not_the_brighter_bone():
    """A classifier trained on the image-level labels can only tell the slices apart by the lesion, so its CAM (4 x 4
    at layer4 on 32^2, upsampled: coarse) must put a good part of the seed on the lesion (a seed at random: 6 %)
    and none on the bone."""
    slices, lesion, bone = _bone_and_lesion(n=32, seed=1)
    ev = cam_evidence(slices, CamConfig(steps=40, batch=8, lr=3e-3, seed=0, widths=(8, 8, 16, 16)))
    assert ev.shape == slices.x.shape and ev.min() >= 0 and ev.max() <= 1
    target = _targets(slices, ev)
    ab = slices.abnormal
    assert _share_on(target, lesion, ab) > 0.25
    assert _share_on(target, bone.expand_as(lesion), ab) == 0


def test_the_negative_pair_target_comes_from_the_evidence_not_the_network():
    """With evidence in the sampler, an abnormal slice's loss is lowest when the network marks the evidence's top
    pixels (here a lesion), whatever the network's own map says."""
    slices, lesion, bone = _bone_and_lesion()
    ev = difference_evidence(slices, k=2)
    sampler = PairSampler(slices.x, slices.abnormal, slices.eta, slices.organ, (0.0, 0.0, 1.0), None, ev)
    batch = sampler.sample(6, torch.Generator().manual_seed(0))
    assert (batch.kind == NEGATIVE).all() and batch.evidence_a is not None

    def rows(xs: torch.Tensor) -> list[int]:  # which slice each side of the batch is
        return [int(torch.nonzero((slices.x == x).flatten(1).all(1))[0]) for x in xs]

    def loss(region_a: torch.Tensor, region_b: torch.Tensor) -> float:
        """The pair loss when each network marks `region_*` (N, S, S) of its abnormal slices (logit +-4)."""
        m = [
            (r & ab.view(-1, 1, 1))[:, None].float() * 8 - 4
            for r, ab in ((region_a, batch.abnormal_a), (region_b, batch.abnormal_b))
        ]
        return float(clamnet_loss([torch.cat([-m[0], m[0]], 1)], [torch.cat([-m[1], m[1]], 1)], batch, FRACTION))

    ra, rb = rows(batch.xa), rows(batch.xb)
    assert loss(lesion[ra], lesion[rb]) < loss(bone.expand(len(ra), S, S), bone.expand(len(rb), S, S))


def test_target_is_an_option_recorded_in_the_model_file(tmp_path):
    slices, _, _ = _bone_and_lesion()
    for target in ("cam", "difference"):
        cfg = ClamNetConfig(size=S, features=(4, 4, 8, 8, 16, 4), steps=2, batch=4, target=target, organ="toy")
        pair, history = train_clamnet(slices, cfg, device="cpu")
        assert len(history) == 2
        save_clamnet(pair, cfg, {}, tmp_path / f"{target}.pt", history)
        assert load_clamnet(tmp_path / f"{target}.pt", "cpu")[1].target == target
    assert ClamNetConfig().target == "self" and evidence(slices, "self", CamConfig()) is None
    with pytest.raises(ValueError, match="unknown target"):
        evidence(slices, "brightest", CamConfig())
