"""Training configuration: the paper's 256^2 setup (stylegan2-ada 'auto' at 256, gamma 1) and a tiny CPU demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from labelfactory.options import SEED_RANGE, option


@dataclass(frozen=True)
class StyleGAN2Config:
    resolution: int = option(256, "image side in pixels (a power of 2)", low=8, where=("conf", "cli"))
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int = 16384
    channel_max: int = 512
    batch_size: int = option(16, "images per step over all processes", low=1)
    mbstd_group: int = 4
    lr: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = option(1.0, "R1 regularisation weight (gamma)")
    style_mixing_prob: float = 0.9
    pl_weight: float = 2.0
    G_reg_interval: int = 4
    D_reg_interval: int = 16
    ema_kimg: float | None = None  # None: batch_size * 10 / 32, as stylegan2-ada
    ema_rampup: float | None = 0.05
    augment: bool = option(True, "ADA (adaptive discriminator augmentation)")
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500.0
    total_kimg: float = option(25000.0, "training length in thousands of real images shown")
    snapshot_kimg: float = option(50.0, "kimg between snapshots: state, preview, published generator")
    fid_kimg: float = option(200.0, "kimg between FID measurements; 0: never")
    fid_images: int = 2000
    preview_seeds: int = 16
    seed: int = option(0, "seed of the initial weights and of every random draw", high=SEED_RANGE[1])
    mixed_precision: bool = option(
        False,
        "main phases with the top num_bf16_res resolutions of G and D in bf16 (AVX-512 BF16 CPUs, GPUs)",
    )
    num_bf16_res: int = 4  # with mixed_precision: how many of the highest resolutions run in bf16 (the reference's 4)
    fused_adam: bool = True  # one fused kernel per optimiser step (CPU and CUDA; 4-7x faster step than the loop)
    channels_last: bool = True  # G, D and images in channels-last memory (CPU: 1.1-1.3x on its convs; same math)

    @property
    def precision_kwargs(self) -> dict[str, Any]:
        """Run-time precision of G and D (no weights depend on it): bf16 blocks and, as the reference, a 256 clamp."""
        return dict(conv_clamp=256.0, num_bf16_res=self.num_bf16_res) if self.mixed_precision else {}

    @property
    def generator_kwargs(self) -> dict[str, Any]:
        return dict(
            z_dim=self.z_dim,
            w_dim=self.w_dim,
            img_resolution=self.resolution,
            img_channels=1,
            channel_base=self.channel_base,
            channel_max=self.channel_max,
            mapping_layers=self.mapping_layers,
            **self.precision_kwargs,
        )

    @property
    def discriminator_kwargs(self) -> dict[str, Any]:
        return dict(
            img_resolution=self.resolution,
            img_channels=1,
            channel_base=self.channel_base,
            channel_max=self.channel_max,
            mbstd_group_size=self.mbstd_group,
            **self.precision_kwargs,
        )

    def architecture(self) -> dict[str, Any]:
        """The fields a checkpoint must share to be resumed (precision may change between runs)."""
        return {
            k: v
            for k, v in {**self.generator_kwargs, **self.discriminator_kwargs}.items()
            if k not in self.precision_kwargs
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StyleGAN2Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def with_overrides(self, **kw) -> StyleGAN2Config:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS: dict[str, StyleGAN2Config] = {
    # the paper: 256^2, stylegan2-ada defaults (batch 16, lr 0.0025, channel base 16384) with gamma = 1
    "paper256": StyleGAN2Config(),
    # a few minutes on a CPU: 64^2, narrow networks, a few kimg
    "demo": StyleGAN2Config(
        resolution=64,
        z_dim=64,
        w_dim=64,
        mapping_layers=2,
        channel_base=1024,
        channel_max=64,
        batch_size=8,
        pl_weight=0.0,
        total_kimg=1.0,
        snapshot_kimg=0.25,
        fid_kimg=0.0,
        fid_images=256,
        preview_seeds=16,
        ada_kimg=100.0,
    ),
    # OpenKBP head-and-neck crops at 64^2 on a CPU: 4x the demo's widths from 16^2 down (128 channels, 32 at 64^2),
    # gamma 0.1 (stylegan2-ada's heuristic 0.0002 R^2 / batch gives 0.05), no path length (as its cifar config)
    "openkbp64": StyleGAN2Config(
        resolution=64,
        z_dim=128,
        w_dim=128,
        mapping_layers=4,
        channel_base=2048,
        channel_max=128,
        batch_size=16,
        r1_gamma=0.1,
        pl_weight=0.0,
        ada_kimg=100.0,
        total_kimg=3000.0,
        snapshot_kimg=4.0,
        fid_kimg=40.0,
        fid_images=2000,
        preview_seeds=32,
    ),
}


def preset(name: str = "auto") -> StyleGAN2Config:
    """'paper256', 'demo', or 'auto' (paper256 when a CUDA GPU is present, else demo)."""
    if name == "auto":
        name = "paper256" if torch.cuda.is_available() else "demo"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of auto, {', '.join(PRESETS)}")
    return PRESETS[name]
