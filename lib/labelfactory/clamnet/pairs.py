"""Contrastive pairs as ClamNet section 3.3 builds them, from slices with image-level labels.

Three kinds of pair, each a slice for network `a` and one for network `b`:
- SAME (positive): one slice and a view of it: (i) blurred to a resolution of 90-100 % of the
  original (downsample by r in [0.9, 1], upsample back), then (ii) stretched / compressed to
  80-100 % per axis (sy, sx in [0.8, 1]) and either resized back to the full size or padded to it
  (centred, image fill -1). The view's geometry is kept so predictions can be compared pixel to pixel.
- NORMAL (positive): two different slices labelled normal.
- NEGATIVE: an abnormal slice and a normal slice, in random order across the two networks.
All randomness comes from the `torch.Generator` passed in: same seed, same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelfactory.errors import LabelFactoryError

SAME, NORMAL, NEGATIVE = 0, 1, 2
BLUR_RANGE = (0.9, 1.0)  # resolution kept by the blur, fraction of the original
STRETCH_RANGE = (0.8, 1.0)  # per-axis size after stretch / compression, fraction of the original


@dataclass(frozen=True)
class ViewParams:
    """How a SAME-pair view was made: blur resolution `r`, per-axis scales (sy, sx), 'resize' or 'pad'."""

    r: float
    sy: float
    sx: float
    mode: str


@dataclass
class PairBatch:
    """B pairs. Images (B, 1, S, S) in [-1, 1]; organ masks (B, 1, S, S) in {0, 1}; `valid` (B, 1, S, S)
    marks pixels of b's frame that hold image content (the pad of a padded view is 0); `views[i]` is
    the ViewParams of a SAME pair (None for the others); `eta_*` the marker weight of each slice; `evidence_*`
    (B, 1, S, S) the map an abnormal slice's target is taken from (`targets.py`; None: the network's own)."""

    xa: torch.Tensor
    xb: torch.Tensor
    organ_a: torch.Tensor
    organ_b: torch.Tensor
    abnormal_a: torch.Tensor
    abnormal_b: torch.Tensor
    eta_a: torch.Tensor
    eta_b: torch.Tensor
    kind: torch.Tensor
    valid: torch.Tensor
    views: list[ViewParams | None]
    evidence_a: torch.Tensor | None = None
    evidence_b: torch.Tensor | None = None


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def draw_view(gen: torch.Generator) -> ViewParams:
    """Random view parameters inside BLUR_RANGE and STRETCH_RANGE."""
    return ViewParams(
        _uniform(*BLUR_RANGE, gen),
        _uniform(*STRETCH_RANGE, gen),
        _uniform(*STRETCH_RANGE, gen),
        "pad" if torch.rand((), generator=gen) < 0.5 else "resize",
    )


def blur(x: torch.Tensor, r: float) -> torch.Tensor:
    """(B, C, S, S) -> same shape at resolution r (downsample to round(r*S) with antialiasing, upsample back)."""
    s = x.shape[-2:]
    small = F.interpolate(
        x, size=(max(1, round(r * s[0])), max(1, round(r * s[1]))), mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(small, size=s, mode="bilinear", align_corners=False)


def stretch(x: torch.Tensor, v: ViewParams, fill: float) -> torch.Tensor:
    """(B, C, S, S) -> same shape: resized to (sy*S, sx*S), then resized back ('resize') or centre-padded with
    `fill` ('pad')."""
    h, w = x.shape[-2:]
    nh, nw = max(1, round(v.sy * h)), max(1, round(v.sx * w))
    small = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if v.mode == "resize":
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    top, left = (h - nh) // 2, (w - nw) // 2
    return F.pad(small, (left, w - nw - left, top, h - nh - top), value=fill)


def make_view(x: torch.Tensor, v: ViewParams) -> torch.Tensor:
    """The SAME-pair view of image slices (B, 1, S, S): blur, then stretch; pad fill -1 (air)."""
    return stretch(blur(x, v.r), v, fill=-1.0)


def to_view_frame(t: torch.Tensor, v: ViewParams) -> torch.Tensor:
    """Carry maps on the original frame (predictions, masks; (B, C, S, S)) into the view's frame (geometry only,
    pad 0)."""
    return stretch(t, v, fill=0.0)


class PairSampler:
    """Draws PairBatch-es from slices x (N, 1, S, S), labels abnormal (N,) bool, eta (N,), organ (N, 1, S, S).

    `mix`: relative frequency of SAME, NORMAL and NEGATIVE pairs; `partners`: for each slice index, the normal
    slices a NEGATIVE pair may put beside it when it is the abnormal one (see `near_normals`, `level_normals`; None: any
    normal slice); `normal_partners`: the same for the second slice of a NORMAL pair (`level_normals`: the same level in
    other patients; None: any other normal slice); `evidence`: (N, 1, S, S) maps abnormal slices take their targets
    from (None: the network's own marker).
    """

    def __init__(
        self,
        x: torch.Tensor,
        abnormal: torch.Tensor,
        eta: torch.Tensor,
        organ: torch.Tensor,
        mix: tuple[float, float, float] = (1.0, 1.0, 1.0),
        partners: dict[int, torch.Tensor] | None = None,
        evidence: torch.Tensor | None = None,
        normal_partners: dict[int, torch.Tensor] | None = None,
    ):
        self.normal_partners = normal_partners or {}
        self.x, self.abnormal, self.eta, self.organ = x, abnormal.bool(), eta.float(), organ.float()
        self.evidence = evidence
        self.partners = partners or {}
        self.normal_idx = torch.nonzero(~self.abnormal).flatten()
        self.abnormal_idx = torch.nonzero(self.abnormal).flatten()
        if len(self.normal_idx) < 2 or len(self.abnormal_idx) < 1:
            raise LabelFactoryError(
                f"ClamNet needs at least 2 normal and 1 abnormal slices, got {len(self.normal_idx)} normal and "
                f"{len(self.abnormal_idx)} abnormal; label more slices in the image-level labels CSV"
            )
        self.mix = torch.tensor(mix, dtype=torch.float)

    def _pick(self, pool: torch.Tensor, gen: torch.Generator, k: int = 1) -> list[int]:
        return pool[torch.randperm(len(pool), generator=gen)[:k]].tolist()

    def sample(self, batch: int, gen: torch.Generator) -> PairBatch:
        kinds = torch.multinomial(self.mix, batch, replacement=True, generator=gen)
        ia, ib, views, xb, organ_b, valid = [], [], [], [], [], []
        for kind in kinds.tolist():
            if kind == SAME:
                i = int(torch.randint(len(self.x), (), generator=gen))
                v = draw_view(gen)
                ia.append(i)
                ib.append(i)
                views.append(v)
                xb.append(make_view(self.x[i : i + 1], v))
                organ_b.append((to_view_frame(self.organ[i : i + 1], v) > 0.5).float())
                valid.append((to_view_frame(torch.ones_like(self.organ[i : i + 1]), v) > 0.5).float())
                continue
            if kind == NORMAL:
                i, j = self._pick(self.normal_idx, gen, 2)
                if i in self.normal_partners:
                    j = self._pick(self.normal_partners[i], gen)[0]
            else:
                i = self._pick(self.abnormal_idx, gen)[0]
                j = self._pick(self.partners.get(i, self.normal_idx), gen)[0]
                if torch.rand((), generator=gen) < 0.5:
                    i, j = j, i
            ia.append(i)
            ib.append(j)
            views.append(None)
            xb.append(self.x[j : j + 1])
            organ_b.append(self.organ[j : j + 1])
            valid.append(torch.ones_like(self.organ[j : j + 1]))
        ia_t, ib_t = torch.tensor(ia), torch.tensor(ib)
        return PairBatch(
            xa=self.x[ia_t],
            xb=torch.cat(xb),
            organ_a=self.organ[ia_t],
            organ_b=torch.cat(organ_b),
            abnormal_a=self.abnormal[ia_t],
            abnormal_b=self.abnormal[ib_t],
            eta_a=self.eta[ia_t],
            eta_b=self.eta[ib_t],
            kind=kinds,
            valid=torch.cat(valid),
            views=views,
            evidence_a=None if self.evidence is None else self.evidence[ia_t],
            evidence_b=None if self.evidence is None else self.evidence[ib_t],
        )


def near_normals(abnormal: torch.Tensor, study: list[str], z: torch.Tensor, k: int) -> dict[int, torch.Tensor]:
    """For each abnormal slice, the k normal slices of its own study nearest along z (ties: lower z first).

    A hard negative: the same patient, scan and anatomical level give the pair nothing to tell apart but the
    marker, where a random normal slice also differs in level (brain vs neck vs thorax). Studies without a normal
    slice are left out (their abnormal slices take any normal one). abnormal (N,) bool, z (N,) slice index.
    """
    out: dict[int, torch.Tensor] = {}
    studies = np.array(study)
    for s in dict.fromkeys(study):
        rows = torch.from_numpy(np.nonzero(studies == s)[0])
        normal = rows[~abnormal[rows]]
        if len(normal) == 0:
            continue
        for i in rows[abnormal[rows]].tolist():
            order = torch.argsort((z[normal] - z[i]).abs() * 2 + (z[normal] > z[i]).long(), stable=True)
            out[i] = normal[order[:k]]
    return out


PAIRINGS = ("patient", "level")
LEVEL_WINDOW = 10.0  # level units (mm on OpenKBP): how far apart two slices of different studies may lie and match
SHIFT = 2  # px: the in-plane translation searched when two level-matched crops are aligned


def shifted(x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S, S) -> every integer translation within +-shift px: (C, T, S, S) and the (T, 2) (dy, dx) used.
    Pixels moved in from outside take the crop's air value -1."""
    offsets = torch.tensor([(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)])
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    s = x.shape[-1]
    views = [padded[:, shift - dy : shift - dy + s, shift - dx : shift - dx + s] for dy, dx in offsets.tolist()]
    return torch.stack(views, 1), offsets


def level_normals(
    query: torch.Tensor,
    abnormal: torch.Tensor,
    study: list[str],
    level: torch.Tensor,
    x: torch.Tensor,
    organ: torch.Tensor,
    k: int,
    window: float = LEVEL_WINDOW,
    shift: int = SHIFT,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each query slice index, the k normal slices of OTHER studies at its level (|level difference| <= window)
    that look most like it after alignment, with the alignment: {i: (indices (<=k,), (dy, dx) per index)}.

    Level matching puts beside a slice what the same anatomy looks like in patients whose label says normal there,
    where the patient's own neighbours differ in level. Alignment: the body crops are already translation- and
    scale-normalised (square box around the body); on top, the integer translation within +-shift px that
    minimises the mean squared difference over the query's organ. Queries without a candidate are left out.
    x, organ (N, 1, S, S); abnormal (N,) bool; level (N,).
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    studies = np.array(study)
    normal = ~abnormal.bool()
    for i in query.tolist():
        cand = torch.from_numpy(np.nonzero(studies != studies[i])[0])
        cand = cand[normal[cand] & ((level[cand] - level[i]).abs() <= window)]
        if len(cand) == 0:
            continue
        views, offsets = shifted(x[cand, 0], shift)
        gate = organ[i, 0] > 0.5
        err = ((views - x[i, 0]) ** 2)[..., gate].mean(-1)  # (C, T)
        best, t = err.min(1)
        order = torch.argsort(best, stable=True)[:k]
        out[i] = (cand[order], offsets[t[order]])
    return out


def aligned_mean(x: torch.Tensor, matches: tuple[torch.Tensor, torch.Tensor], shift: int = SHIFT) -> torch.Tensor:
    """The mean of the matched slices (x (N, 1, S, S)), each moved by its alignment -> (1, S, S)."""
    idx, offsets = matches
    views, all_offsets = shifted(x[idx, 0], shift)
    pick = [int(((all_offsets == o).all(1)).nonzero()[0]) for o in offsets]
    return views[torch.arange(len(idx)), torch.tensor(pick)].mean(0, keepdim=True)
