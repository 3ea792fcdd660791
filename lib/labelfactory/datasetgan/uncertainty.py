"""DatasetGAN's ensemble uncertainty: per-pixel Jensen-Shannon divergence and a per-image score."""

from __future__ import annotations

import math

import torch


def js_divergence(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, M, K, H, W) -> (B, H, W) in nats: entropy of the members' mean softmax minus their mean entropy.

    0 where all members agree; at most log(M) (or log K, whichever is smaller).
    """
    logp = torch.log_softmax(logits.float(), dim=2)
    p = logp.exp()
    mean_entropy = -(p * logp).sum(dim=2).mean(dim=1)
    pm = p.mean(dim=1)
    entropy_of_mean = -torch.special.xlogy(pm, pm).sum(dim=1)
    return (entropy_of_mean - mean_entropy).clamp_min_(0.0)


def image_score(js_map: torch.Tensor, top_fraction: float = 0.1) -> torch.Tensor:
    """js_map (B, H, W) -> (B,): mean of each image's top `top_fraction` most uncertain pixels."""
    flat = js_map.reshape(js_map.shape[0], -1)
    k = max(1, math.ceil(top_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)
