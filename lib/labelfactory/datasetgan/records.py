"""Annotated generated images as the interpreter trains on them: a latent w plus a label mask.

Nothing else is kept: features are regenerated from w. Records come from a MONAI Label
datastore (images whose info holds a latent record, `labelfactory.latent_record`, with a final
label) or from a folder of masks named seed<N>.nii.gz (seed + truncation psi give w). Mask pixels
equal to the config's `ignore_index` (255) are unlabelled: training never draws them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labelfactory.datasetgan.taps import ws_from_seeds
from labelfactory.errors import LabelFactoryError
from labelfactory.latent_record import PROVENANCE_SUFFIX, is_generated, latent_from_info

SEED_NAME = re.compile(r"^seed(\d+)(\.nii\.gz|\.nii|\.seg\.nrrd|\.nrrd)$")


@dataclass
class LatentRecord:
    """One annotated generated image: w (w_dim,), mask (R, R) integer class map, where it came from."""

    w: torch.Tensor
    mask: np.ndarray
    name: str
    seed: int | None = None
    truncation_psi: float | None = None


def check_mask(mask: np.ndarray, resolution: int, num_classes: int, ignore_index: int | None, what: str) -> np.ndarray:
    """Validate a label mask against the generator's image size and the class count; returns int64 (R, R)."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != (resolution, resolution):
        raise LabelFactoryError(
            f"{what}: label shape {mask.shape} differs from its image's ({resolution}, {resolution}); "
            "draw the label on the generated image it belongs to"
        )
    values = set(np.unique(mask).tolist()) - ({ignore_index} if ignore_index is not None else set())
    unknown = sorted(v for v in values if not 0 <= v < num_classes)
    if unknown:
        raise LabelFactoryError(
            f"{what}: label holds values {unknown[:10]} outside the label map (0..{num_classes - 1}"
            + (f", ignore {ignore_index}" if ignore_index is not None else "")
            + "); relabel those pixels"
        )
    return mask.astype(np.int64)


def records_from_datastore(datastore, label_tag: str = "final") -> list[tuple[str, dict, str]]:
    """(image id, latent record, label path) for every generated image with a label of `label_tag`."""
    out = []
    for image_id in sorted(datastore.get_labeled_images(label_tag)):
        info = datastore.get_image_info(image_id)
        if not is_generated(info):
            continue
        label = datastore.get_label_by_image_id(image_id, label_tag)
        if label:
            out.append((image_id, latent_from_info(info, image_id), datastore.get_label_uri(label, label_tag)))
    return out


def load_records(
    G, items: list[tuple[str, dict, str]], num_classes: int, ignore_index: int | None
) -> list[LatentRecord]:
    """(name, latent record, label path) -> validated LatentRecords with w as the generator sees it."""
    from labelfactory.io import read_label

    records = []
    for name, latent, label_path in items:
        w = torch.tensor(latent["w"], dtype=torch.float32)
        if w.numel() != G.w_dim:
            raise LabelFactoryError(
                f"{name}: its recorded w has {w.numel()} values, the generator takes {G.w_dim}; "
                "it was made by another generator"
            )
        mask = check_mask(read_label(label_path).array, G.img_resolution, num_classes, ignore_index, name)
        records.append(LatentRecord(w, mask, name, latent.get("seed"), latent.get("truncation_psi")))
    return records


def records_from_seed_masks(
    G, folder: str | os.PathLike, truncation_psi: float, num_classes: int, ignore_index: int | None
) -> list[LatentRecord]:
    """Masks named seed<N>.nii.gz (or .seg.nrrd) in `folder`; w = mapping(z(seed)) truncated by psi."""
    from labelfactory.io import read_label
    from labelfactory.labels import LABEL_NAMES

    folder = Path(folder)
    by_seed: dict[int, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: (p.name.endswith(".seg.nrrd"), p.name)) if folder.is_dir() else []:
        m = SEED_NAME.match(p.name)
        if m:
            by_seed.setdefault(int(m.group(1)), p)  # one mask per seed; NIfTI before .seg.nrrd
    files = [by_seed[s] for s in sorted(by_seed)]
    if not files:
        raise LabelFactoryError(f"{folder}: no masks named seed<N>.nii.gz here; annotate generated images first")
    records = []
    for p in files:
        seed = int(SEED_NAME.match(p.name).group(1))
        w = ws_from_seeds(G, [seed], truncation_psi)[0, 0].cpu()
        label = read_label(p, label_names=LABEL_NAMES if p.name.endswith(".seg.nrrd") else None)
        records.append(
            LatentRecord(
                w,
                check_mask(label.array, G.img_resolution, num_classes, ignore_index, p.name),
                p.name,
                seed,
                truncation_psi,
            )
        )
    return records


def records_from_datastore_folder(folder: str | os.PathLike, label_tag: str = "final") -> list[tuple[str, dict, str]]:
    """Like `records_from_datastore`, read from a datastore folder on disk with no server: every generated image's
    provenance sidecar (`<id>.labelfactory.json`, the record the server itself trusts) with its `labels/<tag>` file."""
    import json

    from labelfactory.io.image import suffix_of

    folder = Path(folder)
    if not folder.is_dir():
        raise LabelFactoryError(f"{folder}: no such datastore folder")
    labels = folder / "labels" / label_tag
    out = []
    for sidecar in sorted(folder.glob(f"*{PROVENANCE_SUFFIX}")):
        image_id = sidecar.name[: -len(PROVENANCE_SUFFIX)]
        label = next(
            (p for p in sorted(labels.glob(f"{image_id}.*")) if p.name[: -len(suffix_of(p))] == image_id), None
        )
        if label is not None:
            out.append((image_id, latent_from_info(json.loads(sidecar.read_text()), image_id), str(label)))
    return out
