"""Per-class Dice and IoU, and mIoU, over a whole test set.

Counted from one confusion matrix over every pixel of every image (the semantic-segmentation
benchmark convention): IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN). A class
absent from both prediction and truth has no score (NaN) and is left out of the means. mIoU and
mean Dice are over the foreground classes (background excluded) unless asked otherwise.
Written by hand because MONAI's metrics average per image, which weighs a sliver on one slice as
much as a whole organ on another.
"""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, truth: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction; inputs integer masks of one shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    idx = truth.reshape(-1).long() * n_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def scores(
    confusion: torch.Tensor, class_names: dict[str, int] | None = None, include_background: bool = False
) -> dict:
    """Per-class IoU and Dice (NaN where a class is absent from both) and their means, from a confusion matrix.

    Returns {"iou": {name: v}, "dice": {name: v}, "miou": float, "mean_dice": float}; names default to "0", "1", ...
    """
    cm = confusion.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = tp + fp + fn
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.nan)
    dice = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    n = cm.shape[0]
    names = {v: k for k, v in (class_names or {}).items()}
    label = [names.get(c, str(c)) for c in range(n)]
    first = 0 if include_background else 1
    return {
        "iou": {label[c]: float(iou[c]) for c in range(n)},
        "dice": {label[c]: float(dice[c]) for c in range(n)},
        "miou": _nanmean(iou[first:]),
        "mean_dice": _nanmean(dice[first:]),
    }


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")
