"""The pixel-classifier ensemble (DatasetGAN's style interpreter) in two forms with the same numbers.

Each member is DatasetGAN's MLP on a pixel's concatenated, upsampled tap features x (sum C_i):
Linear(sum C_i, H1) -> ReLU -> BN -> Linear(H1, H2) -> ReLU -> BN -> Linear(H2, K).

- `PixelEnsemble` (trainable): all M members as batched matmuls on pixel feature rows (M, P, C).
- `FactorizedEnsemble` (inference, from `PixelEnsemble.factorized()`): the first layer is linear
  and so is bilinear upsampling, so W.concat(up(L_i)) = sum_r up(sum_{i at r} W_i L_i). Each
  resolution's taps go through one 1x1 conv (a matmul) at their own resolution, the hidden-width
  result is upsampled once per resolution and summed, the bias added once. Eval-mode BatchNorm is
  folded into the next linear layer; all members run as one matmul per layer, on channels-last
  (pixel-major) tensors. The (sum C_i, R, R) feature map is never built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from labelfactory.datasetgan.taps import TapLayout
from labelfactory.datasetgan.uncertainty import js_divergence
from labelfactory.stylegan2.networks import assert_shape


@dataclass(frozen=True)
class EnsembleConfig:
    """Ensemble shape (what a model file records to rebuild it)."""

    tap_channels: tuple[int, ...]  # channels C_i of each generator tap, coarse to fine
    tap_resolutions: tuple[int, ...]  # side r_i of each tap
    image_resolution: int  # side R of the generated image every pixel is labelled on
    num_classes: int  # K, the label map's largest value + 1
    members: int = 10  # M pixel MLPs
    hidden: tuple[int, int] = (256, 128)  # (H1, H2) hidden widths
    seed: int = 0  # initialisation seed (member m draws from seed * 1_000_003 + m)

    @property
    def layout(self) -> TapLayout:
        return TapLayout(tuple(self.tap_channels), tuple(self.tap_resolutions), self.image_resolution)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> EnsembleConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)


class PixelEnsemble(nn.Module):
    """M pixel MLPs as batched matmuls. forward(x (M, P, C)) -> logits (M, P, K); member m sees x[m]."""

    def __init__(self, config: EnsembleConfig):
        super().__init__()
        self.config = config
        M, C, (H1, H2), K = config.members, config.layout.total_channels, config.hidden, config.num_classes
        w1, w2, w3 = torch.empty(M, C, H1), torch.empty(M, H1, H2), torch.empty(M, H2, K)
        for m in range(M):  # each member its own Kaiming draw (DatasetGAN: members initialised differently)
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + m)
            w1[m], w2[m], w3[m] = _kaiming((C, H1), C, gen), _kaiming((H1, H2), H1, gen), _kaiming((H2, K), H2, gen)
        self.w1, self.w2, self.w3 = nn.Parameter(w1), nn.Parameter(w2), nn.Parameter(w3)
        self.b1, self.b2, self.b3 = (
            nn.Parameter(torch.zeros(M, H1)),
            nn.Parameter(torch.zeros(M, H2)),
            nn.Parameter(torch.zeros(M, K)),
        )
        self.bn1, self.bn2 = nn.BatchNorm1d(M * H1), nn.BatchNorm1d(M * H2)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        """BatchNorm over each member's own pixels: h (M, P, H) -> (M, P, H)."""
        M, P, H = h.shape
        return bn(h.transpose(0, 1).reshape(P, M * H)).reshape(P, M, H).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape(
            x, [self.config.members, None, self.config.layout.total_channels], "pixel features (M, P, sum C_i)"
        )
        h = self._bn(self.bn1, torch.relu(torch.baddbmm(self.b1[:, None], x, self.w1)))
        h = self._bn(self.bn2, torch.relu(torch.baddbmm(self.b2[:, None], h, self.w2)))
        return torch.baddbmm(self.b3[:, None], h, self.w3)

    @torch.no_grad()
    def factorized(self) -> FactorizedEnsemble:
        """The inference form with eval-mode BatchNorm folded into the next linear layer."""
        M, (H1, H2) = self.config.members, self.config.hidden
        w2, b2 = _fold_bn(self.bn1, self.w2, self.b2, M, H1)
        w3, b3 = _fold_bn(self.bn2, self.w3, self.b3, M, H2)
        return FactorizedEnsemble(self.config.layout, self.w1.detach(), self.b1.detach(), w2, b2, w3, b3)


def member_states(ens: PixelEnsemble, members: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Each of `members`' own tensors, copied to the CPU: w1 (C, H1), b1 (H1,), ..., bn1.running_mean (H1,), ...
    (BatchNorm channels are member-major, so member m's are its slice of length H); the step counters whole."""
    M = ens.config.members
    state = {k: v.detach().cpu() for k, v in ens.state_dict().items()}
    return [{k: _member_part(k, v, M, m).clone() for k, v in state.items()} for m in members]


def _member_part(key: str, value: torch.Tensor, M: int, m: int) -> torch.Tensor:
    """Member m's part of the state tensor `key`: a parameter's row m, a BatchNorm vector's m-th of M slices."""
    if key.endswith("num_batches_tracked"):  # one counter for all members (every member steps together)
        return value
    return value.reshape(M, -1)[m] if key.startswith("bn") else value[m]


def ensemble_of(config: EnsembleConfig, states: list[dict[str, torch.Tensor]]) -> PixelEnsemble:
    """The ensemble of `config` with len(states) members, member m holding `states[m]` (from `member_states`)."""
    ens = PixelEnsemble(replace(config, members=len(states)))
    joined = {}
    for k in ens.state_dict():
        parts = [s[k] for s in states]
        if k.endswith("num_batches_tracked"):
            joined[k] = parts[0]
        else:
            joined[k] = torch.cat(parts) if k.startswith("bn") else torch.stack(parts)
    ens.load_state_dict(joined)
    return ens


def _fold_bn(bn: nn.BatchNorm1d, w: torch.Tensor, b: torch.Tensor, M: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = BN(h) @ w + b with running stats == h @ (s * w) + (t @ w + b); returns (w' (M, H, O), b' (M, O))."""
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(M, H)
    t = bn.bias.reshape(M, H) - bn.running_mean.reshape(M, H) * s
    return (s[:, :, None] * w).detach().clone(), (torch.bmm(t[:, None], w)[:, 0] + b).detach().clone()


def upsample_matrix(r: int, R: int) -> torch.Tensor:
    """(R, r) matrix A with A @ v == F.interpolate(v, size=R, mode='linear', align_corners=False) along one axis.

    Taken from PyTorch's own kernel, so source indices, weights and border clamping are its own.
    """
    return F.interpolate(torch.eye(r)[None], size=R, mode="linear", align_corners=False)[0].T.contiguous()


class FactorizedEnsemble(nn.Module):
    """Folded ensemble over whole images: forward(taps) -> logits (B, M, K, R, R).

    Exact form (default), one band of `band_rows` image rows at a time, so the (M*H1, R, R)
    hidden map is never materialised: bilinear upsampling is separable, so for each band and
    resolution only the few projected source rows (r, M*H1) it reads are upsampled along the width,
    then blended along the height into the band (one small matmul per resolution); ReLU and the
    folded second and third layers follow on the band. All band buffers are allocated once per call
    and reused (fresh large allocations cost page faults that dominated). Width upsampling is a
    batched matmul for the coarse resolutions (scale >= 8) and, for the fine ones, s phase-wise
    weighted adds of shifted columns (each output column x = s*j + p is a fixed 2-tap blend of
    source columns j-1, j, j+1). `vote_and_uncertainty` consumes each band's logits at once, so
    the (B, M, K, R, R) logits are only built when `forward` is asked for them.
    """

    DENSE_MIN_SCALE = 8  # width pass as a matmul when R / r >= this; its cost grows with r, the phase form's with R / r

    def __init__(
        self,
        layout: TapLayout,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        w3: torch.Tensor,
        b3: torch.Tensor,
        band_rows: int = 16,
    ):
        super().__init__()
        self.layout, self.band_rows = layout, band_rows
        M, _, H1 = w1.shape
        self.members, self.hidden1 = M, H1
        R = layout.image_resolution
        offsets = [0]
        for c in layout.channels:
            offsets.append(offsets[-1] + c)
        self.groups = layout.groups()
        for r, idx in self.groups.items():
            rows = torch.cat([w1[:, offsets[i] : offsets[i + 1]] for i in idx], dim=1)  # (M, C_r, H1)
            self.register_buffer(f"w1_r{r}", rows.permute(1, 0, 2).reshape(-1, M * H1).contiguous())  # (C_r, M*H1)
            if r != R:
                self.register_buffer(f"up_r{r}", upsample_matrix(r, R))  # (R, r)
        self.dense = [r for r in self.groups if r != R and (R // r >= self.DENSE_MIN_SCALE or r < 3)]
        self.register_buffer("b1", b1.reshape(M * H1).clone())
        self.register_buffer("w2", w2.contiguous())  # (M, H1, H2)
        self.register_buffer("b2", b2[:, None, :].clone())  # (M, 1, H2)
        self.register_buffer("w3", w3.contiguous())  # (M, H2, K)
        self.register_buffer("b3", b3[:, None, :].clone())

    def _project(self, taps: list[torch.Tensor], r: int) -> torch.Tensor:
        """Taps at resolution r -> first-layer contribution (B, r*r, M*H1), pixel-major: one matmul for all members."""
        idx = self.groups[r]
        x = taps[idx[0]] if len(idx) == 1 else torch.cat([taps[i] for i in idx], dim=1)
        B, C = x.shape[:2]
        return torch.matmul(x.reshape(B, C, r * r).transpose(1, 2), getattr(self, f"w1_r{r}"))

    def _phase_taps(self, r: int) -> list[list[tuple[int, float]]]:
        """Per phase p of scale s = R/r: [(offset into the edge-padded source, weight)] of output column s*j + p."""
        A, s = getattr(self, f"up_r{r}"), self.layout.image_resolution // r
        # an interior source column j = 1 (padded index 2): its outputs s + p read padded columns 1..3 only
        return [[(k, float(A[s + p, k - 1])) for k in (1, 2, 3) if A[s + p, k - 1] != 0] for p in range(s)]

    def _width(self, z: torch.Tensor, r: int, out: torch.Tensor) -> torch.Tensor:
        """Source rows z (n, r, C) of a projected map -> upsampled along the width into out (n, R*C); returns out."""
        R, n = self.layout.image_resolution, z.shape[0]
        if r in self.dense:
            torch.matmul(getattr(self, f"up_r{r}"), z, out=out.view(n, R, -1))  # (R, r) @ (n, r, C), batched over rows
            return out
        zp = torch.cat([z[:, :1], z, z[:, -1:]], dim=1)  # edge-padded: (n, r+2, C)
        zw = out.view(n, r, R // r, z.shape[-1])
        for p, taps in enumerate(self._phase_taps(r)):
            (k, wgt), *rest = taps
            torch.mul(zp[:, k - 1 : k - 1 + r], wgt, out=zw[:, :, p])
            for k, wgt in rest:
                zw[:, :, p].add_(zp[:, k - 1 : k - 1 + r], alpha=wgt)
        return out

    def _source_rows(self, r: int, y0: int, y1: int) -> tuple[int, int]:
        """The rows lo:hi of a resolution-r map that image rows y0:y1 blend (bilinear: a few per band)."""
        used = getattr(self, f"up_r{r}")[y0:y1].any(dim=0).nonzero()[:, 0]
        return int(used[0]), int(used[-1]) + 1

    def _band_hidden(
        self,
        acc: torch.Tensor,
        x_full: torch.Tensor | None,
        low: dict[int, torch.Tensor],
        wbuf: dict[int, torch.Tensor],
        y0: int,
        y1: int,
    ) -> None:
        """First-layer pre-activation of image rows y0:y1 into acc ((y1-y0)*R, M*H1).

        low: one image's projected maps (r, r, M*H1); wbuf: scratch (rows, R*M*H1) for their width passes.
        Only the source rows the band reads are width-upsampled (a row shared by two bands is done twice),
        so no whole-image (r, R*M*H1) map is ever allocated.
        """
        R, T = self.layout.image_resolution, y1 - y0
        if x_full is None:
            acc.zero_()
        else:
            torch.mm(x_full[:, y0 * R : y1 * R].T, getattr(self, f"w1_r{R}"), out=acc)
        rows = acc.view(T, -1)
        for r, z in low.items():  # height pass: each band row blends <= 2 source rows
            lo, hi = self._source_rows(r, y0, y1)
            zw = self._width(z[lo:hi], r, wbuf[r][: hi - lo])
            rows.addmm_(getattr(self, f"up_r{r}")[y0:y1, lo:hi], zw)

    def _head(self, h: torch.Tensor, h2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Hidden pre-activation rows h (P, M*H1) -> logits out (M, P, K): ReLU, the folded second and third layers.

        h2 (M, P, H2) is scratch; the second layer runs one member at a time on strided views of h,
        several times faster than a batched matmul that would first copy h member-major.
        """
        P = h.shape[0]
        hv = h.relu_().view(P, self.members, self.hidden1)
        for m in range(self.members):
            torch.addmm(self.b2[m], hv[:, m], self.w2[m], out=h2[m])
        return torch.baddbmm(self.b3, h2.relu_(), self.w3, out=out)

    def _bands(self, taps: list[torch.Tensor]):
        """Yield (image b, rows y0:y1, logits (M, (y1-y0)*R, K)) band by band; buffers are reused: use each at once."""
        self.layout.check(taps)
        R, B = self.layout.image_resolution, taps[0].shape[0]
        low = {r: self._project(taps, r).reshape(B, r, r, -1) for r in self.groups if r != R}
        # the first-layer bias rides on one upsampled map (bilinear weights sum to 1), else on the full-size one
        bias_at = min(low) if low else None
        if bias_at is not None:
            low[bias_at] += self.b1
        full = None
        if R in self.groups:
            idx = self.groups[R]
            full = taps[idx[0]] if len(idx) == 1 else torch.cat([taps[i] for i in idx], dim=1)
            full = full.reshape(B, -1, R * R)
        P, like = min(self.band_rows, R) * R, self.w3
        acc = like.new_empty(P, self.b1.shape[0])
        h2 = like.new_empty(self.members, P, self.w2.shape[-1])
        logits = like.new_empty(self.members, P, self.w3.shape[-1])
        bands = [(y0, min(R, y0 + self.band_rows)) for y0 in range(0, R, self.band_rows)]
        wbuf = {
            r: like.new_empty(
                max(hi - lo for lo, hi in (self._source_rows(r, *y) for y in bands)), R * self.b1.shape[0]
            )
            for r in low
        }
        for b in range(B):
            for y0, y1 in bands:
                n = (y1 - y0) * R
                self._band_hidden(
                    acc[:n], None if full is None else full[b], {r: v[b] for r, v in low.items()}, wbuf, y0, y1
                )
                if bias_at is None:
                    acc[:n] += self.b1
                yield b, y0, y1, self._head(acc[:n], h2[:, :n], logits[:, :n])

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        R, B = self.layout.image_resolution, taps[0].shape[0]
        out = self.w3.new_empty(B, self.members, self.w3.shape[-1], R, R)
        for b, y0, y1, lg in self._bands(taps):
            out[b, :, :, y0:y1] = lg.transpose(1, 2).reshape(self.members, -1, y1 - y0, R)
        return out

    def vote_and_uncertainty(self, taps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """taps -> (majority_vote (B, R, R) int64, js_divergence (B, R, R) nats), computed band by band so the
        (B, M, K, R, R) logits are never stored; the same numbers as those functions on `forward(taps)`."""
        R, B = self.layout.image_resolution, taps[0].shape[0]
        mask = torch.empty(B, R, R, dtype=torch.int64, device=self.w3.device)
        js = torch.empty(B, R, R, device=self.w3.device)
        for b, y0, y1, lg in self._bands([t.to(self.w3.dtype) for t in taps]):  # taps in the ensemble's dtype
            band = lg.transpose(1, 2)[None]  # (1, M, K, P), a view
            mask[b, y0:y1] = majority_vote(band).view(y1 - y0, R)
            js[b, y0:y1] = js_divergence(band.float()).view(y1 - y0, R)  # the divergence in fp32 always
        return mask, js


def majority_vote(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, M, K, *spatial) -> mask (B, *spatial) int64: the class most members pick (ties: lowest class)."""
    B, M, K = logits.shape[:3]
    votes = logits.argmax(dim=2).reshape(B, M, -1)
    counts = torch.zeros(B, K, votes.shape[-1], dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.int32))
    return counts.argmax(dim=1).reshape(B, *logits.shape[3:])
