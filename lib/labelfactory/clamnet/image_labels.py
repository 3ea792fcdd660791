"""Image-level labels: a CSV saying which slices are normal and which abnormal.

Columns (header required): `image,slice,label,eta`
- image: the study id (its file name less the suffix, as in the datastore);
- slice: 0-based index along the image file's slice axis (array axis 0), or empty for every slice
  of the image (and for 2D images); a row with a slice overrides the image's empty-slice row;
- label: `normal` or `abnormal`;
- eta: optional, the probability in (0, 1] that an abnormal slice's organ holds the marker (the
  loss weight); empty means the training default.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelfactory.errors import LabelFactoryError

COLUMNS = ("image", "slice", "label", "eta")
LABELS = {"normal": False, "abnormal": True}


@dataclass(frozen=True)
class ImageLabel:
    image: str
    slice: int | None
    abnormal: bool
    eta: float | None


def read_image_labels(path: str | os.PathLike) -> list[ImageLabel]:
    """Parse and validate the CSV; LabelFactoryError naming the line for any bad row."""
    path = Path(path)
    if not path.is_file():
        raise LabelFactoryError(f"{path}: no image-level labels file; write one (columns {','.join(COLUMNS)}), see sample-data/README.md (image-level labels)")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames[:3]] != list(COLUMNS[:3]):
            raise LabelFactoryError(f"{path.name}: the header must be {','.join(COLUMNS)} (eta optional), got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            rows.append(_parse(row, f"{path.name} line {line}"))
    if not rows:
        raise LabelFactoryError(f"{path.name}: holds no labels")
    return rows


def _parse(row: dict[str, str], where: str) -> ImageLabel:
    image = (row.get("image") or "").strip()
    label = (row.get("label") or "").strip().lower()
    sl, eta = (row.get("slice") or "").strip(), (row.get("eta") or "").strip()
    if not image:
        raise LabelFactoryError(f"{where}: empty image id")
    if label not in LABELS:
        raise LabelFactoryError(f"{where}: label must be 'normal' or 'abnormal', got '{label}'")
    try:
        index = int(sl) if sl else None
        weight = float(eta) if eta else None
    except ValueError:
        raise LabelFactoryError(f"{where}: slice must be a whole number and eta a number, got '{sl}', '{eta}'") from None
    if index is not None and index < 0:
        raise LabelFactoryError(f"{where}: slice must be >= 0, got {index}")
    if weight is not None and not (0.0 < weight <= 1.0 and math.isfinite(weight)):
        raise LabelFactoryError(f"{where}: eta must lie in (0, 1], got {weight}")
    return ImageLabel(image, index, LABELS[label], weight)


def slice_labels(rows: list[ImageLabel], image: str, depth: int, default_eta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per file slice of `image` (depth slices): listed (D,) bool, abnormal (D,) bool, eta (D,) float."""
    listed, abnormal, eta = np.zeros(depth, bool), np.zeros(depth, bool), np.full(depth, default_eta, dtype=np.float32)
    mine = [r for r in rows if r.image == image]
    for r in sorted(mine, key=lambda r: r.slice is not None):  # whole-image rows first, slice rows override
        if r.slice is not None and r.slice >= depth:
            raise LabelFactoryError(f"image-level labels: {image} has {depth} slices, a row names slice {r.slice}")
        sel = slice(None) if r.slice is None else r.slice
        listed[sel], abnormal[sel] = True, r.abnormal
        eta[sel] = default_eta if r.eta is None else r.eta
    return listed, abnormal, eta
