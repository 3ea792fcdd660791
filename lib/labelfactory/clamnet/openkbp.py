"""OpenKBP head-and-neck CT as weak-segmentation tasks for ClamNet (see `labelfactory.datasets.openkbp`).

Image-level label of an axial slice: abnormal if it holds the task's target, normal otherwise; normal and abnormal
slices come from the same patients and scans. Targets (`TARGETS`): `ptv70`, the 70 Gy planning target volume (tumour
plus a margin, not a lesion outline); `parotid`, either parotid gland (the sanity task: a compact organ at a known
place; only patients with both parotids contoured, `has_target`); `ptv63`, the 63 Gy volume outside PTV70, present at
the oropharynx level in about half the patients (a label whose presence varies at a fixed level). Pixel truth, for
evaluation only: the target's mask. Organ crop (ClamNet section 3.2): the body (`labelfactory.clamnet.body`), the one
region segmentable on every patient here: the organ labels miss the target's tissue (PTV70 surrounds oropharynx,
larynx and neck nodes) and are not contoured in every patient. eta from the slice labels: `ramp_eta` over each
patient's z axis. Level (`WeakSlices.level`, for `ClamNetConfig.pairing = "level"`): mm above the brainstem's lowest
slice (the foramen magnum, where the spinal cord begins; `landmark_slice`), an anatomical landmark: the body's z
extent is not one here (OpenKBP's CT holds values only near the planned dose, so the extent follows the PTVs), and
the parotids' centres scatter 5 mm (median absolute deviation) about the landmark's level against 15 mm about the
same relative place in the body's extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labelfactory.clamnet.body import body_mask
from labelfactory.clamnet.crop import crop_mask, crop_slices, oriented_to_file_slice
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.image_labels import ramp_eta
from labelfactory.datasets.openkbp import PTV70, WINDOW, Case
from labelfactory.io import Image, read_image, read_label
from labelfactory.labels import OPENKBP

PAROTIDS = tuple(v for v, (name, _) in OPENKBP.organs.items() if "parotid" in name)  # right, left
PTV63 = 2  # in the PTV map; the higher dose wins, so PTV63 here is the 63 Gy volume outside PTV70
TARGETS = ("ptv70", "parotid", "ptv63")


@dataclass(frozen=True)
class WeakTask:
    """target: one of TARGETS; size: crop side (px); margin_mm: crop margin around the body; ramp_mm, eta_floor:
    see `ramp_eta`."""

    target: str = "ptv70"
    size: int = 64
    margin_mm: float = 5.0
    ramp_mm: float = 10.0
    eta_floor: float = 0.2


def has_target(case: Case, target: str) -> bool:
    """Whether the case's `target` was contoured (PTV70 always is; the parotids only where listed). `ptv63`: every
    patient, its absence a plan without a 63 Gy level (a prescription, not an organ left uncontoured)."""
    return target in ("ptv70", "ptv63") or all(v in case.organs_present for v in PAROTIDS)


def target_mask(case: Case, image: Image, target: str) -> Image:
    """The case's `target` as a uint8 mask on `image`'s grid."""
    if target in ("ptv70", "ptv63"):
        ptv = read_label(case.ptv, image)
        return ptv.with_array((ptv.array == (PTV70 if target == "ptv70" else PTV63)).astype(np.uint8))
    if target == "parotid":
        organs = read_label(case.label, image)
        return organs.with_array(np.isin(organs.array, PAROTIDS).astype(np.uint8))
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")


BRAINSTEM, SPINAL_CORD = 1, 2


def landmark_slice(case: Case) -> float:
    """File slice of the level's zero: the brainstem's lowest slice; without a brainstem contour, one above the spinal
    cord's highest; NaN with neither (its slices then match no other patient's)."""
    z = read_label(case.label).array
    per_slice = z.reshape(len(z), -1)
    brainstem = np.nonzero((per_slice == BRAINSTEM).any(1))[0]
    if len(brainstem):
        return float(brainstem.min())
    cord = np.nonzero((per_slice == SPINAL_CORD).any(1))[0]
    return float(cord.max() + 1) if len(cord) else float("nan")


def case_levels(case: Case, file_slice: torch.Tensor) -> torch.Tensor:
    """Each file slice's level: mm above `landmark_slice` (z grows superiorly in these volumes)."""
    return (file_slice.float() - landmark_slice(case)) * case.spacing_mm[2]


def load_case_slices(case: Case, task: WeakTask = WeakTask()) -> WeakSlices:
    """One patient -> body crops of every slice with body, the target's truth on the crops, labels and eta per
    slice."""
    image = read_image(case.ct)
    crops = crop_slices(image, body_mask(image), task.size, task.margin_mm, WINDOW)
    target = target_mask(case, image, task.target)
    file_slice = torch.from_numpy(oriented_to_file_slice(image))[crops.slices]
    abnormal_z = target.array.reshape(len(target.array), -1).any(1)  # (D,) along the file's slice axis
    eta_z = ramp_eta(abnormal_z, case.spacing_mm[2], task.ramp_mm, task.eta_floor)
    n = len(crops.x)
    return WeakSlices(
        x=crops.x,
        organ=crops.organ,
        truth=crop_mask(target, crops),
        has_truth=torch.ones(n, dtype=torch.bool),
        abnormal=torch.from_numpy(abnormal_z)[file_slice],
        eta=torch.from_numpy(eta_z)[file_slice],
        study=[case.name] * n,
        file_slice=file_slice,
        level=case_levels(case, file_slice),
    )


def load_weak_task(cases: list[Case], task: WeakTask = WeakTask()) -> WeakSlices:
    """Every case's slices, concatenated (study = case name); cases without the target contoured are left out."""
    return WeakSlices.concat([load_case_slices(c, task) for c in cases if has_target(c, task.target)])
