"""The generator's feature taps: every synthesis layer's output, regenerated from a latent w.

A latent record holds one w (after truncation), broadcast to all layers, as DatasetGAN does.
Taps are the list of (N, C_i, r_i, r_i) maps `G.synthesis(..., return_features=True)` returns,
coarse to fine; nothing here ever upsamples them to image size as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labelfactory.devices import module_device
from labelfactory.stylegan2.latents import z_from_seeds


@dataclass(frozen=True)
class TapLayout:
    """Shapes of a generator's taps: channels and resolution per tap (coarse to fine), image resolution R."""

    channels: tuple[int, ...]
    resolutions: tuple[int, ...]
    image_resolution: int

    @classmethod
    def of(cls, G) -> TapLayout:
        return cls(tuple(G.tap_channels), tuple(G.tap_resolutions), int(G.img_resolution))

    @property
    def total_channels(self) -> int:
        return sum(self.channels)

    def groups(self) -> dict[int, list[int]]:
        """resolution -> indices of the taps at that resolution, coarsest resolution first."""
        out: dict[int, list[int]] = {}
        for i, r in enumerate(self.resolutions):
            out.setdefault(r, []).append(i)
        return dict(sorted(out.items()))

    def check(self, taps: list[torch.Tensor]) -> None:
        got = [(t.shape[1], t.shape[-1]) for t in taps]
        want = list(zip(self.channels, self.resolutions, strict=True))
        if got != want:
            raise ValueError(f"taps (channels, resolution) {got} do not match the layout {want}")


def ws_from_w(G, w: torch.Tensor) -> torch.Tensor:
    """w (N, w_dim) or (w_dim,) -> ws (N, num_ws, w_dim): the same w for every layer."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, G.w_dim)
    return w[:, None, :].expand(-1, G.num_ws, -1).contiguous()


@torch.no_grad()
def ws_from_seeds(G, seeds: list[int], truncation_psi: float = 1.0) -> torch.Tensor:
    """Seeds -> ws (N, num_ws, w_dim) via the mapping network with truncation psi (reproducible)."""
    return G.mapping(z_from_seeds(list(seeds), G.z_dim).to(module_device(G)), truncation_psi=truncation_psi)


@torch.no_grad()
def generate_with_taps(G, ws: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ws (N, num_ws, w_dim) -> (image (N, 1, R, R) in about [-1, 1], taps), constant noise (deterministic)."""
    img, taps = G.synthesis(ws, noise_mode="const", return_features=True)
    return img, [t.float() for t in taps]


def pixel_grid(rows: torch.Tensor, cols: torch.Tensor, image_resolution: int) -> torch.Tensor:
    """Pixel indices (P,) -> grid_sample coordinates (1, 1, P, 2) of those pixels' centres in [-1, 1]."""
    scale = 2.0 / image_resolution
    x = (cols.float() + 0.5) * scale - 1.0
    y = (rows.float() + 0.5) * scale - 1.0
    return torch.stack([x, y], dim=-1)[None, None]


def sample_taps(
    taps: list[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, image_resolution: int
) -> torch.Tensor:
    """The upsampled, concatenated feature vector at chosen pixels only: (P, sum C_i), one image's taps (1, C_i, r, r).

    Bilinear with border clamping at pixel centres is exactly what F.interpolate(size=R,
    mode='bilinear', align_corners=False) computes at those pixels, so training sees the same
    features the full-image forms use, without building the (sum C_i, R, R) map.
    """
    grid = pixel_grid(rows, cols, image_resolution).to(taps[0].device)
    cols_out = [
        F.grid_sample(t.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
        for t in taps
    ]
    return torch.cat(cols_out, dim=0).T.contiguous()
