"""ClamNet's level-matched contrast (`ClamNetConfig.pairing = "level"`, `pairs.level_normals`) on hand-made slices.

Three patients, each a stack of slices whose anatomy (a bright 'bone' square) moves with the level, the same way in
every patient; patient p1 alone has a 'lesion' at levels 20-30. Normal slices of other patients at the same level show
the same anatomy without the lesion; the patient's own nearest normal slices are at another level, where the bone
sits elsewhere. So the level-matched difference is the lesion, the patient-matched one also the moved bone."""

from __future__ import annotations

import pytest
import torch

from labelfactory.clamnet.data import WeakSlices, slice_levels
from labelfactory.clamnet.loss import label_targets
from labelfactory.clamnet.network import MARKER
from labelfactory.clamnet.pairs import NORMAL, PairSampler, level_normals
from labelfactory.clamnet.targets import difference_evidence
from labelfactory.clamnet.train import ClamNetConfig, level_partners, recorded_config, save_clamnet, train_clamnet

pytestmark = pytest.mark.usefixtures("one_thread")
S = 32
LEVELS = torch.arange(0, 60, 5.0)  # mm, 12 slices per patient
LESION_LEVELS = (20.0, 30.0)


def _bone(level: float) -> torch.Tensor:
    """The anatomy at a level: an 8 x 8 bright square whose column moves 2 px per 5 mm (the same in every patient)."""
    m = torch.zeros(S, S, dtype=torch.bool)
    c = 2 + int(level // 5) * 2
    m[4:12, c : c + 8] = True
    return m


def _three_patients(shift_p3: int = 1) -> tuple[WeakSlices, torch.Tensor]:
    """p1 (lesion at LESION_LEVELS), p2 and p3 (no lesion; p3's slices translated by `shift_p3` px, so matching needs
    the alignment). Returns (slices, lesion masks (N, S, S))."""
    g = torch.Generator().manual_seed(0)
    xs, lesion, study, levels = [], [], [], []
    for p in ("p1", "p2", "p3"):
        for lv in LEVELS.tolist():
            x = -0.5 + 0.02 * torch.randn(S, S, generator=g)
            x[_bone(lv)] = 1.0
            les = torch.zeros(S, S, dtype=torch.bool)
            if p == "p1" and LESION_LEVELS[0] <= lv <= LESION_LEVELS[1]:
                les[20:26, 18:24] = True
                x[les] = 0.3
            if p == "p3":
                x = torch.roll(x, shift_p3, dims=1)
            xs.append(x)
            lesion.append(les)
            study.append(p)
            levels.append(lv)
    lesion_t = torch.stack(lesion)
    n = len(xs)
    abnormal = lesion_t.flatten(1).any(1)
    slices = WeakSlices(
        torch.stack(xs)[:, None], torch.ones(n, 1, S, S), lesion_t[:, None].float(), torch.ones(n, dtype=torch.bool),
        abnormal, torch.ones(n), study, (torch.tensor(levels) / 5).long(), torch.tensor(levels),
    )  # fmt: skip
    return slices, lesion_t


def test_level_pairing_picks_other_patients_normal_slices_at_the_same_level():
    slices, _ = _three_patients()
    ab = torch.nonzero(slices.abnormal).flatten()
    found = level_normals(ab, slices.abnormal, slices.study, slices.level, slices.x, slices.organ, k=2, window=2.0)
    assert set(found) == set(ab.tolist())
    for i, (idx, offsets) in found.items():
        assert {slices.study[j] for j in idx.tolist()} == {"p2", "p3"}  # never the patient's own slices
        assert (slices.level[idx] == slices.level[i]).all() and not slices.abnormal[idx].any()
        p3 = [k for k, j in enumerate(idx.tolist()) if slices.study[j] == "p3"][0]
        assert offsets[p3].tolist() == [0, -1]  # p3's 1-px translation is undone by the alignment
    # the NORMAL pairs and NEGATIVE partners of the sampler follow the same rule
    negative, normal = level_partners(slices, k=2, window=2.0)
    assert set(negative) == set(ab.tolist()) and len(normal) == int((~slices.abnormal).sum())
    sampler = PairSampler(slices.x, slices.abnormal, slices.eta, slices.organ, (0.0, 1.0, 0.0), negative, None, normal)
    batch = sampler.sample(16, torch.Generator().manual_seed(0))
    assert (batch.kind == NORMAL).all()
    for xa, xb in zip(batch.xa, batch.xb, strict=True):
        i, j = (int(torch.nonzero((slices.x == v).flatten(1).all(1))[0]) for v in (xa, xb))
        assert slices.study[i] != slices.study[j] and abs(float(slices.level[i] - slices.level[j])) <= 2.0


def test_level_difference_marks_the_lesion_one_patient_has_not_the_shared_anatomy():
    slices, lesion = _three_patients()
    ab = slices.abnormal
    bone = torch.stack([_bone(float(lv)) for lv in slices.level])
    fraction = 36 / S**2  # the lesion's area
    ev = difference_evidence(slices, k=2, pairing="level", window=2.0)
    target = label_targets(ab, slices.organ, ev, fraction)[:, MARKER].bool()
    assert (target[ab] & lesion[ab]).sum() / target[ab].sum() >= 0.9
    assert not (target & bone).any() and not ev[~ab].any()
    # against the patient's own nearest normal slices (other levels), the moved bone's edges differ more than the
    # lesion: that target lands on the anatomy
    own = difference_evidence(slices, k=2, pairing="patient")
    own_target = label_targets(ab, slices.organ, own, fraction)[:, MARKER].bool()
    assert (own_target[ab] & ~lesion[ab]).sum() / own_target[ab].sum() >= 0.5


def test_slices_without_a_level_fall_back_to_their_place_in_the_study():
    slices, _ = _three_patients()
    slices.level = None
    assert torch.allclose(slice_levels(slices)[:12], torch.linspace(0, 100, 12))


def test_pairing_is_an_option_recorded_in_the_model_file(tmp_path):
    slices, _ = _three_patients()
    cfg = ClamNetConfig(
        size=S, features=(4, 4, 8, 8, 16, 4), steps=2, batch=4, target="difference", pairing="level", level_window=2.0
    )
    pair, history = train_clamnet(slices, cfg, device="cpu")
    save_clamnet(pair, cfg, {}, tmp_path / "level.pt", history)
    recorded = recorded_config(tmp_path / "level.pt")
    assert recorded.pairing == "level" and recorded.level_window == 2.0 and ClamNetConfig().pairing == "patient"
    with pytest.raises(ValueError, match="unknown pairing"):
        difference_evidence(slices, pairing="nearby")
