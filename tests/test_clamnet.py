"""ClamNet: pairs, hybrid loss, organ crop, labels CSV, slab split, and learning a bright blob from image-level
labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelfactory.clamnet.crop import box_mask, crop_slices, oriented_to_file_slice, paste_back
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.evaluate import dice_iou, slab_split
from labelfactory.clamnet.image_labels import read_image_labels, slice_labels
from labelfactory.clamnet.loss import clamnet_loss, hybrid_loss, label_targets
from labelfactory.clamnet.pairs import (
    BLUR_RANGE,
    NEGATIVE,
    NORMAL,
    SAME,
    STRETCH_RANGE,
    PairSampler,
    draw_view,
    make_view,
    near_normals,
    to_view_frame,
)
from labelfactory.clamnet.train import ClamNetConfig, load_clamnet, save_clamnet, train_clamnet
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image

TINY = (4, 4, 8, 8, 16, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n: int, size: int, seed: int) -> tuple[WeakSlices, torch.Tensor]:
    """Noisy slices with a disc 'organ'; abnormal ones get a bright 5x5 blob inside the organ. Returns (slices, blob
    masks)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    organ = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2).float()
    x = -0.2 + 0.1 * torch.randn(n, 1, size, size, generator=g) + 0.2 * organ
    abnormal = torch.arange(n) % 2 == 0
    blob = torch.zeros(n, size, size)
    for i in torch.nonzero(abnormal).flatten().tolist():
        cy, cx = (int(v) for v in torch.randint(size // 2 - 6, size // 2 + 2, (2,), generator=g))
        blob[i, cy : cy + 5, cx : cx + 5] = 1
    x = x + 0.9 * blob[:, None]
    org = organ.expand(n, 1, size, size).clone()
    s = WeakSlices(
        x,
        org,
        blob[:, None],
        torch.ones(n, dtype=torch.bool),
        abnormal,
        torch.full((n,), 0.5),
        ["toy"] * n,
        torch.arange(n),
    )
    return s, blob


# ---------------- pairs
def test_pairs_keep_labels_right_and_views_in_range():
    s, _ = _toy(12, 32, 0)
    sampler = PairSampler(s.x, s.abnormal, s.eta, s.organ)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(10):
        b = sampler.sample(8, gen)
        for i, kind in enumerate(b.kind.tolist()):
            seen.add(kind)
            if kind == SAME:
                assert bool(b.abnormal_a[i]) == bool(b.abnormal_b[i])
                v = b.views[i]
                assert BLUR_RANGE[0] <= v.r <= BLUR_RANGE[1]
                assert STRETCH_RANGE[0] <= v.sy <= STRETCH_RANGE[1] and STRETCH_RANGE[0] <= v.sx <= STRETCH_RANGE[1]
                assert torch.allclose(b.xb[i : i + 1], make_view(b.xa[i : i + 1], v))
            elif kind == NORMAL:
                assert not b.abnormal_a[i] and not b.abnormal_b[i]
                assert not torch.equal(b.xa[i], b.xb[i])
            else:
                assert kind == NEGATIVE and int(b.abnormal_a[i]) + int(b.abnormal_b[i]) == 1
    assert seen == {SAME, NORMAL, NEGATIVE}


def test_views_geometry_matches_stated_ranges():
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(1, 1, 64, 64)
    for _ in range(30):
        v = draw_view(gen)
        valid = to_view_frame(ones, v) > 0.5
        rows, cols = valid[0, 0].any(1).sum().item(), valid[0, 0].any(0).sum().item()
        if v.mode == "pad":
            assert abs(rows - v.sy * 64) <= 1 and abs(cols - v.sx * 64) <= 1
            assert 0.8 * 64 - 1 <= rows <= 64 and 0.8 * 64 - 1 <= cols <= 64
        else:
            assert valid.all()
    # pure blur at r = 1 and no stretch is (nearly) the identity
    from labelfactory.clamnet.pairs import ViewParams

    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(make_view(x, ViewParams(1.0, 1.0, 1.0, "resize")), x, atol=1e-5)


def test_near_negatives_pair_an_abnormal_slice_with_its_own_patients_nearest_normal_slices():
    abnormal = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    study, z = ["a"] * 8 + ["b"] * 2, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    near = near_normals(abnormal, study, z, 2)
    assert {i: v.tolist() for i, v in near.items()} == {2: [1, 0], 3: [4, 1], 5: [4, 6]}  # 'b' has no normal slice
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 4, 4)
    sampler = PairSampler(x, abnormal, torch.ones(10), torch.ones(10, 1, 4, 4), (0.0, 0.0, 1.0), near)
    b = sampler.sample(64, torch.Generator().manual_seed(0))
    for i in range(64):
        ab, no = (b.xa[i], b.xb[i]) if b.abnormal_a[i] else (b.xb[i], b.xa[i])
        k, j = int(ab[0, 0, 0]), int(no[0, 0, 0])
        assert j in near[k].tolist() if k in near else not abnormal[j]


def test_sampler_refuses_too_few_labels():
    s, _ = _toy(4, 16, 0)
    with pytest.raises(LabelFactoryError, match="at least 2 normal"):
        PairSampler(s.x, torch.ones(4, dtype=torch.bool), s.eta, s.organ)


# ---------------- loss
def test_hybrid_loss_matches_hand_computed_values():
    y = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    p = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
    expected = -(math.log(0.8) + 0.8 / (1.0 + 0.64))
    assert hybrid_loss(y, p).item() == pytest.approx(expected, abs=1e-5)
    # two pixels, soft targets: mean over pixels of the per-pixel sums over classes
    y2 = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(1, 2, 1, 2)
    p2 = torch.tensor([[0.5, 0.6], [0.5, 0.4]]).view(1, 2, 1, 2)
    px1 = 2 * (0.5 * math.log(0.5) + 0.25 / 0.5)
    px2 = math.log(0.6) + 0.6 / (1 + 0.36)
    assert hybrid_loss(y2, p2).item() == pytest.approx(-(px1 + px2) / 2, abs=1e-5)
    # a mask counts only the chosen pixels
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert hybrid_loss(y2, p2, mask).item() == pytest.approx(-px1, abs=1e-5)


def test_hybrid_loss_finite_at_zero():
    y = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    p = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1).requires_grad_()
    loss = hybrid_loss(y, p)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    zero = hybrid_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    assert zero.item() == 0.0


def test_label_targets_and_negative_pair_weighting():
    organ = torch.zeros(2, 1, 2, 2)
    organ[:, :, 0, :] = 1  # two organ pixels per slice
    marker = torch.tensor([[0.1, 0.9], [0.5, 0.2]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    y = label_targets(torch.tensor([True, False]), organ, marker, fraction=0.5)
    # abnormal slice: the one organ pixel (half of two) with the highest marker probability; never outside the organ
    assert y[0, 1, 0, 1] == 1 and y[0, 1].sum() == 1
    assert y[1, 1].sum() == 0 and torch.allclose(y.sum(1), torch.ones(2, 2, 2))
    # one NEGATIVE pair: total = w_a H(Y_a, P_a) + w_b H(Y_b, P_b), w = eta (0.3) for the abnormal side, 1 for the
    # normal one
    s, _ = _toy(6, 16, 0)
    sampler = PairSampler(s.x, s.abnormal, torch.full((6,), 0.3), s.organ, mix=(0.0, 0.0, 1.0))
    b = sampler.sample(1, torch.Generator().manual_seed(3))
    la, lb = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    pa, pb = la.softmax(1), lb.softmax(1)
    wa = 0.3 if b.abnormal_a[0] else 1.0
    wb = 0.3 if b.abnormal_b[0] else 1.0
    ya = label_targets(b.abnormal_a, b.organ_a, pa[:, 1:], 0.2)
    yb = label_targets(b.abnormal_b, b.organ_b, pb[:, 1:], 0.2)
    expected = wa * hybrid_loss(ya, pa) + wb * hybrid_loss(yb, pb)
    assert clamnet_loss([la], [lb], b, fraction=0.2).item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------- training
def test_toy_training_lowers_loss_and_finds_the_blob(tmp_path):
    train, _ = _toy(24, 32, 0)
    test, blob = _toy(8, 32, 7)
    cfg = ClamNetConfig(
        size=32, features=(8, 8, 16, 16, 32, 8), steps=50, batch=8, lr=1e-2, seed=0, marker_fraction=0.1
    )
    pair, hist = train_clamnet(train, cfg)
    assert np.mean(hist[-10:]) < np.mean(hist[:10])
    p = pair.marker_probability(test.x)
    ab = test.abnormal
    on_blob = p[ab][blob[ab] > 0].mean()
    elsewhere = p[ab][(blob[ab] == 0) & (test.organ[ab, 0] > 0)].mean()
    assert on_blob > elsewhere + 0.1 and on_blob > 2 * elsewhere
    # deterministic, and the checkpoint round-trips
    save_clamnet(pair, cfg, {"toy": True}, tmp_path / "clamnet.pt", hist)
    again, cfg2 = load_clamnet(tmp_path / "clamnet.pt")
    assert cfg2 == cfg and torch.allclose(again.marker_probability(test.x), p)


def test_same_seed_same_model():
    s, _ = _toy(8, 32, 0)
    cfg = ClamNetConfig(size=32, features=TINY, steps=2, batch=2, seed=5)
    h1 = train_clamnet(s, cfg)[1]
    h2 = train_clamnet(s, cfg)[1]
    assert h1 == h2


def test_load_without_model_says_train_first(tmp_path):
    with pytest.raises(LabelFactoryError, match="train clamnet first") as e:
        load_clamnet(tmp_path / "clamnet.pt")
    assert e.value.status == 409


# ---------------- crop
def _volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    arr = np.full((6, 40, 50), -1000, dtype=np.int16)
    organ = np.zeros_like(arr, dtype=np.uint8)
    organ[1:5, 10:20, 15:35] = 1
    arr[organ > 0] = 100
    img = Image(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), direction)
    return img, img.with_array(organ)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, -1)])
def test_crop_is_square_around_the_organ_and_pastes_back(direction):
    img, organ = _volume(direction)
    crops = crop_slices(img, organ, size=32, margin_mm=2.0)
    assert crops.x.shape == (4, 1, 32, 32) and crops.x.min() >= -1 and crops.x.max() <= 1
    # organ 10 x 20 mm + 2 mm margins -> a 24 mm square: the organ spans 20/24 of the width
    cols = crops.organ[0, 0].any(0).sum().item()
    assert abs(cols - 32 * 20 / 24) <= 2
    back = paste_back(crops.organ[:, 0], crops, img)
    assert back.array.shape == img.array.shape
    d, _ = dice_iou(torch.from_numpy(back.array > 0.5), torch.from_numpy(organ.array > 0))
    assert d > 0.95
    assert set(oriented_to_file_slice(img)[crops.slices.numpy()].tolist()) == {1, 2, 3, 4}


def test_crop_box_and_no_organ_fallback(caplog):
    img, _ = _volume()
    m = box_mask(img, (1, 10, 15, 5, 20, 35))
    assert m.array.sum() == 4 * 10 * 20
    crops = crop_slices(img, None, size=16)
    assert len(crops.x) == 6 and "no organ mask" in caplog.text
    with pytest.raises(LabelFactoryError):
        box_mask(img, (0, 0, 1, 1))


# ---------------- labels CSV and split
def test_image_labels_csv(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image,slice,label,eta\nct,,normal,\nct,2,abnormal,0.7\nct,3,abnormal,\n")
    rows = read_image_labels(p)
    listed, abnormal, eta = slice_labels(rows, "ct", 5, default_eta=0.4)
    assert listed.all() and abnormal.tolist() == [False, False, True, True, False]
    assert eta[2] == pytest.approx(0.7) and eta[3] == pytest.approx(0.4)
    p.write_text("image,slice,label,eta\nct,1,sick,\n")
    with pytest.raises(LabelFactoryError, match="line 2"):
        read_image_labels(p)


def test_slab_split_keeps_train_and_test_apart():
    tr, te = slab_split(100, slab=10, gap=3, test_every=3)
    assert len(te) > 0 and len(tr) > 0 and not set(tr) & set(te)
    assert np.abs(tr[:, None] - te[None, :]).min() > 3
