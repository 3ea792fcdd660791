"""What an abnormal slice's target is (`ClamNetConfig.target`); the paper leaves it open.

- `self`: the top `marker_fraction` of its organ pixels by the network's own stop-gradient marker probability
  (`loss.label_targets`). Nothing ties these pixels to the abnormality: on OpenKBP the pair marks the brightest
  bone (docs/RESULTS.md section 6).
- `cam`: a class-activation seed. A slice classifier (`clamnet.cam`, the same image-level labels, `steps` of its
  own) is trained first; its class activation map (CAM) is each slice's evidence.
- `difference`: each abnormal slice minus the mean of its own study's `NEIGHBOURS` nearest normal slices
  (`pairs.near_normals`; organ crops of neighbouring slices are roughly registered), absolute value. With
  `ClamNetConfig.pairing = "level"`: minus the mean of the `NEIGHBOURS` most similar normal slices of OTHER studies
  at the same level, each aligned to it (`pairs.level_normals`): where presence varies between patients at a fixed
  level, the shared anatomy cancels and what only the abnormal patient has remains.
For `cam` and `difference` the target is the top `marker_fraction` of the organ pixels by evidence, fixed for the
whole training (the seed); ClamNet's pairs refine it: SAME pairs make the two networks agree under blur and
stretch, NORMAL and NEGATIVE pairs push whatever looks normal to 0.
"""

from __future__ import annotations

import torch

from labelfactory.clamnet.cam import CamConfig, class_activation_maps, train_classifier
from labelfactory.clamnet.data import WeakSlices, slice_levels
from labelfactory.clamnet.pairs import LEVEL_WINDOW, PAIRINGS, aligned_mean, level_normals, near_normals

TARGETS = ("self", "cam", "difference")
NEIGHBOURS = 4  # normal slices of the same study a `difference` target is taken against


def cam_evidence(slices: WeakSlices, config: CamConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """CAM of a classifier trained on `slices`' labels -> (N, 1, S, S) in [0, 1], 0 outside the organ."""
    classifier = train_classifier(slices, config, device)[0]
    return class_activation_maps(classifier, slices.x, slices.organ)[:, None]


def difference_evidence(
    slices: WeakSlices, k: int = NEIGHBOURS, pairing: str = "patient", window: float = LEVEL_WINDOW
) -> torch.Tensor:
    """|x - mean of k normal slices| on abnormal slices -> (N, 1, S, S), image units (crops in [-1, 1], so in
    [0, 2]); 0 on normal slices, outside the organ and where no normal slice matches. pairing `patient`: the k
    nearest normal slices of the same study; `level`: the k most similar normal slices of other studies within
    `window` of its level (`slice_levels`), aligned (`pairs.level_normals`)."""
    out = torch.zeros_like(slices.x)
    if pairing == "patient":
        for i, normal in near_normals(slices.abnormal, slices.study, slices.file_slice, k).items():
            out[i] = (slices.x[i] - slices.x[normal].mean(0)).abs()
    elif pairing == "level":
        query = torch.nonzero(slices.abnormal).flatten()
        matches = level_normals(
            query, slices.abnormal, slices.study, slice_levels(slices), slices.x, slices.organ, k, window
        )
        for i, m in matches.items():
            out[i] = (slices.x[i] - aligned_mean(slices.x, m)).abs()
    else:
        raise ValueError(f"unknown pairing {pairing!r}; choose from {PAIRINGS}")
    return out * slices.organ


def evidence(
    slices: WeakSlices,
    target: str,
    cam: CamConfig,
    device: str | torch.device = "cpu",
    pairing: str = "patient",
    window: float = LEVEL_WINDOW,
) -> torch.Tensor | None:
    """The evidence map (N, 1, S, S) behind `target`'s seed; None for `self` (the network's own map). `pairing` and
    `window` choose the normal slices a `difference` is taken against."""
    if target == "self":
        return None
    if target == "cam":
        return cam_evidence(slices, cam, device)
    if target == "difference":
        return difference_evidence(slices, pairing=pairing, window=window)
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
