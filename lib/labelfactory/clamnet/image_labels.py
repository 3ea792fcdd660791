"""Image-level labels: a CSV saying which slices are normal and which abnormal.

Columns (header required): `image,slice,label,eta`
- image: the study id (its file name less the suffix, as in the datastore);
- slice: 0-based index along the image file's slice axis (array axis 0), or empty for every slice
  of the image (and for 2D images); a row with a slice overrides the image's empty-slice row;
- label: `normal` or `abnormal`;
- eta: optional, the probability in (0, 1] that an abnormal slice's organ holds the marker (the
  loss weight); empty means the training default.
The same rows can live in a datastore image's info (`rows_from_info`); `ramp_eta` derives eta from slice labels.
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
INFO_KEY = "image_labels"  # in a datastore image's info (or its final label's): rows like the CSV's


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
        raise LabelFactoryError(
            f"{path}: no image-level labels file; write one (columns {','.join(COLUMNS)}), "
            "see sample-data/README.md (image-level labels), or set image_labels in the datastore's image info"
        )
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames[:3]] != list(COLUMNS[:3]):
            raise LabelFactoryError(
                f"{path.name}: the header must be {','.join(COLUMNS)} (eta optional), got {reader.fieldnames}"
            )
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
        raise LabelFactoryError(
            f"{where}: slice must be a whole number and eta a number, got '{sl}', '{eta}'"
        ) from None
    if index is not None and index < 0:
        raise LabelFactoryError(f"{where}: slice must be >= 0, got {index}")
    if weight is not None and not (0.0 < weight <= 1.0 and math.isfinite(weight)):
        raise LabelFactoryError(f"{where}: eta must lie in (0, 1], got {weight}")
    return ImageLabel(image, index, LABELS[label], weight)


def slice_labels(
    rows: list[ImageLabel], image: str, depth: int, default_eta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def rows_from_info(image: str, info: dict, where: str) -> list[ImageLabel]:
    """The `image_labels` entry of a datastore image's info (or its final label's info) -> rows of `image`.

    Shape: {"image_labels": [{"label": "abnormal", "slice": 12, "eta": 0.7}, {"label": "normal"}, ...]},
    each entry a CSV row without its image column (no slice: every slice). No entry: no rows.
    """
    entries = info.get(INFO_KEY)
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LabelFactoryError(
            f"{where}: '{INFO_KEY}' must be a list of {{label, slice, eta}} objects, got {entries!r}"
        )
    text = {k: "" for k in COLUMNS}
    return [
        _parse(text | {k: "" if v is None else str(v) for k, v in e.items()} | {"image": image}, f"{where} entry {i}")
        for i, e in enumerate(entries)
    ]


def ramp_eta(abnormal: np.ndarray, spacing_mm: float, ramp_mm: float, floor: float) -> np.ndarray:
    """eta per slice from slice labels alone: (D,) bool along z, slice spacing (mm) -> (D,) float32.

    Abnormal slices: eta = clip(d / ramp_mm, floor, 1), d the distance in mm from the slice's
    centre to the nearest end of its run of abnormal slices (half a slice beyond the last one).
    A target's cross-section shrinks towards its cranio-caudal ends, so there the share of the
    organ holding the marker is smallest and the slice weighs less. Normal slices: 1 (unused).
    """
    d = np.zeros(len(abnormal))
    run = 0
    for k, a in enumerate(abnormal):  # slices to the run's start, then to its end
        run = run + 1 if a else 0
        d[k] = run
    run = 0
    for k in range(len(abnormal) - 1, -1, -1):
        run = run + 1 if abnormal[k] else 0
        d[k] = min(d[k], run)
    eta = np.clip((d - 0.5) * spacing_mm / ramp_mm, floor, 1.0) if ramp_mm > 0 else np.ones(len(abnormal))
    return np.where(abnormal, eta, 1.0).astype(np.float32)
