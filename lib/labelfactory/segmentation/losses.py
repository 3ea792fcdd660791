"""The segmenters' loss on partial labels: Dice + cross-entropy on the marginal of the contoured classes.

A slice whose label map leaves organ k uncontoured (OpenKBP patients without an esophagus contour, a datastore
label whose `contoured` list omits it) says nothing about k: its 0s mean "background or k". The marginal form
(Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ segmentation", MedIA 2021)
merges the probabilities of the uncontoured classes into background before the loss, and drops their Dice terms
for that slice. With every class contoured it is MONAI's DiceCELoss(to_onehot_y=True, softmax=True) exactly.
Hand-written because MONAI's losses take no per-sample class mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss


class PartialDiceCELoss(nn.Module):
    """Marginal Dice + cross-entropy of logits (B, C, H, W) against labels (B, 1, H, W) int64 in [0, C), given
    `contoured` (B, C) bool (column 0, background, always True); a scalar.

    `batch`: Dice pooled over the slices of the batch that contour each class (MONAI's `batch=True`), else one
    Dice per (slice, contoured class); the mean over the terms that exist. Smoothing as MONAI's DiceLoss.
    """

    def __init__(self, batch: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
        super().__init__()
        self.batch, self.smooth_nr, self.smooth_dr = batch, smooth_nr, smooth_dr

    def forward(self, logits: torch.Tensor, label: torch.Tensor, contoured: torch.Tensor) -> torch.Tensor:
        b, c = logits.shape[:2]
        assert label.shape == (b, 1, *logits.shape[2:]), (label.shape, logits.shape)
        assert contoured.shape == (b, c) and contoured.dtype == torch.bool, (contoured.shape, contoured.dtype)
        known = contoured.clone()
        known[:, 0] = True
        log_p = logits.float().log_softmax(1)
        merged = ~known  # classes folded into background, per slice
        merged[:, 0] = True
        log_bg = torch.logsumexp(log_p.masked_fill(~merged[:, :, None, None], float("-inf")), dim=1)  # (B, H, W)
        y = label[:, 0].long()
        log_target = torch.where(y == 0, log_bg, log_p.gather(1, y[:, None])[:, 0])
        ce = -log_target.mean()

        q = torch.cat([log_bg[:, None].exp(), log_p[:, 1:].exp()], 1)  # marginal probabilities, (B, C, H, W)
        t = torch.zeros_like(q).scatter_(1, y[:, None], 1.0)
        w = known[:, :, None].float()  # (B, C, 1): which (slice, class) terms count
        inter = (q * t).flatten(2).sum(-1, keepdim=True) * w
        denom = (q + t).flatten(2).sum(-1, keepdim=True) * w
        if self.batch:
            inter, denom, w = inter.sum(0), denom.sum(0), w.amax(0)  # (C, 1)
        dice = 1 - (2 * inter + self.smooth_nr) / (denom + self.smooth_dr)
        return torch.where(w > 0, dice, 0.0).sum() / w.sum() + ce


def segmentation_loss(
    output: torch.Tensor | list[torch.Tensor], label: torch.Tensor, contoured: torch.Tensor, loss: PartialDiceCELoss
) -> torch.Tensor:
    """`loss` of a network's output: one logits tensor, or UNet++'s deep-supervision heads (main first, all at
    full resolution) weighted as MONAI's DeepSupervisionLoss ("exp": 1, 1/2, 1/4, ... floored at 1/16)."""
    heads = list(output) if isinstance(output, (list, tuple)) else [output]
    weights = DeepSupervisionLoss(loss).get_weights(len(heads))
    return sum(w * loss(h, label, contoured) for w, h in zip(weights, heads, strict=True))
