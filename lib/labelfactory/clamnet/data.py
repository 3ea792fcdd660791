"""Studies + image-level labels -> organ-cropped training slices (ClamNet's input).

Image-level labels: the CSV's rows, then rows from the datastore's image info
(`image_labels.rows_from_info`), which win over the CSV's for the same slice (a slice row still
wins over a whole-image row). The organ `body` is the CT's body mask (`labelfactory.clamnet.body`).
Any other organ mask comes from, in order: `<organ_dir>/<study id>/mask_<organ>.nii.gz` for each
organ dir given (the layout of `sample-data/datastore/reference`); the study's final label map
(voxels equal to the organ's value in `labelfactory.labels.LABEL_NAMES`). A study with neither is
left out of training with a warning: without an organ crop its slices would not look like the others.
A pixel truth (for evaluation only) is looked up the same way as `mask_<truth>.nii.gz`; slices
labelled normal have an all-zero truth by definition.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from labelfactory.clamnet.body import BODY, body_mask
from labelfactory.clamnet.crop import crop_mask, crop_slices, oriented_to_file_slice
from labelfactory.clamnet.image_labels import ImageLabel, read_image_labels, slice_labels
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, Window, read_image, read_label
from labelfactory.io.dataset import Study, find_studies
from labelfactory.labels import LABEL_NAMES

logger = logging.getLogger(__name__)


@dataclass
class WeakSlices:
    """N organ crops: x, organ, truth (N, 1, S, S); abnormal (N,) bool; eta (N,); has_truth (N,) bool;
    study (N,) ids; file_slice (N,) index in the study's file; level (N,) the slice's anatomical level in mm along
    the body axis, comparable across studies (`ClamNetConfig.pairing = "level"` matches slices of different studies
    by it; None: not known, `slice_levels` makes one)."""

    x: torch.Tensor
    organ: torch.Tensor
    truth: torch.Tensor
    has_truth: torch.Tensor
    abnormal: torch.Tensor
    eta: torch.Tensor
    study: list[str]
    file_slice: torch.Tensor
    level: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: torch.Tensor | np.ndarray) -> WeakSlices:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else [v[i] for i in idx.tolist()] if isinstance(v, list) else v[idx]
        return WeakSlices(**out)

    @staticmethod
    def concat(parts: list[WeakSlices]) -> WeakSlices:
        """The slices of `parts`, one after the other."""
        out = {}
        for f in fields(WeakSlices):
            vs = [getattr(p, f.name) for p in parts]
            if any(v is None for v in vs):
                out[f.name] = None  # a level known for only some parts is not comparable: none
            else:
                out[f.name] = [s for v in vs for s in v] if isinstance(vs[0], list) else torch.cat(vs)
        return WeakSlices(**out)


def slice_levels(slices: WeakSlices) -> torch.Tensor:
    """`slices.level`, or where it is None a fallback: each slice's place in its study's labelled slices, from 0 (the
    lowest file slice) to 100 (the highest), so studies covering the same body part line up roughly."""
    if slices.level is not None:
        return slices.level
    out = torch.zeros(len(slices))
    studies = np.array(slices.study)
    for s in dict.fromkeys(slices.study):
        rows = torch.from_numpy(np.nonzero(studies == s)[0])
        z = slices.file_slice[rows].float()
        out[rows] = 100 * (z - z.min()) / (z.max() - z.min()).clamp(min=1)
    return out


def find_mask(study: Study, name: str, organ_dirs: list[Path]) -> Path | None:
    """`<dir>/<study id>/mask_<name>.nii.gz` in the first organ dir that has it."""
    return next((p for d in organ_dirs if (p := Path(d) / study.id / f"mask_{name}.nii.gz").is_file()), None)


def organ_mask(study: Study, image: Image, organ: str, organ_dirs: list[Path]) -> Image | None:
    """The study's organ mask on its image grid, or None when no source has one."""
    if organ == BODY:
        mask = body_mask(image)
        return mask if mask.array.any() else None
    path = find_mask(study, organ, organ_dirs)
    if path is not None:
        return read_label(path, image)
    if study.label is not None and organ in LABEL_NAMES:
        label = read_label(study.label, image)
        mask = (label.array == LABEL_NAMES[organ]).astype(np.uint8)
        return label.with_array(mask) if mask.any() else None
    return None


def segmented_organ(
    model: str | os.PathLike, image: Image, organ: str, device: str | torch.device = "auto"
) -> Image | None:
    """The organ as the project's trained segmentation model sees it, run on `device` (None when it finds none)."""
    from labelfactory.segmentation.infer import load_segmenter, segment_image

    segmenter = load_segmenter(model, device)
    if organ not in segmenter.label_names:
        raise LabelFactoryError(
            f"the segmentation model at {model} does not segment '{organ}' (it knows {sorted(segmenter.label_names)})"
        )
    label = segment_image(segmenter, image)
    mask = (label.array == segmenter.label_names[organ]).astype(np.uint8)
    return label.with_array(mask) if mask.any() else None


def default_organ_dirs(studies: str | os.PathLike) -> list[Path]:
    """`<studies>/reference` and `<studies>/../reference`, where they exist (the sample data's layout)."""
    s = Path(studies)
    return [d for d in (s / "reference", s.parent / "reference") if d.is_dir()]


def default_labels_csv(studies: str | os.PathLike) -> Path:
    """`<studies>/image_labels.csv`, else `<studies>/../image_labels.csv` (the sample data's layout)."""
    s = Path(studies)
    return next(
        (p for p in (s / "image_labels.csv", s.parent / "image_labels.csv") if p.is_file()), s / "image_labels.csv"
    )


def load_weak_slices(
    studies: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    organ: str = "aorta",
    organ_dirs: list[Path] | None = None,
    truth: str | None = None,
    size: int = 256,
    margin_mm: float = 10.0,
    window: Window = Window(),
    default_eta: float = 0.5,
    info_rows: list[ImageLabel] | None = None,
) -> WeakSlices:
    """Every labelled slice of every study that has an organ mask, cropped to the organ.

    info_rows: labels from the datastore (after the CSV's, so they win); with some, a missing CSV is no error.
    """
    csv_path = Path(labels_csv or default_labels_csv(studies))
    rows = read_image_labels(csv_path) if csv_path.is_file() or not info_rows else []
    rows += info_rows or []
    organ_dirs = default_organ_dirs(studies) if organ_dirs is None else organ_dirs
    labelled = {r.image for r in rows}
    parts = []
    for study in find_studies(studies):
        if study.id not in labelled:
            continue
        image = read_image(study.image)
        mask = organ_mask(study, image, organ, organ_dirs)
        if mask is None:
            logger.warning(
                f"{study.id}: no {organ} mask (organ dirs {[str(d) for d in organ_dirs]} or a final label); "
                "left out of ClamNet's slices"
            )
            continue
        crops = crop_slices(image, mask, size, margin_mm, window)
        file_slice = torch.from_numpy(oriented_to_file_slice(image))[crops.slices]
        depth = 1 if image.ndim == 2 else image.array.shape[0]
        listed, abnormal, eta = (
            torch.from_numpy(a)[file_slice] for a in slice_labels(rows, study.id, depth, default_eta)
        )
        truth_path = find_mask(study, truth, organ_dirs) if truth else None
        if truth_path is not None:
            t, has = crop_mask(read_label(truth_path, image), crops), torch.ones(len(crops.x), dtype=torch.bool)
        else:
            t, has = torch.zeros_like(crops.organ), ~abnormal
        keep = torch.nonzero(listed).flatten()
        parts.append(
            WeakSlices(crops.x, crops.organ, t, has, abnormal, eta, [study.id] * len(crops.x), file_slice).subset(keep)
        )
    if not parts:
        raise LabelFactoryError(
            f"no labelled study in {studies} has a {organ} mask; add masks or label studies that have them"
        )
    return WeakSlices.concat(parts)
