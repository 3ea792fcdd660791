"""Frechet Inception Distance with pytorch-fid's Inception (the TF FID network), offline.

The weights file `pt_inception-2015-12-05-6726825d.pth` cannot be downloaded here: it is taken
from a configured path (argument or $LABELFACTORY_FID_WEIGHTS) or the torch hub cache, where
`python -m labelfactory.evaluation.fid_weights` puts it. Without it, `FIDEvaluator.create`
returns None after one log line and callers skip FID.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from unittest import mock

import numpy as np
import torch

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def fid_weights_cache_path() -> Path:
    """Where pytorch-fid itself would look: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def find_fid_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The configured weights file if it exists, else the torch-cache one if it exists, else None."""
    for candidate in (path, os.environ.get("LABELFACTORY_FID_WEIGHTS"), fid_weights_cache_path()):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def load_inception(weights: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool3 output) with its weights read from `weights`, never the network."""
    from pytorch_fid import inception

    def _local(*_args, **_kwargs):  # stands in for load_state_dict_from_url(url, ...)
        return torch.load(weights, map_location="cpu", weights_only=True)

    with mock.patch.object(inception, "load_state_dict_from_url", _local):
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """(N, 1 or 3, H, W) images in [-1, 1] -> (N, 2048) float64 pool3 features (grey repeated to RGB)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float()
        x = ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1) if x.shape[1] == 1 else (x.clamp(-1, 1) + 1) / 2
        out.append(model(x)[0].flatten(1).double().cpu().numpy())
    return np.concatenate(out)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets: |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)).

    With S_a = A^T A and S_b = B^T B (centred features / sqrt(N - 1)), tr(sqrt(S_a S_b)) is the sum of
    the singular values of A B^T: exact, and seconds instead of the minutes scipy's sqrtm of a
    2048 x 2048 matrix (pytorch-fid's way) takes on a CPU.
    """
    a = (features_a - features_a.mean(0)) / np.sqrt(max(len(features_a) - 1, 1))
    b = (features_b - features_b.mean(0)) / np.sqrt(max(len(features_b) - 1, 1))
    diff = features_a.mean(0) - features_b.mean(0)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.square(a).sum() + np.square(b).sum() - 2 * cross)


class FIDEvaluator:
    """FID of a generator against fixed real images; the real features are computed once."""

    def __init__(self, model: torch.nn.Module, real_images: torch.Tensor, num_images: int):
        self.model, self.num_images = model, num_images
        # evenly spaced over the set, so the reference covers every patient, not the first few in file order
        pick = torch.linspace(0, len(real_images) - 1, min(num_images, len(real_images))).round().long()
        self.real_features = inception_features(model, real_images[pick])

    @classmethod
    def create(
        cls,
        real_images: torch.Tensor,
        num_images: int,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> FIDEvaluator | None:
        found = find_fid_weights(weights)
        if found is None:
            logger.warning(
                "FID skipped: no Inception weights at %s "
                "(run `python -m labelfactory.evaluation.fid_weights` or set LABELFACTORY_FID_WEIGHTS)",
                weights or fid_weights_cache_path(),
            )
            return None
        return cls(load_inception(found, device), real_images, num_images)

    @torch.no_grad()
    def __call__(self, G: torch.nn.Module, seed: int = 123, batch_size: int = 16, truncation_psi: float = 1.0) -> float:
        """FID of `num_images` images of G (noise 'const', at `truncation_psi`) from a fixed seed against the reals."""
        device = next(G.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        fakes = []
        for i in range(0, self.num_images, batch_size):
            z = torch.randn(min(batch_size, self.num_images - i), G.z_dim, generator=gen).to(device)
            fakes.append(G(z, truncation_psi=truncation_psi, noise_mode="const").float().cpu())
        return frechet_distance(self.real_features, inception_features(self.model, torch.cat(fakes)))
