"""OpenKBP head-and-neck CT (Babier et al., Med. Phys. 48:5549, 2021) as body-centred axial crops.

Layout (as converted from the challenge's CSV files): `volumes/<case>_ct.nii.gz` (int16 HU),
`<case>_label.nii.gz` (organs 1-7, `ORGANS`), `<case>_ptv.nii.gz` (1 PTV56, 2 PTV63, 3 PTV70) and
`cases.csv` (split, spacing, organs contoured). Volumes are LPS with identity direction: array
(z, y, x) with z superior, y posterior (row 0 anterior), x toward the patient's left.

The body fills only 30-60 of the 128 pixels across, so slices are cropped, not resized: a
`size` x `size` box at the native in-plane spacing, centred on the body (voxels above
`BODY_HU`) of that slice. `CropBox` records where, so a mask goes back onto the CT's grid.

OpenKBP's CT holds values only near the planned dose: the cranial slices through the brainstem and
the caudal ones through the spinal cord show 10-100 body pixels, the rest -1000. Every slice with
any body is therefore cropped (`min_body=1`); the former 200-pixel threshold skipped a quarter of
the brainstem and spinal-cord voxels (`crop_coverage`, benchmarks/results/openkbp_crop_coverage.json).
The GAN still learns from slices with >= MIN_BODY_PIXELS of body (mostly-air slices teach it little).

Contours are partial: a structure file missing from a patient means "not contoured", not "absent".
`CaseSlices.contoured` says which organs were (the partial-label contract of docs/DESIGN.md).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.io.windowing import Window

# value -> name, as the data set's README numbers them (names 3D Slicer's GenericAnatomyColors knows)
ORGANS: dict[int, str] = {
    1: "brainstem",
    2: "spinal cord",
    3: "right parotid gland",
    4: "left parotid gland",
    5: "esophagus",
    6: "larynx",
    7: "mandible",
}
# cases.csv spells the organs as the challenge's structure files do
CSV_ORGANS: dict[str, int] = {
    "Brainstem": 1,
    "SpinalCord": 2,
    "RightParotid": 3,
    "LeftParotid": 4,
    "Esophagus": 5,
    "Larynx": 6,
    "Mandible": 7,
}
PTV70 = 3
BODY_HU = -500.0  # air below, soft tissue and bone above
MIN_BODY_PIXELS = 200  # the GAN's slices hold at least this much body (about 30 cm^2 at 4 mm)
WINDOW = Window(level=50.0, width=800.0)  # [-350, 450] HU: fat, soft tissue and the organs apart; bone saturates


@dataclass(frozen=True)
class Case:
    """One patient: its files, split, in-plane spacing (mm) and the organ values that were contoured."""

    name: str
    split: str
    ct: Path
    label: Path
    ptv: Path
    spacing_mm: tuple[float, float, float]
    organs_present: tuple[int, ...]


@dataclass(frozen=True)
class CropBox:
    """Slice `z` cropped to rows [y0, y0 + size) and columns [x0, x0 + size); the box may extend past the edge."""

    z: int
    y0: int
    x0: int
    size: int


def read_cases(root: str | os.PathLike, split: str | None = None) -> list[Case]:
    """The cases of `root/cases.csv` (all, or one split), sorted by name."""
    root = Path(root)
    table = root / "cases.csv"
    if not table.is_file():
        raise LabelFactoryError(
            f"{root}: no cases.csv; expected the OpenKBP layout (see labelfactory.datasets.openkbp)"
        )
    cases = []
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            if split is not None and row["split"] != split:
                continue
            name = row["case"]
            organs = tuple(sorted(CSV_ORGANS[o] for o in row["organs_present"].split(";") if o))
            spacing = (float(row["spacing_x_mm"]), float(row["spacing_y_mm"]), float(row["spacing_z_mm"]))
            v = root / "volumes"
            cases.append(
                Case(
                    name,
                    row["split"],
                    v / f"{name}_ct.nii.gz",
                    v / f"{name}_label.nii.gz",
                    v / f"{name}_ptv.nii.gz",
                    spacing,
                    organs,
                )
            )
    if not cases:
        raise LabelFactoryError(f"{table}: no cases" + (f" in split {split!r}" if split else ""))
    return sorted(cases, key=lambda c: c.name)


def read_array(path: Path) -> np.ndarray:
    """A volume file -> its (z, y, x) array."""
    if not path.is_file():
        raise LabelFactoryError(f"{path}: no such file")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def body_boxes(ct_hu: np.ndarray, size: int, min_body: int = 1) -> list[CropBox]:
    """One box per slice of (z, y, x) HU holding >= `min_body` pixels of body (> BODY_HU), centred on that slice's
    body centroid."""
    boxes = []
    for z, body in enumerate(ct_hu > BODY_HU):
        ys, xs = np.nonzero(body)
        if len(ys) >= max(min_body, 1):
            boxes.append(CropBox(z, int(round(ys.mean())) - size // 2, int(round(xs.mean())) - size // 2, size))
    return boxes


def crop(volume: np.ndarray, boxes: list[CropBox], fill: float) -> np.ndarray:
    """(z, y, x) volume -> (len(boxes), size, size) crops, `fill` outside the volume."""
    if not boxes:
        return np.zeros((0, 0, 0), volume.dtype)
    s = boxes[0].size
    pad = np.pad(volume, ((0, 0), (s, s), (s, s)), constant_values=fill)
    return np.stack([pad[b.z, b.y0 + s : b.y0 + 2 * s, b.x0 + s : b.x0 + 2 * s] for b in boxes])


def crop_coverage(label: np.ndarray, boxes: list[CropBox], values: Iterable[int]) -> dict[int, tuple[int, int]]:
    """value -> (voxels of that value inside the boxes, voxels in all) of a (z, y, x) label map."""
    inside = np.zeros(label.shape, bool)
    for b in boxes:
        inside[b.z, max(b.y0, 0) : max(b.y0 + b.size, 0), max(b.x0, 0) : max(b.x0 + b.size, 0)] = True
    out = {}
    for v in values:
        organ = label == v
        out[int(v)] = (int(np.count_nonzero(organ & inside)), int(np.count_nonzero(organ)))
    return out


def paste(crops: np.ndarray, boxes: list[CropBox], shape: tuple[int, int, int], fill: int = 0) -> np.ndarray:
    """The inverse of `crop` for masks: (N, size, size) crops -> a (z, y, x) volume of `shape`, `fill` elsewhere."""
    s = boxes[0].size if boxes else 0
    out = np.full((shape[0], shape[1] + 2 * s, shape[2] + 2 * s), fill, crops.dtype)
    for c, b in zip(crops, boxes, strict=True):
        out[b.z, b.y0 + s : b.y0 + 2 * s, b.x0 + s : b.x0 + 2 * s] = c
    return out[:, s : s + shape[1], s : s + shape[2]]


def contoured_flags(case: Case) -> torch.Tensor:
    """(1 + len(ORGANS),) bool: index 0 background (always True), index k True when organ k was contoured."""
    flags = torch.zeros(1 + len(ORGANS), dtype=torch.bool)
    flags[0] = True
    flags[list(case.organs_present)] = True
    return flags


@dataclass
class CaseSlices:
    """The crops of one case: images (N, 1, size, size) float32 in [-1, 1], organs and PTV (N, size, size) int64;
    `contoured` (1 + len(ORGANS),) bool: which organ values were contoured (background always), as `organs` holds 0
    where an organ was not contoured."""

    case: Case
    boxes: list[CropBox]
    images: torch.Tensor
    organs: torch.Tensor
    ptv: torch.Tensor
    contoured: torch.Tensor


def load_case(case: Case, size: int = 64, window: Window = WINDOW, min_body: int = 1) -> CaseSlices:
    """Crop every slice of one case with >= `min_body` body pixels (CT, organ map, PTV map share the boxes)."""
    ct = read_array(case.ct).astype(np.float32)
    boxes = body_boxes(ct, size, min_body)
    images = window.to_unit(crop(ct, boxes, fill=-1000.0))[:, None]
    organs = crop(read_array(case.label), boxes, fill=0).astype(np.int64)
    ptv = crop(read_array(case.ptv), boxes, fill=0).astype(np.int64) if case.ptv.is_file() else np.zeros_like(organs)
    return CaseSlices(
        case,
        boxes,
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(organs),
        torch.from_numpy(ptv),
        contoured_flags(case),
    )


def load_slices(
    root: str | os.PathLike, split: str, size: int = 64, window: Window = WINDOW, min_body: int = 1
) -> list[CaseSlices]:
    """Every case of a split, cropped (slices with >= `min_body` body pixels)."""
    return [load_case(c, size, window, min_body) for c in read_cases(root, split)]
