"""Weak-segmentation evaluation: a slab split that keeps train and test slices apart; Dice / IoU of a thresholded map,
the threshold chosen on other data, pixel ROC AUC, and the slice-level call a map implies."""

from __future__ import annotations

import numpy as np
import torch

from labelfactory.clamnet.data import WeakSlices


def slab_split(n: int, slab: int, gap: int, test_every: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Slices 0..n-1 in contiguous slabs of `slab`; every `test_every`-th slab (the last of each group) is test.

    Train slices closer than `gap + 1` slices to any test slice are dropped, so no train slice
    touches or neighbours a test slice. Returns (train indices, test indices).
    """
    if slab < 1 or gap < 0 or test_every < 2:
        raise ValueError("slab >= 1, gap >= 0 and test_every >= 2 are required")
    idx = np.arange(n)
    test = (idx // slab) % test_every == test_every - 1
    if not test.any():
        return idx, idx[:0]
    t = idx[test]
    dist = np.abs(idx[:, None] - t[None, :]).min(1)
    return idx[~test & (dist > gap)], idx[test]


def split_by_slab(
    slices: WeakSlices, slab: int = 12, gap: int = 4, test_every: int = 3
) -> tuple[WeakSlices, WeakSlices]:
    """Slab split within each study (on file slice indices). Returns (train, test)."""
    train, test = [], []
    studies = np.array(slices.study)
    for sid in dict.fromkeys(slices.study):
        rows = np.nonzero(studies == sid)[0]
        fs = slices.file_slice[rows].numpy()
        tr, te = slab_split(int(fs.max()) + 1, slab, gap, test_every)
        train += rows[np.isin(fs, tr)].tolist()
        test += rows[np.isin(fs, te)].tolist()
    return slices.subset(np.array(train, dtype=np.int64)), slices.subset(np.array(test, dtype=np.int64))


def dice_iou(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Pooled over all pixels of all slices; pred, truth boolean of any equal shape. Both empty -> (1, 1)."""
    pred, truth = pred.bool(), truth.bool()
    inter = (pred & truth).sum().item()
    p, t = pred.sum().item(), truth.sum().item()
    if p + t == 0:
        return 1.0, 1.0
    return 2 * inter / (p + t), inter / (p + t - inter)


def score_maps(maps: torch.Tensor, slices: WeakSlices, threshold: float) -> dict[str, float]:
    """(N, S, S) maps vs `slices.truth` on the slices that have a truth: pooled Dice, IoU, and slice counts."""
    keep = slices.has_truth
    dice, iou = dice_iou(maps[keep] >= threshold, slices.truth[keep, 0] > 0.5)
    return {"dice": dice, "iou": iou, "slices": int(keep.sum()), "abnormal_slices": int((keep & slices.abnormal).sum())}


def pixel_auroc(maps: torch.Tensor, truth: torch.Tensor) -> float | None:
    """ROC AUC of map values as a pixel score against a boolean truth (any equal shapes); None if one class is absent.

    The Mann-Whitney form, ties counted half: the number scikit-learn's roc_auc_score gives (the tests check), one
    sort instead of its several (its input checks sort the labels again), which on millions of pixels on a shared
    CPU is minutes per method.
    """
    t = truth.bool().flatten()
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse = torch.unique(maps.flatten().double(), return_inverse=True)
    pos = torch.bincount(inverse[t], minlength=int(inverse.max()) + 1).double()
    neg = torch.bincount(inverse[~t], minlength=len(pos)).double()
    below = torch.cumsum(neg, 0) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def candidate_thresholds(maps: torch.Tensor, organ: torch.Tensor, n: int = 64) -> torch.Tensor:
    """Thresholds spread over a map's own range (maps differ in scale): quantiles 0.5 .. 0.999 of its values inside
    the organ, zeros dropped."""
    inside = maps[organ.bool()].flatten()
    if len(inside) > 1_000_000:
        inside = inside[torch.randperm(len(inside), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    q = torch.quantile(inside.double(), torch.linspace(0.5, 0.999, n, dtype=torch.float64))
    return torch.unique(q[q > 0]).float()


def best_threshold(maps: torch.Tensor, truth: torch.Tensor, organ: torch.Tensor) -> tuple[float, float]:
    """The candidate threshold with the best pooled Dice of (maps >= t) vs truth. Returns (threshold, that Dice)."""
    scored = [(dice_iou(maps >= t, truth)[0], float(t)) for t in candidate_thresholds(maps, organ)]
    if not scored:
        return 1.0, 0.0
    dice, t = max(scored)
    return t, dice


def map_scores(maps: torch.Tensor, slices: WeakSlices, threshold: float) -> dict[str, float | int | None]:
    """(N, S, S) maps vs slices.truth: Dice, IoU of maps >= threshold (pooled over pixels), pixel ROC AUC (over the
    organ's pixels: outside it every map is 0), and the slice-level call the map implies (abnormal iff any pixel >=
    threshold): accuracy, sensitivity, specificity."""
    truth = slices.truth[:, 0] > 0.5
    organ = slices.organ[:, 0] > 0.5
    pred = maps >= threshold
    dice, iou = dice_iou(pred, truth)
    called, label = pred.flatten(1).any(1), slices.abnormal.bool()
    n_ab, n_no = int(label.sum()), int((~label).sum())
    return {
        "dice": dice,
        "iou": iou,
        "auroc": pixel_auroc(maps[organ], truth[organ]),
        "slice_accuracy": float((called == label).float().mean()),
        "slice_sensitivity": float((called & label).sum()) / n_ab if n_ab else None,
        "slice_specificity": float((~called & ~label).sum()) / n_no if n_no else None,
        "slices": len(label),
        "abnormal_slices": n_ab,
    }


def per_patient(maps: torch.Tensor, slices: WeakSlices, threshold: float) -> dict[str, dict[str, float | int | None]]:
    """map_scores of each patient (study) on its own slices."""
    studies = np.array(slices.study)
    return {
        s: map_scores(maps[rows], slices.subset(rows), threshold)
        for s in dict.fromkeys(slices.study)
        if len(rows := np.nonzero(studies == s)[0])
    }
