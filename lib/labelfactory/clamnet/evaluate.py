"""Weak-segmentation evaluation: a slab split that keeps train and test slices apart, and Dice / IoU."""

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


def split_by_slab(slices: WeakSlices, slab: int = 12, gap: int = 4, test_every: int = 3) -> tuple[WeakSlices, WeakSlices]:
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
