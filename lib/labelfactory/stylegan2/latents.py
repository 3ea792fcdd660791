"""Seeds -> latent codes, reproducible on every machine (numpy's Mersenne Twister, as stylegan2-ada's generate.py)."""

from __future__ import annotations

import numpy as np
import torch


def z_from_seed(seed: int, z_dim: int) -> torch.Tensor:
    """(1, z_dim) float32 standard-normal z: np.random.RandomState(seed).randn(1, z_dim)."""
    return torch.from_numpy(np.random.RandomState(int(seed)).randn(1, z_dim).astype(np.float32))


def z_from_seeds(seeds: list[int], z_dim: int) -> torch.Tensor:
    """(len(seeds), z_dim) float32, row i = z_from_seed(seeds[i])."""
    return torch.cat([z_from_seed(s, z_dim) for s in seeds])
