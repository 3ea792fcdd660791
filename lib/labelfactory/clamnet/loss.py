"""ClamNet's hybrid loss (equation 1) and the targets Y it is computed against for each pair.

Hybrid loss of one slice, C classes, N counted pixels (`mask`), probabilities p and targets y:

    H(Y, P) = -1/N * sum_c sum_n ( y log p + y p / (y^2 + p^2) )

p is clamped to >= eps inside the log and eps is added to the denominator, so H is finite at
p = 0 and at y = 0 (a pixel with y = 0 adds exactly 0). The second term is largest when p = y, a
per-pixel Dice-like agreement. The total is sum_i w_i * H(Y_i, P_i) over the slices of both
networks, divided by the batch size (a constant, so the optimum is the paper's).

What Y is (the paper leaves it open). Classes: 0 'no marker', 1 'marker'.
- A slice labelled **normal** (either side of a NORMAL or NEGATIVE pair): Y = (1, 0) at every
  pixel, weight w = 1. The image-level label says no pixel holds the marker, so this is certain.
- A slice labelled **abnormal** (its side of a NEGATIVE pair): Y = (0, 1) on the `fraction` of its organ
  pixels where a score is highest, (1, 0) on every other pixel. The score is the network's own stop-
  gradient marker probability (target `self`) or a fixed evidence map (`cam`, `difference`: the batch's
  `evidence_*`, see targets.py); weight w = eta (the probability that the slice holds the marker; from
  the labels CSV, else a hyperparameter). Why not "marker on the whole organ": a UNet++ sees the whole
  crop, so it can learn the image-level label globally and light up the whole organ of every abnormal
  slice without localising anything (we saw exactly that on the toy blob set). Asking for only a
  fraction of the organ (a multiple-instance assumption: some, not all, organ pixels hold the marker)
  makes the cheapest solution the pixels that differ from normal tissue, while the normal side of the
  pair pushes everything that looks normal to 0 with weight 1.
- A **SAME** pair (one slice and its blurred / stretched view): each network's target is the other
  network's stop-gradient prediction, compared in the view's frame (a's prediction is carried into
  it with the view's geometry; the padding of a padded view is not counted), w = 1. This is the
  positive-pair consistency; stopping the gradient keeps each target fixed within a step, so the
  objective is well posed (no network chases its own output).
With deep supervision every head gets the loss and the heads' losses are averaged.
"""

from __future__ import annotations

import math

import torch

from labelfactory.clamnet.network import MARKER
from labelfactory.clamnet.pairs import SAME, PairBatch, to_view_frame

EPS = 1e-6


def hybrid_loss(
    y: torch.Tensor, p: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS, dice_term: bool = True
) -> torch.Tensor:
    """Equation (1) per slice. y, p: (B, C, H, W) in [0, 1]; mask: (B, 1, H, W) of counted pixels or None;
    dice_term False: the cross-entropy term alone (an ablation). Returns (B,)."""
    terms = y * torch.log(p.clamp_min(eps))
    if dice_term:
        terms = terms + y * p / (y * y + p * p + eps)
    if mask is None:
        mask = torch.ones_like(p[:, :1])
    n = mask.flatten(1).sum(1).clamp_min(1.0)
    return -(terms * mask).flatten(1).sum(1) / n


def label_targets(abnormal: torch.Tensor, organ: torch.Tensor, score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Targets from image-level labels. abnormal (B,) bool, organ (B, 1, H, W), score (B, 1, H, W) >= 0: the
    network's marker probability or an evidence map (gradient stopped here) -> Y (B, 2, H, W): marker 1 on the top
    ceil(fraction * organ pixels) organ pixels of abnormal slices by score, 0 everywhere else."""
    y = torch.zeros_like(organ)
    score = torch.where(organ > 0, score.detach(), torch.full_like(score, -1.0)).flatten(1)
    for i in torch.nonzero(abnormal).flatten().tolist():
        k = math.ceil(fraction * float(organ[i].sum()))
        if k > 0:
            y[i].view(-1)[score[i].topk(k).indices] = 1.0
    return torch.cat([1.0 - y, y], dim=1)


def _pair_loss(pa: torch.Tensor, pb: torch.Tensor, batch: PairBatch, fraction: float, dice_term: bool) -> torch.Tensor:
    """One head's loss: pa, pb (B, 2, S, S) probabilities of networks a and b. Returns a scalar."""
    per_slice = []
    for i in range(len(pa)):
        a, b = pa[i : i + 1], pb[i : i + 1]
        if int(batch.kind[i]) == SAME:
            a_in_b = to_view_frame(a, batch.views[i])
            valid = batch.valid[i : i + 1]
            per_slice.append(
                hybrid_loss(b.detach(), a_in_b, valid, dice_term=dice_term)
                + hybrid_loss(a_in_b.detach(), b, valid, dice_term=dice_term)
            )
            continue
        losses = []
        for p, abnormal, organ, eta, evidence in (
            (a, batch.abnormal_a, batch.organ_a, batch.eta_a, batch.evidence_a),
            (b, batch.abnormal_b, batch.organ_b, batch.eta_b, batch.evidence_b),
        ):
            weight = eta[i] if bool(abnormal[i]) else torch.ones(())
            score = p[:, MARKER:] if evidence is None else evidence[i : i + 1]
            y = label_targets(abnormal[i : i + 1], organ[i : i + 1], score, fraction)
            losses.append(weight * hybrid_loss(y, p, dice_term=dice_term))
        per_slice.append(losses[0] + losses[1])
    return torch.cat(per_slice).sum() / len(pa)


def clamnet_loss(
    logits_a: list[torch.Tensor],
    logits_b: list[torch.Tensor],
    batch: PairBatch,
    fraction: float = 0.25,
    dice_term: bool = True,
) -> torch.Tensor:
    """Total loss of a pair batch; logits_*: the heads of each network, each (B, 2, S, S); fraction:
    the share of an abnormal slice's organ pixels taken to hold the marker; dice_term: see hybrid_loss. Scalar."""
    heads = [
        _pair_loss(la.softmax(1), lb.softmax(1), batch, fraction, dice_term)
        for la, lb in zip(logits_a, logits_b, strict=True)
    ]
    return torch.stack(heads).mean()
