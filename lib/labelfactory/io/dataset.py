"""Studies in a folder (a MONAI Label local datastore layout) -> stacks of 2D training slices.

Layout: images at the top (`*.nii.gz`, `*.nii`, `*.nrrd`, `*.png`), their labels at
`labels/final/<same name>`. A DICOM series is a sub-folder of DICOM files; other sub-folders
(e.g. `reference/` masks) are not studies. Which organs a final label contains is its info's
`contoured` list in the datastore index (`datastore_v2.json`), when the index has one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.io.image import PICTURE_SUFFIXES, VOLUME_SUFFIXES, read_image, read_label, suffix_of
from labelfactory.io.slices import label_to_slices, volume_to_slices
from labelfactory.io.windowing import Window
from labelfactory.jsonio import write_json_atomic
from labelfactory.labels import CONTOURED_KEY

INDEX = "datastore_v2.json"  # MONAI Label's local datastore index (labelfactory.tasks.datastore writes it)


@dataclass(frozen=True)
class Study:
    """One image (file or DICOM folder) and its final label, if any; `id` is the file name less its suffix.
    `contoured`: the organ names the label contains (its datastore info's `contoured`); None: every organ."""

    id: str
    image: Path
    label: Path | None
    contoured: tuple[str, ...] | None = None


def write_datalist(studies: list[Study], path: str | os.PathLike) -> Path:
    """Write `studies` as a JSON datalist ({"studies": [{id, image, label, contoured}]}, absolute paths)."""
    rows = [
        {**asdict(s), "image": str(s.image.resolve()), "label": s.label and str(s.label.resolve())} for s in studies
    ]
    return write_json_atomic({"studies": rows}, path)


def read_datalist(path: str | os.PathLike) -> list[Study]:
    """The studies of a JSON datalist (write_datalist), in its order."""
    try:
        rows = json.loads(Path(path).read_text())["studies"]
        return [
            Study(r["id"], Path(r["image"]), r["label"] and Path(r["label"]), r["contoured"] and tuple(r["contoured"]))
            for r in rows
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabelFactoryError(f"{path}: not a datalist of studies ({type(e).__name__}: {e})") from None


def find_studies(folder: str | os.PathLike) -> list[Study]:
    """Every image in `folder`, sorted by id, with `labels/final/<name>` attached where it exists; a `.json` file
    instead of a folder is a datalist (write_datalist: what the server hands a multi_gpu training)."""
    if str(folder).endswith(".json"):
        return read_datalist(folder)
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelFactoryError(f"{folder}: no such folder of studies")
    out = []
    contoured = indexed_contoured(folder)
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name == "labels":
            continue
        if p.is_file() and suffix_of(p) in VOLUME_SUFFIXES + PICTURE_SUFFIXES:
            s = study_of(p)
            out.append(replace(s, contoured=contoured.get(s.id)) if s.label else s)
        elif p.is_dir() and _holds_dicom(p):
            out.append(Study(p.name, p, None))
    return out


def study_of(image: Path) -> Study:
    """The study an image file or DICOM folder is, with its `labels/final/<id>.*` label if one exists."""
    sid = image.name[: -len(suffix_of(image))] if image.is_file() else image.name
    labels = image.parent / "labels" / "final"
    label = (
        next((q for q in labels.glob(sid + ".*") if q.name[: -len(suffix_of(q))] == sid), None)
        if labels.is_dir()
        else None
    )
    return Study(sid, image, label)


def indexed_contoured(folder: Path) -> dict[str, tuple[str, ...]]:
    """image id -> the `contoured` organ names of its final label's info in the folder's datastore index (ids whose
    label says nothing are left out); {} without an index."""
    index = folder / INDEX
    if not index.is_file():
        return {}
    try:
        objects = json.loads(index.read_text()).get("objects") or {}
    except (ValueError, AttributeError) as e:
        raise LabelFactoryError(f"{index}: not a datastore index ({e}); fix or delete it") from None
    out = {}
    for image_id, obj in objects.items():
        names = ((((obj or {}).get("labels") or {}).get("final") or {}).get("info") or {}).get(CONTOURED_KEY)
        if names is None:
            continue
        if not isinstance(names, list):
            raise LabelFactoryError(f"{index}: label of {image_id}: '{CONTOURED_KEY}' must be a list of organ names")
        out[image_id] = tuple(names)
    return out


def _holds_dicom(folder: Path) -> bool:
    """True if the folder's first file is DICOM (the 'DICM' marker at byte 128)."""
    first = next((f for f in sorted(folder.iterdir()) if f.is_file()), None)
    if first is None:
        return False
    with open(first, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def load_slices(images: list[Path], size: int = 256, window: Window = Window()) -> torch.Tensor:
    """All axial slices of `images`, stacked: (N, 1, size, size) float32 in [-1, 1]."""
    if not images:
        raise LabelFactoryError("no images to take slices from")
    return torch.cat([volume_to_slices(read_image(p), size, window)[0] for p in images])


def load_labelled_slices(
    studies: list[Study], size: int = 256, window: Window = Window(), label_names: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Labelled studies -> images (N, 1, size, size) float32, masks (N, size, size) int64, and each slice's study id."""
    xs, ys, ids = [], [], []
    for s in studies:
        if s.label is None:
            continue
        image = read_image(s.image)
        x, geom = volume_to_slices(image, size, window)
        y = label_to_slices(read_label(s.label, image, label_names), geom)
        xs.append(x)
        ys.append(y)
        ids += [s.id] * len(x)
    if not xs:
        raise LabelFactoryError("no labelled studies: save at least one label first")
    return torch.cat(xs), torch.cat(ys), ids
