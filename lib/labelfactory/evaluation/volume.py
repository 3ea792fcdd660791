"""Per-patient 3D scores with partial labels: Dice and HD95 per contoured organ, and the patient's mean Dice.

The label-efficiency experiment's primary endpoint is a patient's mean Dice over the organs that were
contoured in that patient (docs/DESIGN.md "Partial labels"): an organ a patient's label does not
contain is not scored, whatever the prediction draws there, since its truth is unknown. Patients,
not voxels, are the unit, so a large patient weighs as much as a small one (unlike the pooled
confusion matrix of labelfactory.evaluation.metrics).

Dice = 2 |P & T| / (|P| + |T|), 1.0 when both are empty. HD95 is MONAI's symmetric 95th-percentile
Hausdorff distance between the two surfaces (`compute_hausdorff_distance`), in mm with the voxel
spacing; NaN when the prediction or the truth is empty (no surface to measure from).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def organ_scores(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    contoured: Sequence[bool] | np.ndarray | torch.Tensor,
    spacing: Sequence[float],
) -> dict[int, dict[str, float]]:
    """Scores of each contoured organ of one patient.

    pred, truth: label maps of one shape, (z, y, x) or (y, x), integer values;
    contoured:   (n_classes,) bool, index k = label value k (index 0, background, is never scored);
    spacing:     mm per array axis, in the arrays' axis order (z, y, x).
    Returns {value: {"dice": float, "hd95": float (mm)}} for every value k >= 1 with contoured[k].
    """
    pred, truth = _array(pred), _array(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {truth.ndim}D label map")
    flags = np.asarray(_array(contoured), bool)
    out = {}
    for k in np.nonzero(flags)[0]:
        if k == 0:
            continue
        p, t = pred == k, truth == k
        n_p, n_t = int(p.sum()), int(t.sum())
        dice = 1.0 if n_p + n_t == 0 else 2.0 * int((p & t).sum()) / (n_p + n_t)
        out[int(k)] = {"dice": dice, "hd95": _hd95(p, t, spacing) if n_p and n_t else float("nan")}
    return out


def mean_dice(scores: dict) -> float:
    """The mean Dice over the organs of `organ_scores` (or `patient_scores`' "organs"); NaN when none."""
    dice = [s["dice"] for s in scores.values()]
    return float(np.mean(dice)) if dice else float("nan")


def patient_scores(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    contoured: Sequence[bool] | np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    names: dict[int, str] | None = None,
) -> dict:
    """One patient's record: {"organs": {name: {"dice", "hd95"}}, "mean_dice", "mean_hd95", "contoured": [names]}.

    `names`: value -> organ name (default the value as text). mean_hd95 is over the organs with an HD95 (not NaN).
    """
    per = organ_scores(pred, truth, contoured, spacing)
    hd = [s["hd95"] for s in per.values() if not np.isnan(s["hd95"])]
    organs = {(names or {}).get(k, str(k)): s for k, s in per.items()}
    return {
        "organs": organs,
        "mean_dice": mean_dice(per),
        "mean_hd95": float(np.mean(hd)) if hd else float("nan"),
        "contoured": list(organs),
    }


def _hd95(p: np.ndarray, t: np.ndarray, spacing: Sequence[float]) -> float:
    """MONAI's symmetric 95th-percentile Hausdorff distance (mm) of two non-empty boolean masks."""
    y_pred = torch.from_numpy(p)[None, None]
    y = torch.from_numpy(t)[None, None]
    hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    return float(hd.item())


def _array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
