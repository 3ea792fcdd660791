"""What an abnormal slice's target is (`ClamNetConfig.target`); the paper leaves it open.

- `self`: the top `marker_fraction` of its organ pixels by the network's own stop-gradient marker probability
  (`loss.label_targets`). Nothing ties these pixels to the abnormality: on OpenKBP the pair marks the brightest
  bone (docs/RESULTS.md section 6).
- `cam`: a class-activation seed. A slice classifier (`clamnet.cam`, the same image-level labels, `steps` of its
  own) is trained first; its class activation map (CAM) is each slice's evidence.
- `difference`: each abnormal slice minus the mean of its own study's `NEIGHBOURS` nearest normal slices
  (`pairs.near_normals`; organ crops of neighbouring slices are roughly registered), absolute value.
For `cam` and `difference` the target is the top `marker_fraction` of the organ pixels by evidence, fixed for the
whole training (the seed); ClamNet's pairs refine it: SAME pairs make the two networks agree under blur and
stretch, NORMAL and NEGATIVE pairs push whatever looks normal to 0.
"""

from __future__ import annotations

import torch

from labelfactory.clamnet.cam import CamConfig, class_activation_maps, train_classifier
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.pairs import near_normals

TARGETS = ("self", "cam", "difference")
NEIGHBOURS = 4  # normal slices of the same study a `difference` target is taken against


def cam_evidence(slices: WeakSlices, config: CamConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """CAM of a classifier trained on `slices`' labels -> (N, 1, S, S) in [0, 1], 0 outside the organ."""
    classifier = train_classifier(slices, config, device)[0]
    return class_activation_maps(classifier, slices.x, slices.organ)[:, None]


def difference_evidence(slices: WeakSlices, k: int = NEIGHBOURS) -> torch.Tensor:
    """|x - mean of the k nearest normal slices of the same study| on abnormal slices -> (N, 1, S, S), image units
    (crops in [-1, 1], so in [0, 2]); 0 on normal slices, outside the organ and on studies without a normal slice."""
    out = torch.zeros_like(slices.x)
    for i, normal in near_normals(slices.abnormal, slices.study, slices.file_slice, k).items():
        out[i] = (slices.x[i] - slices.x[normal].mean(0)).abs()
    return out * slices.organ


def evidence(
    slices: WeakSlices, target: str, cam: CamConfig, device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """The evidence map (N, 1, S, S) behind `target`'s seed; None for `self` (the network's own map)."""
    if target == "self":
        return None
    if target == "cam":
        return cam_evidence(slices, cam, device)
    if target == "difference":
        return difference_evidence(slices)
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
