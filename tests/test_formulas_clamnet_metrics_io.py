"""Exact values of ClamNet's hybrid loss and eta weighting, pooled Dice / IoU, CT windowing, slices <-> volume.

Every expectation is computed here, in float64 numpy, from the formula itself (ClamNet eq. 1; TP/FP/FN
counts; the window's linear map), on cases small enough to check by hand.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from labelfactory.clamnet.loss import EPS, clamnet_loss, hybrid_loss, label_targets
from labelfactory.clamnet.pairs import NEGATIVE, NORMAL, SAME, PairBatch, ViewParams
from labelfactory.errors import LabelFactoryError
from labelfactory.evaluation.metrics import confusion_matrix, scores
from labelfactory.evaluation.statistics import mean_sd
from labelfactory.io import (
    Image,
    Window,
    label_to_slices,
    probabilities_to_volume,
    slices_to_label,
    to_unit_range,
    volume_to_slices,
)
from labelfactory.io.slices import plan_geometry


# ---------------- ClamNet: H(Y, P) = -1/N sum_c sum_n (y log p + y p / (y^2 + p^2)), eta-weighted sum over slices
def ref_hybrid(y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None, dice: bool = True) -> np.ndarray:
    """(B, C, H, W) float64 -> (B,); log clamped at EPS, EPS in the denominator, N = counted pixels (>= 1);
    dice False: the cross-entropy term alone (the ablation)."""
    terms = (y * np.log(np.maximum(p, EPS)) + dice * y * p / (y**2 + p**2 + EPS)).sum(1)
    m = np.ones_like(terms) if mask is None else mask[:, 0]
    return -(terms * m).reshape(len(y), -1).sum(1) / np.maximum(m.reshape(len(y), -1).sum(1), 1.0)


def test_hybrid_loss_exact_on_soft_targets_a_mask_zero_probabilities_and_tiny_values():
    y = np.array([[[[1.0, 0.3, 1e-3]], [[0.0, 0.7, 0.2]]], [[[0.5, 1.0, 0.0]], [[0.5, 0.0, 1.0]]]])  # (2, 2, 1, 3)
    p = np.array([[[[0.9, 0.4, 1e-3]], [[0.1, 0.6, 0.0]]], [[[0.2, 0.0, 0.5]], [[0.8, 1.0, 0.5]]]])
    mask = np.array([[[[1.0, 0.0, 1.0]]], [[[0.0, 0.0, 0.0]]]])  # the second slice counts no pixel: loss 0, not NaN
    got = hybrid_loss(torch.from_numpy(y), torch.from_numpy(p)).numpy()
    assert np.allclose(got, ref_hybrid(y, p), rtol=1e-12, atol=0)
    got_masked = hybrid_loss(torch.from_numpy(y), torch.from_numpy(p), torch.from_numpy(mask)).numpy()
    assert np.allclose(got_masked, ref_hybrid(y, p, mask), rtol=1e-12, atol=0) and got_masked[1] == 0.0
    # hand check of slice 0, pixel 0: y = (1, 0), p = (0.9, 0.1)
    assert ref_hybrid(y[:1, :, :, :1], p[:1, :, :, :1])[0] == pytest.approx(-(math.log(0.9) + 0.9 / 1.81))


def ref_targets(abnormal: np.ndarray, organ: np.ndarray, marker: np.ndarray, fraction: float) -> np.ndarray:
    """Marker 1 on the ceil(fraction * organ pixels) organ pixels of highest marker probability (abnormal slices)."""
    y = np.zeros_like(organ)
    for i in np.flatnonzero(abnormal):
        inside = np.flatnonzero(organ[i].ravel() > 0)
        k = math.ceil(fraction * len(inside))
        top = inside[np.argsort(-marker[i].ravel()[inside], kind="stable")[:k]]
        y[i].reshape(-1)[top] = 1.0
    return np.concatenate([1 - y, y], axis=1)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 1.0])
def test_label_targets_take_the_top_ceil_fraction_of_organ_pixels(fraction):
    organ = np.zeros((3, 1, 3, 3))
    organ[:, :, :2, :] = 1  # six organ pixels; the last row is outside (and holds the highest marker values)
    marker = np.random.default_rng(0).permutation(27).reshape(3, 1, 3, 3) / 27.0
    marker[:, :, 2] += 1.0
    abnormal = np.array([True, False, True])
    got = label_targets(torch.from_numpy(abnormal), torch.from_numpy(organ), torch.from_numpy(marker), fraction)
    want = ref_targets(abnormal, organ, marker, fraction)
    assert np.array_equal(got.numpy(), want)
    assert want[0, 1].sum() == math.ceil(fraction * 6)


def _batch(kinds, abnormal_a, abnormal_b, eta_a, eta_b, valid, size=4) -> PairBatch:
    g = torch.Generator().manual_seed(5)
    B = len(kinds)
    organ = torch.zeros(B, 1, size, size, dtype=torch.float64)
    organ[:, :, 1:3, :] = 1
    views = [ViewParams(1.0, 1.0, 1.0, "resize") if k == SAME else None for k in kinds]  # identity view geometry
    x = torch.rand(B, 1, size, size, generator=g)
    return PairBatch(
        x,
        x,
        organ,
        organ.clone(),
        torch.tensor(abnormal_a),
        torch.tensor(abnormal_b),
        torch.tensor(eta_a, dtype=torch.float64),
        torch.tensor(eta_b, dtype=torch.float64),
        torch.tensor(kinds),
        valid,
        views,
    )


@pytest.mark.parametrize("dice_term", [True, False])
def test_clamnet_loss_weights_abnormal_slices_by_eta_and_averages_slices_and_heads(dice_term):
    """Paper: total = sum_i eta_i H(Y_i, P_i); normal slices weigh 1; SAME pairs: each net against the other's
    prediction on the counted pixels; divided by the batch size; deep-supervision heads averaged."""
    size, fraction = 4, 0.25
    valid = torch.ones(3, 1, size, size, dtype=torch.float64)
    valid[2, :, :, 0] = 0  # the SAME pair (slice 2) does not count its first column
    batch = _batch(
        [NEGATIVE, NORMAL, SAME], [True, False, False], [False, False, False], [0.3, 0.9, 0.4], [0.7, 0.8, 0.6], valid
    )
    g = torch.Generator().manual_seed(1)
    heads_a = [torch.randn(3, 2, size, size, generator=g, dtype=torch.float64) for _ in range(2)]
    heads_b = [torch.randn(3, 2, size, size, generator=g, dtype=torch.float64) for _ in range(2)]

    def head(la: np.ndarray, lb: np.ndarray) -> float:
        hyb = functools.partial(ref_hybrid, dice=dice_term)
        pa, pb = (np.exp(v) / np.exp(v).sum(1, keepdims=True) for v in (la, lb))
        org = batch.organ_a.numpy()
        ya = ref_targets(np.array([True]), org[:1], pa[:1, 1:], fraction)
        neg = (
            0.3 * hyb(ya, pa[:1])[0]
            + 1.0 * hyb(ref_targets(np.array([False]), org[:1], pb[:1, 1:], fraction), pb[:1])[0]
        )
        y_normal = np.concatenate(
            [np.ones((1, 1, size, size)), np.zeros((1, 1, size, size))], 1
        )  # Y = (1, 0) everywhere
        normal = hyb(y_normal, pa[1:2])[0] + hyb(y_normal, pb[1:2])[0]
        v = valid.numpy()[2:3]
        same = hyb(pb[2:3], pa[2:3], v)[0] + hyb(pa[2:3], pb[2:3], v)[0]
        return (neg + normal + same) / 3

    want = np.mean([head(a.numpy(), b.numpy()) for a, b in zip(heads_a, heads_b, strict=True)])
    kw = {} if dice_term else {"dice_term": False}  # the defaults: fraction 0.25, with the Dice-like term
    assert clamnet_loss(heads_a, heads_b, batch, **kw).item() == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError):  # every head of one network pairs with one of the other
        clamnet_loss(heads_a, heads_b[:1], batch)


def test_same_pair_targets_are_stop_gradient():
    """d/d(logits_a) of a SAME pair's loss sees only H(stopgrad(b), a): computed here with b held constant."""
    size = 4
    valid = torch.ones(1, 1, size, size, dtype=torch.float64)
    batch = _batch([SAME], [False], [False], [1.0], [1.0], valid)
    g = torch.Generator().manual_seed(2)
    la = torch.randn(1, 2, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(1, 2, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    clamnet_loss([la], [lb], batch).backward()
    la2 = la.detach().clone().requires_grad_(True)
    pa, pb = la2.softmax(1), lb.detach().softmax(1)
    y, p = pb, pa  # H(b as constant target, a): the only term through which a gets a gradient
    terms = y * torch.log(p.clamp_min(EPS)) + y * p / (y * y + p * p + EPS)
    (-(terms.sum() / size**2)).backward()
    assert torch.allclose(la.grad, la2.grad, rtol=1e-10, atol=1e-14)


# ---------------- pooled Dice / IoU from one confusion matrix
def test_confusion_matrix_counts_truth_rows_and_prediction_columns():
    rng = np.random.default_rng(3)
    truth, pred = rng.integers(0, 4, (2, 5, 6)), rng.integers(0, 4, (2, 5, 6))
    want = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(truth.ravel(), pred.ravel(), strict=True):
        want[t, p] += 1
    assert np.array_equal(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), 4).numpy(), want)
    with pytest.raises(ValueError):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)


@pytest.mark.parametrize("include_background", [False, True])
def test_scores_are_tp_over_tp_fp_fn_and_their_nan_aware_means(include_background):
    cm = np.zeros((5, 5), dtype=np.int64)
    cm[:3, :3] = [[50, 3, 2], [4, 20, 1], [0, 5, 7]]
    cm[4, 4] = 1  # one pixel, found: IoU = Dice = 1 from TP + FP + FN = 1; class 3 absent from truth and prediction
    tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
    scored = [0, 1, 2, 4]
    iou, dice = tp[scored] / (tp + fp + fn)[scored], 2 * tp[scored] / (2 * tp + fp + fn)[scored]
    s = scores(
        torch.from_numpy(cm),
        {"background": 0, "heart": 1, "aorta": 2, "trachea": 3, "esophagus": 4},
        include_background,
    )
    for c, name in enumerate(("background", "heart", "aorta", "esophagus")):
        assert s["iou"][name] == pytest.approx(iou[c], rel=1e-12) and s["dice"][name] == pytest.approx(
            dice[c], rel=1e-12
        )
    assert math.isnan(s["iou"]["trachea"]) and math.isnan(s["dice"]["trachea"])
    first = 0 if include_background else 1
    assert s["miou"] == pytest.approx(iou[first:].mean(), rel=1e-12)
    assert s["mean_dice"] == pytest.approx(dice[first:].mean(), rel=1e-12)
    assert sorted(scores(torch.from_numpy(cm))["iou"]) == ["0", "1", "2", "3", "4"]  # unnamed classes keep their index
    assert math.isnan(scores(torch.zeros(2, 2, dtype=torch.int64))["miou"])  # nothing to score


def test_mean_sd_is_the_sample_sd_over_finite_folds():
    assert mean_sd([0.2, 0.5, float("nan"), 0.8]) == pytest.approx((0.5, 0.3))  # var = (0.09 + 0 + 0.09) / 2
    assert all(math.isnan(v) for v in mean_sd([float("nan")]))


# ---------------- CT windowing: u = 2 clip((HU - (L - W/2)) / W, 0, 1) - 1
@pytest.mark.parametrize("level, width", [(0.0, 2000.0), (40.0, 400.0), (-600.0, 1500.0)])
def test_window_maps_hu_linearly_onto_minus_one_one_and_back(level, width):
    hu = np.array([-3000, -1000, -650, -160, 0, 40, 239, 240, 1000, 3000], dtype=np.int16)
    want = 2 * np.clip((hu.astype(np.float64) - (level - width / 2)) / width, 0, 1) - 1
    w = Window(level, width)
    assert (w.low, w.high) == (level - width / 2, level + width / 2)
    got = w.to_unit(hu)
    assert got.dtype == np.float32 and np.allclose(got, want, rtol=0, atol=1e-6)
    assert np.array_equal(to_unit_range(hu, w), got)  # CT in HU goes through the window
    inside = (hu >= w.low) & (hu <= w.high)
    back = w.to_hu(got)
    assert back.dtype == np.float32 and np.allclose(back[inside], hu[inside], rtol=0, atol=1e-3 * width)
    edges = w.to_hu(np.array([-7.0, 5.0]))  # float64 in: still float32 HU, clipped to the window's edges
    assert edges.dtype == np.float32 and np.allclose(edges, [w.low, w.high])


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_pictures_map_their_full_range_onto_minus_one_one(dtype, top):
    v = np.array([0, 1, top // 2, top], dtype=dtype)
    got = to_unit_range(v)
    assert got.dtype == np.float32 and np.allclose(got, v.astype(np.float64) / (top / 2) - 1, rtol=0, atol=1e-6)


# ---------------- slices <-> volume
@pytest.mark.parametrize(
    "hw, spacing, size, scaled, offset",
    [
        ((10, 20), (1.0, 1.5), 16, (12, 16), (2, 0)),  # rows 1.5 mm: 15 mm tall, 20 mm wide
        ((20, 10), (1.0, 1.0), 8, (8, 4), (0, 2)),
        ((4, 4), (0.5, 0.5), 8, (8, 8), (0, 0)),
        ((1, 100), (1.0, 1.0), 16, (1, 16), (7, 0)),  # never fewer than one row
        ((100, 1), (1.0, 1.0), 16, (16, 1), (0, 7)),  # nor one column
    ],
)
def test_plan_geometry_fills_the_longer_physical_side_and_centres_the_other(hw, spacing, size, scaled, offset):
    g = plan_geometry(hw, spacing, size, "LPS")
    assert (g.size, g.hw, g.scaled_hw, g.offset, g.orientation) == (size, hw, scaled, offset, "LPS")


def _volume(array: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Image:
    return Image(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(float(d) for d in direction))


def test_volume_to_slices_windows_pads_with_air_and_reorients_to_lps():
    hu = np.random.default_rng(4).uniform(-1200, 1200, (2, 4, 8)).astype(np.float32)  # (D, H, W), LPS already
    x, g = volume_to_slices(_volume(hu), size=8, window=Window(0, 2000))
    unit = np.clip(hu / 2000 + 0.5, 0, 1) * 2 - 1
    assert x.shape == (2, 1, 8, 8) and g.scaled_hw == (4, 8) and g.offset == (2, 0) and g.orientation == "LPS"
    assert np.allclose(x[:, 0, 2:6].numpy(), unit, atol=1e-6)  # same size in-plane: no resampling
    assert (x[:, 0, :2] == -1).all() and (x[:, 0, 6:] == -1).all()
    # stored RAS (x and y axes reversed): the slices come out in LPS all the same
    ras = _volume(hu[:, ::-1, ::-1].copy(), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    x_ras, g_ras = volume_to_slices(ras, size=8, window=Window(0, 2000))
    assert g_ras.orientation == "RAS" and torch.equal(x_ras, x)


def test_labels_go_to_slices_by_nearest_and_come_back_exactly():
    lab = np.random.default_rng(5).integers(0, 4, (2, 3, 4)).astype(np.uint8)
    ras = _volume(lab[:, ::-1, ::-1].copy(), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    _, g = volume_to_slices(ras.with_array(ras.array.astype(np.float32)), size=8)
    assert g.scaled_hw == (6, 8) and g.offset == (1, 0)
    s = label_to_slices(ras, g)
    assert s.dtype == torch.int64
    assert np.array_equal(s[:, 1:7].numpy(), np.kron(lab, np.ones((2, 2), dtype=np.uint8)))  # 2x in-plane, LPS order
    assert (s[:, 0] == 0).all() and (s[:, 7] == 0).all()
    back = slices_to_label(s, g, ras)
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, ras.array)
    assert back.direction == ras.direction and back.spacing == ras.spacing
    with pytest.raises(LabelFactoryError, match=r"\(D, 8, 8\), got \(2, 7, 8\)"):
        slices_to_label(s[:, :7], g, ras)
    with pytest.raises(LabelFactoryError, match=r"\(2, 4\) differs from its image's \(3, 4\)"):
        label_to_slices(_volume(lab[:, :2]), g)


def test_downsampled_slices_are_antialiased():
    """8 -> 2 pixels a side: bilinear sampling alone reads only the middle two of every four source pixels."""
    hu = np.full((1, 8, 8), -1000.0, dtype=np.float32)
    hu[:, [0, 3, 4, 7]] = 1000.0  # rows bilinear sampling would skip
    x, g = volume_to_slices(_volume(hu), size=2)
    assert g.scaled_hw == (2, 2) and (x > -0.9).all() and torch.allclose(x, x.flatten()[0])


def test_probabilities_come_back_bilinearly_from_the_scaled_region_only():
    p = np.random.default_rng(6).uniform(0, 1, (1, 2, 3)).astype(np.float32)
    vol = _volume(p)
    _, g = volume_to_slices(vol, size=6)
    assert g.scaled_hw == (4, 6) and g.offset == (1, 0)
    maps = np.full((1, 6, 6), 9.0, dtype=np.float32)  # the padding must not leak back
    maps[:, 1:5] = np.random.default_rng(7).uniform(0, 1, (1, 4, 6))
    back = probabilities_to_volume(maps, g, vol)
    means = maps[:, 1:5].reshape(1, 2, 2, 3, 2).mean(axis=(2, 4))  # 2x down, half-pixel centres: 2x2 block means
    assert back.array.dtype == np.float32 and np.allclose(back.array, means, atol=1e-6)
    pic = Image(np.zeros((2, 4), dtype=np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))  # 2D: never reoriented
    x, g2 = volume_to_slices(pic, size=4)
    assert g2.orientation is None and g2.scaled_hw == (2, 4) and torch.equal(x[0, 0, 1:3], torch.full((2, 4), -1.0))
    assert volume_to_slices(pic)[1].size == 256  # the default grid
    lab2d = pic.with_array(np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8))
    s2 = label_to_slices(lab2d, g2)
    assert s2.shape == (1, 4, 4) and np.array_equal(s2[0, 1:3].numpy(), lab2d.array)
    assert np.array_equal(slices_to_label(s2, g2, lab2d).array, lab2d.array)
