"""Image-mask pair data sets for the segmenters: synthetic pairs on disk, real labelled slices, and mixes.

Every item is {"image": (1, S, S) float32 in [-1, 1], "label": (1, S, S) int64, "contoured": (C,) bool}
(docs/DESIGN.md "Partial labels"): C counts background; index 0 is background (always True), index k
is label value k, True when that organ was contoured, so a 0 in "label" means background only where
the organ was contoured. Synthetic pairs are labelled whole (all True). Every data set also knows
each item's group (`groups[i]`): the patient (study id) of a real slice, the seed of a synthetic
pair. Splits are made over groups, never over items (see labelfactory.evaluation.splits).

Synthetic layout (written by labelfactory.datasetgan.synthesis): `<dir>/images/seed<NNNNNN>.nii.gz` and
`<dir>/labels/seed<NNNNNN>.nii.gz`, CT intensities in HU like any real image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from labelfactory.datasets.openkbp import body_boxes, crop
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Window, label_to_slices, read_image, read_label, volume_to_slices
from labelfactory.io.dataset import Study, find_studies, load_labelled_slices
from labelfactory.io.image import suffix_of
from labelfactory.io.slices import reorient
from labelfactory.labels import LABEL_NAMES, contoured_flags


class RealSlices(Dataset):
    """Labelled axial slices held in memory: images (N, 1, S, S), masks (N, S, S) (any integer type; items are
    int64), groups = study ids; `contoured` (N, C) or, for every slice alike, (C,) bool: which label values were
    contoured (None: all of `classes`, default 1 + the largest mask value)."""

    def __init__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        groups: Sequence[str],
        contoured: torch.Tensor | None = None,
        classes: int | None = None,
    ):
        if not (len(images) == len(masks) == len(groups)):
            raise ValueError("images, masks and groups differ in length")
        if contoured is None:
            n = classes if classes is not None else int(masks.max()) + 1 if len(masks) else 1
            contoured = torch.ones(n, dtype=torch.bool)
        contoured = torch.as_tensor(contoured, dtype=torch.bool)
        if contoured.ndim == 1:
            contoured = contoured.expand(len(images), -1)
        if contoured.shape[0] != len(images) or (classes is not None and contoured.shape[1] != classes):
            raise ValueError(f"contoured is {tuple(contoured.shape)}, expected ({len(images)}, {classes or 'C'})")
        if len(masks) and int(masks.max()) >= contoured.shape[1]:
            raise ValueError(f"masks hold value {int(masks.max())}, beyond the {contoured.shape[1]} classes")
        self.images, self.masks, self.groups, self.contoured = images, masks, list(groups), contoured

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.masks[i][None].long(), "contoured": self.contoured[i].clone()}


def case_slices_set(cases: Sequence) -> RealSlices:
    """OpenKBP `CaseSlices` (labelfactory.datasets.openkbp) -> one RealSlices: organ masks as uint8 (8x smaller than
    int64), groups = patient names, each slice flagged with its patient's contoured organs."""
    cases = [c for c in cases if len(c.images)]
    if not cases:
        raise LabelFactoryError("no OpenKBP slices to train on")
    return RealSlices(
        torch.cat([c.images for c in cases]),
        torch.cat([c.organs for c in cases]).to(torch.uint8),
        [c.case.name for c in cases for _ in range(len(c.images))],
        torch.cat([c.contoured.expand(len(c.images), -1) for c in cases]),
    )


class SyntheticPairs(Dataset):
    """Synthetic pairs read from disk on demand (thousands fit no memory at 256^2); groups = file stems."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        size: int,
        window: Window = Window(),
        label_names: dict[str, int] | None = None,
    ):
        self.pairs, self.size, self.window, self.label_names = list(pairs), size, window, label_names
        self.groups = [_stem(p) for p, _ in self.pairs]
        self.classes = max((label_names or LABEL_NAMES).values()) + 1  # the annotator labels every organ

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image_path, label_path = self.pairs[i]
        image = read_image(image_path)
        x, geom = volume_to_slices(image, self.size, self.window)
        y = label_to_slices(read_label(label_path, image, self.label_names), geom)
        if len(x) != 1:
            raise LabelFactoryError(f"{image_path.name}: a synthetic pair must be one 2D slice, found {len(x)}")
        return {"image": x[0], "label": y[:1], "contoured": torch.ones(self.classes, dtype=torch.bool)}


class PairSubset(Subset):
    """A subset that keeps its items' groups."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.groups = [dataset.groups[i] for i in self.indices]


class PairConcat(ConcatDataset):
    """Data sets one after another, groups too (a hybrid set: synthetic + real)."""

    def __init__(self, datasets: Sequence[Dataset]):
        super().__init__([d for d in datasets if len(d)])
        self.groups = [g for d in self.datasets for g in d.groups]


def synthetic_pairs(
    folder: str | os.PathLike, size: int = 256, window: Window = Window(), label_names: dict[str, int] | None = None
) -> SyntheticPairs:
    """The pairs in a synthetic data-set folder, sorted by seed; LabelFactoryError when there are none."""
    folder = Path(folder)
    images, labels = folder / "images", folder / "labels"
    if not images.is_dir():
        raise LabelFactoryError(
            f"{folder}: no images/ folder; synthesize a data set there first (labelfactory synthesize)"
        )
    pairs = []
    for p in sorted(images.iterdir()):
        if (
            not p.name.endswith(".nii.gz") or p.name.startswith(".") or not p.is_file()
        ):  # images/ may also hold PNG previews
            continue
        label = labels / p.name
        if not label.exists():
            raise LabelFactoryError(
                f"{folder}: image {p.name} has no labels/{p.name}; the data set is incomplete, synthesize it again"
            )
        pairs.append((p, label))
    if not pairs:
        raise LabelFactoryError(f"{folder}: no synthetic pairs in images/; synthesize a data set there first")
    return SyntheticPairs(pairs, size, window, label_names)


def real_slices(
    studies: Sequence[Study] | str | os.PathLike,
    size: int = 256,
    window: Window = Window(),
    label_names: dict[str, int] | None = None,
    foreground_only: bool = True,
    slicing: str = "resize",
) -> RealSlices:
    """Labelled slices of real studies (a folder or a list of Study); with `foreground_only`, slices showing at least
    one labelled structure. Each slice is flagged with its study's `contoured` organs (None: all). `slicing` as the
    segmenter's config: "resize" (whole slices resized to size) or "body-crop" (`body_crop_slices`)."""
    studies = find_studies(studies) if isinstance(studies, (str, os.PathLike)) else list(studies)
    names = label_names or LABEL_NAMES
    flags = {s.id: torch.from_numpy(contoured_flags(_listed(s.contoured), names)) for s in studies if s.label}
    load = body_crop_slices if slicing == "body-crop" else load_labelled_slices
    images, masks, ids = load(studies, size, window, label_names)
    if foreground_only:
        keep = (masks > 0).flatten(1).any(1)
        if not keep.any():
            raise LabelFactoryError("the labelled studies hold no labelled structure on any slice")
        images, masks, ids = images[keep], masks[keep], [g for g, k in zip(ids, keep.tolist(), strict=True) if k]
    return RealSlices(images, masks, ids, torch.stack([flags[g] for g in ids]))


def body_crop_slices(
    studies: Sequence[Study], size: int, window: Window, label_names: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Labelled CT studies -> size x size crops at native spacing around each LPS axial slice's body, as the
    body-crop segmenter sees them (`segmentation.infer`): images (N, 1, size, size) float32 in [-1, 1], masks
    (N, size, size) int64, each slice's study id."""
    xs, ys, ids = [], [], []
    for s in studies:
        if s.label is None:
            continue
        image = read_image(s.image)
        hu = reorient(image)[0].array.astype(np.float32)
        label = reorient(read_label(s.label, image, label_names))[0].array
        hu, label = (hu[None], label[None]) if hu.ndim == 2 else (hu, label)
        boxes = body_boxes(hu, size)
        xs.append(torch.from_numpy(np.ascontiguousarray(window.to_unit(crop(hu, boxes, fill=-1000.0))[:, None])))
        ys.append(torch.from_numpy(crop(label, boxes, fill=0).astype(np.int64)))
        ids += [s.id] * len(boxes)
    if not xs:
        raise LabelFactoryError("no labelled studies: save at least one label first")
    return torch.cat(xs), torch.cat(ys), ids


class UnlabelledSlices(Dataset):
    """Slices without labels, {"image": (1, S, S) float32 in [-1, 1]} items (a Mean Teacher's unlabelled data);
    groups = study ids."""

    def __init__(self, images: torch.Tensor, groups: Sequence[str]):
        self.images, self.groups = images, list(groups)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


def unlabelled_slices(
    studies: Sequence[Study], size: int = 256, window: Window = Window(), slicing: str = "resize"
) -> UnlabelledSlices:
    """Every slice of `studies` (their labels, if any, unread), cut as `slicing` says (as `real_slices`)."""
    xs, ids = [], []
    for s in studies:
        image = read_image(s.image)
        if slicing == "body-crop":
            hu = reorient(image)[0].array.astype(np.float32)
            hu = hu[None] if hu.ndim == 2 else hu
            x = torch.from_numpy(np.ascontiguousarray(window.to_unit(crop(hu, body_boxes(hu, size), fill=-1000.0))))
            x = x[:, None]
        else:
            x = volume_to_slices(image, size, window)[0]
        xs.append(x)
        ids += [s.id] * len(x)
    return UnlabelledSlices(torch.cat(xs) if xs else torch.zeros(0, 1, size, size), ids)


def unlabelled_record(unlabelled: UnlabelledSlices) -> dict[str, Any]:
    """What a model records of its Mean Teacher's unlabelled slices: their studies and slice count."""
    return {"unlabelled_studies": sorted(set(unlabelled.groups)), "unlabelled_slices": len(unlabelled)}


def _listed(names: Sequence[str] | None) -> list[str] | None:
    return None if names is None else list(names)


def evenly_spaced(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over range(n_items) (all of them when k >= n_items)."""
    if k >= n_items:
        return list(range(n_items))
    return np.linspace(0, n_items - 1, k).round().astype(int).tolist()


def hybrid(synthetic: Dataset, real: Dataset, k_real: int) -> PairConcat:
    """Synthetic pairs plus `k_real` real slices spread evenly over `real` (all when k_real >= len)."""
    return PairConcat([synthetic, PairSubset(real, evenly_spaced(len(real), k_real))])


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))]


def training_sets(
    studies: str | os.PathLike | Sequence[Study] | None,
    synthetic_dir: str | os.PathLike | None,
    k_real: int | None = None,
    val_patients: int = 1,
    size: int = 256,
    label_names: dict[str, int] | None = None,
    window: Window = Window(),
    slicing: str = "resize",
) -> tuple[Dataset, Dataset | None, Dataset | None, dict]:
    """(training set, real set or None, validation set or None, a description) for synthetic-only, real-only or
    hybrid training: `train_segmenter(train, val, config, real_set=real)`. The training set is the synthetic pairs
    when there are any (the real slices then come as the real set, pooled or shared per batch), else the real slices.

    `k_real`: real slices to train on (None: every training patient's, 0: none). Validation is the
    real labelled slices of patients not trained on: every patient when no real slice is trained on,
    else the last `val_patients` patients by id, kept out of training when at least one other remains.
    """
    synthetic = synthetic_pairs(synthetic_dir, size, window, label_names) if synthetic_dir else None
    has_labels = studies is not None and any(
        s.label for s in (find_studies(studies) if isinstance(studies, (str, os.PathLike)) else studies)
    )
    real = real_slices(studies, size, window, label_names, slicing=slicing) if has_labels else None
    if synthetic is None and (real is None or k_real == 0):
        raise LabelFactoryError(
            "nothing to train on: give a synthetic data set, "
            "or studies with labels (labels/final) and real slices to use"
        )
    if real is None:
        return (
            synthetic,
            None,
            None,
            {"synthetic": str(synthetic_dir), "synthetic_pairs": len(synthetic), "real_slices": 0},
        )
    patients = sorted(set(real.groups))
    if k_real == 0:
        held = patients
    else:
        held = patients[-val_patients:] if 0 < val_patients < len(patients) else []
    train_real = PairSubset(real, [i for i, g in enumerate(real.groups) if g not in held])
    val = PairSubset(real, [i for i, g in enumerate(real.groups) if g in held]) if held else None
    chosen = (
        PairSubset(train_real, evenly_spaced(len(train_real), len(train_real) if k_real is None else k_real))
        if k_real != 0
        else None
    )
    info = {
        "synthetic": str(synthetic_dir) if synthetic_dir else None,
        "synthetic_pairs": len(synthetic) if synthetic else 0,
        "real_slices": len(chosen) if chosen else 0,
        "real_patients": sorted(set(chosen.groups)) if chosen else [],
        "val_patients": sorted(held),
        "val_slices": len(val) if val else 0,
    }
    if synthetic is None:
        return chosen, None, val, info
    return synthetic, chosen, val, info
